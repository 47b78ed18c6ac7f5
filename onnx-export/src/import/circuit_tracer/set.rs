//! Transcoder sets: one single-layer transcoder per file.

use std::path::{Path, PathBuf};

use ndarray::Array1;
use tiller_runtime::{Activation, Kind, Meta, Weights};

use super::config::*;
use super::files::*;
use super::tensors::*;
use crate::import::imported::{ImportOptions, Imported};
use crate::tensors::TensorFile;
use crate::tensors::Tensors;
use crate::{Error, Result};

pub(super) fn import_set(
    dir: &Path,
    cfg: Option<&(PathBuf, Config)>,
    files: &Files,
    opts: &ImportOptions,
) -> Result<Vec<Imported>> {
    let (hook_in, hook_out) = hooks(cfg, SET_HOOKS)?;
    if let Some((path, c)) = cfg {
        match c.activation.as_deref() {
            Some("topk") => {
                return Err(Error::format(
                    path,
                    "key `activation` = `topk`: circuit-tracer's TopK keeps the k largest \
                     pre-activations even when negative, which Tiller's TopK (the k largest of \
                     relu(pre)) cannot represent exactly; refusing",
                ));
            }
            Some("relu") | None => {}
            Some(other) if other.contains("jump") => {}
            Some(other) => {
                return Err(Error::format(
                    path,
                    format!(
                        "key `activation` = `{other}` is not one Tiller reads (relu, topk, or none)"
                    ),
                ));
            }
        }
    }
    let paths = set_paths(dir, cfg, files, opts)?;
    let relu_forced = cfg.is_some_and(|(_, c)| c.activation.as_deref() == Some("relu"));
    let model = cfg.map(|(_, c)| c.model_name.clone()).unwrap_or_default();
    let mut out = Vec::with_capacity(paths.len());
    for (layer, path) in paths {
        let (mut meta, weights) = transcoder(&path, relu_forced)?;
        meta.hook_in = hook(layer, hook_in);
        meta.hook_out = hook(layer, hook_out);
        meta.model = model.clone();
        weights
            .check(&meta)
            .map_err(|e| Error::format(&path, e.to_string()))?;
        out.push(Imported {
            name: Some(format!("layer_{layer}")),
            meta,
            weights,
        });
    }
    Ok(out)
}

/// The layers to import and their files: from the config's `transcoders` list or the folder.
/// Importing every layer needs every file from 0 to the last, as circuit-tracer does.
pub(super) fn set_paths(
    dir: &Path,
    cfg: Option<&(PathBuf, Config)>,
    files: &Files,
    opts: &ImportOptions,
) -> Result<Vec<(usize, PathBuf)>> {
    if let Some((cfg_path, c)) = cfg
        && let Some(list) = &c.transcoders
    {
        if list.is_empty() {
            return Err(Error::format(
                cfg_path,
                "key `transcoders` is an empty list",
            ));
        }
        return chosen(dir, list.len(), opts, "transcoder set")?
            .into_iter()
            .map(|i| Ok((i, resolve(dir, cfg_path, i, &list[i])?)))
            .collect();
    }
    let Some((&last, _)) = files.layers.last_key_value() else {
        return Err(Error::format(
            dir,
            "holds no `layer_{i}.safetensors` files (a transcoder set has one per layer)",
        ));
    };
    if let Some(l) = opts.layer {
        return match files.layers.get(&l) {
            Some(p) => Ok(vec![(l, p.clone())]),
            None => Err(Error::format(
                dir,
                format!(
                    "--layer {l} does not exist: the folder has `layer_{{i}}.safetensors` for layers {}",
                    files
                        .layers
                        .keys()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        };
    }
    (0..=last)
        .map(|i| match files.layers.get(&i) {
            Some(p) => Ok((i, p.clone())),
            None => Err(Error::format(
                dir.join(format!("layer_{i}.safetensors")),
                format!(
                    "is missing: circuit-tracer needs a transcoder for every layer from 0 to {last}"
                ),
            )),
        })
        .collect()
}

/// The local file of entry `i` of the config's `transcoders` list.
pub(super) fn resolve(dir: &Path, cfg_path: &Path, i: usize, entry: &str) -> Result<PathBuf> {
    let local = match entry.strip_prefix("hf://") {
        Some(rest) => {
            // hf://owner/repo/path/in/repo?revision=…: the file as a snapshot of the repo holds it.
            let rest = rest.split('?').next().unwrap_or(rest);
            let in_repo: Vec<&str> = rest.splitn(3, '/').collect();
            match in_repo.get(2) {
                Some(p) if !p.is_empty() => dir.join(p),
                _ => {
                    return Err(Error::format(
                        cfg_path,
                        format!(
                            "`transcoders[{i}]` = `{entry}` is not an hf://owner/repo/file URI"
                        ),
                    ));
                }
            }
        }
        None => {
            let p = PathBuf::from(entry);
            if p.is_absolute() { p } else { dir.join(p) }
        }
    };
    if local.extension().is_some_and(|e| e == "npz") {
        return Err(Error::format(
            cfg_path,
            format!(
                "`transcoders[{i}]` = `{entry}` is a Gemma Scope `.npz` transcoder: import it with \
                 --format gemma-scope, or convert the set with circuit-tracer's \
                 `save_transcoders_to_cache` and import the cache folder"
            ),
        ));
    }
    if !local.is_file() {
        return Err(Error::format(
            cfg_path,
            format!(
                "`transcoders[{i}]` = `{entry}`: {} does not exist; download the file there, or \
                 convert the set with circuit-tracer's `save_transcoders_to_cache` and import the \
                 cache folder",
                local.display()
            ),
        ));
    }
    Ok(local)
}

/// One per-layer transcoder file, without hooks or model.
pub(super) fn transcoder(path: &Path, relu_forced: bool) -> Result<(Meta, Weights)> {
    let mut st = TensorFile::open(path)?;
    if st.has("w_enc") && !st.has("W_enc") {
        return Err(Error::format(
            path,
            "has tensor `w_enc` (Gemma Scope 2's layout, which circuit-tracer converts on load): \
             import it with its own format, or convert the set with circuit-tracer's \
             `save_transcoders_to_cache` and import the cache folder",
        ));
    }
    let d_sae = vector_len(&st, "b_enc")?;
    let d_model = vector_len(&st, "b_dec")?;
    let w_enc = matrix(&mut st, "W_enc", [d_sae, d_model], "[d_sae, d_model]")?;
    let w_dec = match st.shape("W_dec") {
        // The first release stored the decoder transposed (`load_relu_transcoder` transposed it back).
        Some(&[a, b]) if a == d_model && b == d_sae && d_sae != d_model => transposed(matrix(
            &mut st,
            "W_dec",
            [d_model, d_sae],
            "[d_model, d_sae]",
        )?),
        _ => matrix(&mut st, "W_dec", [d_sae, d_model], "[d_sae, d_model]")?,
    };
    let b_enc = vector(&mut st, "b_enc", d_sae, "[d_sae]")?;
    let b_dec = vector(&mut st, "b_dec", d_model, "[d_model]")?;
    let threshold = if st.has(THRESHOLD) {
        if relu_forced {
            return Err(Error::format(
                path,
                format!(
                    "has tensor `{THRESHOLD}` but the config says `activation: relu` \
                     (circuit-tracer would refuse to load it)"
                ),
            ));
        }
        let t = st.take_any(THRESHOLD)?;
        let t = match t.shape() {
            [] | [1] => Array1::from_elem(d_sae, t.iter().copied().next().unwrap_or(0.0)),
            [n] if *n == d_sae => into1(&st, THRESHOLD, t)?,
            s => {
                return Err(Error::format(
                    path,
                    format!("tensor `{THRESHOLD}` has shape {s:?}, expected [d_sae] = [{d_sae}]"),
                ));
            }
        };
        check_threshold(path, THRESHOLD, &t)?;
        Some(t)
    } else {
        None
    };
    let w_skip = if st.has("W_skip") {
        Some(matrix(
            &mut st,
            "W_skip",
            [d_model, d_model],
            "[d_model, d_model]",
        )?)
    } else {
        None
    };
    if st.has("k") {
        return Err(Error::format(
            path,
            "has tensor `k`: a TopK transcoder; circuit-tracer's TopK keeps the k largest \
             pre-activations even when negative, which Tiller's TopK cannot represent exactly; refusing",
        ));
    }
    leftovers(
        &st,
        &format!("W_enc, W_dec, b_enc, b_dec, {THRESHOLD}, W_skip"),
    )?;

    let kind = if w_skip.is_some() {
        Kind::SkipTranscoder
    } else {
        Kind::Transcoder
    };
    let activation = if threshold.is_some() {
        Activation::JumpRelu
    } else {
        Activation::Relu
    };
    let mut meta = Meta::new(kind, activation, d_model, d_sae, d_model);
    meta.source = SOURCE.into();
    let mut weights = Weights::new(
        w_enc.t().as_standard_layout().into_owned(),
        b_enc,
        w_dec,
        b_dec,
    );
    weights.threshold = threshold;
    weights.w_skip = w_skip;
    Ok((meta, weights))
}
