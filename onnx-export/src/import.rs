//! Recognising checkpoint formats and writing them as Tiller dictionaries.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use tiller::{Meta, Weights};

use crate::{Error, Result, saelens};

/// A checkpoint format `import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Recognise the format from the files present.
    Auto,
    /// SAELens: `cfg.json` + `sae_weights.safetensors`.
    SaeLens,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "saelens" => Ok(Self::SaeLens),
            other => Err(format!("`{other}` is not a known format (auto, saelens)")),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::SaeLens => "saelens",
        })
    }
}

/// Recognises the format of the checkpoint at `path`.
pub fn detect(path: &Path) -> Result<Format> {
    if path.is_dir() && saelens::detect(path) {
        return Ok(Format::SaeLens);
    }
    if !path.exists() {
        return Err(Error::format(path, "does not exist"));
    }
    Err(Error::format(
        path,
        format!(
            "is not a checkpoint Tiller recognises: expected a SAELens folder with `{}` and `{}`",
            saelens::CFG,
            saelens::WEIGHTS
        ),
    ))
}

/// Reads the checkpoint at `path` in `format`.
pub fn read(path: &Path, format: Format) -> Result<(Meta, Weights)> {
    let format = if format == Format::Auto {
        detect(path)?
    } else {
        format
    };
    match format {
        Format::SaeLens => saelens::import(path),
        Format::Auto => unreachable!("resolved above"),
    }
}

/// Builds the ONNX dictionary and writes it to `out` (with external data past 2 GiB).
pub fn write(meta: &Meta, weights: &Weights, out: &Path) -> Result<()> {
    let model = tiller::dictionary::build_model(meta, weights)?;
    tiller::graph::write_model(model, out, tiller::graph::EXTERNAL_DATA_THRESHOLD)?;
    Ok(())
}
