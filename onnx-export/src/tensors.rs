//! Reading safetensors checkpoints with every shape and dtype checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// The float tensors of one safetensors file, widened to float32 (and float64 for references).
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    tensors: BTreeMap<String, ArrayD<f32>>,
}

impl TensorFile {
    /// Reads every tensor of `path`. A truncated file, a header that claims more bytes than the file
    /// has, or a non-float tensor is an error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|c| {
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                    })
                    .collect(),
                other => {
                    return Err(Error::format(
                        path,
                        format!("tensor `{name}` has dtype {other:?}, not a float type"),
                    ));
                }
            };
            let a = ArrayD::from_shape_vec(IxDyn(view.shape()), values)
                .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
            tensors.insert(name.to_string(), a);
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has a tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The names of all tensors.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The shape of the tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|a| a.shape())
    }

    /// Removes and returns the tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let a = self.take_any(name)?;
        if a.shape() != shape {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, but the config implies {shape:?}",
                    a.shape()
                ),
            ));
        }
        Ok(a)
    }

    /// Removes and returns the tensor `name` whatever its shape.
    pub fn take_any(&mut self, name: &str) -> Result<ArrayD<f32>> {
        self.tensors.remove(name).ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "tensor `{name}` is missing (the file has: {})",
                    self.names().join(", ")
                ),
            )
        })
    }

    /// Removes and returns a matrix of the given shape.
    pub fn take2(&mut self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let a = self.take(name, &[rows, cols])?;
        a.into_dimensionality()
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Removes and returns a vector of the given length.
    pub fn take1(&mut self, name: &str, len: usize) -> Result<Array1<f32>> {
        let a = self.take(name, &[len])?;
        a.into_dimensionality()
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))
    }
}
