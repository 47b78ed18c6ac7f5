//! Llama Scope checkpoints — `hyperparams.json`, `lm_config.json` and
//! `checkpoints/final.safetensors`, as the October 2024 `lm_saes` saved and released them — imported
//! with the CLI, run through the runtime and compared with a float64 implementation of what
//! `lm_saes`' own loader does with them (`tests/common/llama_scope.rs`, written from
//! `SparseAutoEncoder.from_config`, `standardize_parameters_of_dataset_activation_scaling`,
//! `transform_to_unit_decoder_norm`, `encode`, `decode`, in `src/lm_saes/sae.py`). Tiller's activations are `lm_saes`' times the
//! input scale `s_in` (the units SAELens reports); the reconstruction is compared as it is. Where
//! the decoder columns have unit norm the result is also compared with SAELens'
//! `llama_scope_sae_huggingface_loader` + `fold_activation_norm_scaling_factor`. Normwise relative
//! error under 1e-5, TopK indices identical.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::llama_scope::{D, hyperparams, lm_saes, s_in, tensors, write_checkpoint};
use common::{
    BadCheckpoint, Rng, Tensors, assert_bad_checkpoints, assert_topk_indices, import_ok, m2, v1,
};
use ndarray::Array2;
use safetensors::Dtype;
use serde_json::{Value, json};
use tiller_runtime::{Dictionary, InputNorm, Kind, SessionOptions};
use tiller_test_support::rel_err;

const TOL: f64 = 1e-5;

/// SAELens' reading of the same checkpoint: `W_enc = encoder.weightᵀ · s`, `W_dec =
/// decoder.weightᵀ / s`, `b_dec = decoder.bias / s`, `threshold = jump_relu_threshold · s`, and
/// JumpReLU as `relu(pre) · [pre > threshold]`.
fn saelens(h: &Value, t: &Tensors, x: &Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    let s = s_in(h);
    let w_enc = m2(t, "encoder.weight").t().to_owned() * s;
    let w_dec = m2(t, "decoder.weight").t().to_owned() / s;
    let b_dec = v1(t, "decoder.bias") / s;
    let th = h["jump_relu_threshold"].as_f64().unwrap() * s;
    let pre = x.dot(&w_enc) + v1(t, "encoder.bias");
    let acts = pre.mapv(|v| if v > th { v.max(0.0) } else { 0.0 });
    let recon = acts.dot(&w_dec) + b_dec;
    (acts, recon)
}

/// The format every import of this file names.
const FORMAT: &str = "llama-scope";

/// Random inputs of about the dataset's average norm.
fn inputs(h: &Value, seed: u64) -> Array2<f32> {
    let avg = h["dataset_average_activation_norm"]["in"]
        .as_f64()
        .unwrap_or(2.5);
    Rng::new(seed).matrix(25, D, avg / (D as f64).sqrt()) + 0.05
}

/// Compares the dictionary at `dict` with `lm_saes` (and with SAELens when `with_saelens`).
fn check(
    name: &str,
    dict: &Path,
    h: &Value,
    t: &Tensors,
    with_saelens: bool,
    seed: u64,
) -> Dictionary {
    let dict = Dictionary::load(dict, &SessionOptions::default()).unwrap();
    assert_eq!(dict.meta().source, "llama-scope");
    let x = inputs(h, seed);
    let x64 = x.mapv(f64::from);
    let (acts, recon) = lm_saes(h, t, &x64);
    let acts = acts * s_in(h);
    let enc = dict.encode(x.view()).unwrap();
    let (_, got_recon) = dict.encode_decode(x.view()).unwrap();
    let (ea, er) = (rel_err(&enc.acts, &acts), rel_err(&got_recon, &recon));
    assert!(
        ea < TOL,
        "{name}: acts relative error {ea:e} against lm_saes"
    );
    assert!(
        er < TOL,
        "{name}: reconstruction relative error {er:e} against lm_saes"
    );
    let active = acts.iter().filter(|v| **v > 0.0).count();
    assert!(
        active > 0 && active < acts.len(),
        "{name}: degenerate fixture ({active} active)"
    );
    if let Some((_, idx)) = &enc.top {
        assert_topk_indices(name, &acts, &enc.acts, idx, false);
    }
    print!("{name}: acts {ea:.2e} recon {er:.2e} (lm_saes)");
    if with_saelens {
        let (sa, sr) = saelens(h, t, &x64);
        let (ea, er) = (rel_err(&enc.acts, &sa), rel_err(&got_recon, &sr));
        assert!(
            ea < TOL,
            "{name}: acts relative error {ea:e} against SAELens"
        );
        assert!(
            er < TOL,
            "{name}: reconstruction relative error {er:e} against SAELens"
        );
        print!(", acts {ea:.2e} recon {er:.2e} (SAELens)");
    }
    println!();
    dict
}

#[test]
fn released_jumprelu_sae() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.onnx");

    // As released: bf16 weights, decoder norms at most 1, dataset-wise normalisation.
    let ckpt = dir.path().join("Llama3_1-8B-Base-L15R-8x");
    let h = hyperparams(json!({}));
    let t = write_checkpoint(&ckpt, &h, &tensors(&mut Rng::new(1), false), Dtype::BF16);
    import_ok(FORMAT, &ckpt, &out, None);
    let dict = check("released R SAE", &out, &h, &t, false, 2);
    let m = dict.meta();
    assert_eq!(m.kind, Kind::Sae);
    assert_eq!(m.input_norm, InputNorm::Scale(s_in(&h) as f32));
    assert_eq!(m.hook_in, "blocks.15.hook_resid_post");
    assert_eq!(m.model, "meta-llama/Llama-3.1-8B");
    // SAELens ignores `sparsity_include_decoder_norm`: with these decoder norms its features fire
    // elsewhere than lm_saes' (and Tiller's).
    let x = inputs(&h, 2).mapv(f64::from);
    let (theirs, _) = saelens(&h, &t, &x);
    let (ours, _) = lm_saes(&h, &t, &x);
    let differ = theirs
        .iter()
        .zip(&ours)
        .filter(|(a, b)| (**a > 0.0) != (**b > 0.0))
        .count();
    assert!(differ > 0, "the fixture does not tell SAELens from lm_saes");
    println!(
        "released R SAE: SAELens fires differently on {differ} of {} entries",
        ours.len()
    );

    // Unit-norm decoder columns: SAELens' reading agrees too.
    let ckpt = dir.path().join("Llama3_1-8B-Base-L7R-8x");
    let t = write_checkpoint(&ckpt, &h, &tensors(&mut Rng::new(3), true), Dtype::F32);
    import_ok(FORMAT, &ckpt, &out, None);
    check("unit-norm decoder", &out, &h, &t, true, 4);
}

#[test]
fn variants() {
    let cases = [
        (
            "topk",
            hyperparams(json!({"act_fn": "topk", "jump_relu_threshold": 0.0, "top_k": 7})),
        ),
        (
            "topk with a measured threshold",
            hyperparams(json!({"act_fn": "topk", "jump_relu_threshold": 0.3, "top_k": 7})),
        ),
        (
            "transcoder",
            hyperparams(json!({"hook_point_in": "blocks.3.ln2.hook_normalized",
                               "hook_point_out": "blocks.3.hook_mlp_out",
                               "dataset_average_activation_norm": {"in": 2.5, "out": 1.5}})),
        ),
        (
            "relu, token-wise, decoder bias subtracted",
            hyperparams(json!({"act_fn": "relu", "norm_activation": "token-wise",
                               "apply_decoder_bias_to_pre_encoder": true})),
        ),
        (
            "jumprelu, b_dec subtracted, no decoder-norm folding",
            hyperparams(json!({"apply_decoder_bias_to_pre_encoder": true,
                               "sparsity_include_decoder_norm": false,
                               "dataset_average_activation_norm": {"in": 2.5, "out": 2.0}})),
        ),
    ];
    for (i, (name, h)) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let t = write_checkpoint(
            &ckpt,
            h,
            &tensors(&mut Rng::new(10 + i as u64), false),
            Dtype::F32,
        );
        let out = dir.path().join("d.onnx");
        import_ok(FORMAT, &ckpt, &out, None);
        let dict = check(name, &out, h, &t, false, 20 + i as u64);
        if *name == "transcoder" {
            assert_eq!(dict.meta().kind, Kind::Transcoder);
            assert_eq!(dict.meta().hook_out, "blocks.3.hook_mlp_out");
        }
    }
}

#[test]
fn repository_folder() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("Llama3_1-8B-Base-LXR-8x");
    let layers = ["Llama3_1-8B-Base-L0R-8x", "Llama3_1-8B-Base-L2R-8x"];
    let mut written = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let h = hyperparams(
            json!({"hook_point_in": format!("blocks.{}.hook_resid_post", 2 * i),
                                   "hook_point_out": format!("blocks.{}.hook_resid_post", 2 * i)}),
        );
        let t = write_checkpoint(
            &repo.join(l),
            &h,
            &tensors(&mut Rng::new(40 + i as u64), false),
            Dtype::F32,
        );
        written.push((h, t));
    }
    assert!(tiller_export::llama_scope::detect(&repo));
    assert!(tiller_export::llama_scope::detect(&repo.join(layers[0])));
    assert!(!tiller_export::sparsify::detect(&repo));
    assert!(!tiller_export::gemma_scope::detect(&repo));
    let one = dir.path().join("one.onnx");
    import_ok(FORMAT, &repo, &one, Some(layers[1]));
    let d = check(
        "repository, one",
        &one,
        &written[1].0,
        &written[1].1,
        false,
        50,
    );
    assert_eq!(d.meta().hook_in, "blocks.2.hook_resid_post");

    let all = dir.path().join("all.onnx");
    import_ok(FORMAT, &repo, &all, None);
    for (i, l) in layers.iter().enumerate() {
        let p: PathBuf = dir.path().join(format!("all.{l}.onnx"));
        check(
            &format!("repository, all: {l}"),
            &p,
            &written[i].0,
            &written[i].1,
            false,
            51,
        );
    }
}

const BAD_CHECKPOINTS: [BadCheckpoint; 4] = [
    BadCheckpoint {
        what: "a missing tensor",
        folder: "missing",
        write: |ckpt| {
            let mut t = tensors(&mut Rng::new(60), false);
            t.remove("decoder.bias");
            write_checkpoint(ckpt, &hyperparams(json!({})), &t, Dtype::F32);
        },
        names: &["final.safetensors", "`decoder.bias` is missing"],
    },
    BadCheckpoint {
        what: "d_sae in the config disagrees with the weights",
        folder: "shape",
        write: |ckpt| {
            write_checkpoint(
                ckpt,
                &hyperparams(json!({"d_sae": 128})),
                &tensors(&mut Rng::new(61), false),
                Dtype::F32,
            );
        },
        names: &["final.safetensors", "`encoder.weight` has shape [96, 32]"],
    },
    BadCheckpoint {
        what: "dataset-wise normalisation without its averages",
        folder: "norm",
        write: |ckpt| {
            let mut h = hyperparams(json!({}));
            h.as_object_mut()
                .unwrap()
                .remove("dataset_average_activation_norm");
            write_checkpoint(ckpt, &h, &tensors(&mut Rng::new(62), false), Dtype::F32);
        },
        names: &["hyperparams.json", "dataset_average_activation_norm"],
    },
    BadCheckpoint {
        what: "only a torch pickle",
        folder: "pickle",
        write: |ckpt| {
            std::fs::create_dir_all(ckpt.join("checkpoints")).unwrap();
            std::fs::write(
                ckpt.join("hyperparams.json"),
                hyperparams(json!({})).to_string(),
            )
            .unwrap();
            std::fs::write(ckpt.join("checkpoints/final.pt"), b"PK").unwrap();
        },
        names: &["final.pt", "safetensors"],
    },
];

#[test]
fn bad_checkpoints_name_the_file() {
    assert_bad_checkpoints(FORMAT, &BAD_CHECKPOINTS);
}
