//! The checkpoint's layout: its files, which layers to read, the hooks they read and write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::config::*;
use crate::import::imported::ImportOptions;
use crate::{Error, Result};

/// The config file name.
pub const CONFIG: &str = "config.yaml";
/// The value `meta.source` gets.
pub const SOURCE: &str = "circuit-tracer";

/// The JumpReLU threshold of a per-layer file.
pub(super) const THRESHOLD: &str = "activation_function.threshold";
/// Default hooks of a transcoder set without a config (circuit-tracer's original `ReplacementModel`).
pub(super) const SET_HOOKS: (&str, &str) = ("mlp.hook_in", "mlp.hook_out");
/// Default hooks of a CLT without a config (`load_clt`).
pub(super) const CLT_HOOKS: (&str, &str) = ("hook_resid_mid", "hook_mlp_out");

#[derive(Debug, Clone, Copy)]
pub(super) enum SetOrClt {
    Set,
    Clt,
}

/// The numbered files of a folder.
#[derive(Debug, Default)]
pub(super) struct Files {
    pub(super) layers: BTreeMap<usize, PathBuf>,
    pub(super) enc: BTreeMap<usize, PathBuf>,
    pub(super) dec: BTreeMap<usize, PathBuf>,
}

pub(super) fn scan(dir: &Path) -> Result<Files> {
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
pub(super) fn chosen(dir: &Path, n: usize, opts: &ImportOptions, what: &str) -> Result<Vec<usize>> {
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

pub(super) fn hooks<'a>(
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

pub(super) fn hook(layer: usize, name: &str) -> String {
    format!("blocks.{layer}.{name}")
}
