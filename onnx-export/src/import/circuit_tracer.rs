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

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};
use tiller_runtime::{Activation, Kind, Meta, Weights};

use super::imported::{ImportOptions, Imported};
use crate::tensors::TensorFile;
use crate::{Error, Result};

/// The config file name.
pub const CONFIG: &str = "config.yaml";
/// The value `meta.source` gets.
pub const SOURCE: &str = "circuit-tracer";

/// The JumpReLU threshold of a per-layer file.
const THRESHOLD: &str = "activation_function.threshold";
/// Default hooks of a transcoder set without a config (circuit-tracer's original `ReplacementModel`).
const SET_HOOKS: (&str, &str) = ("mlp.hook_in", "mlp.hook_out");
/// Default hooks of a CLT without a config (`load_clt`).
const CLT_HOOKS: (&str, &str) = ("hook_resid_mid", "hook_mlp_out");

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

/// The parts of `config.yaml` the import reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// `transcoder_set` or `cross_layer_transcoder`.
    pub model_kind: Option<String>,
    /// The model the dictionaries were trained on.
    pub model_name: String,
    /// The TransformerLens hook the features read, relative to `blocks.{layer}`.
    pub feature_input_hook: Option<String>,
    /// The TransformerLens hook the features write, relative to `blocks.{layer}`.
    pub feature_output_hook: Option<String>,
    /// `activation` (`relu`, `topk`, or absent: the files decide).
    pub activation: Option<String>,
    /// `transcoders`: the file of each layer, in layer order.
    pub transcoders: Option<Vec<String>>,
}

/// Imports the circuit-tracer checkpoint in `dir`: one dictionary per source layer, or only
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

#[derive(Debug, Clone, Copy)]
enum SetOrClt {
    Set,
    Clt,
}

/// The numbered files of a folder.
#[derive(Debug, Default)]
struct Files {
    layers: BTreeMap<usize, PathBuf>,
    enc: BTreeMap<usize, PathBuf>,
    dec: BTreeMap<usize, PathBuf>,
}

fn scan(dir: &Path) -> Result<Files> {
    let mut files = Files::default();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".safetensors") else {
            continue;
        };
        for (prefix, map) in [
            ("layer_", &mut files.layers),
            ("W_enc_", &mut files.enc),
            ("W_dec_", &mut files.dec),
        ] {
            if let Some(n) = stem.strip_prefix(prefix)
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && let Ok(i) = n.parse::<usize>()
            {
                map.insert(i, entry.path());
            }
        }
    }
    Ok(files)
}

/// Which layers to import out of `n`, or an error naming the missing one.
fn chosen(dir: &Path, n: usize, opts: &ImportOptions, what: &str) -> Result<Vec<usize>> {
    match opts.layer {
        None => Ok((0..n).collect()),
        Some(l) if l < n => Ok(vec![l]),
        Some(l) => Err(Error::format(
            dir,
            format!(
                "--layer {l} does not exist: this {what} has layers 0..={}",
                n.saturating_sub(1)
            ),
        )),
    }
}

fn hooks<'a>(
    cfg: Option<&'a (PathBuf, Config)>,
    default: (&'a str, &'a str),
) -> Result<(&'a str, &'a str)> {
    let Some((path, c)) = cfg else {
        return Ok(default);
    };
    let need = |v: &'a Option<String>, key: &str| -> Result<&'a str> {
        v.as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::format(path, format!("key `{key}` is missing")))
    };
    Ok((
        need(&c.feature_input_hook, "feature_input_hook")?,
        need(&c.feature_output_hook, "feature_output_hook")?,
    ))
}

fn hook(layer: usize, name: &str) -> String {
    format!("blocks.{layer}.{name}")
}

// ---------------------------------------------------------------------------------------------
// Transcoder sets.

fn import_set(
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
fn set_paths(
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
fn resolve(dir: &Path, cfg_path: &Path, i: usize, entry: &str) -> Result<PathBuf> {
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
fn transcoder(path: &Path, relu_forced: bool) -> Result<(Meta, Weights)> {
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

// ---------------------------------------------------------------------------------------------
// Cross-layer transcoders.

fn import_clt(
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
fn check_clt_files(dir: &Path, files: &Files) -> Result<usize> {
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
fn clt_layer(
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

// ---------------------------------------------------------------------------------------------
// Tensor helpers.

fn vector_len(st: &TensorFile, name: &str) -> Result<usize> {
    match st.shape(name) {
        None => Err(Error::format(
            st.path(),
            format!(
                "tensor `{name}` is missing (the file has: {})",
                st.names().join(", ")
            ),
        )),
        Some(&[n]) if n > 0 => Ok(n),
        Some(s) => Err(Error::format(
            st.path(),
            format!("tensor `{name}` has shape {s:?}, expected a non-empty vector"),
        )),
    }
}

fn take(st: &mut TensorFile, name: &str, want: &[usize], what: &str) -> Result<ArrayD<f32>> {
    let a = st.take_any(name)?;
    if a.shape() != want {
        return Err(Error::format(
            st.path(),
            format!(
                "tensor `{name}` has shape {:?}, expected {what} = {want:?}",
                a.shape()
            ),
        ));
    }
    Ok(a)
}

fn matrix(st: &mut TensorFile, name: &str, want: [usize; 2], what: &str) -> Result<Array2<f32>> {
    let a = take(st, name, &want, what)?;
    a.into_dimensionality::<Ix2>()
        .map_err(|e| Error::format(st.path(), format!("tensor `{name}`: {e}")))
}

fn vector(st: &mut TensorFile, name: &str, len: usize, what: &str) -> Result<Array1<f32>> {
    let a = take(st, name, &[len], what)?;
    into1(st, name, a)
}

fn into1(st: &TensorFile, name: &str, a: ArrayD<f32>) -> Result<Array1<f32>> {
    a.into_dimensionality::<Ix1>()
        .map_err(|e| Error::format(st.path(), format!("tensor `{name}`: {e}")))
}

fn transposed(a: Array2<f32>) -> Array2<f32> {
    a.t().as_standard_layout().into_owned()
}

/// Thresholds must be finite and `≥ 0`: circuit-tracer's JumpReLU is `x · [x > θ]`, Tiller's
/// `relu(x) · [x > θ]`; they agree exactly when no threshold is negative.
fn check_threshold(path: &Path, name: &str, t: &Array1<f32>) -> Result<()> {
    if let Some((j, v)) = t.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::format(
            path,
            format!("tensor `{name}`: feature {j} has threshold {v}, not a finite number"),
        ));
    }
    if let Some((j, v)) = t.iter().enumerate().find(|(_, v)| **v < 0.0) {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}`: feature {j} has threshold {v} < 0; circuit-tracer's JumpReLU \
                 `x·[x > θ]` then passes negative activations, which Tiller's JumpReLU \
                 (`relu(x)·[x > θ]`) zeroes; refusing"
            ),
        ));
    }
    Ok(())
}

fn leftovers(st: &TensorFile, expected: &str) -> Result<()> {
    match st.names().first() {
        None => Ok(()),
        Some(extra) => Err(Error::format(
            st.path(),
            format!(
                "tensor `{extra}` is not part of circuit-tracer's layout (this file holds {expected}); \
                 refusing rather than ignoring it"
            ),
        )),
    }
}

/// The tensor shapes of a safetensors file, read from its header alone.
fn header(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let bad = |m: String| Error::format(path, format!("not a valid safetensors file: {m}"));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || n > size.saturating_sub(8) {
        return Err(bad(format!(
            "header length {n} is larger than the file or 100 MiB"
        )));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_slice(&buf).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut out = BTreeMap::new();
    for (k, t) in obj {
        if k == "__metadata__" {
            continue;
        }
        let shape = t
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(format!("tensor `{k}` has no valid shape")))?;
        out.insert(k.clone(), shape);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// config.yaml: the subset of YAML circuit-tracer's configs use (`key: scalar` lines, block and
// flow lists of scalars, lists of flat mappings as in the first release's `transcoders`).

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Scalar(String),
    List(Vec<Item>),
    Other,
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Scalar(String),
    Map(BTreeMap<String, String>),
}

/// Parses `config.yaml` (the text `text` of the file at `path`).
pub fn parse_config(path: &Path, text: &str) -> Result<Config> {
    let map = parse_yaml(path, text)?;
    let err = |m: String| Error::format(path, m);
    let scalar = |key: &str| -> Result<Option<String>> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Scalar(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(format!("key `{key}` is not a single value"))),
        }
    };
    let transcoders = match map.get("transcoders") {
        None | Some(Value::Null) => None,
        Some(Value::List(items)) => {
            // The first release listed `{id, layer, filepath}` mappings; later ones, paths.
            let mut by_layer: BTreeMap<usize, String> = BTreeMap::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Item::Scalar(s) => {
                        by_layer.insert(i, s.clone());
                    }
                    Item::Map(m) => {
                        let layer = m
                            .get("layer")
                            .and_then(|l| l.parse::<usize>().ok())
                            .ok_or_else(|| {
                                err(format!("`transcoders[{i}]` has no integer `layer`"))
                            })?;
                        let file = m
                            .get("filepath")
                            .ok_or_else(|| err(format!("`transcoders[{i}]` has no `filepath`")))?;
                        if by_layer.insert(layer, file.clone()).is_some() {
                            return Err(err(format!("`transcoders` lists layer {layer} twice")));
                        }
                    }
                }
            }
            let n = by_layer.len();
            if let Some(missing) = (0..n).find(|l| !by_layer.contains_key(l)) {
                return Err(err(format!(
                    "`transcoders` has no entry for layer {missing} (circuit-tracer needs layers 0..{n})"
                )));
            }
            Some(by_layer.into_values().collect())
        }
        Some(_) => return Err(err("key `transcoders` is not a list".into())),
    };
    Ok(Config {
        model_kind: scalar("model_kind")?,
        model_name: scalar("model_name")?.unwrap_or_default(),
        feature_input_hook: scalar("feature_input_hook")?,
        feature_output_hook: scalar("feature_output_hook")?,
        activation: scalar("activation")?,
        transcoders,
    })
}

struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

fn parse_yaml(path: &Path, text: &str) -> Result<BTreeMap<String, Value>> {
    let at = |no: usize, m: String| Error::format(path, format!("line {no}: {m}"));
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let body = strip_comment(raw).trim_end();
        let trimmed = body.trim_start();
        if trimmed.is_empty() || trimmed == "---" || trimmed.starts_with('%') {
            continue;
        }
        if body.starts_with('\t') {
            return Err(at(
                i + 1,
                "tabs are not allowed for indentation in YAML".into(),
            ));
        }
        lines.push(Line {
            no: i + 1,
            indent: body.len() - trimmed.len(),
            text: trimmed,
        });
    }
    let mut map = BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        let line = &lines[i];
        if line.indent != 0 || is_item(line.text) {
            return Err(at(
                line.no,
                "expected a top-level `key: value` (the config is a mapping)".into(),
            ));
        }
        let (key, rest) = split_key(line.text).ok_or_else(|| {
            at(
                line.no,
                format!("expected `key: value`, got `{}`", line.text),
            )
        })?;
        i += 1;
        let start = i;
        while i < lines.len() && (lines[i].indent > 0 || is_item(lines[i].text)) {
            i += 1;
        }
        let block = &lines[start..i];
        let value = if !rest.is_empty() {
            if !block.is_empty() {
                return Err(at(
                    block[0].no,
                    format!("key `{key}` has a value and an indented block"),
                ));
            }
            inline_value(rest).map_err(|m| at(line.no, m))?
        } else if block.is_empty() {
            Value::Null
        } else if is_item(block[0].text) {
            list(block).map_err(|(no, m)| at(no, m))?
        } else {
            Value::Other
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(at(line.no, format!("key `{key}` appears twice")));
        }
    }
    Ok(map)
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// A block list: items at the first line's indentation, each a scalar or a flat mapping.
fn list(block: &[Line<'_>]) -> std::result::Result<Value, (usize, String)> {
    let indent = block[0].indent;
    let mut items = Vec::new();
    let mut i = 0;
    while i < block.len() {
        let line = &block[i];
        if line.indent != indent || !is_item(line.text) {
            return Err((line.no, "expected a list item `- …`".into()));
        }
        let first = line.text[1..].trim_start();
        i += 1;
        let start = i;
        while i < block.len() && block[i].indent > indent {
            i += 1;
        }
        let rest = &block[start..i];
        match split_key(first) {
            Some((k, v)) => {
                let mut m = BTreeMap::new();
                m.insert(k, scalar(v).map_err(|e| (line.no, e))?);
                for l in rest {
                    let (k, v) = split_key(l.text).ok_or_else(|| {
                        (l.no, format!("expected `key: value`, got `{}`", l.text))
                    })?;
                    m.insert(k, scalar(v).map_err(|e| (l.no, e))?);
                }
                items.push(Item::Map(m));
            }
            None => {
                if let Some(l) = rest.first() {
                    return Err((l.no, "a list item of a scalar has an indented block".into()));
                }
                items.push(Item::Scalar(scalar(first).map_err(|e| (line.no, e))?));
            }
        }
    }
    Ok(Value::List(items))
}

fn inline_value(rest: &str) -> std::result::Result<Value, String> {
    if let Some(inner) = rest.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("unterminated list `{rest}`"))?;
        if inner.trim().is_empty() {
            return Ok(Value::List(Vec::new()));
        }
        let items: std::result::Result<Vec<Item>, String> = inner
            .split(',')
            .map(|s| scalar(s.trim()).map(Item::Scalar))
            .collect();
        return Ok(Value::List(items?));
    }
    if rest.starts_with('{') || rest.starts_with('|') || rest.starts_with('>') {
        return Ok(Value::Other);
    }
    match rest {
        "~" | "null" | "Null" | "NULL" => Ok(Value::Null),
        _ => scalar(rest).map(Value::Scalar),
    }
}

/// A plain, single- or double-quoted scalar.
fn scalar(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .ok_or_else(|| format!("unterminated quoted string {s}"))?;
        return Ok(inner.replace("''", "'"));
    }
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| format!("unterminated quoted string {s}"))?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(c @ ('"' | '\\' | '/')) => out.push(c),
                other => {
                    return Err(format!(
                        "unsupported escape `\\{}` in {s}",
                        other.unwrap_or(' ')
                    ));
                }
            }
        }
        return Ok(out);
    }
    Ok(s.to_string())
}

/// `key: rest` (or `key:`), with the key unquoted.
fn split_key(text: &str) -> Option<(String, &str)> {
    let (mut quote, mut prev_space) = (None, true);
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') if prev_space || i == 0 => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ':') => {
                let after = &text[i + 1..];
                if after.is_empty() || after.starts_with(' ') {
                    let key = scalar(&text[..i]).ok()?;
                    if key.is_empty() {
                        return None;
                    }
                    return Some((key, after.trim()));
                }
            }
            _ => {}
        }
        prev_space = c == ' ';
    }
    None
}

/// The line without a trailing `# comment` (a `#` at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev == ' ' || prev == '\t' => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_configs_circuit_tracer_writes() {
        let p = Path::new("config.yaml");
        let clt = "model_name: \"google/gemma-2-2b\"\nmodel_kind: cross_layer_transcoder\n\
                   feature_input_hook: hook_resid_mid # the residual stream\nfeature_output_hook: 'hook_mlp_out'\n\
                   scan:\n  - a\n  - b\n";
        let c = parse_config(p, clt).unwrap();
        assert_eq!(c.model_kind.as_deref(), Some("cross_layer_transcoder"));
        assert_eq!(c.model_name, "google/gemma-2-2b");
        assert_eq!(c.feature_input_hook.as_deref(), Some("hook_resid_mid"));
        assert_eq!(c.feature_output_hook.as_deref(), Some("hook_mlp_out"));
        assert_eq!(c.transcoders, None);

        let set = "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n\
                   transcoders:\n- hf://mntss/x/layer_0.safetensors?revision=main\n- layer_1.safetensors\n";
        let c = parse_config(p, set).unwrap();
        assert_eq!(
            c.transcoders.unwrap(),
            vec![
                "hf://mntss/x/layer_0.safetensors?revision=main",
                "layer_1.safetensors"
            ]
        );

        // The first release's `{id, layer, filepath}` entries, in any order.
        let old = "model_name: \"meta-llama/Llama-3.2-1B\"\nfeature_input_hook: \"hook_resid_mid\"\n\
                   feature_output_hook: 'mlp.hook_out'\n\ntranscoders:\n  - id: \"b\"\n    layer: 1\n    \
                   filepath: \"b.safetensors\"\n  - id: \"a\"\n    layer: 0\n    filepath: \"a.safetensors\"\n";
        let c = parse_config(p, old).unwrap();
        assert_eq!(
            c.transcoders.unwrap(),
            vec!["a.safetensors", "b.safetensors"]
        );
        assert_eq!(
            parse_config(p, "transcoders: [a, 'b']\n")
                .unwrap()
                .transcoders
                .unwrap(),
            vec!["a", "b"]
        );
    }

    #[test]
    fn bad_configs_name_the_line() {
        let p = Path::new("config.yaml");
        let e = parse_config(p, "model_kind: x\n  oops\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_config(p, "a: 1\na: 2\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`a`"), "{e}");
        let e = parse_config(p, "transcoders:\n  - layer: 1\n    filepath: x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 0"), "{e}");
        let e = parse_config(p, "feature_input_hook:\n  - a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("feature_input_hook"), "{e}");
    }
}
