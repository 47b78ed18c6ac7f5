//! SAELens checkpoints: a folder with `cfg.json` and `sae_weights.safetensors`.
//!
//! Both config generations are read:
//! - v6 and later: `architecture` (`standard`, `topk`, `jumprelu`, `gated`, `transcoder`,
//!   `skip_transcoder`, `jumprelu_transcoder`, and the training-time `batchtopk` /
//!   `matryoshka_batchtopk`), `k`, `rescale_acts_by_decoder_norm`, with `model_name` and `hook_name`
//!   under `metadata`;
//! - before 6.0: flat configs with `hook_name` or the older `hook_point`, `activation_fn_str` (or
//!   `activation_fn`) and `activation_fn_kwargs.k`, a boolean or string `normalize_activations`.
//!
//! The maths follows SAELens: TopK takes the k largest pre-activations and ReLUs them;
//! `rescale_acts_by_decoder_norm` scales pre-activations by the decoder row norms (folded into the
//! weights here); transcoders never subtract `b_dec` from their input nor de-normalise their output;
//! the skip term `x W_skipᵀ` reads the raw input.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Axis};
use serde_json::Value;
use tiller_runtime::dictionary::Gated;
use tiller_runtime::{Activation, InputNorm, Kind, Meta, Weights};

use super::imported::{ImportOptions, Imported};
use crate::tensors::TensorFile;
use crate::tensors::Tensors;
use crate::{Error, Result};

/// The config file name.
pub const CFG: &str = "cfg.json";
/// The weights file name.
pub const WEIGHTS: &str = "sae_weights.safetensors";

/// Whether `dir` looks like a SAELens checkpoint.
pub fn detect(dir: &Path) -> bool {
    dir.is_dir() && dir.join(CFG).is_file() && dir.join(WEIGHTS).is_file()
}

/// The parts of `cfg.json` the import needs, after version upgrades and defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The SAELens architecture name.
    pub architecture: String,
    /// Input width.
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// Output width (transcoders).
    pub d_out: Option<usize>,
    /// TopK's k.
    pub k: Option<usize>,
    /// Whether `b_dec` is subtracted from the input.
    pub apply_b_dec_to_input: bool,
    /// The normalisation, in Tiller's terms.
    pub input_norm: InputNorm,
    /// TopK pre-activations scaled by decoder row norms.
    pub rescale_acts_by_decoder_norm: bool,
    /// The model it was trained on.
    pub model_name: String,
    /// The hook it reads.
    pub hook_name: String,
    /// The hook a transcoder writes.
    pub hook_name_out: String,
}

fn is_v6(cfg: &Value) -> bool {
    let version = cfg
        .get("sae_lens_version")
        .or_else(|| cfg.get("metadata").and_then(|m| m.get("sae_lens_version")))
        .and_then(Value::as_str);
    match version {
        Some(v) => v
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .is_some_and(|m| m >= 6),
        None => false,
    }
}

/// Parses `cfg.json` (the text `text` of the file at `path`); `dir` is searched for
/// `activation_scaler.json` when the config asks for a dataset-wise scale.
pub fn parse_config(path: &Path, text: &str, dir: &Path) -> Result<Config> {
    let err = |m: String| Error::format(path, m);
    let cfg: Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    if !cfg.is_object() {
        return Err(err("the config is not a JSON object".into()));
    }
    let meta = cfg.get("metadata").cloned().unwrap_or(Value::Null);
    // A key at the top level, or (v6) under `metadata`.
    let field = |k: &str| {
        cfg.get(k)
            .filter(|v| !v.is_null())
            .or_else(|| meta.get(k).filter(|v| !v.is_null()))
    };
    let size = |k: &str| -> Result<usize> {
        match cfg.get(k) {
            None | Some(Value::Null) => Err(err(format!("key `{k}` is missing"))),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(err(format!("key `{k}` = {v} is not a positive integer"))),
            },
        }
    };
    let string = |k: &str| field(k).and_then(Value::as_str).unwrap_or("").to_string();
    let boolean = |k: &str, default: bool| -> Result<bool> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(format!("key `{k}` = {v} is not true or false"))),
        }
    };

    let v6 = is_v6(&cfg);
    let mut architecture = cfg
        .get("architecture")
        .and_then(Value::as_str)
        .unwrap_or("standard")
        .to_string();
    let mut k = cfg.get("k").and_then(Value::as_u64).map(|k| k as usize);
    if !v6 {
        let act = cfg
            .get("activation_fn_str")
            .or_else(|| cfg.get("activation_fn"))
            .and_then(Value::as_str)
            .unwrap_or("relu");
        let kw_k = cfg
            .get("activation_fn_kwargs")
            .and_then(|kw| kw.get("k"))
            .and_then(Value::as_u64);
        match act {
            "relu" => {}
            "topk" => {
                architecture = "topk".into();
                k = kw_k.map(|k| k as usize).or(k);
            }
            other => {
                return Err(err(format!(
                    "key `activation_fn_str` = `{other}` is not supported (Tiller reads relu and topk)"
                )));
            }
        }
        if architecture == "topk" && k.is_none() {
            k = kw_k.map(|k| k as usize);
        }
    }
    let d_in = size("d_in")?;
    let d_sae = size("d_sae")?;
    let transcoder = architecture.contains("transcoder");
    let d_out = if transcoder {
        cfg.get("d_out").and_then(Value::as_u64).map(|d| d as usize)
    } else {
        None
    };
    let apply_b_dec_to_input = boolean("apply_b_dec_to_input", !transcoder)?;
    if transcoder && apply_b_dec_to_input {
        return Err(err(
            "key `apply_b_dec_to_input` is true, which SAELens forbids for transcoders".into(),
        ));
    }
    let input_norm = match cfg.get("normalize_activations") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => InputNorm::None,
        Some(Value::Bool(true)) => scaler(dir)?,
        Some(Value::String(s)) => match s.as_str() {
            "none" => InputNorm::None,
            "expected_average_only_in" => scaler(dir)?,
            "constant_norm_rescale" => InputNorm::NormRescale,
            "layer_norm" => InputNorm::LayerNorm,
            other => {
                return Err(err(format!(
                    "key `normalize_activations` = `{other}` is not a SAELens mode"
                )));
            }
        },
        Some(v) => {
            return Err(err(format!(
                "key `normalize_activations` = {v} is not a string or boolean"
            )));
        }
    };
    if matches!(architecture.as_str(), "topk") && k.is_none() {
        return Err(err(
            "a topk SAE needs `k` (or `activation_fn_kwargs.k` before SAELens 6)".into(),
        ));
    }
    Ok(Config {
        architecture,
        d_in,
        d_sae,
        d_out,
        k,
        apply_b_dec_to_input,
        input_norm,
        rescale_acts_by_decoder_norm: boolean("rescale_acts_by_decoder_norm", false)?,
        model_name: string("model_name"),
        hook_name: field("hook_name")
            .or_else(|| field("hook_point"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        hook_name_out: string("hook_name_out"),
    })
}

/// `expected_average_only_in`: the scale SAELens applies, when a training checkpoint still holds it
/// in `activation_scaler.json`; final saves have it folded into the weights already.
fn scaler(dir: &Path) -> Result<InputNorm> {
    let p = dir.join("activation_scaler.json");
    if !p.is_file() {
        return Ok(InputNorm::None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&p, format!("not valid JSON: {e}")))?;
    match v.get("scaling_factor") {
        None | Some(Value::Null) => Ok(InputNorm::None),
        Some(s) => match s.as_f64() {
            Some(f) if f.is_finite() && f != 0.0 => Ok(InputNorm::Scale(f as f32)),
            _ => Err(Error::format(
                &p,
                format!("`scaling_factor` = {s} is not a finite non-zero number"),
            )),
        },
    }
}

/// Imports the SAELens checkpoint in `dir`.
pub fn import(dir: &Path, _opts: &ImportOptions) -> Result<Vec<Imported>> {
    let cfg_path = dir.join(CFG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = parse_config(&cfg_path, &text, dir)?;
    let weights_path: PathBuf = dir.join(WEIGHTS);
    let mut st = TensorFile::open(&weights_path)?;
    let (meta, weights) = convert(&cfg, &cfg_path, &mut st)?;
    Ok(Imported::single(meta, weights))
}

/// Builds Tiller's metadata and weights from a parsed config and its tensors.
pub fn convert(cfg: &Config, cfg_path: &Path, st: &mut TensorFile) -> Result<(Meta, Weights)> {
    let (kind, activation) = match cfg.architecture.as_str() {
        "standard" => (Kind::Sae, Activation::Relu),
        "topk" => (Kind::Sae, Activation::TopK),
        "jumprelu" => (Kind::Sae, Activation::JumpRelu),
        "gated" => (Kind::Sae, Activation::Gated),
        "batchtopk" | "matryoshka_batchtopk" => (Kind::Sae, Activation::BatchTopK),
        "transcoder" => (Kind::Transcoder, Activation::Relu),
        "jumprelu_transcoder" => (Kind::Transcoder, Activation::JumpRelu),
        "skip_transcoder" => (Kind::SkipTranscoder, Activation::Relu),
        other => {
            return Err(Error::format(
                cfg_path,
                format!(
                    "key `architecture` = `{other}` is unknown; Tiller imports standard, topk, jumprelu, gated, \
                     batchtopk, matryoshka_batchtopk, transcoder, jumprelu_transcoder, skip_transcoder"
                ),
            ));
        }
    };
    let (d_in, d_sae) = (cfg.d_in, cfg.d_sae);
    let d_out = match (cfg.d_out, kind) {
        (Some(d), _) => d,
        (None, Kind::Sae) => d_in,
        // Transcoder configs before d_out existed: the decoder's width says it.
        (None, _) => st
            .shape("W_dec")
            .and_then(|s| s.get(1).copied())
            .unwrap_or(d_in),
    };

    let w_enc = st.take2("W_enc", d_in, d_sae)?;
    let mut w_dec = st.take2("W_dec", d_sae, d_out)?;
    let b_dec = st.take1("b_dec", d_out)?;
    let (mut b_enc, gated) = if activation == Activation::Gated {
        let b_gate = st.take1("b_gate", d_sae)?;
        let r_mag = st.take1("r_mag", d_sae)?;
        let b_mag = st.take1("b_mag", d_sae)?;
        (b_gate, Some(Gated { r_mag, b_mag }))
    } else {
        (st.take1("b_enc", d_sae)?, None)
    };
    let mut threshold = match activation {
        Activation::JumpRelu => Some(if st.has("threshold") {
            st.take1("threshold", d_sae)?
        } else if st.has("log_threshold") {
            st.take1("log_threshold", d_sae)?.mapv(f32::exp)
        } else {
            return Err(Error::format(
                st.path(),
                "tensor `threshold` is missing (a jumprelu SAE needs it)",
            ));
        }),
        Activation::BatchTopK => {
            let t = st.take_any("topk_threshold")?;
            if t.len() != 1 {
                return Err(Error::format(
                    st.path(),
                    format!(
                        "tensor `topk_threshold` has shape {:?}, expected a scalar",
                        t.shape()
                    ),
                ));
            }
            Some(Array1::from_elem(
                1,
                t.iter().copied().next().unwrap_or(0.0),
            ))
        }
        _ => None,
    };
    let w_skip = if kind == Kind::SkipTranscoder {
        Some(st.take2("W_skip", d_out, d_in)?)
    } else {
        None
    };

    // Pre-6 checkpoints: a per-feature decoder scale, folded into the decoder rows.
    for name in ["scaling_factor", "finetuning_scaling_factor"] {
        if st.has(name) {
            let s = st.take1(name, d_sae)?;
            if s.iter().any(|v| *v != 1.0) {
                for (mut row, f) in w_dec.axis_iter_mut(Axis(0)).zip(s.iter()) {
                    row *= *f;
                }
            }
        }
    }

    let mut w_enc = w_enc;
    if cfg.rescale_acts_by_decoder_norm {
        if activation != Activation::TopK {
            return Err(Error::format(
                cfg_path,
                "`rescale_acts_by_decoder_norm` is only defined for topk SAEs",
            ));
        }
        fold_decoder_norm(&mut w_enc, &mut b_enc, &mut w_dec, threshold.as_mut());
    }

    let mut meta = Meta::new(kind, activation, d_in, d_sae, d_out);
    meta.k = if activation == Activation::TopK {
        cfg.k
    } else {
        None
    };
    meta.hook_in = cfg.hook_name.clone();
    meta.hook_out = if cfg.hook_name_out.is_empty() {
        cfg.hook_name.clone()
    } else {
        cfg.hook_name_out.clone()
    };
    meta.model = cfg.model_name.clone();
    meta.input_norm = cfg.input_norm;
    meta.source = "saelens".into();
    let weights = Weights {
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold,
        gated,
        w_skip,
        b_skip: None,
        apply_b_dec_to_input: cfg.apply_b_dec_to_input,
    };
    weights
        .check(&meta)
        .map_err(|e| Error::format(cfg_path, e.to_string()))?;
    Ok((meta, weights))
}

/// Moves the decoder row norms into the encoder: `W_enc[:, i] *= n_i`, `b_enc[i] *= n_i`,
/// `W_dec[i] /= n_i` (and a threshold, if any, `*= n_i`). The features then read `pre · n`, as
/// SAELens computes them with `rescale_acts_by_decoder_norm`, and decode to the same output.
pub fn fold_decoder_norm(
    w_enc: &mut Array2<f32>,
    b_enc: &mut Array1<f32>,
    w_dec: &mut Array2<f32>,
    threshold: Option<&mut Array1<f32>>,
) {
    let norms: Vec<f32> = w_dec.rows().into_iter().map(|r| r.dot(&r).sqrt()).collect();
    for (i, &n) in norms.iter().enumerate() {
        if n > 0.0 {
            w_enc.column_mut(i).mapv_inplace(|v| v * n);
            b_enc[i] *= n;
            w_dec.row_mut(i).mapv_inplace(|v| v / n);
        }
    }
    if let Some(t) = threshold
        && t.len() == norms.len()
    {
        for (v, n) in t.iter_mut().zip(&norms) {
            *v *= n;
        }
    }
}
