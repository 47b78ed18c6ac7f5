//! Llama Scope checkpoints (OpenMOSS Language-Model-SAEs, the `lm_saes` of October 2024): a folder
//! with `hyperparams.json`, `lm_config.json` and `checkpoints/final.safetensors` (or
//! `sae_weights.safetensors`, `checkpoints/pruned.safetensors`, searched in `lm_saes`' order), with
//! `encoder.weight` `[d_sae, d_model]`, `encoder.bias`, `decoder.weight` `[d_model, d_sae]` and
//! `decoder.bias`. A repository's folder of such folders (`Llama3_1-8B-Base-L15R-8x`, …) is imported
//! whole, or one of them with `--hookpoint`.
//!
//! The maths is what `lm_saes`' own loader (`SparseAutoEncoder.from_config`, `src/lm_saes/sae.py`)
//! makes of a checkpoint, the form in which Llama Scope's JumpReLU thresholds were measured
//! (`post_processing.py`):
//! 1. `norm_activation: dataset-wise` is folded into the weights, with `s_in = sqrt(d_model) /
//!    dataset_average_activation_norm.in` and `s_out` likewise: `encoder.bias /= s_in`,
//!    `decoder.bias /= s_out`, `decoder.weight *= s_in / s_out`; inputs are then read raw.
//! 2. `sparsity_include_decoder_norm` moves the decoder column norms `n` into the encoder:
//!    `decoder.weight /= n`, `encoder.weight *= n`, `encoder.bias *= n`.
//! 3. `pre = x encoder.weightᵀ + encoder.bias` (less `decoder.bias` first when
//!    `apply_decoder_bias_to_pre_encoder`); JumpReLU keeps `pre` where `pre > jump_relu_threshold`
//!    (one scalar); TopK keeps the `top_k` largest of `relu(pre)` (a `topk` checkpoint with a
//!    positive `jump_relu_threshold` runs as JumpReLU, as there); `x̂ = f decoder.weightᵀ + decoder.bias`.
//!
//! Here the input is scaled by `s_in` inside the graph (`input_norm = scale:s_in`, undone on an
//! SAE's output) and the feature activations are `s_in` times `lm_saes`' — the units SAELens
//! reports them in — so the threshold is `jump_relu_threshold · s_in`, as SAELens sets it. The
//! features that fire and the reconstruction are `lm_saes`'. SAELens' loader
//! (`llama_scope_sae_huggingface_loader`) agrees exactly when the decoder columns have unit norm; it
//! ignores `sparsity_include_decoder_norm`, so with other norms its features fire at
//! `pre > t · s_in` where `lm_saes`' fire at `pre > t · s_in / n`.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use serde_json::{Map, Value};
use tiller_runtime::{Activation, InputNorm, Kind, Meta, Weights};

use super::discover::{folder_name, json_object, read_json, select};
use super::imported::{ImportOptions, Imported};
use crate::tensors::TensorFile;
use crate::tensors::Tensors;
use crate::{Error, Result};

/// The SAE's config file.
pub const HYPERPARAMS: &str = "hyperparams.json";
/// The language model's config file, beside it.
pub const LM_CONFIG: &str = "lm_config.json";
/// The weights files, in the order `lm_saes` looks for them.
pub const WEIGHTS: [&str; 3] = [
    "sae_weights.safetensors",
    "checkpoints/pruned.safetensors",
    "checkpoints/final.safetensors",
];
/// The torch pickles `lm_saes` also accepts, named in the error when only they are present.
const TORCH_WEIGHTS: [&str; 3] = [
    "sae_weights.pt",
    "checkpoints/pruned.pt",
    "checkpoints/final.pt",
];

/// How deep below a repository's folder checkpoints are looked for.
const MAX_DEPTH: usize = 2;

fn is_checkpoint_dir(dir: &Path) -> bool {
    dir.is_dir()
        && dir.join(HYPERPARAMS).is_file()
        && WEIGHTS
            .iter()
            .chain(TORCH_WEIGHTS.iter())
            .any(|w| dir.join(w).is_file())
}

/// Whether `path` looks like a Llama Scope checkpoint folder, or a folder of them.
pub fn detect(path: &Path) -> bool {
    is_checkpoint_dir(path)
        || !super::discover::find_dirs(path, is_checkpoint_dir, MAX_DEPTH).is_empty()
}

/// Imports the checkpoint folder at `path`, or those below it (all, or the one `opts.hookpoint`
/// names).
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Vec<Imported>> {
    let dirs = select(
        path,
        is_checkpoint_dir,
        MAX_DEPTH,
        opts,
        "Llama Scope checkpoints (`hyperparams.json` + `checkpoints/final.safetensors`)",
    )?;
    dirs.into_iter()
        .map(|(name, dir)| {
            let (meta, weights) = read_checkpoint(&dir)?;
            Ok(Imported {
                name,
                meta,
                weights,
            })
        })
        .collect()
}

/// The activation function of `act_fn`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActFn {
    /// `relu(pre)`.
    Relu,
    /// The `top_k` largest of `relu(pre)`.
    TopK,
    /// `pre · [pre > jump_relu_threshold]`.
    JumpRelu,
}

/// The input normalisation of `norm_activation`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// No scaling (`none`, or `inference`: already folded into the weights).
    None,
    /// Each token scaled to norm `sqrt(d_model)`.
    TokenWise,
    /// Scaled by `sqrt(d_model) / average norm`, the averages measured on the dataset.
    DatasetWise {
        /// The input's average norm.
        avg_in: f64,
        /// The output's average norm.
        avg_out: f64,
    },
}

/// The parts of `hyperparams.json` the import needs, with `lm_saes`' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Input and output width.
    pub d_model: usize,
    /// Number of features.
    pub d_sae: usize,
    /// The activation function.
    pub act_fn: ActFn,
    /// JumpReLU's threshold (one for every feature).
    pub jump_relu_threshold: f64,
    /// TopK's k.
    pub top_k: usize,
    /// The input normalisation.
    pub norm: Norm,
    /// Decoder norms folded into the encoder on loading.
    pub sparsity_include_decoder_norm: bool,
    /// Whether `decoder.bias` exists.
    pub use_decoder_bias: bool,
    /// Whether `decoder.bias` is subtracted from the input.
    pub apply_decoder_bias_to_pre_encoder: bool,
    /// The hook read.
    pub hook_point_in: String,
    /// The hook written (a transcoder's differs).
    pub hook_point_out: String,
}

impl Config {
    /// Whether it reads one hook and writes another.
    pub fn is_transcoder(&self) -> bool {
        self.hook_point_in != self.hook_point_out
    }
}

/// Parses `hyperparams.json` (the text `text` of the file at `path`).
pub fn parse_config(path: &Path, text: &str) -> Result<Config> {
    let cfg = json_object(path, text)?;
    let err = |m: String| Error::format(path, m);
    let size = |k: &str| -> Result<Option<usize>> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(err(format!("key `{k}` = {v} is not a positive integer"))),
            },
        }
    };
    let boolean = |k: &str, default: bool| -> Result<bool> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(format!("key `{k}` = {v} is not true or false"))),
        }
    };
    let string = |k: &str, default: &str| -> Result<String> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(err(format!("key `{k}` = {v} is not a string"))),
        }
    };
    let d_model = size("d_model")?.ok_or_else(|| err("key `d_model` is missing".into()))?;
    let d_sae = match (size("d_sae")?, size("expansion_factor")?) {
        (Some(d), _) => d,
        (None, Some(e)) => e * d_model,
        (None, None) => return Err(err("key `d_sae` (or `expansion_factor`) is missing".into())),
    };
    let act_fn = match string("act_fn", "relu")?.to_lowercase().as_str() {
        "relu" => ActFn::Relu,
        "topk" => ActFn::TopK,
        "jumprelu" => ActFn::JumpRelu,
        other => {
            return Err(err(format!(
                "key `act_fn` = `{other}` is unknown; Tiller imports relu, topk and jumprelu"
            )));
        }
    };
    let jump_relu_threshold = match cfg.get("jump_relu_threshold") {
        None | Some(Value::Null) => 0.0,
        Some(v) => match v.as_f64() {
            Some(t) if t.is_finite() => t,
            _ => {
                return Err(err(format!(
                    "key `jump_relu_threshold` = {v} is not a number"
                )));
            }
        },
    };
    // `lm_saes` runs a topk checkpoint with a measured threshold as JumpReLU.
    let act_fn = if act_fn == ActFn::TopK && jump_relu_threshold > 0.0 {
        ActFn::JumpRelu
    } else {
        act_fn
    };
    if act_fn == ActFn::JumpRelu && jump_relu_threshold < 0.0 {
        return Err(err(format!(
            "key `jump_relu_threshold` = {jump_relu_threshold} is negative: `lm_saes` then passes \
             negative pre-activations through, which Tiller's JumpReLU (`relu(pre) · [pre > t]`) does not"
        )));
    }
    let top_k = size("top_k")?.unwrap_or(50);
    if act_fn == ActFn::TopK && top_k > d_sae {
        return Err(err(format!(
            "key `top_k` = {top_k} exceeds d_sae = {d_sae}"
        )));
    }
    if boolean("use_glu_encoder", false)? {
        return Err(err(
            "key `use_glu_encoder` is true: a gated-linear encoder has no Tiller equivalent".into(),
        ));
    }
    let hook_point_in = string("hook_point_in", "")?;
    let hook_point_out = match string("hook_point_out", "")? {
        s if s.is_empty() => hook_point_in.clone(),
        s => s,
    };
    let norm = match string("norm_activation", "token-wise")?.as_str() {
        "none" | "inference" => Norm::None,
        "token-wise" => Norm::TokenWise,
        "dataset-wise" => {
            let avg = cfg
                .get("dataset_average_activation_norm")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    err("`norm_activation` is `dataset-wise` but key `dataset_average_activation_norm` is missing".into())
                })?;
            let avg_in = average(path, avg, &["in", &hook_point_in])?;
            let avg_out = average(path, avg, &["out", &hook_point_out])?;
            Norm::DatasetWise { avg_in, avg_out }
        }
        "batch-wise" => {
            return Err(err(
                "key `norm_activation` = `batch-wise` scales by the batch's average norm, which a \
                 dictionary cannot fix in advance"
                    .into(),
            ));
        }
        other => {
            return Err(err(format!(
                "key `norm_activation` = `{other}` is not none, token-wise or dataset-wise"
            )));
        }
    };
    Ok(Config {
        d_model,
        d_sae,
        act_fn,
        jump_relu_threshold,
        top_k,
        norm,
        sparsity_include_decoder_norm: boolean("sparsity_include_decoder_norm", true)?,
        use_decoder_bias: boolean("use_decoder_bias", true)?,
        apply_decoder_bias_to_pre_encoder: boolean("apply_decoder_bias_to_pre_encoder", true)?,
        hook_point_in,
        hook_point_out,
    })
}

/// A dataset-average norm, under the first of `keys` present (`in`/`out`, or the hook's name).
fn average(path: &Path, avg: &Map<String, Value>, keys: &[&str]) -> Result<f64> {
    let Some((k, v)) = keys.iter().find_map(|k| avg.get(*k).map(|v| (*k, v))) else {
        return Err(Error::format(
            path,
            format!(
                "key `dataset_average_activation_norm` has no `{}` entry",
                keys.first().copied().unwrap_or("in")
            ),
        ));
    };
    match v.as_f64() {
        Some(a) if a.is_finite() && a > 0.0 => Ok(a),
        _ => Err(Error::format(
            path,
            format!("`dataset_average_activation_norm.{k}` = {v} is not a positive number"),
        )),
    }
}

/// The weights file of a checkpoint folder.
fn weights_path(dir: &Path) -> Result<PathBuf> {
    if let Some(p) = WEIGHTS.iter().map(|w| dir.join(w)).find(|p| p.is_file()) {
        return Ok(p);
    }
    match TORCH_WEIGHTS
        .iter()
        .map(|w| dir.join(w))
        .find(|p| p.is_file())
    {
        Some(p) => Err(Error::format(
            p,
            "is a torch pickle; Tiller reads Llama Scope weights from safetensors \
             (`checkpoints/final.safetensors`)",
        )),
        None => Err(Error::format(
            dir,
            format!("has none of the weights files {}", WEIGHTS.join(", ")),
        )),
    }
}

/// The model: `lm_config.json`'s `model_name`, or Llama Scope's own model when the folder is
/// named after it.
fn model_name(dir: &Path) -> Result<String> {
    let lm = dir.join(LM_CONFIG);
    if lm.is_file() {
        let cfg = read_json(&lm)?;
        if let Some(m) = cfg.get("model_name").and_then(Value::as_str) {
            return Ok(m.to_string());
        }
    }
    Ok(if folder_name(dir).starts_with("Llama3_1-8B") {
        "meta-llama/Llama-3.1-8B".into()
    } else {
        String::new()
    })
}

/// Reads the checkpoint folder `dir`.
pub fn read_checkpoint(dir: &Path) -> Result<(Meta, Weights)> {
    let cfg_path = dir.join(HYPERPARAMS);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = parse_config(&cfg_path, &text)?;
    let mut st = TensorFile::open(&weights_path(dir)?)?;
    let (mut meta, weights) = convert(&cfg, &cfg_path, &mut st)?;
    meta.model = model_name(dir)?;
    Ok((meta, weights))
}

/// Builds Tiller's metadata and weights from a parsed config and its tensors (see the module docs
/// for the maths).
pub fn convert(cfg: &Config, cfg_path: &Path, st: &mut TensorFile) -> Result<(Meta, Weights)> {
    let (d, d_sae) = (cfg.d_model, cfg.d_sae);
    let transcoder = cfg.is_transcoder();
    // Kept in float32 (the released weights are bfloat16); each value is rescaled in float64.
    let enc = st.take2("encoder.weight", d_sae, d)?;
    let enc_b = st.take1("encoder.bias", d_sae)?;
    let dec = st.take2("decoder.weight", d, d_sae)?;
    let dec_b = if cfg.use_decoder_bias {
        st.take1("decoder.bias", d)?
    } else {
        Array1::zeros(d)
    };

    // sigma: the factor between Tiller's activations and lm_saes'; r: lm_saes' decoder rescale;
    // s_out: the output's scale; denorm: what Tiller divides an SAE's output by.
    let sqrt_d = (d as f64).sqrt();
    let (input_norm, sigma, r, s_out) = match cfg.norm {
        Norm::None => (InputNorm::None, 1.0, 1.0, 1.0),
        Norm::TokenWise => {
            if transcoder {
                return Err(Error::format(
                    cfg_path,
                    "`norm_activation` = `token-wise` on a transcoder rescales the output by the \
                     label's own norm, which is not known at inference",
                ));
            }
            (InputNorm::NormRescale, 1.0, 1.0, 1.0)
        }
        Norm::DatasetWise { avg_in, avg_out } => {
            let (s_in, s_out) = (sqrt_d / avg_in, sqrt_d / avg_out);
            (InputNorm::Scale(s_in as f32), s_in, s_in / s_out, s_out)
        }
    };
    let denorm = if transcoder || cfg.norm == Norm::TokenWise {
        // Token-wise scaling is undone per token inside the graph; transcoders are not undone.
        1.0
    } else {
        sigma
    };
    let subtract_b_dec = cfg.use_decoder_bias && cfg.apply_decoder_bias_to_pre_encoder;
    if subtract_b_dec && transcoder && cfg.norm != Norm::None {
        return Err(Error::format(
            cfg_path,
            "`apply_decoder_bias_to_pre_encoder` on a normalised transcoder subtracts the output's \
             bias in the input's scale, which Tiller's format cannot express",
        ));
    }

    let norms: Vec<f64> = dec
        .columns()
        .into_iter()
        .map(|c| {
            if cfg.sparsity_include_decoder_norm {
                c.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt() * r
            } else {
                1.0
            }
        })
        .collect();
    // A feature whose decoder column is zero writes nothing and is left silent here; lm_saes would
    // divide by its zero norm.
    let w_enc = Array2::from_shape_fn((d, d_sae), |(j, i)| match norms[i] {
        0.0 => 0.0,
        n => (f64::from(enc[[i, j]]) * n) as f32,
    });
    drop(enc);
    let w_dec = Array2::from_shape_fn((d_sae, d), |(i, j)| match norms[i] {
        0.0 => 0.0,
        n => (f64::from(dec[[j, i]]) * r / n * denorm / sigma) as f32,
    });
    drop(dec);
    let b_enc = Array1::from_shape_fn(d_sae, |i| (f64::from(enc_b[i]) * norms[i]) as f32);
    let b_dec = dec_b.mapv(|b| (f64::from(b) * denorm / s_out) as f32);

    let (kind, activation) = (
        if transcoder {
            Kind::Transcoder
        } else {
            Kind::Sae
        },
        match cfg.act_fn {
            ActFn::Relu => Activation::Relu,
            ActFn::TopK => Activation::TopK,
            ActFn::JumpRelu => Activation::JumpRelu,
        },
    );
    let mut meta = Meta::new(kind, activation, d, d_sae, d);
    if activation == Activation::TopK {
        meta.k = Some(cfg.top_k);
    }
    meta.input_norm = input_norm;
    meta.hook_in = cfg.hook_point_in.clone();
    meta.hook_out = cfg.hook_point_out.clone();
    meta.source = "llama-scope".into();
    let mut weights = Weights::new(w_enc, b_enc, w_dec, b_dec);
    if activation == Activation::JumpRelu {
        weights.threshold = Some(Array1::from_elem(
            d_sae,
            (cfg.jump_relu_threshold * sigma) as f32,
        ));
    }
    weights.apply_b_dec_to_input = subtract_b_dec;
    weights
        .check(&meta)
        .map_err(|e| Error::format(st.path(), e.to_string()))?;
    Ok((meta, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_config() {
        // The fields of a released Llama Scope hyperparams.json.
        let c = parse_config(
            Path::new(HYPERPARAMS),
            r#"{"hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
                "use_decoder_bias": true, "apply_decoder_bias_to_pre_encoder": false, "expansion_factor": 8,
                "d_model": 4096, "d_sae": 32768, "bias_init_method": "all_zero", "act_fn": "jumprelu",
                "jump_relu_threshold": 0.35546875, "norm_activation": "dataset-wise",
                "dataset_average_activation_norm": {"in": 10.8125, "out": 10.8125},
                "decoder_exactly_fixed_norm": false, "sparsity_include_decoder_norm": true,
                "use_glu_encoder": false, "init_decoder_norm": 0.5, "top_k": 50, "dtype": "torch.bfloat16"}"#,
        )
        .unwrap();
        assert_eq!(c.act_fn, ActFn::JumpRelu);
        assert_eq!(
            c.norm,
            Norm::DatasetWise {
                avg_in: 10.8125,
                avg_out: 10.8125
            }
        );
        assert!(!c.is_transcoder());
    }
}
