//! circuit-tracer checkpoints (safety-research/circuit-tracer): per-layer transcoder sets and
//! cross-layer transcoders (CLTs), read from a local folder.
//!
//! Layouts, as circuit-tracer writes and reads them:
//! - a transcoder set (`circuit_tracer/transcoder/single_layer_transcoder.py`, `load_transcoder`,
//!   `TranscoderSet.to_safetensors`): `layer_{i}.safetensors` per layer with `W_enc` `[d_sae, d_model]`,
//!   `W_dec` `[d_sae, d_model]`, `b_enc` `[d_sae]`, `b_dec` `[d_model]`, optionally
//!   `activation_function.threshold` (JumpReLU) and `W_skip` `[d_model, d_model]`. The first release
//!   (`load_relu_transcoder`) stored `W_dec` as `[d_model, d_sae]`; that is read too when the two
//!   widths differ.
//! - a CLT (`circuit_tracer/transcoder/cross_layer_transcoder.py`, `load_clt`, `to_safetensors`):
//!   for each of the `L` layers, `W_enc_{i}.safetensors` with `W_enc_{i}` `[d_sae, d_model]`,
//!   `b_enc_{i}` `[d_sae]`, `b_dec_{i}` `[d_model]` and optionally `threshold_{i}` `[d_sae]`, and
//!   `W_dec_{i}.safetensors` with `W_dec_{i}` `[d_sae, L-i, d_model]`.
//! - beside them, optionally, `config.yaml` (`circuit_tracer/utils/hf_utils.py`, `caching.py`):
//!   `model_kind` (`transcoder_set` or `cross_layer_transcoder`), `model_name`,
//!   `feature_input_hook`, `feature_output_hook`, `activation`, and for sets stored elsewhere a
//!   `transcoders` list of files.
//!
//! The maths (the same sources): `pre = x W_encᵀ + b_enc`; JumpReLU is `pre · [pre > θ]` (no ReLU:
//! exact in Tiller's `relu(pre) · [pre > θ]` only for `θ ≥ 0`, so negative thresholds are refused),
//! otherwise ReLU. A transcoder decodes `f W_dec + b_dec + x W_skipᵀ`. A CLT's output at layer `l`
//! is `Σ_{i ≤ l} f_i W_dec_i[:, l-i] + b_dec_l`: one bias per output layer, added once.
//!
//! Each source layer becomes one dictionary named `layer_{i}`: a transcoder (a skip transcoder
//! with `W_skip`), or for a CLT a `clt` dictionary with `n_layers = L - i` that reads
//! `blocks.{i}.<feature_input_hook>` and writes `blocks.{l}.<feature_output_hook>` for
//! `l = i..L-1`. Its `b_dec` holds `b_dec_i` for its first output layer and zeros for the others,
//! so that the reconstructions of the source layers sum to circuit-tracer's reconstruction exactly.
//! Hooks are TransformerLens names, `blocks.{layer}.<hook>`, as circuit-tracer attaches them; with
//! no config they default to `mlp.hook_in`/`mlp.hook_out` for sets (the original
//! `ReplacementModel` defaults) and `hook_resid_mid`/`hook_mlp_out` for CLTs (`load_clt`'s).
//!
//! Refused, with a message naming the file and tensor: TopK sets (circuit-tracer keeps negative
//! values among the top k, which Tiller's TopK zeroes), negative JumpReLU thresholds, CLT skip
//! connections (circuit-tracer's `load_clt` never reads them), Gemma Scope `.npz` and Gemma Scope 2
//! files listed by a config (other importers' formats), and any tensor the layout does not name.

mod clt;
mod config;
mod files;
mod set;
mod tensors;

use std::path::Path;

use clt::import_clt;
use files::{SetOrClt, scan};
use set::import_set;

use crate::import::imported::{ImportOptions, Imported};
use crate::{Error, Result};

pub use config::{Config, parse_config};
pub use files::{CONFIG, SOURCE};

/// Whether `dir` looks like a circuit-tracer checkpoint: a folder with a `config.yaml` naming a
/// circuit-tracer `model_kind` (or listing `transcoders` and their hooks, as the first release's
/// did), or with `layer_{i}.safetensors` or `W_enc_{i}.safetensors` files.
pub fn detect(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    let cfg = dir.join(CONFIG);
    if cfg.is_file()
        && let Ok(text) = std::fs::read_to_string(&cfg)
        && let Ok(c) = parse_config(&cfg, &text)
        && (matches!(
            c.model_kind.as_deref(),
            Some("transcoder_set" | "cross_layer_transcoder")
        ) || (c.transcoders.is_some() && c.feature_input_hook.is_some()))
    {
        return true;
    }
    match scan(dir) {
        Ok(files) => !files.layers.is_empty() || !files.enc.is_empty(),
        Err(_) => false,
    }
}

/// `opts.layer`.
pub fn import(dir: &Path, opts: &ImportOptions) -> Result<Vec<Imported>> {
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "is not a folder; a circuit-tracer checkpoint is a folder of `layer_{i}.safetensors` or \
             `W_enc_{i}.safetensors`/`W_dec_{i}.safetensors` files",
        ));
    }
    let cfg_path = dir.join(CONFIG);
    let cfg = if cfg_path.is_file() {
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        Some(parse_config(&cfg_path, &text)?)
    } else {
        None
    };
    let files = scan(dir)?;
    // The first release's configs list `transcoders` without a `model_kind`: a set.
    let listed = cfg.as_ref().is_some_and(|c| c.transcoders.is_some());
    let kind = match (
        cfg.as_ref().and_then(|c| c.model_kind.as_deref()),
        listed || !files.layers.is_empty(),
        !files.enc.is_empty() || !files.dec.is_empty(),
    ) {
        (Some("transcoder_set"), _, _) => SetOrClt::Set,
        (Some("cross_layer_transcoder"), _, _) => SetOrClt::Clt,
        (Some(other), _, _) => {
            return Err(Error::format(
                &cfg_path,
                format!(
                    "key `model_kind` = `{other}` is not one circuit-tracer loads \
                     (transcoder_set, cross_layer_transcoder)"
                ),
            ));
        }
        (None, true, false) => SetOrClt::Set,
        (None, false, true) => SetOrClt::Clt,
        (None, true, true) => {
            return Err(Error::format(
                dir,
                "holds both per-layer `layer_{i}.safetensors` and CLT `W_enc_{i}`/`W_dec_{i}` files; \
                 add a `config.yaml` with `model_kind` to say which to read",
            ));
        }
        (None, false, false) => {
            return Err(Error::format(
                dir,
                "holds no `layer_{i}.safetensors` nor `W_enc_{i}.safetensors` files",
            ));
        }
    };
    let cfg = cfg.map(|c| (cfg_path, c));
    match kind {
        SetOrClt::Set => import_set(dir, cfg.as_ref(), &files, opts),
        SetOrClt::Clt => import_clt(dir, cfg.as_ref(), &files, opts),
    }
}
