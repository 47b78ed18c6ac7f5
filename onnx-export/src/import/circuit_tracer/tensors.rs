//! Taking tensors from the checkpoint's safetensors files with their shapes checked.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};

use crate::tensors::TensorFile;
use crate::{Error, Result};

pub(super) fn vector_len(st: &TensorFile, name: &str) -> Result<usize> {
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
