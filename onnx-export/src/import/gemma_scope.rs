//! Gemma Scope checkpoints (Google DeepMind's JumpReLU SAEs and transcoders).
//!
//! - Gemma Scope (Gemma 2): `params.npz` with `W_enc` `[d_in, d_sae]`, `W_dec` `[d_sae, d_out]`,
//!   `b_enc`, `b_dec`, `threshold`, in folders `layer_N/width_16k/average_l0_K/` (or `embedding/…`)
//!   of the repositories `gemma-scope-2b-pt-res`, `-mlp`, `-att`, `-transcoders`, ….
//! - Gemma Scope 2 (Gemma 3): `params.safetensors` with the same tensors in lowercase (`w_enc`,
//!   `w_dec`, …) and, for the `_affine` transcoders, `affine_skip_connection` `[d_in, d_out]`, in
//!   folders `resid_post/layer_N_width_16k_l0_medium/` (also `attn_out`, `mlp_out`, `transcoder`, and
//!   their `_all` variants) of the repositories `gemma-scope-2-1b-pt`, …, with an optional
//!   `config.json`.
//!
//! The maths is Google's (the Gemma Scope tutorial's `JumpReLUSAE`): `pre = x W_enc + b_enc`,
//! `f = relu(pre) · [pre > threshold]`, `x̂ = f W_dec + b_dec`, plus `x · affine_skip_connection`
//! for the affine transcoders (no bias of its own: `b_dec` is the bias). Nothing is subtracted from
//! the input.
//!
//! Hooks and the model come from the folder names, in the TransformerLens naming SAELens gives the
//! same SAEs. The embedding SAEs were trained on the embedding before Gemma multiplies it by
//! `sqrt(d_model)`, while TransformerLens' `hook_embed` comes after; they read `hook_embed` here
//! through an input scale of `1/sqrt(d_model)`, undone on the output. A folder that holds several
//! checkpoints below it is imported whole, or one of them with `--hookpoint` (its path below the
//! folder, e.g. `layer_20/width_16k/average_l0_71`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Axis};
use serde_json::Value;
use tiller_runtime::{Activation, InputNorm, Kind, Meta, Weights};

use super::discover::{read_json, select};
use super::imported::{ImportOptions, Imported};
use crate::tensors::TensorFile;
use crate::tensors::Tensors;
use crate::{Error, Result};

/// Gemma Scope's weights file.
pub const NPZ: &str = "params.npz";
/// Gemma Scope 2's weights file.
pub const SAFETENSORS: &str = "params.safetensors";
/// Gemma Scope 2's optional per-folder config.
pub const CONFIG: &str = "config.json";

/// How deep below a repository's folder checkpoints are looked for.
const MAX_DEPTH: usize = 4;

/// The weights file of a checkpoint folder, if it has one.
fn weights_file(dir: &Path) -> Option<PathBuf> {
    [NPZ, SAFETENSORS]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

fn is_checkpoint_dir(dir: &Path) -> bool {
    dir.is_dir() && weights_file(dir).is_some()
}

fn is_weights_file(path: &Path) -> bool {
    path.is_file()
        && path
            .file_name()
            .is_some_and(|n| n == NPZ || n == SAFETENSORS)
}

/// Whether `path` looks like a Gemma Scope checkpoint: a `params.npz` or `params.safetensors`, a
/// folder with one, or a folder with such folders below it.
pub fn detect(path: &Path) -> bool {
    is_weights_file(path)
        || is_checkpoint_dir(path)
        || !super::discover::find_dirs(path, is_checkpoint_dir, MAX_DEPTH).is_empty()
}

/// Imports the checkpoint at `path`, or those below it (all, or the one `opts.hookpoint` names).
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Vec<Imported>> {
    if is_weights_file(path) {
        let (meta, weights) = read_checkpoint(path)?;
        return Ok(Imported::single(meta, weights));
    }
    let dirs = select(
        path,
        is_checkpoint_dir,
        MAX_DEPTH,
        opts,
        "Gemma Scope checkpoints (`params.npz` or `params.safetensors`)",
    )?;
    dirs.into_iter()
        .map(|(name, dir)| {
            let file = weights_file(&dir)
                .ok_or_else(|| Error::format(&dir, "has no params.npz or params.safetensors"))?;
            let (meta, weights) = read_checkpoint(&file)?;
            Ok(Imported {
                name,
                meta,
                weights,
            })
        })
        .collect()
}

/// What the folder names (and Gemma Scope 2's `config.json`) say about a checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// The model, in SAELens' naming (`gemma-2-2b`, `google/gemma-3-1b-pt`).
    pub model: String,
    /// The hook read.
    pub hook_in: String,
    /// The hook written.
    pub hook_out: String,
    /// A transcoder (reads the MLP's input, writes its output).
    pub transcoder: bool,
    /// An embedding SAE (trained before Gemma's `sqrt(d_model)` scaling).
    pub embedding: bool,
    /// `config.json` promises an affine skip connection.
    pub affine: bool,
}

/// The number after `prefix` in `s` (`layer_12` → 12), if any.
fn number_after(s: &str, prefix: &str) -> Option<usize> {
    let i = s.find(prefix)?;
    let digits: String = s[i + prefix.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The repository name in a path component (`gemma-scope-2b-pt-res`, or the Hugging Face cache's
/// `models--google--gemma-scope-2b-pt-res`).
fn repo_name(component: &str) -> Option<&str> {
    component.find("gemma-scope-").map(|i| &component[i..])
}

/// Reads what it can from the names of the folders holding `file`.
pub fn context(file: &Path) -> Result<Context> {
    let full = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let dir = full.parent().unwrap_or(Path::new("."));
    let parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    let repo = parts.iter().rev().find_map(|p| repo_name(p)).unwrap_or("");
    let v2 =
        repo.starts_with("gemma-scope-2-") || file.file_name().is_some_and(|n| n == SAFETENSORS);
    let mut ctx = Context::default();
    if v2 {
        let cfg_path = dir.join(CONFIG);
        let cfg = if cfg_path.is_file() {
            Some(read_json(&cfg_path)?)
        } else {
            None
        };
        if let Some(c) = &cfg {
            match c.get("architecture").and_then(Value::as_str) {
                None | Some("jump_relu") => {}
                Some(other) => {
                    return Err(Error::format(
                        &cfg_path,
                        format!(
                            "key `architecture` = `{other}`; Gemma Scope 2 SAEs are `jump_relu`"
                        ),
                    ));
                }
            }
            ctx.affine = c
                .get("affine_connection")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        }
        ctx.model = match cfg
            .as_ref()
            .and_then(|c| c.get("model_name"))
            .and_then(Value::as_str)
        {
            Some(m) => gemma3_model(m),
            None => repo
                .strip_prefix("gemma-scope-2-")
                .map(|rest| gemma3_model(&format!("gemma-3-{rest}")))
                .unwrap_or_default(),
        };
        let folder = parts.last().map(String::as_str).unwrap_or("");
        let site = parts
            .len()
            .checked_sub(2)
            .and_then(|i| parts.get(i))
            .map(String::as_str)
            .unwrap_or("");
        if let Some(l) = number_after(folder, "layer_") {
            let site_of = |s: &str| {
                ["resid_post", "attn_out", "mlp_out", "transcoder", "clt"]
                    .into_iter()
                    .find(|k| s.starts_with(k))
            };
            match site_of(site).or_else(|| site_of(folder)) {
                Some("resid_post") => ctx.hook_in = format!("blocks.{l}.hook_resid_post"),
                Some("attn_out") => ctx.hook_in = format!("blocks.{l}.attn.hook_z"),
                Some("mlp_out") => ctx.hook_in = format!("blocks.{l}.hook_mlp_out"),
                Some("transcoder") | Some("clt") => {
                    ctx.transcoder = true;
                    ctx.hook_in = format!("blocks.{l}.hook_mlp_in");
                    ctx.hook_out = format!("blocks.{l}.hook_mlp_out");
                }
                _ => {}
            }
        }
        // Folders renamed on the way: the config's own Hugging Face module names.
        if ctx.hook_in.is_empty()
            && let Some(c) = &cfg
        {
            let hf = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            ctx.hook_in = hf("hf_hook_point_in");
            ctx.hook_out = hf("hf_hook_point_out");
            ctx.transcoder = !ctx.hook_out.is_empty() && ctx.hook_out != ctx.hook_in;
        }
    } else {
        // gemma-scope-2b-pt-res: size, pt or it, site.
        let mut fields = repo.strip_prefix("gemma-scope-").unwrap_or("").split('-');
        let (size, variant, site) = (fields.next(), fields.next(), fields.next());
        if let (Some(size), Some(variant)) = (size, variant) {
            ctx.model = match variant {
                "it" => format!("gemma-2-{size}-it"),
                _ => format!("gemma-2-{size}"),
            };
        }
        ctx.embedding = parts.iter().any(|p| p == "embedding");
        let layer = parts.iter().rev().find_map(|p| {
            p.strip_prefix("layer_")
                .and_then(|n| n.parse::<usize>().ok())
        });
        match (site, layer) {
            (_, None) if ctx.embedding => ctx.hook_in = "hook_embed".into(),
            (Some("res"), Some(l)) => ctx.hook_in = format!("blocks.{l}.hook_resid_post"),
            (Some("mlp"), Some(l)) => ctx.hook_in = format!("blocks.{l}.hook_mlp_out"),
            (Some("att"), Some(l)) => ctx.hook_in = format!("blocks.{l}.attn.hook_z"),
            (Some("transcoders"), Some(l)) => {
                ctx.transcoder = true;
                ctx.hook_in = format!("blocks.{l}.ln2.hook_normalized");
                ctx.hook_out = format!("blocks.{l}.hook_mlp_out");
            }
            _ => {}
        }
    }
    if ctx.hook_out.is_empty() {
        ctx.hook_out = ctx.hook_in.clone();
    }
    Ok(ctx)
}

/// SAELens' name for a Gemma 3 model (`gemma-v3-1b-pt` → `google/gemma-3-1b-pt`; the 270M
/// pretrained model has no `-pt`).
fn gemma3_model(name: &str) -> String {
    let mut m = name.replace("-v3", "-3");
    if !m.contains("google") {
        m = format!("google/{m}");
    }
    if m.contains("270m") {
        m = m.replace("-pt", "");
    }
    m
}

/// Reads the checkpoint `file` (`params.npz` or `params.safetensors`).
pub fn read_checkpoint(file: &Path) -> Result<(Meta, Weights)> {
    let mut params = if file.extension().is_some_and(|e| e == "npz") {
        Params::npz(file)?
    } else {
        Params::safetensors(file)?
    };
    let ctx = context(file)?;
    convert(&ctx, &mut params)
}

/// Builds Tiller's metadata and weights from a checkpoint's tensors and what its path says.
pub fn convert(ctx: &Context, p: &mut Params) -> Result<(Meta, Weights)> {
    let (d_in, d_sae) = match p.shape("w_enc") {
        Some(&[d_in, d_sae]) => (d_in, d_sae),
        Some(s) => {
            return Err(p.err(format!(
                "array `{}` has shape {s:?}, expected [d_in, d_sae]",
                p.name("w_enc")
            )));
        }
        None => return Err(p.missing("w_enc")),
    };
    let d_out = match p.shape("w_dec") {
        Some(&[_, d]) => d,
        Some(s) if s.len() == 3 => {
            return Err(p.err(format!(
                "array `{}` has shape {s:?}: a cross-layer transcoder, which this importer does not read",
                p.name("w_dec")
            )));
        }
        Some(s) => {
            return Err(p.err(format!(
                "array `{}` has shape {s:?}, expected [{d_sae}, d_out]",
                p.name("w_dec")
            )));
        }
        None => return Err(p.missing("w_dec")),
    };
    let w_enc = p.take2("w_enc", d_in, d_sae)?;
    let mut w_dec = p.take2("w_dec", d_sae, d_out)?;
    let b_enc = p.take1("b_enc", d_sae)?;
    let b_dec = p.take1("b_dec", d_out)?;
    let threshold = p.take1("threshold", d_sae)?;
    // A per-feature decoder scale (SAELens' `finetuning_scaling_factor`), folded into the rows.
    if p.has("scaling_factor") {
        let s = p.take1("scaling_factor", d_sae)?;
        for (mut row, f) in w_dec.axis_iter_mut(Axis(0)).zip(s.iter()) {
            row *= *f;
        }
    }
    let w_skip = if p.has("affine_skip_connection") {
        // Google adds `x @ affine_skip_connection`; Tiller adds `x W_skipᵀ`.
        Some(
            p.take2("affine_skip_connection", d_in, d_out)?
                .t()
                .to_owned(),
        )
    } else if ctx.affine {
        return Err(p.err(format!(
            "array `affine_skip_connection` is missing, but {CONFIG} says `affine_connection` (the file has: {})",
            p.names().join(", ")
        )));
    } else {
        None
    };
    let kind = if w_skip.is_some() {
        Kind::SkipTranscoder
    } else if ctx.transcoder || d_out != d_in {
        Kind::Transcoder
    } else {
        Kind::Sae
    };
    let mut meta = Meta::new(kind, Activation::JumpRelu, d_in, d_sae, d_out);
    meta.hook_in = ctx.hook_in.clone();
    meta.hook_out = ctx.hook_out.clone();
    meta.model = ctx.model.clone();
    meta.source = "gemma-scope".into();
    if ctx.embedding && kind == Kind::Sae {
        meta.input_norm = InputNorm::Scale((1.0 / (d_in as f64).sqrt()) as f32);
    }
    let mut weights = Weights::new(w_enc, b_enc, w_dec, b_dec);
    weights.threshold = Some(threshold);
    weights.w_skip = w_skip;
    weights.check(&meta).map_err(|e| p.err(e.to_string()))?;
    Ok((meta, weights))
}

/// A checkpoint's arrays, widened to float32, looked up without regard to case (`W_enc` or
/// `w_enc`).
#[derive(Debug)]
pub struct Params {
    path: PathBuf,
    /// Lowercased name → (name in the file, array).
    arrays: BTreeMap<String, (String, ArrayD<f32>)>,
}

impl Params {
    /// Reads every array of a `.npz` file (float16, float32 or float64).
    pub fn npz(path: &Path) -> Result<Self> {
        let arrays = crate::npy::read_npz_all(path)?
            .into_iter()
            .map(|(name, a)| (name.to_lowercase(), (name, a)))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            arrays,
        })
    }

    /// Reads every tensor of a safetensors file.
    pub fn safetensors(path: &Path) -> Result<Self> {
        let mut st = TensorFile::open(path)?;
        let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        let mut arrays = BTreeMap::new();
        for name in names {
            let a = st.take_any(&name)?;
            arrays.insert(name.to_lowercase(), (name, a));
        }
        Ok(Self {
            path: path.to_path_buf(),
            arrays,
        })
    }

    fn err(&self, message: String) -> Error {
        Error::format(&self.path, message)
    }

    /// The array `key` as the file spells it.
    fn name(&self, key: &str) -> String {
        self.arrays
            .get(key)
            .map_or_else(|| key.to_string(), |(n, _)| n.clone())
    }
}

/// Arrays are looked up by their lowercased names; taking one checks that it is finite.
impl Tensors for Params {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<&str> {
        self.arrays.values().map(|(n, _)| n.as_str()).collect()
    }

    fn shape(&self, key: &str) -> Option<&[usize]> {
        self.arrays.get(key).map(|(_, a)| a.shape())
    }

    fn take_any(&mut self, key: &str) -> Result<ArrayD<f32>> {
        let Some((name, a)) = self.arrays.remove(key) else {
            return Err(self.missing(key));
        };
        if a.iter().any(|v| !v.is_finite()) {
            return Err(self.err(format!("array `{name}` contains NaN or infinite values")));
        }
        Ok(a)
    }

    fn noun(&self) -> &'static str {
        "array"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        assert_eq!(gemma3_model("gemma-v3-1b-pt"), "google/gemma-3-1b-pt");
        assert_eq!(gemma3_model("gemma-3-270m-pt"), "google/gemma-3-270m");
        assert_eq!(gemma3_model("google/gemma-3-4b-it"), "google/gemma-3-4b-it");
        assert_eq!(
            number_after("layer_10_width_262k_l0_small", "layer_"),
            Some(10)
        );
        assert_eq!(
            repo_name("models--google--gemma-scope-2b-pt-res"),
            Some("gemma-scope-2b-pt-res")
        );
    }
}
