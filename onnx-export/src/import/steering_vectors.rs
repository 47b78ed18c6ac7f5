//! Raw steering directions, turned into `vector` dictionaries the runtime uses with the `vector`
//! and `project_cap` ops (and as projection monitors):
//! - llama.cpp / repeng GGUF control vectors: one dictionary per `direction.N` tensor, named `N`
//!   (llama.cpp adds `direction.N` to the output of block N; name the host's hook with
//!   `--hook 'model.layers.{name}'`);
//! - `.npy` files of one direction `[d]` or several `[n, d]`: one dictionary, a feature per row.

use std::path::Path;

use ndarray::Array2;
use tiller_runtime::dictionary::vector_dictionary;

use super::imported::{ImportOptions, Imported};
use crate::{Error, Result};

/// Whether `path` is a `.gguf` or `.npy` file.
pub fn detect(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "gguf" || e == "npy")
}

/// Imports the directions in `path`.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Vec<Imported>> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let cv = tiller_runtime::vectors::read_gguf_control_vector(path)?;
        let mut out = Vec::new();
        for (layer, dir) in &cv.directions {
            if opts.layer.is_some_and(|l| l != *layer) {
                continue;
            }
            let u = Array2::from_shape_vec((1, dir.len()), dir.clone())
                .map_err(|e| Error::format(path, format!("`direction.{layer}`: {e}")))?;
            let (mut meta, weights) = vector_dictionary(u)
                .map_err(|e| Error::format(path, format!("`direction.{layer}`: {e}")))?;
            meta.model = cv.model_hint.clone().unwrap_or_default();
            meta.source = "control-vector".into();
            meta.labels.insert(0, format!("direction.{layer}"));
            out.push(Imported {
                name: Some(layer.to_string()),
                meta,
                weights,
            });
        }
        if out.is_empty()
            && let Some(l) = opts.layer
        {
            let have: Vec<String> = cv.directions.keys().map(|k| k.to_string()).collect();
            return Err(Error::format(
                path,
                format!("has no `direction.{l}` (it has layers {})", have.join(", ")),
            ));
        }
        return Ok(out);
    }
    let u = tiller_runtime::vectors::read_npy_vectors(path)?;
    let (mut meta, weights) =
        vector_dictionary(u).map_err(|e| Error::format(path, e.to_string()))?;
    meta.source = "npy".into();
    Ok(Imported::single(meta, weights))
}
