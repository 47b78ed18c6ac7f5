//! Writing imported dictionaries as ONNX files.

use std::path::{Path, PathBuf};

use tiller_runtime::{Meta, Weights};

use crate::Result;

/// Where dictionary `name` of a multi-dictionary checkpoint is written, given `-o OUT.onnx`:
/// `OUT.<name>.onnx`.
pub fn output_path(out: &Path, name: Option<&str>) -> PathBuf {
    match name {
        None => out.to_path_buf(),
        Some(n) => {
            let safe: String = n
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let stem = out
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            out.with_file_name(format!("{stem}.{safe}.onnx"))
        }
    }
}

/// Builds the ONNX dictionary and writes it to `out` (weights past 2 GiB streamed to external data).
pub fn write(meta: &Meta, weights: &Weights, out: &Path) -> Result<()> {
    Ok(tiller_runtime::dictionary::write_dictionary(
        meta, weights, out,
    )?)
}

/// [`write()`] with `W_enc` and `W_dec` stored as `dtype` (f16, bf16: rounded to nearest).
pub fn write_as(
    meta: &Meta,
    weights: &Weights,
    out: &Path,
    dtype: tiller_runtime::dictionary::WeightDtype,
) -> Result<()> {
    Ok(tiller_runtime::dictionary::write_dictionary_as(
        meta, weights, out, dtype,
    )?)
}
