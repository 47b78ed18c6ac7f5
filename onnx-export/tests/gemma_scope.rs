//! Gemma Scope checkpoints — `params.npz` JumpReLU SAEs (residual, embedding, transcoder, a
//! repository folder of several) and Gemma Scope 2 `params.safetensors` SAEs and transcoders with
//! and without the affine skip connection — written here in the repositories' own folder layout,
//! imported with the CLI, run through the runtime and compared with a float64 implementation of
//! Google's `JumpReLUSAE` (the Gemma Scope tutorials): `relu(pre) · [pre > threshold]`, `f W_dec +
//! b_dec`, `+ x @ affine_skip_connection`. Normwise relative error under 1e-5.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{
    BadCheckpoint, Rng, Tensors, assert_bad_checkpoints, import_ok, m2, stored, v1,
    write_safetensors,
};
use ndarray::{Array2, ArrayD};
use ndarray_npy::NpzWriter;
use safetensors::Dtype;
use serde_json::json;
use tiller_runtime::{Dictionary, InputNorm, Kind, SessionOptions};
use tiller_test_support::rel_err;

const TOL: f64 = 1e-5;

/// Random Gemma Scope weights under the names `names` gives them (`W_enc` or `w_enc`).
fn tensors(rng: &mut Rng, d_in: usize, d_sae: usize, d_out: usize, lower: bool) -> Tensors {
    let w = |n: &str| {
        if lower {
            n.to_lowercase()
        } else {
            n.to_string()
        }
    };
    let mut t = Tensors::new();
    t.insert(w("W_enc"), rng.normal(&[d_in, d_sae], 0.3));
    t.insert(w("W_dec"), rng.normal(&[d_sae, d_out], 0.3));
    t.insert("b_enc".into(), rng.normal(&[d_sae], 0.1));
    t.insert("b_dec".into(), rng.normal(&[d_out], 0.2));
    // Some thresholds below zero: Google's `relu(pre) · [pre > t]` then still zeroes negatives.
    t.insert("threshold".into(), rng.uniform(&[d_sae], -0.2, 0.6));
    t
}

/// Writes `params.npz` as `np.savez` does (float32 arrays). Returns the stored tensors.
fn write_npz(dir: &Path, t: &Tensors) -> Tensors {
    std::fs::create_dir_all(dir).unwrap();
    let f = std::fs::File::create(dir.join("params.npz")).unwrap();
    let mut npz = NpzWriter::new(f);
    for (k, v) in t {
        npz.add_array(k.as_str(), &v.mapv(|x| x as f32)).unwrap();
    }
    npz.finish().unwrap();
    t.iter()
        .map(|(k, v)| (k.clone(), stored(v, Dtype::F32)))
        .collect()
}

/// Writes Gemma Scope 2's `params.safetensors` (and `config.json` when given).
fn write_v2(dir: &Path, t: &Tensors, cfg: Option<serde_json::Value>) -> Tensors {
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("params.safetensors"), t, Dtype::F32);
    if let Some(c) = cfg {
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    }
    t.iter()
        .map(|(k, v)| (k.clone(), stored(v, Dtype::F32)))
        .collect()
}

fn get<'a>(t: &'a Tensors, name: &str) -> &'a ArrayD<f64> {
    t.get(name).or_else(|| t.get(&name.to_lowercase())).unwrap()
}

/// Google's `JumpReLUSAE.encode`/`decode`/`forward` in float64, on inputs `x` (already in the
/// space the SAE was trained on).
fn reference(t: &Tensors, x: &Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    let w_enc: Array2<f64> = get(t, "W_enc").clone().into_dimensionality().unwrap();
    let w_dec: Array2<f64> = get(t, "W_dec").clone().into_dimensionality().unwrap();
    let pre = x.dot(&w_enc) + v1(t, "b_enc");
    let th = v1(t, "threshold");
    let mut acts = pre.clone();
    for mut row in acts.rows_mut() {
        for (v, t) in row.iter_mut().zip(&th) {
            *v = if *v > *t { v.max(0.0) } else { 0.0 };
        }
    }
    let mut recon = acts.dot(&w_dec) + v1(t, "b_dec");
    if t.contains_key("affine_skip_connection") {
        recon += &x.dot(&m2(t, "affine_skip_connection"));
    }
    (acts, recon)
}

/// The format every import of this file names.
const FORMAT: &str = "gemma-scope";

/// Loads `dict`, runs it on random inputs, compares with the reference (inputs scaled by
/// `input_scale` into the SAE's own space, outputs scaled back); returns the dictionary.
fn check(name: &str, dict: &Path, t: &Tensors, input_scale: f64, seed: u64) -> Dictionary {
    let dict = Dictionary::load(dict, &SessionOptions::default()).unwrap();
    assert_eq!(dict.meta().source, "gemma-scope");
    let mut rng = Rng::new(seed);
    let x = rng.matrix(21, dict.meta().d_in, 1.0 / input_scale) + (0.1 / input_scale) as f32;
    let (ref_acts, mut ref_recon) = reference(t, &(x.mapv(f64::from) * input_scale));
    ref_recon /= input_scale;
    let enc = dict.encode(x.view()).unwrap();
    let (_, recon) = dict.encode_decode(x.view()).unwrap();
    let (ea, er) = (rel_err(&enc.acts, &ref_acts), rel_err(&recon, &ref_recon));
    assert!(ea < TOL, "{name}: acts relative error {ea:e}");
    assert!(er < TOL, "{name}: reconstruction relative error {er:e}");
    let active = ref_acts.iter().filter(|v| **v > 0.0).count();
    assert!(
        active > 0 && active < ref_acts.len(),
        "{name}: degenerate fixture"
    );
    println!("{name}: acts {ea:.2e} recon {er:.2e}");
    dict
}

#[test]
fn gemma_scope_npz() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.onnx");
    let (d, d_sae) = (32, 80);

    // A residual-stream SAE in its repository's layout.
    let ckpt = dir
        .path()
        .join("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_41");
    let t = write_npz(&ckpt, &tensors(&mut Rng::new(1), d, d_sae, d, false));
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check("gemma scope res", &out, &t, 1.0, 2);
    let m = dict.meta();
    assert_eq!((m.kind, m.input_norm), (Kind::Sae, InputNorm::None));
    assert_eq!(m.hook_in, "blocks.12.hook_resid_post");
    assert_eq!(m.model, "gemma-2-2b");

    // The file itself, named directly, in a folder whose name says nothing.
    let bare = dir.path().join("somewhere");
    let t = write_npz(&bare, &tensors(&mut Rng::new(3), d, d_sae, d, false));
    import_ok(FORMAT, &bare.join("params.npz"), &out, None);
    let dict = check("gemma scope npz file", &out, &t, 1.0, 4);
    assert_eq!(dict.meta().hook_in, "");

    // An embedding SAE, trained before Gemma's sqrt(d_model) scaling, read at hook_embed.
    let ckpt = dir
        .path()
        .join("gemma-scope-9b-it-res/embedding/width_4k/average_l0_6");
    let t = write_npz(&ckpt, &tensors(&mut Rng::new(5), d, d_sae, d, false));
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check(
        "gemma scope embedding",
        &out,
        &t,
        1.0 / (d as f64).sqrt(),
        6,
    );
    assert_eq!(dict.meta().hook_in, "hook_embed");
    assert_eq!(dict.meta().model, "gemma-2-9b-it");

    // A transcoder: reads the MLP's normalised input, writes its output.
    let ckpt = dir
        .path()
        .join("gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_54");
    let t = write_npz(&ckpt, &tensors(&mut Rng::new(7), d, d_sae, d, false));
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check("gemma scope transcoder", &out, &t, 1.0, 8);
    let m = dict.meta();
    assert_eq!(m.kind, Kind::Transcoder);
    assert_eq!(m.hook_in, "blocks.3.ln2.hook_normalized");
    assert_eq!(m.hook_out, "blocks.3.hook_mlp_out");
}

#[test]
fn gemma_scope_repository_folder() {
    let dir = tempfile::tempdir().unwrap();
    // The Hugging Face cache's name for the repository.
    let repo = dir
        .path()
        .join("models--google--gemma-scope-2b-pt-mlp/snapshots/0127b340");
    let mut written: Vec<(String, Tensors)> = Vec::new();
    for (i, sub) in [
        "layer_2/width_16k/average_l0_20",
        "layer_10/width_16k/average_l0_33",
        "layer_10/width_65k/average_l0_31",
    ]
    .iter()
    .enumerate()
    {
        let t = write_npz(
            &repo.join(sub),
            &tensors(&mut Rng::new(20 + i as u64), 24, 48, 24, false),
        );
        written.push((sub.to_string(), t));
    }
    assert!(tiller_export::gemma_scope::detect(&repo));
    assert!(tiller_export::gemma_scope::detect(
        &repo.join("layer_2/width_16k/average_l0_20/params.npz")
    ));
    assert!(!tiller_export::sparsify::detect(&repo));
    assert!(!tiller_export::llama_scope::detect(&repo));
    let one = dir.path().join("one.onnx");
    import_ok(
        FORMAT,
        &repo,
        &one,
        Some("layer_10/width_16k/average_l0_33"),
    );
    let dict = check("repository, one", &one, &written[1].1, 1.0, 30);
    assert_eq!(dict.meta().hook_in, "blocks.10.hook_mlp_out");

    let all = dir.path().join("all.onnx");
    import_ok(FORMAT, &repo, &all, None);
    for (i, (sub, t)) in written.iter().enumerate() {
        let p: PathBuf = dir
            .path()
            .join(format!("all.{}.onnx", sub.replace('/', "_")));
        assert!(p.is_file(), "{} missing", p.display());
        check(
            &format!("repository, all: {sub}"),
            &p,
            t,
            1.0,
            31 + i as u64,
        );
    }
}

#[test]
fn gemma_scope_2_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.onnx");
    let repo = dir.path().join("gemma-scope-2-1b-pt");
    let (d, d_sae) = (32, 80);

    // A residual SAE with its config.json.
    let ckpt = repo.join("resid_post/layer_10_width_16k_l0_small");
    let t = write_v2(
        &ckpt,
        &tensors(&mut Rng::new(40), d, d_sae, d, true),
        Some(
            json!({"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
                    "hf_hook_point_in": "model.layers.10.output", "width": 16384, "l0": "small"}),
        ),
    );
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check("gemma scope 2 resid_post", &out, &t, 1.0, 41);
    let m = dict.meta();
    assert_eq!(m.kind, Kind::Sae);
    assert_eq!(m.hook_in, "blocks.10.hook_resid_post");
    assert_eq!(m.model, "google/gemma-3-1b-pt");

    // An attention-output SAE without config.json: the repository's name gives the model.
    let ckpt = repo.join("attn_out_all/layer_11_width_16k_l0_medium");
    let t = write_v2(&ckpt, &tensors(&mut Rng::new(42), d, d_sae, d, true), None);
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check("gemma scope 2 attn_out", &out, &t, 1.0, 43);
    assert_eq!(dict.meta().hook_in, "blocks.11.attn.hook_z");
    assert_eq!(dict.meta().model, "google/gemma-3-1b-pt");

    // A transcoder without the skip connection.
    let ckpt = repo.join("transcoder/layer_5_width_16k_l0_big");
    let t = write_v2(&ckpt, &tensors(&mut Rng::new(44), d, d_sae, d, true), None);
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check("gemma scope 2 transcoder", &out, &t, 1.0, 45);
    let m = dict.meta();
    assert_eq!(m.kind, Kind::Transcoder);
    assert_eq!(m.hook_in, "blocks.5.hook_mlp_in");
    assert_eq!(m.hook_out, "blocks.5.hook_mlp_out");

    // An affine transcoder: `+ x @ affine_skip_connection`, `[d_in, d_out]`.
    let ckpt = repo.join("transcoder_all/layer_5_width_16k_l0_big_affine");
    let mut rng = Rng::new(46);
    let mut t = tensors(&mut rng, d, d_sae, d, true);
    t.insert("affine_skip_connection".into(), rng.normal(&[d, d], 0.2));
    let t = write_v2(
        &ckpt,
        &t,
        Some(
            json!({"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
                    "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
                    "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output",
                    "affine_connection": true}),
        ),
    );
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check("gemma scope 2 affine transcoder", &out, &t, 1.0, 47);
    assert_eq!(dict.meta().kind, Kind::SkipTranscoder);
}

const BAD_D: usize = 16;
const BAD_D_SAE: usize = 40;

const BAD_CHECKPOINTS: [BadCheckpoint; 5] = [
    BadCheckpoint {
        what: "arrays of an integer dtype",
        folder: "gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_9",
        write: |ckpt| {
            std::fs::create_dir_all(ckpt).unwrap();
            let t = tensors(&mut Rng::new(50), BAD_D, BAD_D_SAE, BAD_D, false);
            let mut npz = NpzWriter::new(std::fs::File::create(ckpt.join("params.npz")).unwrap());
            for (k, v) in &t {
                npz.add_array(k.as_str(), &v.mapv(|x| (x * 100.0) as i32))
                    .unwrap();
            }
            npz.finish().unwrap();
        },
        names: &["params.npz", "array `", "<i4"],
    },
    BadCheckpoint {
        what: "a missing array",
        folder: "gemma-scope-2b-pt-res/layer_2/width_16k/average_l0_9",
        write: |ckpt| {
            let mut t = tensors(&mut Rng::new(51), BAD_D, BAD_D_SAE, BAD_D, false);
            t.remove("threshold");
            write_npz(ckpt, &t);
        },
        names: &["params.npz", "`threshold` is missing"],
    },
    BadCheckpoint {
        what: "a bias that disagrees with the encoder's width",
        folder: "gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_9",
        write: |ckpt| {
            let mut rng = Rng::new(52);
            let mut t = tensors(&mut rng, BAD_D, BAD_D_SAE, BAD_D, false);
            t.insert("b_enc".into(), rng.normal(&[BAD_D_SAE + 1], 0.1));
            write_npz(ckpt, &t);
        },
        names: &["params.npz", "`b_enc` has shape [41]"],
    },
    BadCheckpoint {
        what: "config.json promises the affine skip connection, the file has none",
        folder: "gemma-scope-2-1b-pt/transcoder_all/layer_5_width_16k_l0_big_affine",
        write: |ckpt| {
            write_v2(
                ckpt,
                &tensors(&mut Rng::new(53), BAD_D, BAD_D_SAE, BAD_D, true),
                Some(json!({"architecture": "jump_relu", "affine_connection": true})),
            );
        },
        names: &["params.safetensors", "affine_skip_connection"],
    },
    BadCheckpoint {
        what: "not a zip archive at all",
        folder: "broken",
        write: |ckpt| {
            std::fs::create_dir_all(ckpt).unwrap();
            std::fs::write(ckpt.join("params.npz"), b"not a zip").unwrap();
        },
        names: &["params.npz", ".npz"],
    },
];

#[test]
fn bad_checkpoints_name_the_file() {
    assert_bad_checkpoints(FORMAT, &BAD_CHECKPOINTS);
}
