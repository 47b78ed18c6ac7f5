//! dictionary_learning, OpenAI and Goodfire checkpoints, written with their real layouts and names
//! by `tests/fixtures/make_torch_fixtures.py` (Python standard library only), imported with the
//! `tiller-export` binary, run through the runtime, and compared with a float64 implementation of
//! each project's own maths written from its source (here: dictionary_learning's
//! `dictionary.py`/`trainers/*.py` and the science-of-finetuning fork's crosscoders, Goodfire's
//! reference loader; in `tests/common/openai.rs`: openai/sparse_autoencoder's `model.py`):
//! normwise relative error under 1e-5, TopK index sets identical.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::torch::{Ref, fixtures, linear, relu, topk};
use common::{Rng, assert_topk_indices, import, openai};
use ndarray::{Array1, Array2, Axis, s};
use tiller_runtime::{Activation, Dictionary, InputNorm, Kind};
use tiller_test_support::rel_err;

const TOL: f64 = 1e-5;
const D: usize = 32;
const F: usize = 80;
const L: usize = 2;

/// The import fails; its message.
fn import_fails(ckpt: &Path, format: &str, out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .arg("import")
        .arg(ckpt)
        .args(["--format", format, "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "import of {} succeeded",
        ckpt.display()
    );
    assert!(!out.exists(), "a failed import left {}", out.display());
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Encodes and decodes `x` with the runtime and compares with the reference.
fn compare(
    name: &str,
    dict: &Dictionary,
    x: &Array2<f32>,
    acts: &Array2<f64>,
    recon: &Array2<f64>,
) {
    let enc = dict.encode(x.view()).unwrap();
    let (_, got_recon) = dict.encode_decode(x.view()).unwrap();
    let (ea, er) = (rel_err(&enc.acts, acts), rel_err(&got_recon, recon));
    println!("{name}: acts {ea:.2e} recon {er:.2e}");
    assert!(ea < TOL, "{name}: acts relative error {ea:e}");
    assert!(er < TOL, "{name}: reconstruction relative error {er:e}");
    let active = acts.iter().filter(|v| **v > 0.0).count();
    assert!(
        active > 0 && active < acts.len(),
        "{name}: degenerate fixture ({active} of {} active)",
        acts.len()
    );
    if let Some((_, idx)) = enc.top {
        assert_topk_indices(name, acts, &enc.acts, &idx, false);
    }
}

fn input(seed: u64, width: usize) -> Array2<f32> {
    Rng::new(seed).matrix(19, width, 1.0) + 0.25
}

// --- the projects' maths, in float64 ------------------------------------------------------------

/// `post · [post > t]`, `t` one value or one per feature.
fn above(post: &Array2<f64>, t: &Array1<f64>) -> Array2<f64> {
    let mut f = post.clone();
    for mut row in f.rows_mut() {
        for (j, v) in row.iter_mut().enumerate() {
            let th = if t.len() == 1 { t[0] } else { t[j] };
            if *v <= th {
                *v = 0.0;
            }
        }
    }
    f
}

/// The science-of-finetuning fork's `normalize_activations` (keep_relative_variance) on one
/// layer's slice, and its inverse.
fn fork_normalise(x: &mut Array2<f64>, mean: &Array1<f64>, scale: f64) {
    for mut row in x.rows_mut() {
        row.zip_mut_with(mean, |v, m| *v = (*v - m) * scale);
    }
}

fn fork_denormalise(y: &mut Array2<f64>, mean: &Array1<f64>, scale: f64) {
    for mut row in y.rows_mut() {
        row.zip_mut_with(mean, |v, m| *v = *v / (scale + 1e-8) + m);
    }
}

/// dictionary_learning's `encode` and `decode` for the class the reference names.
fn dictionary_learning_reference(r: &Ref, x: &Array2<f32>) -> (Array2<f64>, Array2<f64>) {
    let x = x.mapv(f64::from);
    let class = r.setting("dict_class").as_str().unwrap();
    let k = r.setting("k").as_u64().unwrap_or(0) as usize;
    match class {
        "AutoEncoder" => {
            let (mut enc, mut b, mut dec) = (
                r.m2("encoder.weight"),
                r.v1("encoder.bias"),
                r.m2("decoder.weight"),
            );
            let bias = r.v1("bias");
            // from_pretrained(normalize_decoder=True)
            let norms: Vec<f64> = dec
                .columns()
                .into_iter()
                .map(|c| c.dot(&c).sqrt())
                .collect();
            if !norms.iter().all(|n| (n - 1.0).abs() <= 1e-8 + 1e-5) {
                for (j, n) in norms.iter().enumerate() {
                    dec.column_mut(j).mapv_inplace(|v| v / n);
                    enc.row_mut(j).mapv_inplace(|v| v * n);
                    b[j] *= n;
                }
            }
            let f = relu(linear(&(&x - &bias), &enc, Some(&b)));
            let y = linear(&f, &dec, None) + &bias;
            (f, y)
        }
        "AutoEncoderNew" => {
            let f = relu(linear(
                &x,
                &r.m2("encoder.weight"),
                Some(&r.v1("encoder.bias")),
            ));
            let y = linear(&f, &r.m2("decoder.weight"), Some(&r.v1("decoder.bias")));
            (f, y)
        }
        "GatedAutoEncoder" => {
            let db = r.v1("decoder_bias");
            let x_enc = linear(&(&x - &db), &r.m2("encoder.weight"), None);
            let gate = &x_enc + &r.v1("gate_bias");
            let r_mag = r.v1("r_mag").mapv(f64::exp);
            let mag = relu(&x_enc * &r_mag + &r.v1("mag_bias"));
            let mut f = mag;
            f.zip_mut_with(&gate, |m, g| {
                if *g <= 0.0 {
                    *m = 0.0
                }
            });
            let y = linear(&f, &r.m2("decoder.weight"), None) + &db;
            (f, y)
        }
        "JumpReluAutoEncoder" => {
            let pre = x.dot(&r.m2("W_enc")) + &r.v1("b_enc");
            let f = relu(above(&pre, &r.v1("threshold")));
            let y = f.dot(&r.m2("W_dec")) + &r.v1("b_dec");
            (f, y)
        }
        "AutoEncoderTopK" => {
            let nf = r.setting("norm_factor").as_f64().unwrap_or(1.0);
            let b_dec = r.v1("b_dec");
            let xb = &x / nf;
            let post = relu(linear(
                &(&xb - &b_dec),
                &r.m2("encoder.weight"),
                Some(&r.v1("encoder.bias")),
            ));
            let f = topk(&post, k);
            let y = linear(&f, &r.m2("decoder.weight"), None) + &b_dec;
            // A backup's model runs on x / norm_factor; its final save (scale_biases) gives
            // features and reconstructions norm_factor times those.
            (f * nf, y * nf)
        }
        "BatchTopKSAE" => {
            let normalised = r.setting("normalised").as_bool().unwrap_or(false);
            let mut xn = x.clone();
            let (mean, scale) = if normalised {
                (r.v1("activation_mean"), r.scalar("activation_global_scale"))
            } else {
                (Array1::zeros(D), 1.0)
            };
            if normalised {
                fork_normalise(&mut xn, &mean, scale);
            }
            let b_dec = r.v1("b_dec");
            let post = relu(linear(
                &(&xn - &b_dec),
                &r.m2("encoder.weight"),
                Some(&r.v1("encoder.bias")),
            ));
            let f = above(&post, &Array1::from_elem(1, r.scalar("threshold")));
            let mut y = linear(&f, &r.m2("decoder.weight"), None) + &b_dec;
            if normalised {
                fork_denormalise(&mut y, &mean, scale);
            }
            (f, y)
        }
        "MatryoshkaBatchTopKSAE" => {
            let b_dec = r.v1("b_dec");
            let post = relu((&x - &b_dec).dot(&r.m2("W_enc")) + &r.v1("b_enc"));
            let f = above(&post, &Array1::from_elem(1, r.scalar("threshold")));
            let y = f.dot(&r.m2("W_dec")) + &b_dec;
            (f, y)
        }
        "CrossCoder" | "BatchTopKCrossCoder" => crosscoder_reference(r, class, &x),
        other => panic!("no reference for {other}"),
    }
}

/// The fork's CrossCoder: `f = relu(Σ_l x_l W_l + b)`, `x̂_l = f D_l + b_l`; BatchTopKCrossCoder
/// thresholds `f · Σ_l ‖D_l[j]‖`.
fn crosscoder_reference(r: &Ref, class: &str, x: &Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    let normalised = r.setting("normalised").as_bool().unwrap_or(false);
    let enc = r.a3("encoder.weight");
    let dec = r.a3("decoder.weight");
    let bias = r.m2("decoder.bias");
    let (means, scales) = if normalised {
        (
            r.m2("activation_mean"),
            r.v1("activation_global_scale").to_vec(),
        )
    } else {
        (Array2::zeros((L, D)), vec![1.0; L])
    };
    let mut pre = Array2::<f64>::zeros((x.nrows(), F)) + &r.v1("encoder.bias");
    for (l, &scale) in scales.iter().enumerate() {
        let mut xl = x.slice(s![.., l * D..(l + 1) * D]).to_owned();
        if normalised {
            fork_normalise(&mut xl, &means.row(l).to_owned(), scale);
        }
        pre += &xl.dot(&enc.index_axis(Axis(0), l));
    }
    let mut f = relu(pre);
    if class == "BatchTopKCrossCoder" {
        let code: Vec<f64> = (0..F)
            .map(|j| {
                (0..L)
                    .map(|l| {
                        let row = dec.slice(s![l, j, ..]);
                        row.dot(&row).sqrt()
                    })
                    .sum()
            })
            .collect();
        let t = r.scalar("threshold");
        for mut row in f.rows_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                if *v * code[j] <= t {
                    *v = 0.0;
                }
            }
        }
    }
    let mut y = Array2::zeros((x.nrows(), L * D));
    for (l, &scale) in scales.iter().enumerate() {
        let mut yl = f.dot(&dec.index_axis(Axis(0), l)) + bias.row(l);
        if normalised {
            fork_denormalise(&mut yl, &means.row(l).to_owned(), scale);
        }
        y.slice_mut(s![.., l * D..(l + 1) * D]).assign(&yl);
    }
    (f, y)
}

// --- dictionary_learning ------------------------------------------------------------------------

/// Imports `dictionary-learning/<name>` and compares it with the reference.
fn dictionary_learning_case(root: &Path, name: &str, seed: u64) -> Dictionary {
    let dir = root.join("dictionary-learning").join(name);
    let r = Ref::load(&dir.join("ref.json"));
    let dict = import(
        &dir,
        "dictionary-learning",
        &root.join(format!("{name}.onnx")),
    );
    let m = dict.meta();
    assert_eq!(m.source, "dictionary-learning");
    assert_eq!(m.model, "EleutherAI/pythia-70m-deduped");
    assert_eq!((m.d_in, m.d_sae, m.d_out), (D, F, D));
    let width = if m.kind == Kind::Crosscoder { L * D } else { D };
    if m.kind == Kind::Sae {
        assert_eq!(m.hook_in, "resid_post_layer_3");
    }
    let x = input(seed, width);
    let (acts, recon) = dictionary_learning_reference(&r, &x);
    compare(name, &dict, &x, &acts, &recon);
    dict
}

#[test]
fn dictionary_learning_relu_gated_and_jumprelu() {
    let dir = fixtures("dictionary-learning");
    for (i, (name, act)) in [
        ("autoencoder", Activation::Relu),
        ("autoencoder_new", Activation::Relu),
        ("gated", Activation::Gated),
        ("jumprelu", Activation::JumpRelu),
    ]
    .into_iter()
    .enumerate()
    {
        let d = dictionary_learning_case(dir.path(), name, 1 + i as u64);
        assert_eq!(d.meta().activation, act, "{name}");
        assert_eq!(d.meta().kind, Kind::Sae, "{name}");
    }
}

#[test]
fn dictionary_learning_topk_family() {
    let dir = fixtures("dictionary-learning");
    let d = dictionary_learning_case(dir.path(), "topk", 11);
    assert_eq!(d.meta().activation, Activation::TopK);
    assert_eq!(d.meta().k, Some(7));
    for (i, name) in ["batch_topk", "batch_topk_normalised", "matryoshka"]
        .into_iter()
        .enumerate()
    {
        let d = dictionary_learning_case(dir.path(), name, 12 + i as u64);
        assert_eq!(d.meta().activation, Activation::BatchTopK, "{name}");
        assert_eq!(d.meta().input_norm, InputNorm::None, "{name}: folded");
    }
    // A training backup in ae.pt: weights under `ae`, inputs scaled by norm_factor.
    let d = dictionary_learning_case(dir.path(), "backup", 15);
    assert_eq!(d.meta().k, Some(7));
}

#[test]
fn dictionary_learning_crosscoders() {
    let dir = fixtures("dictionary-learning");
    for (i, (name, act)) in [
        ("crosscoder", Activation::Relu),
        ("crosscoder_normalised", Activation::Relu),
        ("batch_topk_crosscoder", Activation::JumpRelu),
    ]
    .into_iter()
    .enumerate()
    {
        let d = dictionary_learning_case(dir.path(), name, 21 + i as u64);
        let m = d.meta();
        assert_eq!(
            (m.kind, m.n_layers, m.activation),
            (Kind::Crosscoder, L, act),
            "{name}"
        );
    }
}

#[test]
fn dictionary_learning_paths_and_detection() {
    let dir = fixtures("dictionary-learning");
    let root = dir.path();
    // The ae.pt itself, and the folder with the format left to detection.
    let r = Ref::load(&root.join("dictionary-learning/topk/ref.json"));
    let x = input(31, D);
    let (acts, recon) = dictionary_learning_reference(&r, &x);
    let d = import(
        &root.join("dictionary-learning/topk/ae.pt"),
        "dictionary-learning",
        &root.join("a.onnx"),
    );
    compare("topk by ae.pt", &d, &x, &acts, &recon);
    let d = import(
        &root.join("dictionary-learning/topk"),
        "auto",
        &root.join("b.onnx"),
    );
    assert_eq!(d.meta().source, "dictionary-learning");
    compare("topk detected", &d, &x, &acts, &recon);
}

#[test]
fn dictionary_learning_errors_name_the_file_and_key() {
    let dir = fixtures("dictionary-learning");
    let root = dir.path();
    let case = |name: &str| root.join("dictionary-learning").join(name);
    let e = import_fails(
        &case("unknown_class"),
        "dictionary-learning",
        &root.join("u.onnx"),
    );
    assert!(
        e.contains("config.json") && e.contains("`trainer.dict_class` = `FancyAutoEncoder`"),
        "{e}"
    );
    let e = import_fails(
        &case("bad_shape"),
        "dictionary-learning",
        &root.join("s.onnx"),
    );
    assert!(
        e.contains("ae.pt") && e.contains("`decoder.weight` has shape [33, 80]"),
        "{e}"
    );
    let e = import_fails(
        &case("missing_tensor"),
        "dictionary-learning",
        &root.join("m.onnx"),
    );
    assert!(
        e.contains("ae.pt") && e.contains("`encoder.bias` is missing"),
        "{e}"
    );
}

// --- OpenAI -------------------------------------------------------------------------------------

#[test]
fn openai_topk_with_layer_norm_relu_and_tied() {
    let dir = fixtures("openai");
    let root = dir.path().join("openai");
    for (i, (file, format, hook)) in [
        (
            "resid_post_mlp_v5_32k/autoencoders/6.pt",
            "openai",
            "blocks.6.hook_resid_post",
        ),
        (
            "mlp_post_act/autoencoders/3.pt",
            "openai",
            "blocks.3.mlp.hook_post",
        ),
        ("tied.pt", "auto", ""),
    ]
    .into_iter()
    .enumerate()
    {
        let ckpt = root.join(file);
        let r = Ref::load(&ckpt.with_extension("ref.json"));
        let d = import(&ckpt, format, &dir.path().join(format!("o{i}.onnx")));
        let m = d.meta();
        assert_eq!(m.source, "openai");
        assert_eq!(m.hook_in, hook, "{file}");
        assert_eq!(m.model, if hook.is_empty() { "" } else { "gpt2" });
        if r.setting("activation").as_str() == Some("TopK") {
            assert_eq!(
                (m.activation, m.k, m.input_norm),
                (Activation::TopK, Some(7), InputNorm::LayerNorm)
            );
        } else {
            assert_eq!(
                (m.activation, m.input_norm),
                (Activation::Relu, InputNorm::None)
            );
        }
        let x = input(40 + i as u64, D);
        let (acts, recon) = openai::reference(&r, &x);
        compare(file, &d, &x, &acts, &recon);
    }
}

#[test]
fn openai_refuses_an_identity_postact_topk() {
    let dir = fixtures("openai");
    let e = import_fails(
        &dir.path().join("openai/identity_postact.pt"),
        "openai",
        &dir.path().join("i.onnx"),
    );
    assert!(
        e.contains("identity_postact.pt")
            && e.contains("`activation_state_dict.postact_fn` = `Identity`"),
        "{e}"
    );
}

// --- Goodfire -----------------------------------------------------------------------------------

#[test]
fn goodfire_float32_and_bfloat16() {
    let dir = fixtures("goodfire");
    for (i, (sub, file, model, hook, format)) in [
        (
            "f32",
            "Llama-3.1-8B-Instruct-SAE-l19.pth",
            "meta-llama/Llama-3.1-8B-Instruct",
            "model.layers.19",
            "goodfire",
        ),
        (
            "bf16",
            "Llama-3.3-70B-Instruct-SAE-l50.pth",
            "meta-llama/Llama-3.3-70B-Instruct",
            "model.layers.50",
            "auto",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let base: PathBuf = dir.path().join("goodfire").join(sub);
        let r = Ref::load(&base.join("ref.json"));
        let d = import(
            &base.join(file),
            format,
            &dir.path().join(format!("g{i}.onnx")),
        );
        let m = d.meta();
        assert_eq!(
            (
                m.source.as_str(),
                m.model.as_str(),
                m.hook_in.as_str(),
                m.activation
            ),
            ("goodfire", model, hook, Activation::Relu)
        );
        // f = relu(encoder_linear(x)); x̂ = decoder_linear(f).
        let x = input(50 + i as u64, D);
        let xf = x.mapv(f64::from);
        let f = relu(linear(
            &xf,
            &r.m2("encoder_linear.weight"),
            Some(&r.v1("encoder_linear.bias")),
        ));
        let y = linear(
            &f,
            &r.m2("decoder_linear.weight"),
            Some(&r.v1("decoder_linear.bias")),
        );
        compare(file, &d, &x, &f, &y);
    }
}
