//! Cross-layer transcoders: `W_enc_{i}`/`W_dec_{i}` files, each layer writing to later ones.

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

pub(super) fn import_clt(
    dir: &Path,
    cfg: Option<&(PathBuf, Config)>,
    files: &Files,
    opts: &ImportOptions,
) -> Result<Vec<Imported>> {
    let (hook_in, hook_out) = hooks(cfg, CLT_HOOKS)?;
    if let Some((path, c)) = cfg {
        if c.transcoders.is_some() {
            return Err(Error::format(
                path,
                "a cross_layer_transcoder config with a `transcoders` list is Gemma Scope 2's \
                 multi-layer format, which circuit-tracer converts on load: convert it with \
                 circuit-tracer's `save_transcoders_to_cache` and import the cache folder",
            ));
        }
        if let Some(a) = c.activation.as_deref() {
            return Err(Error::format(
                path,
                format!(
                    "key `activation` = `{a}`: circuit-tracer's `load_clt` takes the activation from \
                     the files (`threshold_{{i}}` present: JumpReLU, else ReLU); remove the key"
                ),
            ));
        }
    }
    if files.enc.is_empty() && files.dec.is_empty() {
        return Err(Error::format(
            cfg.map_or(dir, |(p, _)| p.as_path()),
            "describes a cross-layer transcoder, but the folder holds no `W_enc_{i}.safetensors` \
             nor `W_dec_{i}.safetensors` files",
        ));
    }
    let n = check_clt_files(dir, files)?;
    let layers = chosen(dir, n, opts, "CLT")?;
    let model = cfg.map(|(_, c)| c.model_name.clone()).unwrap_or_default();

    // circuit-tracer reads the sizes and whether there are thresholds from layer 0's encoder file.
    let enc0 = &files.enc[&0];
    let head = header(enc0)?;
    let shape0 = head.get("W_enc_0").ok_or_else(|| {
        Error::format(
            enc0,
            format!(
                "tensor `W_enc_0` is missing (the file has: {})",
                head.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let [d_sae, d_model] = shape0[..] else {
        return Err(Error::format(
            enc0,
            format!("tensor `W_enc_0` has shape {shape0:?}, expected [d_sae, d_model]"),
        ));
    };
    let has_threshold = head.contains_key("threshold_0");

    let mut out = Vec::with_capacity(layers.len());
    for i in layers {
        let (mut meta, weights) = clt_layer(files, i, n, d_sae, d_model, has_threshold)?;
        meta.hook_in = hook(i, hook_in);
        meta.hook_out = (i..n)
            .map(|l| hook(l, hook_out))
            .collect::<Vec<_>>()
            .join(",");
        meta.model = model.clone();
        weights
            .check(&meta)
            .map_err(|e| Error::format(&files.enc[&i], e.to_string()))?;
        out.push(Imported {
            name: Some(format!("layer_{i}")),
            meta,
            weights,
        });
    }
    Ok(out)
}

/// Checks that `W_enc_{i}` and `W_dec_{i}` exist for `i = 0..L`, and returns `L`.
pub(super) fn check_clt_files(dir: &Path, files: &Files) -> Result<usize> {
    let last = files
        .enc
        .keys()
        .chain(files.dec.keys())
        .copied()
        .max()
        .unwrap_or(0);
    for i in 0..=last {
        for (prefix, map) in [("W_enc_", &files.enc), ("W_dec_", &files.dec)] {
            if !map.contains_key(&i) {
                return Err(Error::format(
                    dir.join(format!("{prefix}{i}.safetensors")),
                    format!(
                        "is missing: a CLT needs `W_enc_{{i}}.safetensors` and \
                         `W_dec_{{i}}.safetensors` for every layer, and this folder has files up to \
                         layer {last}"
                    ),
                ));
            }
        }
    }
    Ok(last + 1)
}

/// Source layer `i` of an `n`-layer CLT.
pub(super) fn clt_layer(
    files: &Files,
    i: usize,
    n: usize,
    d_sae: usize,
    d_model: usize,
    has_threshold: bool,
) -> Result<(Meta, Weights)> {
    let enc_path = &files.enc[&i];
    let mut st = TensorFile::open(enc_path)?;
    let w_enc = matrix(
        &mut st,
        &format!("W_enc_{i}"),
        [d_sae, d_model],
        "[d_sae, d_model] (the shape of `W_enc_0`)",
    )?;
    let b_enc = vector(&mut st, &format!("b_enc_{i}"), d_sae, "[d_sae]")?;
    let b_dec_i = vector(&mut st, &format!("b_dec_{i}"), d_model, "[d_model]")?;
    let t_name = format!("threshold_{i}");
    let threshold = match (has_threshold, st.has(&t_name)) {
        (true, true) => {
            let t = vector(&mut st, &t_name, d_sae, "[d_sae]")?;
            check_threshold(enc_path, &t_name, &t)?;
            Some(t)
        }
        (true, false) => {
            return Err(Error::format(
                enc_path,
                format!(
                    "tensor `{t_name}` is missing, but `threshold_0` exists: circuit-tracer reads \
                     every layer as JumpReLU and would fail on this one"
                ),
            ));
        }
        (false, true) => {
            return Err(Error::format(
                enc_path,
                format!(
                    "has tensor `{t_name}` but `W_enc_0.safetensors` has no `threshold_0`: \
                     circuit-tracer would read every layer as ReLU and ignore it; refusing"
                ),
            ));
        }
        (false, false) => None,
    };
    if let Some(skip) = st
        .names()
        .into_iter()
        .find(|s| s.to_lowercase().contains("skip"))
    {
        return Err(Error::format(
            enc_path,
            format!(
                "has tensor `{skip}`: a CLT skip connection, which circuit-tracer's `load_clt` never \
                 reads and Tiller's CLTs do not have; refusing rather than dropping it"
            ),
        ));
    }
    leftovers(
        &st,
        &format!("W_enc_{i}, b_enc_{i}, b_dec_{i}, threshold_{i}"),
    )?;

    let dec_path = &files.dec[&i];
    let mut st = TensorFile::open(dec_path)?;
    let name = format!("W_dec_{i}");
    let want = [d_sae, n - i, d_model];
    let w = st.take_any(&name)?;
    if w.shape() != want {
        return Err(Error::format(
            dec_path,
            format!(
                "tensor `{name}` has shape {:?}, expected [d_sae, L - {i}, d_model] = {want:?} \
                 (L = {n} layers of `W_enc_{{i}}`/`W_dec_{{i}}` files)",
                w.shape()
            ),
        ));
    }
    // Row f holds output layer i's d_model values, then layer i+1's, …: Tiller's layer-major rows.
    let w_dec = w
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((d_sae, (n - i) * d_model))
        .map_err(|e| Error::format(dec_path, format!("tensor `{name}`: {e}")))?;
    leftovers(&st, &name)?;

    // The bias of output layer l is added once to the sum over source layers; it goes with the
    // source layer l, so that the source layers' reconstructions sum to circuit-tracer's.
    let mut b_dec = Array1::zeros((n - i) * d_model);
    b_dec.slice_mut(ndarray::s![..d_model]).assign(&b_dec_i);

    let activation = if threshold.is_some() {
        Activation::JumpRelu
    } else {
        Activation::Relu
    };
    let mut meta = Meta::new(Kind::Clt, activation, d_model, d_sae, d_model);
    meta.n_layers = n - i;
    meta.source = SOURCE.into();
    let mut weights = Weights::new(
        w_enc.t().as_standard_layout().into_owned(),
        b_enc,
        w_dec,
        b_dec,
    );
    weights.threshold = threshold;
    Ok((meta, weights))
}
