//! Taking tensors from the checkpoint's safetensors files with their shapes checked.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};

use crate::tensors::TensorFile;
use crate::tensors::Tensors;
use crate::{Error, Result};

pub(super) fn vector_len(st: &TensorFile, name: &str) -> Result<usize> {
    match st.shape(name) {
        None => Err(st.missing(name)),
        Some(&[n]) if n > 0 => Ok(n),
        Some(s) => Err(Error::format(
            st.path(),
            format!("tensor `{name}` has shape {s:?}, expected a non-empty vector"),
        )),
    }
}

pub(super) fn take(
    st: &mut TensorFile,
    name: &str,
    want: &[usize],
    what: &str,
) -> Result<ArrayD<f32>> {
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

pub(super) fn matrix(
    st: &mut TensorFile,
    name: &str,
    want: [usize; 2],
    what: &str,
) -> Result<Array2<f32>> {
    let a = take(st, name, &want, what)?;
    a.into_dimensionality::<Ix2>()
        .map_err(|e| Error::format(st.path(), format!("tensor `{name}`: {e}")))
}

pub(super) fn vector(
    st: &mut TensorFile,
    name: &str,
    len: usize,
    what: &str,
) -> Result<Array1<f32>> {
    let a = take(st, name, &[len], what)?;
    into1(st, name, a)
}

pub(super) fn into1(st: &TensorFile, name: &str, a: ArrayD<f32>) -> Result<Array1<f32>> {
    a.into_dimensionality::<Ix1>()
        .map_err(|e| Error::format(st.path(), format!("tensor `{name}`: {e}")))
}

pub(super) fn transposed(a: Array2<f32>) -> Array2<f32> {
    a.t().as_standard_layout().into_owned()
}

/// Thresholds must be finite and `≥ 0`: circuit-tracer's JumpReLU is `x · [x > θ]`, Tiller's
/// `relu(x) · [x > θ]`; they agree exactly when no threshold is negative.
pub(super) fn check_threshold(path: &Path, name: &str, t: &Array1<f32>) -> Result<()> {
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

pub(super) fn leftovers(st: &TensorFile, expected: &str) -> Result<()> {
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
pub(super) fn header(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let (header, _) = crate::tensors::Header::open(path)?;
    let out = header
        .tensors
        .into_iter()
        .map(|(name, info)| (name, info.shape))
        .collect();
    Ok(out)
}
