//! Reading and writing activation tensors as `.npy` files.
//!
//! Activations are read as float32; float16 files (and float64 ones) are widened or narrowed on
//! the way in, since hosts commonly record activations at half precision.
//!
//! The reading is the project's one `.npy`/`.npz` reader, [`tiller_runtime::npy`], shared with
//! the runtime's steering-vector files; this module puts the file's path on its errors and adds
//! the offline tool's shape and finiteness checks. Byte order: both are read, since the
//! descriptor says which one the data has (`<` and `=` little-endian, `>` big-endian, swapped as
//! it is read); nothing is ever misread, and NumPy on a big-endian host writes `>` arrays by
//! default. Writing is little-endian float32.

use std::path::Path;

use ndarray::{Array2, ArrayD, Ix2};
use ndarray_npy::WriteNpyExt;
use tiller_runtime::npy::{NpyError, Npz};

use crate::{Error, Result};

/// The error `e`, met reading `path`, as the tool's error.
pub(crate) fn lift(path: &Path, e: NpyError) -> Error {
    match e {
        NpyError::Io(e) => Error::io(path, e),
        NpyError::Format(m) => Error::format(path, m),
    }
}

/// Reads a float `.npy` file of any shape as float32.
pub fn read_f32_dyn(path: &Path) -> Result<ArrayD<f32>> {
    tiller_runtime::npy::read_f32_file(path).map_err(|e| lift(path, e))
}

/// The names of the arrays in a `.npz` archive (without `.npy`, as NumPy names them).
pub fn npz_names(path: &Path) -> Result<Vec<String>> {
    Npz::open(path)
        .and_then(|z| z.names())
        .map_err(|e| lift(path, e))
}

/// Reads the float array `name` of an open `.npz` archive at `path` as float32.
fn read_member(path: &Path, npz: &mut Npz, name: &str) -> Result<ArrayD<f32>> {
    npz.read_f32(name).map_err(|e| match e {
        NpyError::Io(e) => Error::io(path, e),
        NpyError::Format(m) => Error::format(path, format!("array `{name}`: {m}")),
    })
}

/// Reads the float array `name` of a `.npz` archive as float32.
pub fn read_npz_f32(path: &Path, name: &str) -> Result<ArrayD<f32>> {
    let mut npz = Npz::open(path).map_err(|e| lift(path, e))?;
    read_member(path, &mut npz, name)
}

/// Reads every float array of a `.npz` archive as float32, with its name (without `.npy`).
pub fn read_npz_all(path: &Path) -> Result<Vec<(String, ArrayD<f32>)>> {
    let mut npz = Npz::open(path).map_err(|e| lift(path, e))?;
    let names = npz.names().map_err(|e| lift(path, e))?;
    names
        .into_iter()
        .map(|name| read_member(path, &mut npz, &name).map(|a| (name, a)))
        .collect()
}

/// Reads a float `.npy` file of shape `[n, width]` as float32, checking the width and that every
/// value is finite.
pub fn read_activations(path: &Path, width: usize) -> Result<Array2<f32>> {
    let a = read_f32_dyn(path)?;
    let shape = a.shape().to_vec();
    let a = if shape.len() == 3 && shape[1] * shape[2] == width {
        a.into_shape_with_order((shape[0], width))
            .map_err(|e| Error::format(path, e.to_string()))?
            .into_dyn()
    } else {
        a
    };
    let a = a.into_dimensionality::<Ix2>().map_err(|_| {
        Error::format(
            path,
            format!("has shape {shape:?}; expected [n, {width}] activations"),
        )
    })?;
    if a.ncols() != width {
        return Err(Error::format(
            path,
            format!(
                "has shape {shape:?}: rows of width {}, but the dictionary reads width {width}",
                a.ncols()
            ),
        ));
    }
    check_finite_rows(path, &a)?;
    Ok(a)
}

/// Refuses activations holding a NaN or an infinity, naming the first such row.
pub fn check_finite_rows(path: &Path, a: &ndarray::Array2<f32>) -> Result<()> {
    match a
        .rows()
        .into_iter()
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        Some(i) => Err(Error::format(
            path,
            format!("row {i} contains NaN or infinite values"),
        )),
        None => Ok(()),
    }
}

/// Writes a float32 `.npy` file.
pub fn write<D: ndarray::Dimension>(path: &Path, a: &ndarray::Array<f32, D>) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    a.write_npy(std::io::BufWriter::new(file))
        .map_err(|e| Error::format(path, format!("cannot write .npy: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.npy` of `descr` and shape `[rows, cols]` holding `data`.
    fn npy(descr: &str, rows: u64, cols: u64, data: &[u8]) -> Vec<u8> {
        let mut out = tiller_runtime::npy::header_bytes(descr, false, &[rows, cols]);
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn big_endian_activations_read_as_little_endian_ones() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.375).collect();
        let files: [(&str, &str, Vec<u8>); 3] = [
            (
                "le4.npy",
                "<f4",
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            (
                "be4.npy",
                ">f4",
                v.iter().flat_map(|x| x.to_be_bytes()).collect(),
            ),
            (
                "be8.npy",
                ">f8",
                v.iter().flat_map(|&x| f64::from(x).to_be_bytes()).collect(),
            ),
        ];
        let mut read = Vec::new();
        for (name, descr, data) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, npy(descr, 3, 4, &data)).unwrap();
            read.push(read_activations(&path, 4).unwrap());
            let shard = crate::train::data::Shard::open(&path, None).unwrap();
            let mut rows = vec![0f32; 8];
            shard.read(1, 2, &mut rows).unwrap();
            assert_eq!(rows, v[4..], "{name}");
        }
        assert_eq!(read[0].as_slice().unwrap(), &v[..]);
        assert_eq!(read[0], read[1]);
        assert_eq!(read[0], read[2]);
    }
}
