//! The one way importers look tensors up: by name, taken as float32 with their shapes checked,
//! and whatever is left over listed at the end.
//!
//! Every checkpoint container implements it: a safetensors file ([`super::TensorFile`]), a
//! `torch.save` archive ([`crate::torch::Checkpoint`]) and Gemma Scope's parameters
//! ([`crate::import::gemma_scope::Params`]).

use std::path::Path;

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};

use crate::{Error, Result};

/// Named tensors, each taken (read and removed) once as float32.
pub trait Tensors {
    /// The file they come from, named by every error.
    fn path(&self) -> &Path;

    /// The names of all tensors not taken yet.
    fn names(&self) -> Vec<&str>;

    /// The shape of the tensor `name`, if it is there (not taken yet).
    fn shape(&self, name: &str) -> Option<&[usize]>;

    /// Reads and removes the tensor `name` as float32, whatever its shape.
    fn take_any(&mut self, name: &str) -> Result<ArrayD<f32>>;

    /// What the container calls its entries in messages: "tensor" or "array".
    fn noun(&self) -> &'static str {
        "tensor"
    }

    /// Whether the tensor `name` is there (not taken yet).
    fn has(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    /// The error for a tensor `name` that is not there, listing what is.
    fn missing(&self, name: &str) -> Error {
        Error::format(
            self.path(),
            format!(
                "{} `{name}` is missing (the file has: {})",
                self.noun(),
                self.names().join(", ")
            ),
        )
    }

    /// Checks that the tensor `name` is there with shape `shape`.
    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.shape(name) {
            None => Err(self.missing(name)),
            Some(have) if have != shape => Err(Error::format(
                self.path(),
                format!(
                    "{} `{name}` has shape {have:?}, but {shape:?} was expected",
                    self.noun()
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Reads and removes the tensor `name`, which must have shape `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        self.check_shape(name, shape)?;
        self.take_any(name)
    }

    /// Reads and removes a `[rows, cols]` matrix.
    fn take2(&mut self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let a = self.take(name, &[rows, cols])?;
        a.into_dimensionality::<Ix2>()
            .map_err(|e| Error::format(self.path(), format!("{} `{name}`: {e}", self.noun())))
    }

    /// Reads and removes a vector of length `len`.
    fn take1(&mut self, name: &str, len: usize) -> Result<Array1<f32>> {
        let a = self.take(name, &[len])?;
        a.into_dimensionality::<Ix1>()
            .map_err(|e| Error::format(self.path(), format!("{} `{name}`: {e}", self.noun())))
    }
}
