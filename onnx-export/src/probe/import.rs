//! The `probe` import format: linear probes as common Python tools save them.
//!
//! - `.safetensors` or `.npz` holding `weight` and `bias` (`torch.nn.Linear`'s state dict, also
//!   with a prefix such as `probe.weight` / `probe.bias` when only one `*.weight` is present),
//!   `coef_` and `intercept_` (scikit-learn's `LogisticRegression`), or `coef` and `intercept`;
//! - a `.npy` weight, with its bias given by `--bias b.npy` (none: zero);
//! - a folder holding such `.npy` files: `weight.npy` / `bias.npy`, `coef_.npy` /
//!   `intercept_.npy`, or `coef.npy` / `intercept.npy`.
//!
//! The weight is `[d]` (one read-out) or `[n_out, d]` (torch's `[out_features, in_features]`,
//! scikit-learn's `[n_classes, d]`, one read-out per row); the bias `[n_out]` (or `[]`, `[1]` for
//! one read-out). Floats of any width are read (bfloat16 too, from safetensors). Each read-out
//! becomes `sigmoid(x·w + b)` (`--probe-output sigmoid`, the default) or its logit
//! (`--probe-output logit`, which is also the exact form of a multinomial model's scores).
//!
//! A `.npy` is recognised as a steering direction (`--format vector`) by `--format auto`:
//! name `--format probe` (or give `--bias`) to read it as a probe's weight.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD, Ix2};
use tiller_runtime::dictionary::probe_dictionary;

use crate::import::imported::{ImportOptions, Imported};
use crate::tensors::TensorFile;
use crate::tensors::Tensors;
use crate::{Error, Result};

/// The `(weight, bias)` names tried, in order.
const PAIRS: &[(&str, &str)] = &[
    ("weight", "bias"),
    ("coef_", "intercept_"),
    ("coef", "intercept"),
];

/// The weight and bias tensors among `names`: one of [`PAIRS`], or the only `*.weight` with its
/// `*.bias`.
fn find_pair(names: &[String]) -> std::result::Result<(String, Option<String>), String> {
    let has = |n: &str| names.iter().any(|m| m == n);
    for (w, b) in PAIRS {
        if has(w) {
            return Ok((w.to_string(), has(b).then(|| b.to_string())));
        }
    }
    let weights: Vec<&String> = names.iter().filter(|n| n.ends_with(".weight")).collect();
    match weights.as_slice() {
        [w] => {
            let b = format!("{}.bias", w.trim_end_matches(".weight"));
            let b = has(&b).then_some(b);
            Ok((w.to_string(), b))
        }
        [] => Err(format!(
            "holds no probe weight: expected `weight`/`bias`, `coef_`/`intercept_` or \
             `coef`/`intercept` (it has: {})",
            names.join(", ")
        )),
        many => Err(format!(
            "holds several weights ({}): a probe file holds one linear layer",
            many.iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn ext(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

/// The `.npy` pair of a folder, if it has one.
fn folder_pair(dir: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    PAIRS.iter().find_map(|(w, b)| {
        let w = dir.join(format!("{w}.npy"));
        let b = dir.join(format!("{b}.npy"));
        w.is_file().then(|| (w, b.is_file().then_some(b)))
    })
}

/// Whether `path` looks like a saved probe: a `.safetensors` or `.npz` with one linear layer's
/// tensors, or a folder with its `.npy` files.
pub fn detect(path: &Path) -> bool {
    if path.is_dir() {
        return folder_pair(path).is_some();
    }
    let names = match ext(path) {
        "safetensors" => TensorFile::open(path).map(|f| {
            f.names()
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        }),
        "npz" => crate::npy::npz_names(path),
        _ => return false,
    };
    names.is_ok_and(|n| find_pair(&n).is_ok())
}

/// Reads the probe at `path` (see the module docs).
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Vec<Imported>> {
    let (weight, bias, source) = match ext(path) {
        _ if path.is_dir() => {
            let (w, b) = folder_pair(path).ok_or_else(|| {
                Error::format(
                    path,
                    "holds no `weight.npy`, `coef_.npy` or `coef.npy` probe weight",
                )
            })?;
            if opts.bias.is_some() {
                return Err(Error::format(
                    path,
                    "--bias goes with a .npy weight file, not a folder",
                ));
            }
            let bias = b.map(|b| npy_tensor(&b)).transpose()?;
            (npy_tensor(&w)?, bias, "npy")
        }
        "npy" => {
            let bias = opts.bias.as_deref().map(npy_tensor).transpose()?;
            (npy_tensor(path)?, bias, "npy")
        }
        "safetensors" | "npz" => {
            if let Some(b) = &opts.bias {
                return Err(Error::format(
                    b,
                    format!(
                        "--bias goes with a .npy weight; {} holds its own tensors",
                        path.display()
                    ),
                ));
            }
            let names = if ext(path) == "npz" {
                crate::npy::npz_names(path)?
            } else {
                TensorFile::open(path)?
                    .names()
                    .into_iter()
                    .map(str::to_string)
                    .collect()
            };
            let (w, b) = find_pair(&names).map_err(|m| Error::format(path, m))?;
            let read = |name: &str| -> Result<Tensor> {
                let values = if ext(path) == "npz" {
                    crate::npy::read_npz_f32(path, name)?
                } else {
                    TensorFile::open(path)?.take_any(name)?
                };
                Ok(Tensor {
                    file: path.to_path_buf(),
                    name: name.to_string(),
                    values,
                })
            };
            let bias = b.as_deref().map(read).transpose()?;
            (read(&w)?, bias, ext(path))
        }
        other => {
            return Err(Error::format(
                path,
                format!(
                    "`.{other}` is not a probe file: give a .safetensors, .npz or .npy file, or a folder of .npy files"
                ),
            ));
        }
    };
    let (w, b) = shapes(&weight, bias.as_ref())?;
    let (mut meta, weights) = probe_dictionary(w, b, opts.probe_output.activation())
        .map_err(|e| Error::format(&weight.file, e.to_string()))?;
    meta.source = source.to_string();
    Ok(Imported::single(meta, weights))
}

/// One array read from a file, with where it came from (for messages).
struct Tensor {
    file: PathBuf,
    name: String,
    values: ArrayD<f32>,
}

impl Tensor {
    fn err(&self, message: String) -> Error {
        Error::format(&self.file, format!("`{}` {message}", self.name))
    }
}

fn npy_tensor(path: &Path) -> Result<Tensor> {
    Ok(Tensor {
        file: path.to_path_buf(),
        name: path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        values: crate::npy::read_f32_dyn(path)?,
    })
}

/// Checks the shapes and values of a weight and its bias; returns `[n_out, d]` and `[n_out]`.
fn shapes(weight: &Tensor, bias: Option<&Tensor>) -> Result<(Array2<f32>, Array1<f32>)> {
    let ws = weight.values.shape().to_vec();
    let w: Array2<f32> = match ws.len() {
        1 => weight
            .values
            .clone()
            .into_shape_with_order((1, ws[0]))
            .map_err(|e| weight.err(e.to_string()))?,
        2 => weight
            .values
            .clone()
            .into_dimensionality::<Ix2>()
            .map_err(|e| weight.err(e.to_string()))?,
        _ => {
            return Err(weight.err(format!(
                "has shape {ws:?}: a probe's weight is [d] or [n_out, d]"
            )));
        }
    };
    let (n_out, d) = w.dim();
    if n_out == 0 || d == 0 {
        return Err(weight.err(format!("has shape {ws:?}: it is empty")));
    }
    if w.iter().any(|v| !v.is_finite()) {
        return Err(weight.err("contains NaN or infinite values".into()));
    }
    let b = match bias {
        None => Array1::zeros(n_out),
        Some(t) => {
            let bs = t.values.shape().to_vec();
            let fits = t.values.len() == n_out && bs.iter().filter(|&&k| k != 1).count() <= 1;
            if !fits {
                let hint = if ws.len() == 2 && t.values.len() == d && d != n_out {
                    format!(
                        ": the weight looks transposed ([d, n_out], as JAX and Keras store kernels); \
                         save its transpose, [{n_out}, {d}] → [{d}, {n_out}]"
                    )
                } else {
                    String::new()
                };
                return Err(t.err(format!(
                    "has shape {bs:?}, but the weight {ws:?} has {n_out} read-out{}{hint}",
                    if n_out == 1 { "" } else { "s" }
                )));
            }
            if t.values.iter().any(|v| !v.is_finite()) {
                return Err(t.err("contains NaN or infinite values".into()));
            }
            t.values.iter().copied().collect()
        }
    };
    Ok((w, b))
}
