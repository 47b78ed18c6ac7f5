//! A loaded checkpoint: what the pickle says about each tensor, and taking them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use serde_json::Value;

use super::archive::*;
use super::dtype::*;
use super::elements::*;
use super::limits::*;
use super::objects::*;
use crate::tensors::Tensors;
use crate::{Error, Result};

/// What the pickle says about one tensor, before its storage is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// An open `torch.save` checkpoint: its pickle read and checked, its tensors read from the
/// archive only when taken.
///
/// Nested dicts are flattened with `.` (`{"ae": {"encoder.weight": t}}` gives `ae.encoder.weight`),
/// as are lists and tuples that hold tensors (`layers.0.weight`); dict keys that are integers are
/// written in decimal. A tensor saved at the top level is named `""`. Non-finite floats among the
/// plain values are kept as the strings `nan`, `inf` and `-inf`.
///
/// A tensor laid out densely in its storage (contiguous, or any permutation of its axes, as a
/// transposed weight is) is streamed from the archive straight into its float32 (or int64) array,
/// in the axis order asked for: taking holds one copy of the weights in memory. Other views (gaps,
/// overlaps) read their storage whole first.
#[derive(Debug)]
pub struct Checkpoint {
    pub(super) path: PathBuf,
    pub(super) archive: Archive,
    pub(super) order: ByteOrder,
    pub(super) tensors: BTreeMap<String, TensorRef>,
    /// The plain values.
    pub values: BTreeMap<String, Value>,
}

/// Whether `path` is a file that starts like a zip archive (cheap; reads four bytes).
pub fn is_archive(path: &Path) -> bool {
    let mut head = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == ZIP_MAGIC
}

/// Opens the checkpoint at `path`: checks the archive, runs its pickle and checks what it says
/// (tensor extents are checked against their storages when taken).
pub fn load(path: &Path) -> Result<Checkpoint> {
    let mut archive = Archive::open(path)?;
    let flat = archive.unpickle()?;
    // Widening halves doubles their size: bound what the tensors may take before reading any.
    let mut want: u64 = 0;
    for (name, t) in &flat.tensors {
        let bytes = t.numel.checked_mul(if t.dtype.is_float() { 4 } else { 8 });
        want = bytes.and_then(|b| want.checked_add(b)).ok_or_else(|| {
            Error::format(path, format!("tensor `{name}` is too large to address"))
        })?;
    }
    if want > archive.budget.saturating_mul(2) {
        return Err(Error::format(
            path,
            format!(
                "its tensors would take {want} bytes, more than twice what its members may hold \
                 ({} bytes): an expanded view or a corrupt shape",
                archive.budget
            ),
        ));
    }
    let order = archive.byteorder()?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        archive,
        order,
        tensors: flat.tensors,
        values: flat.values,
    })
}

impl Checkpoint {
    /// The dtype and shape of the tensor `name`, if present.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|t| TensorInfo {
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
    }

    /// A plain value.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// Reads the float tensor `name` with its axes in the order `perm`; removes it when `take`.
    pub(super) fn read_float(
        &mut self,
        name: &str,
        perm: &[usize],
        take: bool,
    ) -> Result<ArrayD<f32>> {
        let t = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        if !t.dtype.is_float() {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}` holds {}, not floats", t.dtype.name()),
            ));
        }
        let t = t.clone();
        let (shape, out) = self.archive.read_tensor(name, &t, perm, self.order)?;
        if take {
            self.tensors.remove(name);
        }
        match out {
            Elements::Float(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
                .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}"))),
            Elements::Int(_) => Err(Error::format(&self.path, format!("tensor `{name}`"))),
        }
    }

    /// Reads the integer (or boolean) tensor `name`; removes it when `take`.
    pub(super) fn read_int(&mut self, name: &str, take: bool) -> Result<ArrayD<i64>> {
        let t = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        if t.dtype.is_float() {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}` holds {}, not integers", t.dtype.name()),
            ));
        }
        let t = t.clone();
        let identity: Vec<usize> = (0..t.shape.len()).collect();
        let (shape, out) = self.archive.read_tensor(name, &t, &identity, self.order)?;
        if take {
            self.tensors.remove(name);
        }
        match out {
            Elements::Int(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
                .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}"))),
            Elements::Float(_) => Err(Error::format(&self.path, format!("tensor `{name}`"))),
        }
    }

    /// Reads and removes the float tensor `name` of shape `shape` with its axes permuted:
    /// axis `i` of the result is axis `perm[i]` of the tensor (as `torch.permute`).
    pub fn take_permuted(
        &mut self,
        name: &str,
        shape: &[usize],
        perm: &[usize],
    ) -> Result<ArrayD<f32>> {
        self.check_shape(name, shape)?;
        let mut seen = vec![false; shape.len()];
        for &p in perm {
            if p >= shape.len() || std::mem::replace(&mut seen[p], true) {
                return Err(Error::format(
                    &self.path,
                    format!("tensor `{name}`: {perm:?} is not a permutation of its axes"),
                ));
            }
        }
        if perm.len() != shape.len() {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}`: {perm:?} is not a permutation of its axes"),
            ));
        }
        self.read_float(name, perm, true)
    }

    /// Reads and removes a `[rows, cols]` matrix as its transpose, `[cols, rows]` (an `nn.Linear`
    /// weight as the `x W` matrix), without a second copy.
    pub fn take2_transposed(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Array2<f32>> {
        let a = self.take_permuted(name, &[rows, cols], &[1, 0])?;
        a.into_dimensionality()
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Reads and removes the integer (or boolean) tensor `name`, widened to int64.
    pub fn take_ints(&mut self, name: &str) -> Result<ArrayD<i64>> {
        self.read_int(name, true)
    }

    /// A one-element integer tensor (a `k` buffer) or an integer value; `None` when absent.
    pub fn int(&mut self, name: &str) -> Result<Option<i64>> {
        if self.has(name) {
            let a = self.read_int(name, false)?;
            return match a.len() {
                1 => Ok(a.iter().next().copied()),
                n => Err(Error::format(
                    &self.path,
                    format!("tensor `{name}` has {n} elements, expected one integer"),
                )),
            };
        }
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                Error::format(&self.path, format!("`{name}` = {v} is not an integer"))
            }),
        }
    }

    /// A one-element float tensor or a number value; `None` when absent.
    pub fn scalar(&mut self, name: &str) -> Result<Option<f64>> {
        if self.has(name) {
            let rank = self.shape(name).map_or(0, <[usize]>::len);
            let identity: Vec<usize> = (0..rank).collect();
            let a = self.read_float(name, &identity, false)?;
            return match a.len() {
                1 => Ok(a.iter().next().map(|v| f64::from(*v))),
                n => Err(Error::format(
                    &self.path,
                    format!("tensor `{name}` has {n} elements, expected one number"),
                )),
            };
        }
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::format(&self.path, format!("`{name}` = {v} is not a number"))
            }),
        }
    }

    /// Keeps only the entries under `prefix` (a name and a `.`), with the prefix removed:
    /// `strip_prefix("ae")` turns `ae.encoder.weight` into `encoder.weight`.
    pub fn strip_prefix(&mut self, prefix: &str) {
        let p = format!("{prefix}.");
        fn keep<V>(m: &mut BTreeMap<String, V>, p: &str) {
            let old = std::mem::take(m);
            m.extend(
                old.into_iter()
                    .filter_map(|(k, v)| k.strip_prefix(p).map(|s| (s.to_string(), v))),
            );
        }
        keep(&mut self.tensors, &p);
        keep(&mut self.values, &p);
    }
}

impl Tensors for Checkpoint {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Streams a densely laid-out tensor straight into its array (see [`Checkpoint`]).
    fn take_any(&mut self, name: &str) -> Result<ArrayD<f32>> {
        let rank = self.shape(name).map_or(0, <[usize]>::len);
        let identity: Vec<usize> = (0..rank).collect();
        self.read_float(name, &identity, true)
    }
}

/// The [`Tensors`] lookup, also as inherent methods so that callers need not import the trait
/// (the public API of `torch::Checkpoint` before the trait existed).
impl Checkpoint {
    /// The file.
    pub fn path(&self) -> &Path {
        Tensors::path(self)
    }

    /// Whether it has a tensor `name` (not taken yet).
    pub fn has(&self, name: &str) -> bool {
        Tensors::has(self, name)
    }

    /// The names of all tensors not taken yet.
    pub fn names(&self) -> Vec<&str> {
        Tensors::names(self)
    }

    /// The shape of the tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        Tensors::shape(self, name)
    }

    /// Reads and removes the float tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        Tensors::take(self, name, shape)
    }

    /// Reads and removes the float tensor `name` whatever its shape.
    pub fn take_any(&mut self, name: &str) -> Result<ArrayD<f32>> {
        Tensors::take_any(self, name)
    }

    /// Reads and removes a matrix of the given shape.
    pub fn take2(&mut self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        Tensors::take2(self, name, rows, cols)
    }

    /// Reads and removes a vector of the given length.
    pub fn take1(&mut self, name: &str, len: usize) -> Result<Array1<f32>> {
        Tensors::take1(self, name, len)
    }
}
