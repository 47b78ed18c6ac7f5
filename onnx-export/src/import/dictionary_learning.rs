//! saprmarks/dictionary_learning checkpoints: a trainer folder with `ae.pt` (a `torch.save`d state
//! dict) and `config.json` (`trainer.dict_class`, `activation_dim`, `dict_size`, `k`, `lm_name`,
//! `submodule_name`, …). The path may be the folder, its `ae.pt`, or a `checkpoints/ae_<step>.pt`
//! beside it.
//!
//! Each class is read as its `from_pretrained` loads it and computed as its `encode`/`decode` do
//! (`dictionary_learning/dictionary.py`, `trainers/top_k.py`, `trainers/batch_top_k.py`,
//! `trainers/matryoshka_batch_top_k.py`):
//! - `AutoEncoder`: `f = relu(encoder(x - bias))`, `x̂ = decoder(f) + bias`; as
//!   `from_pretrained(normalize_decoder=True)` does, decoder columns are scaled to unit norm (and the
//!   encoder rows and bias by the same norms) unless they already are.
//! - `AutoEncoderNew`: `f = relu(encoder(x))`, `x̂ = decoder(f)` (both with biases).
//! - `GatedAutoEncoder`: `x_enc = encoder(x - decoder_bias)`,
//!   `f = [x_enc + gate_bias > 0] · relu(exp(r_mag) · x_enc + mag_bias)`.
//! - `JumpReluAutoEncoder`: `pre = x W_enc + b_enc`, `f = relu(pre · [pre > threshold])`.
//! - `AutoEncoderTopK`: the `k` largest of `relu(encoder(x - b_dec))` (`k` from the state dict's
//!   buffer, checked against the config).
//! - `BatchTopKSAE` and `MatryoshkaBatchTopKSAE`: at inference the learned scalar threshold,
//!   `f = relu(pre) · [relu(pre) > threshold]` (Tiller's `batchtopk`). A threshold still at its
//!   initial -1 keeps every positive activation, as the project does.
//! - `CrossCoder` (the science-of-finetuning fork): encoder `[n_layers, d, F]`, decoder
//!   `[n_layers, F, d]`, `f = relu(Σ_l x_l W_l + b)`, `x̂_l = f D_l + b_l`; written in Tiller's
//!   layer-major layout (`W_enc` `[n_layers·d, F]`, `W_dec` `[F, n_layers·d]`). Features are those of
//!   `encode`, not the code-normalised ones `get_activations` reports.
//! - `BatchTopKCrossCoder`: its threshold compares `f · c_j` (`c_j` the code normalisation of
//!   feature `j`, from `code_normalization_id`), which is a per-feature threshold `t / c_j` on `f`:
//!   written as JumpReLU. Decoupled code normalisation (per-layer features) is refused.
//!
//! The fork's activation normaliser (`activation_mean`, `activation_std`, `activation_global_scale`
//! buffers, when not NaN) is folded into the weights: `x_n = (x - mean)·s`, undone as
//! `y/(s + 1e-8) + mean`, both affine. A training backup left in `ae.pt` (`{"ae": state_dict,
//! "norm_factor": …}`) is read with the bias scaling the trainer applies before its final save
//! (`scale_biases(norm_factor)`), so it runs on raw activations like a final checkpoint.
//!
//! `tiller.model` is the config's `lm_name`; an SAE's hook is its `submodule_name`, the trainer's
//! own name for it (`resid_post_layer_3`): give the host's name with `--hook`. Crosscoders get no
//! hook (their layers are not named in the config).

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Ix3, s};
use serde_json::Value;
use tiller_runtime::dictionary::Gated;
use tiller_runtime::{Activation, InputNorm, Kind, Meta, Weights};

use super::imported::{ImportOptions, Imported};
use crate::torch::{self, Checkpoint};
use crate::{Error, Result};

/// The weights file of a trainer folder.
pub const WEIGHTS: &str = "ae.pt";
/// The config file of a trainer folder.
pub const CONFIG: &str = "config.json";

/// The classes Tiller imports.
pub const CLASSES: &[&str] = &[
    "AutoEncoder",
    "AutoEncoderNew",
    "GatedAutoEncoder",
    "JumpReluAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "CrossCoder",
    "BatchTopKCrossCoder",
];

/// The `(ae.pt, config.json)` pair `path` names: a trainer folder, its `ae.pt`, or a checkpoint in
/// its `checkpoints/` folder.
fn resolve(path: &Path) -> Option<(PathBuf, PathBuf)> {
    if path.is_dir() {
        let (w, c) = (path.join(WEIGHTS), path.join(CONFIG));
        return (w.is_file() && c.is_file()).then_some((w, c));
    }
    if !path.is_file() || path.extension().is_none_or(|e| e != "pt") {
        return None;
    }
    let parent = path.parent()?;
    let mut cfg = parent.join(CONFIG);
    if !cfg.is_file() && parent.file_name().is_some_and(|n| n == "checkpoints") {
        cfg = parent.parent()?.join(CONFIG);
    }
    cfg.is_file().then(|| (path.to_path_buf(), cfg))
}

/// Whether `path` looks like a dictionary_learning checkpoint (its config names a `dict_class`).
pub fn detect(path: &Path) -> bool {
    resolve(path).is_some_and(|(_, cfg)| {
        std::fs::read_to_string(&cfg)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v["trainer"]["dict_class"].is_string())
    })
}

/// The parts of `config.json` the import uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `trainer.dict_class`.
    pub dict_class: String,
    /// `trainer.activation_dim`, checked against the weights.
    pub activation_dim: Option<usize>,
    /// `trainer.dict_size`, checked against the weights.
    pub dict_size: Option<usize>,
    /// `trainer.k`, checked against the state dict's `k`.
    pub k: Option<usize>,
    /// `trainer.lm_name`.
    pub lm_name: String,
    /// `trainer.submodule_name`.
    pub submodule_name: String,
}

/// Parses `config.json` (the text `text` of the file at `path`).
pub fn parse_config(path: &Path, text: &str) -> Result<Config> {
    let err = |m: String| Error::format(path, m);
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let t = v
        .get("trainer")
        .filter(|t| t.is_object())
        .ok_or_else(|| err("key `trainer` is missing or not an object".into()))?;
    let size = |k: &str| -> Result<Option<usize>> {
        match t.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(err(format!(
                    "key `trainer.{k}` = {x} is not a positive integer"
                ))),
            },
        }
    };
    let string = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let dict_class = t
        .get("dict_class")
        .and_then(Value::as_str)
        .ok_or_else(|| err("key `trainer.dict_class` is missing or not a string".into()))?
        .to_string();
    Ok(Config {
        dict_class,
        activation_dim: size("activation_dim")?,
        dict_size: size("dict_size")?,
        k: size("k")?,
        lm_name: string("lm_name"),
        submodule_name: string("submodule_name"),
    })
}

/// Imports the dictionary_learning checkpoint at `path`.
pub fn import(path: &Path, _opts: &ImportOptions) -> Result<Vec<Imported>> {
    let (weights_path, cfg_path) = resolve(path).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "is not a dictionary_learning checkpoint: `{WEIGHTS}` and `{CONFIG}` are expected"
            ),
        )
    })?;
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = parse_config(&cfg_path, &text)?;
    let mut ck = torch::load(&weights_path)?;
    let norm_factor = unwrap_backup(&mut ck)?;
    if !ck.has("encoder.weight")
        && !ck.has("W_enc")
        && ck.names().iter().any(|n| n.starts_with("_orig_mod."))
    {
        // Saved while torch.compile wrapped the module, as from_pretrained also accepts.
        ck.strip_prefix("_orig_mod");
    }
    let (meta, weights) = convert(&cfg, &cfg_path, &mut ck, norm_factor)?;
    Ok(Imported::single(meta, weights))
}

/// A backup written during training holds the state dict under `ae` and the activation scale
/// under `norm_factor`; a final `ae.pt` is the state dict itself.
fn unwrap_backup(ck: &mut Checkpoint) -> Result<Option<f64>> {
    let is_backup = ck.names().iter().any(|n| n.starts_with("ae."))
        && ck.values.contains_key("step")
        && !ck.has("encoder.weight")
        && !ck.has("W_enc");
    if !is_backup {
        return Ok(None);
    }
    let nf = ck.scalar("norm_factor")?;
    if let Some(f) = nf
        && !(f.is_finite() && f > 0.0)
    {
        return Err(Error::format(
            ck.path(),
            format!("`norm_factor` = {f} is not a positive number"),
        ));
    }
    ck.strip_prefix("ae");
    Ok(nf)
}

/// A dictionary while it is rearranged, in Tiller's layer-major layout: matrices in float32 (one
/// copy of the weights), vectors in float64.
struct Dict {
    kind: Kind,
    activation: Activation,
    d: usize,
    f: usize,
    layers: usize,
    k: Option<usize>,
    /// `[layers·d, f]`.
    w_enc: Array2<f32>,
    /// `[f]` (the gate bias of a gated SAE).
    b_enc: Array1<f64>,
    /// Subtracted from the (normalised) input before encoding, `[layers·d]`.
    sub: Option<Array1<f64>>,
    /// `[f, layers·d]`.
    w_dec: Array2<f32>,
    /// `[layers·d]`.
    b_dec: Array1<f64>,
    threshold: Option<Array1<f64>>,
    /// `(r_mag, b_mag)`.
    gated: Option<(Array1<f64>, Array1<f64>)>,
    norm: Option<Normaliser>,
}

/// `x_n = (x - mean)·scale_l` per layer, undone as `y·unscale_l + mean`.
struct Normaliser {
    mean: Array1<f64>,
    scale: Vec<f64>,
    unscale: Vec<f64>,
}

fn v64(a: Array1<f32>) -> Array1<f64> {
    a.mapv(f64::from)
}

/// The shape of a tensor the class requires, checked to have `rank` dimensions.
fn dims(ck: &Checkpoint, name: &str, class: &str, rank: usize) -> Result<Vec<usize>> {
    let s = ck.shape(name).ok_or_else(|| {
        Error::format(
            ck.path(),
            format!(
                "tensor `{name}` is missing (a {class} has it; the checkpoint has: {})",
                ck.names().join(", ")
            ),
        )
    })?;
    if s.len() != rank || s.contains(&0) {
        return Err(Error::format(
            ck.path(),
            format!("tensor `{name}` has shape {s:?}, expected {rank} non-empty dimensions"),
        ));
    }
    Ok(s.to_vec())
}

fn dims2(ck: &Checkpoint, name: &str, class: &str) -> Result<(usize, usize)> {
    match dims(ck, name, class, 2)?[..] {
        [a, b] => Ok((a, b)),
        _ => Err(Error::format(
            ck.path(),
            format!("tensor `{name}` is not a matrix"),
        )),
    }
}

fn dims3(ck: &Checkpoint, name: &str, class: &str) -> Result<(usize, usize, usize)> {
    match dims(ck, name, class, 3)?[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => Err(Error::format(
            ck.path(),
            format!("tensor `{name}` is not 3-D"),
        )),
    }
}

/// The `k` of a TopK-family state dict, checked against the config as `from_pretrained` does.
fn topk_k(ck: &mut Checkpoint, cfg: &Config, cfg_path: &Path, f: usize) -> Result<usize> {
    let state = ck.int("k")?;
    let k = match (state, cfg.k) {
        (Some(s), Some(c)) if s != c as i64 => {
            return Err(Error::format(
                cfg_path,
                format!(
                    "key `trainer.k` = {c} differs from the checkpoint's `k` = {s} ({})",
                    ck.path().display()
                ),
            ));
        }
        (Some(s), _) => s,
        (None, Some(c)) => c as i64,
        (None, None) => {
            return Err(Error::format(
                ck.path(),
                "tensor `k` is missing and the config has no `trainer.k`",
            ));
        }
    };
    match usize::try_from(k) {
        Ok(k) if k >= 1 && k <= f => Ok(k),
        _ => Err(Error::format(
            ck.path(),
            format!("`k` = {k} is not between 1 and dict_size = {f}"),
        )),
    }
}

/// The scalar `threshold` buffer of the BatchTopK family.
fn scalar_threshold(ck: &mut Checkpoint) -> Result<f64> {
    let t = ck.take_any("threshold")?;
    match t.len() {
        1 => Ok(t.iter().next().map_or(0.0, |v| f64::from(*v))),
        _ => Err(Error::format(
            ck.path(),
            format!(
                "tensor `threshold` has shape {:?}, expected a scalar (per-layer thresholds are \
                 the decoupled code normalisation, which Tiller does not import)",
                t.shape()
            ),
        )),
    }
}

/// The fork's activation normaliser over `layers` layers of width `d`, when its buffers are
/// present and not NaN (`has_activation_normalizer`).
fn normaliser(ck: &mut Checkpoint, layers: usize, d: usize) -> Result<Option<Normaliser>> {
    let keys = [
        "activation_mean",
        "activation_std",
        "activation_global_scale",
        "target_rms",
    ];
    let present: Vec<&str> = keys.iter().copied().filter(|k| ck.has(k)).collect();
    if present.is_empty() {
        return Ok(None);
    }
    if present.len() != keys.len() {
        return Err(Error::format(
            ck.path(),
            format!(
                "has the normalisation buffers {} but not all of {}",
                present.join(", "),
                keys.join(", ")
            ),
        ));
    }
    let shape: Vec<usize> = if layers == 1 {
        vec![d]
    } else {
        vec![layers, d]
    };
    let mean = ck.take("activation_mean", &shape)?;
    let std = ck.take("activation_std", &shape)?;
    let scale = ck.take_any("activation_global_scale")?;
    ck.take_any("target_rms")?;
    if mean.iter().chain(std.iter()).any(|v| v.is_nan()) {
        return Ok(None);
    }
    if scale.len() != layers {
        return Err(Error::format(
            ck.path(),
            format!(
                "tensor `activation_global_scale` has shape {:?}, expected {layers} value(s)",
                scale.shape()
            ),
        ));
    }
    let scale: Vec<f64> = scale.iter().map(|v| f64::from(*v)).collect();
    if scale.iter().any(|s| !s.is_finite()) {
        return Err(Error::format(
            ck.path(),
            "tensor `activation_global_scale` is not finite",
        ));
    }
    Ok(Some(Normaliser {
        mean: mean.iter().map(|v| f64::from(*v)).collect(),
        // The fork divides by `scale + 1e-8` to undo it.
        unscale: scale.iter().map(|s| 1.0 / (s + 1e-8)).collect(),
        scale,
    }))
}

/// Builds Tiller's metadata and weights from a config and the checkpoint's tensors.
pub fn convert(
    cfg: &Config,
    cfg_path: &Path,
    ck: &mut Checkpoint,
    norm_factor: Option<f64>,
) -> Result<(Meta, Weights)> {
    let class = cfg.dict_class.as_str();
    let mut dict = match class {
        "AutoEncoder" => {
            let (f, d) = dims2(ck, "encoder.weight", class)?;
            let bias = v64(ck.take1("bias", d)?);
            let mut w_enc = ck.take2_transposed("encoder.weight", f, d)?;
            let mut b_enc = v64(ck.take1("encoder.bias", f)?);
            let mut w_dec = ck.take2_transposed("decoder.weight", d, f)?;
            normalize_decoder(&mut w_enc, &mut b_enc, &mut w_dec);
            Dict::sae(
                Activation::Relu,
                w_enc,
                b_enc,
                Some(bias.clone()),
                w_dec,
                bias,
            )
        }
        "AutoEncoderNew" => {
            let (f, d) = dims2(ck, "encoder.weight", class)?;
            let w_enc = ck.take2_transposed("encoder.weight", f, d)?;
            let b_enc = v64(ck.take1("encoder.bias", f)?);
            let w_dec = ck.take2_transposed("decoder.weight", d, f)?;
            let b_dec = v64(ck.take1("decoder.bias", d)?);
            Dict::sae(Activation::Relu, w_enc, b_enc, None, w_dec, b_dec)
        }
        "GatedAutoEncoder" => {
            let (f, d) = dims2(ck, "encoder.weight", class)?;
            let b_dec = v64(ck.take1("decoder_bias", d)?);
            let w_enc = ck.take2_transposed("encoder.weight", f, d)?;
            let w_dec = ck.take2_transposed("decoder.weight", d, f)?;
            let b_gate = v64(ck.take1("gate_bias", f)?);
            let r_mag = v64(ck.take1("r_mag", f)?);
            let b_mag = v64(ck.take1("mag_bias", f)?);
            let mut x = Dict::sae(
                Activation::Gated,
                w_enc,
                b_gate,
                Some(b_dec.clone()),
                w_dec,
                b_dec,
            );
            x.gated = Some((r_mag, b_mag));
            x
        }
        "JumpReluAutoEncoder" => {
            let (d, f) = dims2(ck, "W_enc", class)?;
            let w_enc = ck.take2("W_enc", d, f)?;
            let b_enc = v64(ck.take1("b_enc", f)?);
            let w_dec = ck.take2("W_dec", f, d)?;
            let b_dec = v64(ck.take1("b_dec", d)?);
            let mut x = Dict::sae(Activation::JumpRelu, w_enc, b_enc, None, w_dec, b_dec);
            x.threshold = Some(v64(ck.take1("threshold", f)?));
            x
        }
        "AutoEncoderTopK" | "BatchTopKSAE" => {
            let (f, d) = dims2(ck, "encoder.weight", class)?;
            let k = topk_k(ck, cfg, cfg_path, f)?;
            let norm = if class == "BatchTopKSAE" {
                normaliser(ck, 1, d)?
            } else {
                None
            };
            let w_enc = ck.take2_transposed("encoder.weight", f, d)?;
            let b_enc = v64(ck.take1("encoder.bias", f)?);
            let w_dec = ck.take2_transposed("decoder.weight", d, f)?;
            let b_dec = v64(ck.take1("b_dec", d)?);
            let t = scalar_threshold(ck)?;
            let act = if class == "AutoEncoderTopK" {
                Activation::TopK
            } else {
                Activation::BatchTopK
            };
            let mut x = Dict::sae(act, w_enc, b_enc, Some(b_dec.clone()), w_dec, b_dec);
            x.norm = norm;
            if act == Activation::TopK {
                x.k = Some(k);
            } else {
                x.threshold = Some(Array1::from_elem(1, t));
            }
            x
        }
        "MatryoshkaBatchTopKSAE" => {
            let (d, f) = dims2(ck, "W_enc", class)?;
            topk_k(ck, cfg, cfg_path, f)?;
            if ck.has("group_sizes") {
                let g = ck.take_ints("group_sizes")?;
                let sum: i64 = g.iter().sum();
                if sum != f as i64 || g.iter().any(|&s| s <= 0) {
                    return Err(Error::format(
                        ck.path(),
                        format!(
                            "tensor `group_sizes` = {:?} does not split dict_size = {f} into positive groups",
                            g.iter().collect::<Vec<_>>()
                        ),
                    ));
                }
            }
            let w_enc = ck.take2("W_enc", d, f)?;
            let b_enc = v64(ck.take1("b_enc", f)?);
            let w_dec = ck.take2("W_dec", f, d)?;
            let b_dec = v64(ck.take1("b_dec", d)?);
            let t = scalar_threshold(ck)?;
            let mut x = Dict::sae(
                Activation::BatchTopK,
                w_enc,
                b_enc,
                Some(b_dec.clone()),
                w_dec,
                b_dec,
            );
            x.threshold = Some(Array1::from_elem(1, t));
            x
        }
        "CrossCoder" | "BatchTopKCrossCoder" => crosscoder(class, ck, cfg, cfg_path)?,
        other => {
            return Err(Error::format(
                cfg_path,
                format!(
                    "key `trainer.dict_class` = `{other}` is not a class Tiller imports ({})",
                    CLASSES.join(", ")
                ),
            ));
        }
    };
    let err_dim = |k: &str, want: usize, got: usize| {
        Error::format(
            cfg_path,
            format!(
                "key `trainer.{k}` = {want}, but the weights in {} have {got}",
                ck.path().display()
            ),
        )
    };
    if let Some(a) = cfg.activation_dim
        && a != dict.d
    {
        return Err(err_dim("activation_dim", a, dict.d));
    }
    if let Some(s) = cfg.dict_size
        && s != dict.f
    {
        return Err(err_dim("dict_size", s, dict.f));
    }
    if let Some(nf) = norm_factor {
        if dict.kind == Kind::Crosscoder {
            return Err(Error::format(
                ck.path(),
                "a crosscoder training backup with a `norm_factor` is not supported: import the final checkpoint",
            ));
        }
        dict.scale_biases(nf);
    }
    let (mut meta, weights) = dict.finish(ck.path())?;
    meta.model = cfg.lm_name.clone();
    if meta.kind == Kind::Sae {
        meta.hook_in = cfg.submodule_name.clone();
        meta.hook_out = cfg.submodule_name.clone();
    }
    meta.source = "dictionary-learning".into();
    weights
        .check(&meta)
        .map_err(|e| Error::format(ck.path(), e.to_string()))?;
    Ok((meta, weights))
}

/// The Euclidean norm of a row, accumulated in float64.
fn row_norm(r: ndarray::ArrayView1<'_, f32>) -> f64 {
    r.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// `shift · w` for a float32 matrix `w`, accumulated in float64.
fn shift_dot(shift: &Array1<f64>, w: &Array2<f32>) -> Array1<f64> {
    let mut out = Array1::<f64>::zeros(w.ncols());
    for (s, row) in shift.iter().zip(w.rows()) {
        if *s != 0.0 {
            out.zip_mut_with(&row, |o, &v| *o += s * f64::from(v));
        }
    }
    out
}

/// `AutoEncoder.from_pretrained(normalize_decoder=True)`: unless every decoder column already has
/// unit norm (`torch.allclose`), divide the columns by their norms and multiply the encoder rows
/// and bias by them. Reconstructions are unchanged; features are measured along unit directions.
fn normalize_decoder(w_enc: &mut Array2<f32>, b_enc: &mut Array1<f64>, w_dec: &mut Array2<f32>) {
    let norms: Vec<f64> = w_dec.rows().into_iter().map(row_norm).collect();
    if norms.iter().all(|n| (n - 1.0).abs() <= 1e-8 + 1e-5) {
        return;
    }
    for (j, &n) in norms.iter().enumerate() {
        // A zero column (a dead feature) would be NaN in torch; it decodes to nothing either way.
        if n > 0.0 {
            w_dec.row_mut(j).mapv_inplace(|v| (f64::from(v) / n) as f32);
            w_enc
                .column_mut(j)
                .mapv_inplace(|v| (f64::from(v) * n) as f32);
            b_enc[j] *= n;
        }
    }
}

/// `CrossCoder` and `BatchTopKCrossCoder`: encoder `[L, d, F]`, decoder `[L, F, d]`.
fn crosscoder(class: &str, ck: &mut Checkpoint, cfg: &Config, cfg_path: &Path) -> Result<Dict> {
    let (l, d, f) = dims3(ck, "encoder.weight", class)?;
    let norm = normaliser(ck, l, d)?;
    let w_enc = ck
        .take("encoder.weight", &[l, d, f])?
        .into_shape_with_order((l * d, f))
        .map_err(|e| Error::format(ck.path(), format!("tensor `encoder.weight`: {e}")))?;
    let b_enc = v64(ck.take1("encoder.bias", f)?);
    // [L, F, d] read as [F, L, d]: each feature's decoder rows, layer after layer.
    let dec = ck
        .take_permuted("decoder.weight", &[l, f, d], &[1, 0, 2])?
        .into_dimensionality::<Ix3>()
        .map_err(|e| Error::format(ck.path(), format!("tensor `decoder.weight`: {e}")))?;
    // Per layer and feature, the decoder norm: the code normalisation is built from them.
    let layer_norms: Vec<Vec<f64>> = (0..l)
        .map(|li| (0..f).map(|j| row_norm(dec.slice(s![j, li, ..]))).collect())
        .collect();
    let w_dec = dec
        .into_shape_with_order((f, l * d))
        .map_err(|e| Error::format(ck.path(), format!("tensor `decoder.weight`: {e}")))?;
    let b_dec = ck
        .take("decoder.bias", &[l, d])?
        .mapv(f64::from)
        .into_shape_with_order(l * d)
        .map_err(|e| Error::format(ck.path(), format!("tensor `decoder.bias`: {e}")))?;
    let mut x = Dict {
        kind: Kind::Crosscoder,
        activation: Activation::Relu,
        d,
        f,
        layers: l,
        k: None,
        w_enc,
        b_enc,
        sub: None,
        w_dec,
        b_dec,
        threshold: None,
        gated: None,
        norm,
    };
    if class == "BatchTopKCrossCoder" {
        topk_k(ck, cfg, cfg_path, f)?;
        let t = scalar_threshold(ck)?;
        let code = code_normalisation(ck, &layer_norms)?;
        // relu(pre)·c > t  ⇔  relu(pre) > t/c for c > 0; with c = 0 the comparison is 0 > t.
        let th: Array1<f64> = code
            .iter()
            .map(|&c| {
                if c > 0.0 {
                    t / c
                } else if t < 0.0 {
                    f64::from(f32::MIN)
                } else {
                    f64::from(f32::MAX)
                }
            })
            .collect();
        x.activation = Activation::JumpRelu;
        x.threshold = Some(th);
    }
    Ok(x)
}

/// The per-feature code normalisation of `CrossCoder.get_code_normalization`.
fn code_normalisation(ck: &mut Checkpoint, layer_norms: &[Vec<f64>]) -> Result<Vec<f64>> {
    // `from_pretrained` assumes CROSSCODER when the id is absent; MIXED uses the constructor's
    // default weights, as `from_pretrained` builds the module without them.
    let id = ck.int("code_normalization_id")?.unwrap_or(1);
    let f = layer_norms.first().map_or(0, Vec::len);
    let sum = |j: usize| layer_norms.iter().map(|n| n[j]).sum::<f64>();
    let sae = |j: usize| layer_norms.iter().map(|n| n[j] * n[j]).sum::<f64>().sqrt();
    Ok(match id {
        1 => (0..f).map(sum).collect(),
        2 => (0..f).map(sae).collect(),
        3 => (0..f).map(|j| 1.0 * sae(j) + 0.1 * sum(j)).collect(),
        4 => vec![1.0; f],
        5 => {
            return Err(Error::format(
                ck.path(),
                "`code_normalization_id` = 5 (DECOUPLED): per-layer features are not a Tiller \
                 crosscoder",
            ));
        }
        other => {
            return Err(Error::format(
                ck.path(),
                format!("`code_normalization_id` = {other} is not one of 1-5"),
            ));
        }
    })
}

impl Dict {
    fn sae(
        activation: Activation,
        w_enc: Array2<f32>,
        b_enc: Array1<f64>,
        sub: Option<Array1<f64>>,
        w_dec: Array2<f32>,
        b_dec: Array1<f64>,
    ) -> Self {
        Self {
            kind: Kind::Sae,
            activation,
            d: w_enc.nrows(),
            f: w_enc.ncols(),
            layers: 1,
            k: None,
            w_enc,
            b_enc,
            sub,
            w_dec,
            b_dec,
            threshold: None,
            gated: None,
            norm: None,
        }
    }

    /// `scale_biases(s)`, as the trainer applies it before its final save: every bias times `s`,
    /// a JumpReLU threshold times `s`, a scalar threshold times `s` when it is not negative.
    fn scale_biases(&mut self, s: f64) {
        self.b_enc *= s;
        self.b_dec *= s;
        if let Some(sub) = &mut self.sub {
            *sub *= s;
        }
        if let Some((_, b_mag)) = &mut self.gated {
            *b_mag *= s;
        }
        if let Some(t) = &mut self.threshold {
            let jump = self.activation == Activation::JumpRelu;
            t.mapv_inplace(|v| if jump || v >= 0.0 { v * s } else { v });
        }
    }

    /// Folds what Tiller's graph does not compute itself into the weights and narrows to float32.
    fn finish(mut self, path: &Path) -> Result<(Meta, Weights)> {
        let width = self.layers * self.d;
        let mut apply_b_dec_to_input = false;
        if let Some(n) = self.norm.take() {
            if self.gated.is_some() {
                return Err(Error::format(
                    path,
                    "a gated dictionary with an activation normaliser is not supported",
                ));
            }
            // x' = (x - mean)·s - sub  ⇒  x' W = x (s W) - (s·mean + sub) W.
            let shift: Array1<f64> = (0..width)
                .map(|i| n.scale[i / self.d] * n.mean[i] + self.sub.as_ref().map_or(0.0, |v| v[i]))
                .collect();
            self.b_enc = &self.b_enc - &shift_dot(&shift, &self.w_enc);
            for (i, mut row) in self.w_enc.rows_mut().into_iter().enumerate() {
                let s = n.scale[i / self.d];
                row.mapv_inplace(|v| (f64::from(v) * s) as f32);
            }
            // y = (f W_dec + b_dec)·u + mean.
            for i in 0..width {
                let u = n.unscale[i / self.d];
                self.w_dec
                    .column_mut(i)
                    .mapv_inplace(|v| (f64::from(v) * u) as f32);
                self.b_dec[i] = self.b_dec[i] * u + n.mean[i];
            }
        } else if let Some(sub) = self.sub.take() {
            if sub == self.b_dec {
                apply_b_dec_to_input = true;
            } else if self.gated.is_some() {
                return Err(Error::format(
                    path,
                    "a gated dictionary whose input shift differs from its decoder bias is not supported",
                ));
            } else {
                self.b_enc = &self.b_enc - &shift_dot(&sub, &self.w_enc);
            }
        }
        let f32s = |a: &Array1<f64>| a.mapv(|v| v as f32);
        let mut meta = Meta::new(self.kind, self.activation, self.d, self.f, self.d);
        meta.n_layers = self.layers;
        meta.k = self.k;
        meta.input_norm = InputNorm::None;
        let mut w = Weights::new(self.w_enc, f32s(&self.b_enc), self.w_dec, f32s(&self.b_dec));
        w.apply_b_dec_to_input = apply_b_dec_to_input;
        w.threshold = self.threshold.as_ref().map(f32s);
        w.gated = self.gated.as_ref().map(|(r, b)| Gated {
            r_mag: f32s(r),
            b_mag: f32s(b),
        });
        Ok((meta, w))
    }
}
