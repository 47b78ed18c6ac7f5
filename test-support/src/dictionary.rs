//! Dictionaries written for a test.

use std::path::Path;

use tiller_runtime::dictionary::build_model;
use tiller_runtime::{Meta, Weights};

/// Writes the dictionary of `meta` and `w` to `path`, every weight inside the `.onnx` file.
pub fn write_dictionary(path: &Path, meta: &Meta, w: &Weights) {
    tiller_runtime::graph::write_model(build_model(meta, w).unwrap(), path, usize::MAX).unwrap();
}
