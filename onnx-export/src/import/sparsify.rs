//! EleutherAI sparsify checkpoints: a hookpoint folder with `cfg.json` and `sae.safetensors`, or a
//! training run's folder holding one such folder per hookpoint (`layers.10`, `layers.10.mlp`, and
//! `layers.10/seed0` when several seeds were trained).
//!
//! The maths follows `sparsify/sparse_coder.py` and `sparsify/fused_encoder.py`:
//! - encode: `pre = (x - b_dec) W_encᵀ + b_enc` for an SAE, `x W_encᵀ + b_enc` for a transcoder
//!   (`transcode: true`); keep the k largest of `relu(pre)`. The ReLU comes first there and last
//!   here, which selects the same features and gives the same activations;
//! - decode: `x̂ = f W_dec + b_dec`, plus `x W_skipᵀ` on the raw input when `skip_connection`.
//!
//! Two tensor layouts are read: `encoder.weight` `[num_latents, d_in]` / `encoder.bias` (June 2024
//! onwards) and the first releases' `W_enc` `[d_in, num_latents]` / `b_enc`. Transcoders saved
//! before `transcode` moved into the coder's config (February 2025) subtracted `b_dec` like an SAE
//! and carry no `transcode` key, so they are read, exactly, as SAEs. `groupmax` activations,
//! signed SAEs and matching pursuit have no Tiller equivalent and are refused.

use std::path::Path;

use ndarray::{Array1, Array2};
use serde_json::Value;
use tiller_runtime::{Activation, Kind, Meta, Weights};

use super::discover::{find_dirs, folder_name, json_object, select};
use super::imported::{ImportOptions, Imported};
use crate::tensors::TensorFile;
use crate::tensors::Tensors;
use crate::{Error, Result};

/// The config file name.
pub const CFG: &str = "cfg.json";
/// The weights file name.
pub const WEIGHTS: &str = "sae.safetensors";
/// The training run's config, in the folder above the hookpoints; it names the model.
pub const RUN_CFG: &str = "config.json";

/// How deep below a run's folder hookpoint folders are looked for (`best/layers.3/seed0`).
const MAX_DEPTH: usize = 3;

/// Whether `dir` is one hookpoint's folder.
pub fn is_hookpoint_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join(CFG).is_file() && dir.join(WEIGHTS).is_file()
}

/// Whether `path` looks like a sparsify checkpoint: a hookpoint folder, or a folder with hookpoint
/// folders below it.
pub fn detect(path: &Path) -> bool {
    is_hookpoint_dir(path) || !find_dirs(path, is_hookpoint_dir, MAX_DEPTH).is_empty()
}

/// Imports the hookpoint folder at `path`, or the hookpoints below it: the one `opts.hookpoint`
/// names, or all of them, each named by its folder's path below `path`.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Vec<Imported>> {
    let dirs = select(
        path,
        is_hookpoint_dir,
        MAX_DEPTH,
        opts,
        "hookpoint folders (`cfg.json` + `sae.safetensors`)",
    )?;
    dirs.into_iter()
        .map(|(name, dir)| {
            let hookpoint = hook_of(&name.clone().unwrap_or_else(|| folder_name(&dir)));
            let (meta, weights) = read_hookpoint(&dir, &hookpoint)?;
            Ok(Imported {
                name,
                meta,
                weights,
            })
        })
        .collect()
}

/// The module a hookpoint folder's path names: `best/layers.3/seed1` → `layers.3` (the trainer
/// saves the best checkpoints under `best/` and several seeds as `seedN` below the hookpoint).
pub fn hook_of(name: &str) -> String {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| {
            !p.is_empty()
                && *p != "best"
                && !(p.starts_with("seed")
                    && p.len() > 4
                    && p[4..].bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    if parts.is_empty() {
        name.to_string()
    } else {
        parts.join("/")
    }
}

/// The parts of `cfg.json` the import needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Input width.
    pub d_in: usize,
    /// Number of latents, when the config fixes it (`num_latents`, or `d_in · expansion_factor`).
    pub num_latents: Option<usize>,
    /// The number of latents kept per token.
    pub k: usize,
    /// A transcoder: `b_dec` is not subtracted from the input.
    pub transcode: bool,
    /// A linear skip connection `x W_skipᵀ` is added to the output.
    pub skip_connection: bool,
}

/// Parses `cfg.json` (the text `text` of the file at `path`).
pub fn parse_config(path: &Path, text: &str) -> Result<Config> {
    let cfg = json_object(path, text)?;
    let err = |m: String| Error::format(path, m);
    let size = |k: &str| -> Result<Option<usize>> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => Err(err(format!(
                    "key `{k}` = {v} is not a non-negative integer"
                ))),
            },
        }
    };
    let boolean = |k: &str| -> Result<bool> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(format!("key `{k}` = {v} is not true or false"))),
        }
    };
    let d_in = match size("d_in")? {
        Some(d) if d > 0 => d,
        Some(_) => return Err(err("key `d_in` is 0".into())),
        None => return Err(err("key `d_in` is missing".into())),
    };
    // The default of `k` changed between releases (50, then 32) and every release saves it, so a
    // config without it is not guessed at.
    let k = match size("k")? {
        Some(k) if k > 0 => k,
        Some(_) => return Err(err("key `k` is 0".into())),
        None => return Err(err("key `k` is missing".into())),
    };
    match cfg.get("activation").and_then(Value::as_str) {
        None | Some("topk") => {}
        Some("groupmax") => {
            return Err(err(
                "key `activation` = `groupmax` (the largest latent of each of k groups) has no Tiller \
                 equivalent; Tiller imports topk sparse coders"
                    .into(),
            ));
        }
        Some(other) => {
            return Err(err(format!(
                "key `activation` = `{other}` is unknown; Tiller imports topk sparse coders"
            )));
        }
    }
    for (key, what) in [
        ("signed", "a signed SAE (top k by absolute value, no ReLU)"),
        ("matching_pursuit", "a matching-pursuit coder"),
    ] {
        if boolean(key)? {
            return Err(err(format!(
                "key `{key}` is true: {what} has no Tiller equivalent"
            )));
        }
    }
    let num_latents = match size("num_latents")? {
        Some(n) if n > 0 => Some(n),
        _ => size("expansion_factor")?
            .filter(|&e| e > 0)
            .map(|e| e * d_in),
    };
    Ok(Config {
        d_in,
        num_latents,
        k,
        transcode: boolean("transcode")?,
        skip_connection: boolean("skip_connection")?,
    })
}

/// Reads one hookpoint folder; `hookpoint` is the name it was saved under.
pub fn read_hookpoint(dir: &Path, hookpoint: &str) -> Result<(Meta, Weights)> {
    let cfg_path = dir.join(CFG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = parse_config(&cfg_path, &text)?;
    let mut st = TensorFile::open(&dir.join(WEIGHTS))?;
    let (mut meta, weights) = convert(&cfg, &cfg_path, &mut st, hookpoint)?;
    meta.model = run_model(dir);
    Ok((meta, weights))
}

/// Builds Tiller's metadata and weights from a parsed config and its tensors.
pub fn convert(
    cfg: &Config,
    cfg_path: &Path,
    st: &mut TensorFile,
    hookpoint: &str,
) -> Result<(Meta, Weights)> {
    let d_in = cfg.d_in;
    let (w_enc, b_enc) = if st.has("encoder.weight") {
        let latents = match (cfg.num_latents, st.shape("encoder.weight")) {
            (Some(n), _) => n,
            (None, Some(&[n, _])) => n,
            (None, _) => 0,
        };
        let w = st.take2("encoder.weight", latents, d_in)?;
        (w.t().to_owned(), st.take1("encoder.bias", latents)?)
    } else if st.has("W_enc") {
        let latents = match (cfg.num_latents, st.shape("W_enc")) {
            (Some(n), _) => n,
            (None, Some(&[_, n])) => n,
            (None, _) => 0,
        };
        (
            st.take2("W_enc", d_in, latents)?,
            st.take1("b_enc", latents)?,
        )
    } else {
        return Err(Error::format(
            st.path(),
            format!(
                "tensor `encoder.weight` (or the first releases' `W_enc`) is missing (the file has: {})",
                st.names().join(", ")
            ),
        ));
    };
    let d_sae = w_enc.ncols();
    if cfg.k > d_sae {
        return Err(Error::format(
            cfg_path,
            format!("key `k` = {} exceeds the {d_sae} latents", cfg.k),
        ));
    }
    // A transcoder's output width is whatever its decoder writes; an SAE's is its input's.
    let d_out = match (cfg.transcode, st.shape("W_dec")) {
        (true, Some(&[_, d])) => d,
        _ => d_in,
    };
    let w_dec: Array2<f32> = st.take2("W_dec", d_sae, d_out)?;
    let b_dec: Array1<f32> = st.take1("b_dec", d_out)?;
    let w_skip = if cfg.skip_connection {
        Some(st.take2("W_skip", d_out, d_in)?)
    } else {
        None
    };
    let kind = match (cfg.transcode, cfg.skip_connection) {
        (false, false) => Kind::Sae,
        (true, false) => Kind::Transcoder,
        // An SAE with a skip connection is a skip transcoder that reads and writes one hook.
        (_, true) => Kind::SkipTranscoder,
    };
    let mut meta = Meta::new(kind, Activation::TopK, d_in, d_sae, d_out);
    meta.k = Some(cfg.k);
    meta.hook_in = hookpoint.to_string();
    meta.hook_out = hookpoint.to_string();
    meta.source = "sparsify".into();
    let mut weights = Weights::new(w_enc, b_enc, w_dec, b_dec);
    weights.w_skip = w_skip;
    weights.apply_b_dec_to_input = !cfg.transcode;
    weights
        .check(&meta)
        .map_err(|e| Error::format(st.path(), e.to_string()))?;
    Ok((meta, weights))
}

/// The model named by the training run's `config.json` in a folder above `dir`, or empty.
fn run_model(dir: &Path) -> String {
    dir.ancestors()
        .skip(1)
        .take(MAX_DEPTH)
        .map(|a| a.join(RUN_CFG))
        .filter(|p| p.is_file())
        .find_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            v.get("model").and_then(Value::as_str).map(str::to_string)
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_of_paths() {
        assert_eq!(hook_of("layers.3"), "layers.3");
        assert_eq!(hook_of("layers.3/seed12"), "layers.3");
        assert_eq!(hook_of("best/layers.3.mlp"), "layers.3.mlp");
        assert_eq!(hook_of("seedling"), "seedling");
    }

    #[test]
    fn config_keys() {
        let p = Path::new("cfg.json");
        let c = parse_config(
            p,
            r#"{"expansion_factor": 4, "normalize_decoder": true, "num_latents": 0, "k": 8,
                "multi_topk": false, "d_in": 16}"#,
        )
        .unwrap();
        assert_eq!(c.num_latents, Some(64));
        assert!(!c.transcode && !c.skip_connection);
        let e = parse_config(p, r#"{"d_in": 16, "k": 4, "activation": "groupmax"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("groupmax"), "{e}");
        let e = parse_config(p, r#"{"d_in": 16}"#).unwrap_err().to_string();
        assert!(e.contains("`k` is missing"), "{e}");
    }
}
