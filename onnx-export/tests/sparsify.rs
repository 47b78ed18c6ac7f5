//! EleutherAI sparsify checkpoints — TopK SAEs, transcoders, skip transcoders, the first releases'
//! `W_enc` layout, and training runs with one folder per hookpoint — written here with the layout
//! `SparseCoder.save_to_disk` gives them, imported with the CLI and run through the runtime, and
//! compared with a float64 implementation of sparsify's own maths (`sparsify/sparse_coder.py`
//! `encode`/`decode`/`forward`, `sparsify/fused_encoder.py`): normwise relative error under 1e-5,
//! TopK indices identical.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{
    BadCheckpoint, Rng, Tensors, assert_bad_checkpoints, assert_topk_indices, import_ok, m2,
    run_import, stored, v1, write_safetensors,
};
use ndarray::Array2;
use safetensors::Dtype;
use serde_json::json;
use tiller_runtime::{Dictionary, Kind, SessionOptions};
use tiller_test_support::rel_err;

const TOL: f64 = 1e-5;

/// Writes a hookpoint folder as `SparseCoder.save_to_disk` does: `sae.safetensors` and `cfg.json`
/// (the coder's config plus `d_in`). Returns the tensors as stored.
fn write_hookpoint(dir: &Path, cfg: &serde_json::Value, t: &Tensors, dtype: Dtype) -> Tensors {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    write_safetensors(&dir.join("sae.safetensors"), t, dtype);
    t.iter()
        .map(|(k, v)| (k.clone(), stored(v, dtype)))
        .collect()
}

/// A current config (`SparseCoderConfig.to_dict()` + `d_in`).
fn cfg(d_in: usize, latents: usize, k: usize, transcode: bool, skip: bool) -> serde_json::Value {
    json!({"activation": "topk", "expansion_factor": 32, "normalize_decoder": true,
           "num_latents": latents, "k": k, "multi_topk": false, "skip_connection": skip,
           "transcode": transcode, "d_in": d_in})
}

/// Random weights in the current layout (`encoder.weight` `[latents, d_in]`).
fn tensors(rng: &mut Rng, d_in: usize, latents: usize, d_out: usize, skip: bool) -> Tensors {
    let mut t = Tensors::new();
    t.insert("encoder.weight".into(), rng.normal(&[latents, d_in], 0.3));
    t.insert("encoder.bias".into(), rng.normal(&[latents], 0.1));
    t.insert("W_dec".into(), rng.normal(&[latents, d_out], 0.3));
    t.insert("b_dec".into(), rng.normal(&[d_out], 0.2));
    if skip {
        t.insert("W_skip".into(), rng.normal(&[d_out, d_in], 0.2));
    }
    t
}

/// sparsify's maths in float64: `encode` (b_dec subtracted unless transcoding; the k largest of
/// `relu(pre)`), `decode`, and `forward`'s skip term on the raw input.
fn reference(
    t: &Tensors,
    k: usize,
    transcode: bool,
    x: &Array2<f32>,
) -> (Array2<f64>, Array2<f64>) {
    let x = x.mapv(f64::from);
    let b_dec = v1(t, "b_dec");
    let x_in = if transcode { x.clone() } else { &x - &b_dec };
    let pre = if t.contains_key("encoder.weight") {
        x_in.dot(&m2(t, "encoder.weight").t()) + v1(t, "encoder.bias")
    } else {
        x_in.dot(&m2(t, "W_enc")) + v1(t, "b_enc")
    };
    let relu = pre.mapv(|v| v.max(0.0));
    let mut acts = Array2::zeros(relu.raw_dim());
    for (i, row) in relu.rows().into_iter().enumerate() {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &j in &idx[..k] {
            acts[[i, j]] = row[j];
        }
    }
    let mut y = acts.dot(&m2(t, "W_dec")) + &b_dec;
    if let Some(ws) = t.get("W_skip") {
        let ws: Array2<f64> = ws.clone().into_dimensionality().unwrap();
        y += &x.dot(&ws.t());
    }
    (acts, y)
}

/// The format every import of this file names.
const FORMAT: &str = "sparsify";

/// Runs `dict` on random inputs and compares it with the reference; returns the two errors.
fn check(name: &str, dict: &Path, t: &Tensors, k: usize, transcode: bool, seed: u64) -> (f64, f64) {
    let dict = Dictionary::load(dict, &SessionOptions::default()).unwrap();
    assert_eq!(dict.meta().source, "sparsify");
    assert_eq!(dict.meta().k, Some(k));
    let mut rng = Rng::new(seed);
    let x = rng.matrix(23, dict.meta().d_in, 1.0) + 0.2;
    let (ref_acts, ref_recon) = reference(t, k, transcode, &x);
    let enc = dict.encode(x.view()).unwrap();
    let (_, recon) = dict.encode_decode(x.view()).unwrap();
    let (ea, er) = (rel_err(&enc.acts, &ref_acts), rel_err(&recon, &ref_recon));
    assert!(ea < TOL, "{name}: acts relative error {ea:e}");
    assert!(er < TOL, "{name}: reconstruction relative error {er:e}");
    let (_, idx) = enc.top.unwrap();
    assert_topk_indices(name, &ref_acts, &enc.acts, &idx, true);
    println!("{name}: acts {ea:.2e} recon {er:.2e}");
    (ea, er)
}

struct Case {
    name: &'static str,
    transcode: bool,
    skip: bool,
    dtype: Dtype,
}

#[test]
fn sparse_coders() {
    let cases = [
        Case {
            name: "topk SAE",
            transcode: false,
            skip: false,
            dtype: Dtype::F32,
        },
        Case {
            name: "topk SAE, bf16 weights",
            transcode: false,
            skip: false,
            dtype: Dtype::BF16,
        },
        Case {
            name: "transcoder",
            transcode: true,
            skip: false,
            dtype: Dtype::F32,
        },
        Case {
            name: "SAE with a skip connection",
            transcode: false,
            skip: true,
            dtype: Dtype::F32,
        },
        Case {
            name: "skip transcoder",
            transcode: true,
            skip: true,
            dtype: Dtype::F32,
        },
    ];
    let (d_in, latents, k) = (24, 96, 7);
    for (i, c) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("layers.3.mlp");
        let mut rng = Rng::new(100 + i as u64);
        let t = write_hookpoint(
            &ckpt,
            &cfg(d_in, latents, k, c.transcode, c.skip),
            &tensors(&mut rng, d_in, latents, d_in, c.skip),
            c.dtype,
        );
        let out = dir.path().join("d.onnx");
        import_ok(FORMAT, &ckpt, &out, None);
        check(c.name, &out, &t, k, c.transcode, 200 + i as u64);
        let meta = Dictionary::load(&out, &SessionOptions::default())
            .unwrap()
            .meta()
            .clone();
        let kind = match (c.transcode, c.skip) {
            (false, false) => Kind::Sae,
            (true, false) => Kind::Transcoder,
            (_, true) => Kind::SkipTranscoder,
        };
        assert_eq!(meta.kind, kind, "{}", c.name);
        assert_eq!(meta.hook_in, "layers.3.mlp");
        assert_eq!(meta.hook_out, "layers.3.mlp");
    }
}

/// The first releases (June 2024): `W_enc` `[d_in, d_sae]` and `b_enc`, a config of
/// `expansion_factor`, `normalize_decoder`, `k` and `d_in` only.
#[test]
fn first_release_layout() {
    let (d_in, k) = (20, 5);
    let latents = d_in * 4;
    let mut rng = Rng::new(7);
    let mut t = Tensors::new();
    t.insert("W_enc".into(), rng.normal(&[d_in, latents], 0.3));
    t.insert("b_enc".into(), rng.normal(&[latents], 0.1));
    t.insert("W_dec".into(), rng.normal(&[latents, d_in], 0.3));
    t.insert("b_dec".into(), rng.normal(&[d_in], 0.2));
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("layer_6.pt");
    let t = write_hookpoint(
        &ckpt,
        &json!({"expansion_factor": 4, "normalize_decoder": true, "k": k, "d_in": d_in}),
        &t,
        Dtype::F32,
    );
    let out = dir.path().join("d.onnx");
    import_ok(FORMAT, &ckpt, &out, None);
    check("first-release W_enc layout", &out, &t, k, false, 8);
}

/// A training run: `config.json` naming the model, and one folder per hookpoint.
fn write_run(root: &Path) -> Vec<(String, Tensors)> {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(
        root.join("config.json"),
        json!({"sae": {"k": 4}, "batch_size": 8, "hookpoints": ["layers.0", "layers.2", "layers.10"],
               "model": "EleutherAI/pythia-70m", "dataset": "EleutherAI/SmolLM2-135M-10B"})
        .to_string(),
    )
    .unwrap();
    ["layers.0", "layers.2", "layers.10"]
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut rng = Rng::new(300 + i as u64);
            let t = write_hookpoint(
                &root.join(h),
                &cfg(16, 48, 4, false, false),
                &tensors(&mut rng, 16, 48, 16, false),
                Dtype::F32,
            );
            (h.to_string(), t)
        })
        .collect()
}

#[test]
fn multi_hookpoint_run_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("run");
    let hooks = write_run(&root);
    let out = dir.path().join("one.onnx");
    import_ok(FORMAT, &root, &out, Some("layers.10"));
    assert!(
        out.is_file(),
        "one hookpoint is written to the -o path itself"
    );
    check("run, --hookpoint layers.10", &out, &hooks[2].1, 4, false, 9);
    let d = Dictionary::load(&out, &SessionOptions::default()).unwrap();
    assert_eq!(d.meta().hook_in, "layers.10");
    assert_eq!(d.meta().model, "EleutherAI/pythia-70m");

    let err = String::from_utf8_lossy(&run_import(FORMAT, &root, &out, Some("layers.7")).stderr)
        .to_string();
    assert!(
        err.contains("layers.7") && err.contains("layers.0, layers.2, layers.10"),
        "{err}"
    );
}

#[test]
fn multi_hookpoint_run_all() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("run");
    let hooks = write_run(&root);
    assert!(tiller_export::sparsify::detect(&root));
    assert!(tiller_export::sparsify::detect(&root.join("layers.2")));
    assert!(!tiller_export::gemma_scope::detect(&root));
    assert!(!tiller_export::llama_scope::detect(&root));
    let out = dir.path().join("all.onnx");
    import_ok(FORMAT, &root, &out, None);
    for (i, (h, t)) in hooks.iter().enumerate() {
        let p: PathBuf = dir.path().join(format!("all.{h}.onnx"));
        assert!(p.is_file(), "{} missing", p.display());
        check(&format!("run, all: {h}"), &p, t, 4, false, 10 + i as u64);
        let d = Dictionary::load(&p, &SessionOptions::default()).unwrap();
        assert_eq!(d.meta().hook_in, *h);
        assert_eq!(d.meta().model, "EleutherAI/pythia-70m");
    }
}

const BAD_CHECKPOINTS: [BadCheckpoint; 5] = [
    BadCheckpoint {
        what: "a missing tensor",
        folder: "missing",
        write: |ckpt| {
            let mut t = tensors(&mut Rng::new(11), 16, 48, 16, false);
            t.remove("W_dec");
            write_hookpoint(ckpt, &cfg(16, 48, 4, false, false), &t, Dtype::F32);
        },
        names: &["sae.safetensors", "`W_dec` is missing"],
    },
    BadCheckpoint {
        what: "the config says 64 latents, the encoder has 48",
        folder: "shape",
        write: |ckpt| {
            write_hookpoint(
                ckpt,
                &cfg(16, 64, 4, false, false),
                &tensors(&mut Rng::new(12), 16, 48, 16, false),
                Dtype::F32,
            );
        },
        names: &["sae.safetensors", "`encoder.weight` has shape [48, 16]"],
    },
    BadCheckpoint {
        what: "a skip connection the file lacks",
        folder: "skip",
        write: |ckpt| {
            write_hookpoint(
                ckpt,
                &cfg(16, 48, 4, true, true),
                &tensors(&mut Rng::new(13), 16, 48, 16, false),
                Dtype::F32,
            );
        },
        names: &["sae.safetensors", "`W_skip` is missing"],
    },
    BadCheckpoint {
        what: "an activation Tiller cannot represent",
        folder: "groupmax",
        write: |ckpt| {
            let mut c = cfg(16, 48, 4, false, false);
            c["activation"] = json!("groupmax");
            let t = tensors(&mut Rng::new(14), 16, 48, 16, false);
            write_hookpoint(ckpt, &c, &t, Dtype::F32);
        },
        names: &["cfg.json", "groupmax"],
    },
    BadCheckpoint {
        what: "k larger than the number of latents",
        folder: "k",
        write: |ckpt| {
            write_hookpoint(
                ckpt,
                &cfg(16, 48, 64, false, false),
                &tensors(&mut Rng::new(15), 16, 48, 16, false),
                Dtype::F32,
            );
        },
        names: &["cfg.json", "`k` = 64"],
    },
];

#[test]
fn bad_checkpoints_name_the_file() {
    assert_bad_checkpoints(FORMAT, &BAD_CHECKPOINTS);
}

/// Several seeds per hookpoint (`layers.1/seed0`, `layers.1/seed1`): each is a dictionary of its
/// own, named by its path, reading the hookpoint's module.
#[test]
fn multi_seed_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("run");
    let mut written = Vec::new();
    for s in 0..2u64 {
        let t = write_hookpoint(
            &root.join(format!("layers.1/seed{s}")),
            &cfg(16, 48, 4, false, false),
            &tensors(&mut Rng::new(400 + s), 16, 48, 16, false),
            Dtype::F32,
        );
        written.push(t);
    }
    let out = dir.path().join("s.onnx");
    import_ok(FORMAT, &root, &out, None);
    for (s, t) in written.iter().enumerate() {
        let p = dir.path().join(format!("s.layers.1_seed{s}.onnx"));
        check(&format!("seed {s}"), &p, t, 4, false, 500 + s as u64);
        let d = Dictionary::load(&p, &SessionOptions::default()).unwrap();
        assert_eq!(d.meta().hook_in, "layers.1");
    }
}
