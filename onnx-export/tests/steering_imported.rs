//! Steering edits on imported checkpoints that normalise their input (README, "How it behaves";
//! `runtime/tests/steering_norm.rs` checks the same on dictionaries built directly). A checkpoint
//! of each format that normalises is written with the importer tests' own fixture writers and
//! imported with `tiller-export import` (the trainer's dictionary is trained for a few steps and
//! written by the trainer); the file must carry the `tiller.input_norm` the format implies. A
//! [`Runtime`] with one profile per op (`add`, `add` with `normalize`, `clamp`, `ablate`, `scale`,
//! `cap`, `project_cap`) then edits activations whose mean is far from 0 and spread far from 1,
//! and every token's result must equal `y + decode(x, f') − decode(x, f)` computed in float64 by
//! the source format's own maths:
//!
//! - SAELens `layer_norm` (`layer_norm`) and `constant_norm_rescale` (`norm_rescale`):
//!   `tests/common/saelens.rs`, SAELens' `encode`/`decode` with its
//!   `run_time_activation_norm_fn_in/out`.
//! - SAELens `expected_average_only_in` with `activation_scaler.json` (`scale:s`): the same SAE
//!   inside SAELens' `ActivationScaler`, which feeds it `x·s` and divides its output by `s`.
//! - Llama Scope dataset-wise (`scale:√d/avg_in`): `tests/common/llama_scope.rs`, `lm_saes`'
//!   loader, `encode`, `decode`. Tiller's feature units are `lm_saes`' times `s_in` (those SAELens
//!   reports), so `f'` is divided by `s_in` before `lm_saes` decodes it.
//! - OpenAI's TopK autoencoder with `LN` (`layer_norm`): `tests/common/openai.rs`, `model.py`'s
//!   `LN`, `encode`, `decode` and `· std + mu`, on the fixture script's checkpoint.
//! - Our trainer's default `Normalize::Scale` (`scale:s_in`): the trainer's own parameters in its
//!   normalised space, `(f·W_dec + b_dec) / s_in`, with `f` from `train::encode_raw`.
//!
//! No reference reads the runtime's weights, gains or edit code: each decodes from the tensors the
//! checkpoint stored (or the trainer holds), through the format's own normalisation.
//! Tolerance: normwise relative error of every token's edited activations under 1e-5 (f32 against
//! float64). Each case must also tell the old edit (the imported file's raw decoder row times the
//! change of the feature) from the reference by more than 1e-2.
#![allow(clippy::unwrap_used)]

mod common;
mod train_common;

use std::path::{Path, PathBuf};

use common::llama_scope::{self, LmSaes};
use common::saelens::{self as sl, Sae};
use common::torch::{Ref, fixtures};
use common::{Rng, Tensors, import, openai, write_saelens};
use ndarray::{Array1, Array2};
use safetensors::Dtype;
use serde_json::json;
use tempfile::TempDir;
use tiller_export::train::{self, Control, Finished, Outcome, TrainConfig};
use tiller_runtime::{ActivationsMut, DictionaryFile, InputNorm, Phase, Runtime, Token};

const TOL: f64 = 1e-5;
/// How far the old edit must miss the reference for a case to tell it from the right one.
const RAW_MISS: f64 = 1e-2;
/// Tokens per request (one request per op): two on which the edited feature fires, one silent.
const T: usize = 3;

/// A source format's own maths.
trait Format {
    /// Feature activations of `x`, `[tokens, d_sae]`, in the units the runtime reports.
    fn encode(&self, x: &Array2<f32>) -> Array2<f64>;
    /// The reconstruction from `x`'s statistics and the activations `f` (not necessarily `x`'s
    /// own), in the model's space.
    fn decode(&self, x: &Array2<f32>, f: &Array2<f64>) -> Array2<f64>;
}

/// A SAELens SAE, inside its `ActivationScaler` (`scale` 1 when there is none).
struct SaeLens {
    sae: Sae,
    t: Tensors,
    scale: f64,
}

impl SaeLens {
    fn scaled(&self, x: &Array2<f32>) -> Array2<f32> {
        // ActivationScaler.scale runs in the model's dtype.
        x.mapv(|v| (f64::from(v) * self.scale) as f32)
    }
}

impl Format for SaeLens {
    fn encode(&self, x: &Array2<f32>) -> Array2<f64> {
        sl::encode(&self.sae, &self.t, &self.scaled(x))
    }
    fn decode(&self, x: &Array2<f32>, f: &Array2<f64>) -> Array2<f64> {
        sl::decode(&self.sae, &self.t, &self.scaled(x), f) / self.scale
    }
}

/// `lm_saes`, with Tiller's activations `s_in` times its own.
struct LlamaScope {
    sae: LmSaes,
    s_in: f64,
}

impl Format for LlamaScope {
    fn encode(&self, x: &Array2<f32>) -> Array2<f64> {
        self.sae.encode(&x.mapv(f64::from)) * self.s_in
    }
    fn decode(&self, x: &Array2<f32>, f: &Array2<f64>) -> Array2<f64> {
        self.sae.decode(&x.mapv(f64::from), &(f / self.s_in))
    }
}

/// openai/sparse_autoencoder, from the fixture script's record of the stored tensors.
struct OpenAi(Ref);

impl Format for OpenAi {
    fn encode(&self, x: &Array2<f32>) -> Array2<f64> {
        openai::encode(&self.0, x)
    }
    fn decode(&self, x: &Array2<f32>, f: &Array2<f64>) -> Array2<f64> {
        openai::decode(&self.0, x, f)
    }
}

/// The trainer's own forward pass, on the parameters it finished with.
struct Trained(Box<Finished>);

impl Format for Trained {
    fn encode(&self, x: &Array2<f32>) -> Array2<f64> {
        let f = &self.0;
        train::encode_raw(&f.arch, &f.params, &f.norm, f.threshold, x.view()).mapv(f64::from)
    }
    fn decode(&self, _x: &Array2<f32>, f: &Array2<f64>) -> Array2<f64> {
        let p = &self.0.params;
        (f.dot(&p.w_dec.mapv(f64::from)) + p.b_dec.mapv(f64::from)) / f64::from(self.0.norm.s_in)
    }
}

/// One imported dictionary and its format's maths.
struct Case {
    name: &'static str,
    /// Holds the checkpoint and the imported file.
    _dir: TempDir,
    onnx: PathBuf,
    /// The `tiller.input_norm` the format implies.
    norm: InputNorm,
    format: Box<dyn Format>,
}

/// A SAELens 6 standard SAE with `normalize_activations = mode`, and the `activation_scaler.json`
/// factor a training checkpoint keeps beside it, if any.
fn saelens_case(
    name: &'static str,
    mode: &'static str,
    scaler: Option<f64>,
    norm: InputNorm,
    seed: u64,
) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = sl::v6("standard", json!({ "normalize_activations": mode }));
    let t = sl::tensors(&mut Rng::new(seed), "standard", 32, 80, 32);
    let t = write_saelens(&ckpt, &cfg, &t, Dtype::F32);
    if let Some(s) = scaler {
        std::fs::write(
            ckpt.join("activation_scaler.json"),
            json!({ "scaling_factor": s }).to_string(),
        )
        .unwrap();
    }
    let onnx = dir.path().join("d.onnx");
    import(&ckpt, "saelens", &onnx);
    let sae = Sae {
        arch: "standard",
        k: 0,
        apply_b_dec_to_input: true,
        // The scaler sits outside the SAE, which itself normalises nothing then.
        norm: if scaler.is_some() { "none" } else { mode },
        rescale: false,
    };
    Case {
        name,
        _dir: dir,
        onnx,
        norm,
        format: Box::new(SaeLens {
            sae,
            t,
            scale: scaler.unwrap_or(1.0),
        }),
    }
}

/// A released Llama Scope SAE (JumpReLU, decoder norms at most 1, dataset-wise normalisation).
fn llama_scope_case(seed: u64) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("Llama3_1-8B-Base-L15R-8x");
    let h = llama_scope::hyperparams(json!({}));
    let t = llama_scope::tensors(&mut Rng::new(seed), false);
    let t = llama_scope::write_checkpoint(&ckpt, &h, &t, Dtype::F32);
    let onnx = dir.path().join("d.onnx");
    import(&ckpt, "llama-scope", &onnx);
    let s_in = llama_scope::s_in(&h);
    Case {
        name: "Llama Scope dataset-wise",
        _dir: dir,
        onnx,
        norm: InputNorm::Scale(s_in as f32),
        format: Box::new(LlamaScope {
            sae: LmSaes::load(&h, &t),
            s_in,
        }),
    }
}

/// The fixture script's OpenAI v5 TopK autoencoder, with `LN` on its input.
fn openai_case() -> Case {
    let dir = fixtures("openai");
    let ckpt = dir
        .path()
        .join("openai/resid_post_mlp_v5_32k/autoencoders/6.pt");
    let r = Ref::load(&ckpt.with_extension("ref.json"));
    assert_eq!(r.setting("activation"), "TopK");
    let onnx = dir.path().join("d.onnx");
    import(&ckpt, "openai", &onnx);
    Case {
        name: "OpenAI TopK LN",
        _dir: dir,
        onnx,
        norm: InputNorm::LayerNorm,
        format: Box::new(OpenAi(r)),
    }
}

/// A TopK SAE trained for 8 steps with the default normalisation (`Normalize::Scale`), on
/// activations far from unit norm. (TopK: after so few steps a ReLU SAE's L1 term keeps its
/// features too faint for the raw-row guard to see anything.)
fn trained_case() -> Case {
    let dir = tempfile::tempdir().unwrap();
    let (_, x) = train_common::synthetic(5, 24, 48, 3.0 / 48.0, 2560);
    let data = dir.path().join("acts.npy");
    train_common::write_npy(&data, &x.mapv(|v| 7.0 * v + 0.5), Dtype::F32);
    let onnx = dir.path().join("d.onnx");
    let mut cfg = TrainConfig::new(
        vec![data],
        tiller_runtime::Kind::Sae,
        tiller_runtime::Activation::TopK,
        48,
        onnx.clone(),
    );
    cfg.k = Some(4);
    cfg.batch = 256;
    cfg.tokens = Some(2048);
    cfg.lr = 3e-3;
    cfg.seed = 4;
    cfg.eval_tokens = Some(256);
    cfg.checkpoint_every = 0;
    cfg.hook_in = "blocks.3.hook_resid_post".into();
    let Outcome::Finished(f) = train::train(&cfg, &Control::default()).unwrap() else {
        panic!("the trainer stopped early");
    };
    Case {
        name: "trainer default scale:s_in",
        _dir: dir,
        onnx,
        norm: InputNorm::Scale(f.norm.s_in),
        format: Box::new(Trained(f)),
    }
}

/// The ops, each in its own profile: `(profile, rule body)`.
fn ops(feature: usize, cap: f64) -> Vec<(&'static str, String)> {
    vec![
        (
            "add",
            format!("op = \"add\"\nfeature = {feature}\nstrength = 1.5"),
        ),
        (
            "add-unit",
            format!("op = \"add\"\nfeature = {feature}\nstrength = 1.5\nnormalize = true"),
        ),
        (
            "clamp",
            format!("op = \"clamp\"\nfeature = {feature}\nvalue = 3.0"),
        ),
        ("ablate", format!("op = \"ablate\"\nfeature = {feature}")),
        (
            "scale",
            format!("op = \"scale\"\nfeature = {feature}\nfactor = 0.3"),
        ),
        (
            "cap",
            format!("op = \"cap\"\nfeature = {feature}\nvalue = {cap}"),
        ),
        (
            "project-cap",
            format!("op = \"project_cap\"\nfeature = {feature}\nvalue = 0.05"),
        ),
    ]
}

/// The new value of feature `i` (activation `f`) under `profile`, for the ops that set one.
fn new_value(profile: &str, f: f64, cap: f64) -> Option<f64> {
    match profile {
        "add" => Some(f + 1.5),
        "clamp" => Some(3.0),
        "ablate" => Some(0.0),
        "scale" => Some(0.3 * f),
        "cap" => Some(f.min(cap)),
        _ => None,
    }
}

/// The reference result for one token: its activations `y` (= `x`, an SAE edits its own input)
/// plus the difference of two float64 reconstructions.
fn reference_edit(
    format: &dyn Format,
    x: &Array2<f32>,
    acts: &Array1<f64>,
    i: usize,
    profile: &str,
    cap: f64,
) -> Vec<f64> {
    let with = |fi: f64| {
        let mut a = acts.clone().insert_axis(ndarray::Axis(0));
        a[[0, i]] = fi;
        format.decode(x, &a).row(0).to_vec()
    };
    let f = acts[i];
    let base = with(f);
    let diff = |fi: f64| -> Vec<f64> { with(fi).iter().zip(&base).map(|(a, b)| a - b).collect() };
    let unit = || {
        let u = diff(f + 1.0);
        let n = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.into_iter().map(|v| v / n).collect::<Vec<f64>>()
    };
    let y: Vec<f64> = x.row(0).iter().map(|v| f64::from(*v)).collect();
    let delta: Vec<f64> = match profile {
        "add-unit" => unit().into_iter().map(|v| 1.5 * v).collect(),
        "project-cap" => {
            let u = unit();
            let p: f64 = u.iter().zip(&y).map(|(a, b)| a * b).sum();
            let c = -(p.max(0.05) - 0.05);
            u.into_iter().map(|v| c * v).collect()
        }
        p => diff(new_value(p, f, cap).unwrap()),
    };
    y.iter().zip(delta).map(|(a, d)| a + d).collect()
}

/// Normwise relative error `max|a − b| / max|b|`.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Activations with mean 0.7 and standard deviation 2.5.
fn inputs(seed: u64, rows: usize, d: usize) -> Array2<f32> {
    Rng::new(seed).matrix(rows, d, 2.5) + 0.7
}

/// Runs every op on `case` through the runtime and checks each token against the reference.
/// Returns the largest error, and the raw-row edit's miss: over the ops that set the feature's
/// value, the smallest of each op's largest miss on its tokens.
fn check(case: &Case, seed: u64) -> (f64, f64) {
    let file = DictionaryFile::open(&case.onnx).unwrap();
    let meta = file.meta().clone();
    assert_eq!(
        meta.input_norm, case.norm,
        "{}: tiller.input_norm of the imported file",
        case.name
    );
    assert_ne!(meta.input_norm, InputNorm::None, "{}", case.name);
    let w_dec = file.weights().unwrap().w_dec;
    let n_ops = ops(0, 0.0).len();
    // The feature that fires on the most candidate tokens (then the most strongly); each request
    // gets T − 1 tokens on which it fires and one on which it does not, so that every op has
    // something to do and a silent feature is edited too.
    let pool = inputs(seed, 16 * n_ops * T, meta.d_in);
    let pool_acts = case.format.encode(&pool);
    let key = |j: usize| {
        let c = pool_acts.column(j);
        (c.iter().filter(|v| **v > 0.0).count(), c.sum())
    };
    let i = (0..meta.d_sae)
        .max_by(|&a, &b| {
            let (ka, kb) = (key(a), key(b));
            ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
        })
        .unwrap();
    let (on, off): (Vec<usize>, Vec<usize>) =
        (0..pool.nrows()).partition(|&t| pool_acts[[t, i]] > 0.0);
    assert!(
        on.len() >= n_ops * (T - 1) && off.len() >= n_ops,
        "{}: feature {i} fires on {} of {} candidate tokens",
        case.name,
        on.len(),
        pool.nrows()
    );
    let rows: Vec<usize> = (0..n_ops)
        .flat_map(|r| on[(T - 1) * r..(T - 1) * (r + 1)].iter().chain([&off[r]]))
        .copied()
        .collect();
    let x = pool.select(ndarray::Axis(0), &rows);
    let acts = case.format.encode(&x);
    // Half the largest activation among the `cap` request's own tokens, so that it cuts one.
    let r_cap = ops(0, 0.0).iter().position(|(p, _)| *p == "cap").unwrap();
    let cap = acts
        .column(i)
        .slice(ndarray::s![r_cap * T..(r_cap + 1) * T])
        .fold(0.0f64, |m, v| m.max(*v))
        / 2.0;
    let cap = (cap * 1e4).round() / 1e4;
    assert!(cap > 0.0, "{}: feature {i} never fires", case.name);
    let hook = &meta.hook_in;
    let file_name = case.onnx.file_name().unwrap().to_str().unwrap();
    let mut config = format!(
        "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"d\"\npath = \"{file_name}\"\n"
    );
    for (name, body) in ops(i, cap) {
        config += &format!(
            "[[profile]]\nname = \"{name}\"\n[[profile.steer]]\ndictionary = \"d\"\nhook = \"{hook}\"\n{body}\n"
        );
    }
    let toml = case.onnx.parent().unwrap_or(Path::new(".")).join("t.toml");
    std::fs::write(&toml, config).unwrap();
    let rt = Runtime::from_config_file(&toml).unwrap();
    let profiles: Vec<&str> = ops(i, cap).iter().map(|(p, _)| *p).collect();
    let mut tokens = Vec::new();
    for (r, p) in profiles.iter().enumerate() {
        rt.begin_request(r as u64, Some(p), None).unwrap();
        tokens.extend((0..T).map(|_| Token {
            request: r as u64,
            phase: Phase::Generated,
        }));
    }
    let mut got = x.clone();
    let mut step = rt.step(&tokens).unwrap();
    step.hook(hook, ActivationsMut::F32(got.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    let (mut worst, mut raw_miss) = (0.0f64, f64::INFINITY);
    for (r, p) in profiles.iter().enumerate() {
        let mut miss = 0.0f64;
        for t in r * T..(r + 1) * T {
            let xt = x.slice(ndarray::s![t..t + 1, ..]).to_owned();
            let want = reference_edit(&*case.format, &xt, &acts.row(t).to_owned(), i, p, cap);
            let g: Vec<f64> = got.row(t).iter().map(|v| f64::from(*v)).collect();
            let e = rel(&g, &want);
            assert!(e < TOL, "{}, {p}: token {t}: rel err {e:e}", case.name);
            worst = worst.max(e);
            // The old edit: `y + (f' − f)·W_dec[i]` with the imported file's raw row.
            // A token whose feature the op leaves as it is tells nothing apart.
            if let Some(v) = new_value(p, acts[[t, i]], cap).filter(|v| *v != acts[[t, i]]) {
                let c = v - acts[[t, i]];
                let raw: Vec<f64> = x
                    .row(t)
                    .iter()
                    .zip(w_dec.row(i))
                    .map(|(a, d)| f64::from(*a) + c * f64::from(*d))
                    .collect();
                miss = miss.max(rel(&raw, &want));
            }
        }
        if new_value(p, 0.0, cap).is_some() {
            println!("{}, {p}: the raw-row edit misses by {miss:.2e}", case.name);
            raw_miss = raw_miss.min(miss);
        }
    }
    (worst, raw_miss)
}

#[test]
fn edits_on_imported_normalising_checkpoints_are_in_the_model_space() {
    let cases = [
        saelens_case(
            "SAELens layer_norm",
            "layer_norm",
            None,
            InputNorm::LayerNorm,
            1,
        ),
        saelens_case(
            "SAELens constant_norm_rescale",
            "constant_norm_rescale",
            None,
            InputNorm::NormRescale,
            2,
        ),
        saelens_case(
            "SAELens expected_average_only_in",
            "expected_average_only_in",
            Some(0.37),
            InputNorm::Scale(0.37),
            3,
        ),
        llama_scope_case(4),
        openai_case(),
        trained_case(),
    ];
    for (k, case) in cases.iter().enumerate() {
        let (worst, raw_miss) = check(case, 100 + k as u64);
        println!(
            "{}: max rel err {worst:.2e}; the raw-row edit misses by {raw_miss:.2e} or more",
            case.name
        );
        assert!(
            raw_miss > RAW_MISS,
            "{}: the raw decoder row would pass ({raw_miss:e})",
            case.name
        );
    }
}
