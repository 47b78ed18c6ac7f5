//! What the trainer writes is what it trained: the ONNX dictionary loads in `tiller_runtime::Dictionary`
//! and its `acts` match the trainer's own forward pass (normwise relative error under 1e-5), its
//! reconstruction reproduces the held-out FVU the trainer reported (so the normalisation, the
//! transcoder's output scale and the skip connection are folded correctly), and the SAELens
//! folder, re-imported by `tiller-export import`, encodes and decodes the same.
#![allow(clippy::unwrap_used)]

mod train_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array2, s};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use tiller_export::train::data::Normalize;
use tiller_export::train::{self, Control, Outcome, TrainConfig};
use tiller_runtime::{Activation, Dictionary, Kind, SessionOptions};
use tiller_test_support::rel_err;
use train_common::{synthetic, write_npy};

const ROWS: usize = 12_000;
const EVAL: usize = 2048;
const D: usize = 24;

struct Data {
    inputs: Vec<PathBuf>,
    targets: Vec<PathBuf>,
    /// The raw rows the graph reads, `[ROWS, width_in]`.
    x: Array2<f32>,
    /// The raw targets, `[ROWS, width_out]`.
    y: Array2<f32>,
}

/// Activations for `kind`, written as float32 `.npy` files (crosscoders: one per layer, or one
/// `[n, layers, d]` array). Scaled far from unit norm so that normalisation matters.
fn data(dir: &Path, kind: Kind, one_array: bool) -> Data {
    let (_, x) = synthetic(11, D, 48, 3.0 / 48.0, ROWS);
    let x = x.mapv(|v| 7.0 * v + 0.5);
    let mut rng = StdRng::seed_from_u64(3);
    match kind {
        Kind::Transcoder | Kind::SkipTranscoder => {
            let d_out = 20;
            let map = Array2::<f32>::from_shape_simple_fn((D, d_out), || {
                0.3 * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng)
            });
            let y = x.dot(&map).mapv(|v| v.tanh() * 3.0) + 0.2 * &x.slice(s![.., ..d_out]);
            let (xi, yo) = (dir.join("mlp_in.npy"), dir.join("mlp_out.npy"));
            write_npy(&xi, &x, safetensors::Dtype::F32);
            write_npy(&yo, &y, safetensors::Dtype::F32);
            Data {
                inputs: vec![xi],
                targets: vec![yo],
                x,
                y,
            }
        }
        Kind::Crosscoder => {
            let layers: Vec<Array2<f32>> = (0..3)
                .map(|l| {
                    let mix = Array2::<f32>::from_shape_simple_fn((D, D), || {
                        0.4 * <StandardNormal as Distribution<f32>>::sample(
                            &StandardNormal,
                            &mut rng,
                        )
                    });
                    if l == 0 {
                        x.clone()
                    } else {
                        x.dot(&mix) + l as f32
                    }
                })
                .collect();
            let views: Vec<_> = layers.iter().map(|a| a.view()).collect();
            let flat = ndarray::concatenate(ndarray::Axis(1), &views).unwrap();
            let inputs = if one_array {
                let p = dir.join("layers.npy");
                let bytes = train_common::encode(&flat, safetensors::Dtype::F32);
                std::fs::write(&p, train_common::npy_bytes("<f4", &[ROWS, 3, D], &bytes)).unwrap();
                vec![p]
            } else {
                layers
                    .iter()
                    .enumerate()
                    .map(|(l, a)| {
                        let p = dir.join(format!("layer{l}.npy"));
                        write_npy(&p, a, safetensors::Dtype::F32);
                        p
                    })
                    .collect()
            };
            Data {
                inputs,
                targets: Vec::new(),
                y: flat.clone(),
                x: flat,
            }
        }
        _ => {
            let p = dir.join("acts.npy");
            write_npy(&p, &x, safetensors::Dtype::F32);
            Data {
                inputs: vec![p],
                targets: Vec::new(),
                y: x.clone(),
                x,
            }
        }
    }
}

fn fvu(recon: &Array2<f32>, y: &Array2<f32>) -> f64 {
    let mean = y.mapv(f64::from).mean_axis(ndarray::Axis(0)).unwrap();
    let mut err = 0.0;
    let mut tot = 0.0;
    for (r, t) in recon.rows().into_iter().zip(y.rows()) {
        for ((a, b), m) in r.iter().zip(t.iter()).zip(mean.iter()) {
            err += (f64::from(*a) - f64::from(*b)).powi(2);
            tot += (f64::from(*b) - m).powi(2);
        }
    }
    err / tot
}

fn round_trip(kind: Kind, activation: Activation, normalize: Normalize, one_array: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), kind, one_array);
    let out = dir.path().join("dict.onnx");
    let mut cfg = TrainConfig::new(d.inputs.clone(), kind, activation, 64, out.clone());
    cfg.targets = d.targets.clone();
    cfg.batch = 256;
    cfg.tokens = Some(40_000);
    cfg.lr = 3e-3;
    cfg.seed = 9;
    cfg.normalize = normalize;
    cfg.eval_tokens = Some(EVAL as u64);
    cfg.checkpoint_every = 0;
    cfg.hook_in = "blocks.3.hook_resid_post".into();
    cfg.model = "synthetic".into();
    if matches!(activation, Activation::TopK | Activation::BatchTopK) {
        cfg.k = Some(5);
    }
    if activation == Activation::Relu {
        cfg.sparsity_coeff = Some(0.5);
    }
    if activation == Activation::JumpRelu {
        cfg.sparsity_coeff = Some(0.5);
        cfg.init_threshold = Some(0.2);
        cfg.bandwidth = Some(0.05);
    }
    let saelens = train::export::saelens_unsupported(kind, activation)
        .is_none()
        .then(|| dir.path().join("saelens"));
    cfg.export_saelens = saelens.clone();
    let Outcome::Finished(f) = train::train(&cfg, &Control::default()).unwrap() else {
        panic!("stopped");
    };
    let what = format!("{kind} {activation} {normalize:?}");
    let eval = f.report.eval.clone().unwrap();
    assert!(eval.fvu < 0.5, "{what}: held-out FVU {}", eval.fvu);

    // The held-out rows, as the graph reads them.
    let x = d.x.slice(s![ROWS - EVAL.., ..]).to_owned();
    let y = d.y.slice(s![ROWS - EVAL.., ..]).to_owned();
    let dict = Dictionary::load(&out, &SessionOptions::default()).unwrap();
    assert_eq!(dict.meta().source, "tiller-train");
    assert_eq!(dict.meta().hook_in, "blocks.3.hook_resid_post");
    // Crosscoders' `[batch, layers, d]` input is given flat, `[batch, layers·d]`.
    let (acts, recon) = dict.encode_decode(x.view()).unwrap();
    let own = train::encode_raw(&f.arch, &f.params, &f.norm, f.threshold, x.view());
    let err = rel_err(&acts, &own);
    assert!(
        err < 1e-5,
        "{what}: acts differ from the trainer's by {err:e}"
    );
    let l0 = acts.iter().filter(|v| **v != 0.0).count() as f64 / EVAL as f64;
    assert!(
        (l0 - eval.l0).abs() < 1e-9 + 0.01 * eval.l0,
        "{what}: L0 {l0} vs {}",
        eval.l0
    );
    if normalize == Normalize::LayerNorm && matches!(kind, Kind::Sae | Kind::Crosscoder) {
        // The trainer measures FVU on layer-normed targets; the graph undoes the norm per token
        // (`y·std + mean`). Compare with the trainer's reconstruction, un-normalised alike.
        let mut own_recon = own.dot(&f.params.w_dec) + &f.params.b_dec;
        for (mut r, xr) in own_recon.rows_mut().into_iter().zip(x.rows()) {
            for (rb, xb) in r
                .as_slice_mut()
                .unwrap()
                .chunks_mut(D)
                .zip(xr.as_slice().unwrap().chunks(D))
            {
                let mean = xb.iter().map(|v| f64::from(*v)).sum::<f64>() / D as f64;
                let var = xb
                    .iter()
                    .map(|v| (f64::from(*v) - mean).powi(2))
                    .sum::<f64>()
                    / (D as f64 - 1.0);
                for v in rb {
                    *v = (f64::from(*v) * var.sqrt() + mean) as f32;
                }
            }
        }
        let e = rel_err(&recon, &own_recon);
        assert!(
            e < 1e-5,
            "{what}: the reconstruction differs from the trainer's by {e:e}"
        );
    } else {
        let onnx_fvu = fvu(&recon, &y);
        assert!(
            (onnx_fvu - eval.fvu).abs() <= 2e-3 * eval.fvu.max(1e-3),
            "{what}: the dictionary's FVU {onnx_fvu} differs from the trainer's {}",
            eval.fvu
        );
    }

    if let Some(sl) = saelens {
        let re = dir.path().join("reimported.onnx");
        let st = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
            .args(["import"])
            .arg(&sl)
            .arg("-o")
            .arg(&re)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let again = Dictionary::load(&re, &SessionOptions::default()).unwrap();
        assert_eq!(again.meta().source, "saelens");
        let (a2, r2) = again.encode_decode(x.view()).unwrap();
        let ea = rel_err(&a2, &acts);
        let er = rel_err(&r2, &recon);
        assert!(ea < 1e-5, "{what}: SAELens re-import acts differ by {ea:e}");
        assert!(
            er < 1e-5,
            "{what}: SAELens re-import reconstruction differs by {er:e}"
        );
    }
}

#[test]
fn saes_of_every_activation() {
    round_trip(Kind::Sae, Activation::Relu, Normalize::Scale, false);
    round_trip(Kind::Sae, Activation::TopK, Normalize::Scale, false);
    round_trip(Kind::Sae, Activation::BatchTopK, Normalize::Scale, false);
    round_trip(Kind::Sae, Activation::JumpRelu, Normalize::Scale, false);
    round_trip(Kind::Sae, Activation::TopK, Normalize::LayerNorm, false);
    round_trip(Kind::Sae, Activation::Relu, Normalize::None, false);
}

#[test]
fn transcoders_and_skip_transcoders() {
    round_trip(Kind::Transcoder, Activation::Relu, Normalize::Scale, false);
    round_trip(
        Kind::Transcoder,
        Activation::JumpRelu,
        Normalize::Scale,
        false,
    );
    round_trip(
        Kind::Transcoder,
        Activation::TopK,
        Normalize::LayerNorm,
        false,
    );
    round_trip(
        Kind::SkipTranscoder,
        Activation::Relu,
        Normalize::Scale,
        false,
    );
}

#[test]
fn crosscoders() {
    round_trip(Kind::Crosscoder, Activation::Relu, Normalize::Scale, false);
    round_trip(Kind::Crosscoder, Activation::TopK, Normalize::Scale, true);
    round_trip(
        Kind::Crosscoder,
        Activation::JumpRelu,
        Normalize::LayerNorm,
        false,
    );
}

#[test]
fn the_cli_trains_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), Kind::Sae, false);
    let out = dir.path().join("sae.onnx");
    let report = dir.path().join("report.json");
    let st = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .args([
            "train",
            "--kind",
            "sae",
            "--activation",
            "topk",
            "--k",
            "4",
            "--d-sae",
            "48",
        ])
        .args([
            "--batch", "256", "--tokens", "20000", "--lr", "3e-3", "--seed", "3", "--quiet",
        ])
        .arg("--input")
        .arg(&d.inputs[0])
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .arg("--export-saelens")
        .arg(dir.path().join("sl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(
        stdout.contains("held-out") && stdout.contains("FVU"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["activation"], "topk");
    assert_eq!(r["steps"], 79);
    for key in ["fvu", "l0", "dead_fraction", "dense_fraction", "tokens"] {
        assert!(r["eval"][key].is_number(), "eval.{key} missing: {r}");
    }
    assert!(r["history"].as_array().unwrap().len() >= 10);
    assert!(dir.path().join("sl").join("cfg.json").is_file());

    // Unsupported combinations and bad options fail before training, naming what is wrong.
    let bad = |extra: &[&str]| {
        let st = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
            .args(["train", "--d-sae", "48", "--quiet", "-o"])
            .arg(dir.path().join("x.onnx"))
            .arg("--input")
            .arg(&d.inputs[0])
            .args(extra)
            .output()
            .unwrap();
        assert!(!st.status.success());
        String::from_utf8_lossy(&st.stderr).to_string()
    };
    assert!(bad(&["--activation", "topk"]).contains("--k"));
    assert!(bad(&["--activation", "topk", "--k", "100"]).contains("--k"));
    assert!(bad(&["--activation", "relu", "--kind", "transcoder"]).contains("--target"));
    assert!(bad(&["--activation", "gated"]).contains("cannot be trained"));
    let e = bad(&[
        "--activation",
        "relu",
        "--kind",
        "crosscoder",
        "--n-layers",
        "3",
        "--export-saelens",
        "/tmp/x",
    ]);
    assert!(e.contains("crosscoder"), "{e}");
}
