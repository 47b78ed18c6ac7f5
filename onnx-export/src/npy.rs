//! Reading and writing activation tensors as `.npy` files.
//!
//! Activations are read as float32; float16 files (and float64 ones) are widened or narrowed on
//! the way in, since hosts commonly record activations at half precision.
//!
//! This is the offline tool's one reader of float `.npy` and `.npz` data (activations, Gemma Scope
//! parameters, probe inputs). Byte order: both are read, since the descriptor says which one the
//! data has (`<` and `=` little-endian, `>` big-endian, swapped as it is read); nothing is ever
//! misread, and NumPy on a big-endian host writes `>` arrays by default.

use std::io::Read;
use std::path::Path;

use ndarray::{Array2, ArrayD, Ix2};
use ndarray_npy::{ReadDataError, ReadNpyError, ReadNpyExt, ReadableElement, WriteNpyExt};
use py_literal::Value as PyValue;

use crate::{Error, Result};

/// A float32 read from a float16, float32 or float64 array of either byte order.
#[derive(Debug, Clone, Copy, Default)]
struct Widened(f32);

impl ReadableElement for Widened {
    fn read_to_end_exact_vec<R: Read>(
        mut reader: R,
        type_desc: &PyValue,
        len: usize,
    ) -> std::result::Result<Vec<Self>, ReadDataError> {
        let PyValue::String(desc) = type_desc else {
            return Err(ReadDataError::WrongDescriptor(type_desc.clone()));
        };
        let (big, width) = match desc.as_str() {
            "<f2" | "=f2" => (false, 2),
            "<f4" | "=f4" => (false, 4),
            "<f8" | "=f8" => (false, 8),
            ">f2" => (true, 2),
            ">f4" => (true, 4),
            ">f8" => (true, 8),
            _ => return Err(ReadDataError::WrongDescriptor(type_desc.clone())),
        };
        let bytes = len.checked_mul(width).ok_or(ReadDataError::MissingData)?;
        let mut buf = Vec::new();
        (&mut reader).take(bytes as u64).read_to_end(&mut buf)?;
        if buf.len() != bytes {
            return Err(ReadDataError::MissingData);
        }
        let mut probe = [0u8; 1];
        if reader.read(&mut probe)? != 0 {
            return Err(ReadDataError::ExtraBytes(1));
        }
        let value = |c: &[u8]| -> f32 {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            if big {
                b[..c.len()].reverse();
            }
            match c.len() {
                2 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                4 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                _ => f64::from_le_bytes(b) as f32,
            }
        };
        Ok(buf.chunks_exact(width).map(|c| Widened(value(c))).collect())
    }
}

fn describe(e: ReadNpyError) -> String {
    match e {
        ReadNpyError::WrongDescriptor(d) => {
            format!("dtype {d} is not float16, float32 or float64")
        }
        ReadNpyError::MissingData => {
            "the file is truncated: it holds less data than its header declares".into()
        }
        ReadNpyError::ExtraBytes(_) => {
            "the file has bytes after the data its header declares".into()
        }
        ReadNpyError::LengthOverflow => "the shape in its header is impossibly large".into(),
        other => format!("not a valid .npy file: {other}"),
    }
}

/// Longest `.npy` header accepted (NumPy itself refuses more than 10 000 bytes by default).
const MAX_NPY_HEADER: u64 = 1 << 16;

/// Why the first 12 bytes `head` of a `.npy` of `size` bytes declare a header that cannot be
/// there. `ndarray-npy` allocates the header length it reads before reading the header (up to
/// 4 GiB in format 2 and 3), so this is checked before it sees the bytes.
fn header_overrun(head: &[u8], size: u64) -> Option<String> {
    if head.len() < 12 || !head.starts_with(b"\x93NUMPY") {
        return None;
    }
    let (start, len) = match head[6] {
        1 => (10, u64::from(u16::from_le_bytes([head[8], head[9]]))),
        2 | 3 => (
            12,
            u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
        ),
        _ => return None,
    };
    if len > MAX_NPY_HEADER {
        Some(format!(
            "its header is {len} bytes, over the {MAX_NPY_HEADER} allowed"
        ))
    } else if start + len > size {
        Some(format!(
            "the file is truncated: its header ends at byte {}, the file has {size}",
            start + len
        ))
    } else {
        None
    }
}

/// Reads a float `.npy` file of any shape as float32.
pub fn read_f32_dyn(path: &Path) -> Result<ArrayD<f32>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = std::io::BufReader::new(file);
    // `ndarray-npy` allocates the header length it reads before reading the header: a length
    // larger than the file (up to 4 GiB in format 2 and 3) must be refused before it sees it.
    let mut head = Vec::with_capacity(12);
    (&mut reader)
        .take(12)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    if let Some(why) = header_overrun(&head, size) {
        return Err(Error::format(path, why));
    }
    let a = ArrayD::<Widened>::read_npy(std::io::Cursor::new(head).chain(reader))
        .map_err(|e| Error::format(path, describe(e)))?;
    Ok(a.mapv(|w| w.0))
}

fn open_npz(path: &Path) -> Result<ndarray_npy::NpzReader<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    ndarray_npy::NpzReader::new(std::io::BufReader::new(file))
        .map_err(|e| Error::format(path, format!("not a valid .npz archive: {e}")))
}

/// The names of the arrays in a `.npz` archive (without `.npy`, as NumPy names them).
pub fn npz_names(path: &Path) -> Result<Vec<String>> {
    open_npz(path)?
        .names()
        .map_err(|e| Error::format(path, format!("not a valid .npz archive: {e}")))
}

/// Checks the header of member `name` (or `name.npy`) of a `.npz` before `ndarray-npy` reads it.
fn check_npz_member(path: &Path, name: &str) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: String| Error::format(path, format!("array `{name}`: {e}"));
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::format(path, format!("not a valid .npz archive: {e}")))?;
    let member = match zip.index_for_name(name) {
        Some(i) => i,
        None => match zip.index_for_name(&format!("{name}.npy")) {
            Some(i) => i,
            // Not there: `ndarray-npy` says so.
            None => return Ok(()),
        },
    };
    let mut entry = zip.by_index(member).map_err(|e| bad(e.to_string()))?;
    let size = entry.size();
    let mut head = Vec::with_capacity(12);
    // A member that cannot even be read this far is reported by `ndarray-npy`.
    if (&mut entry).take(12).read_to_end(&mut head).is_err() {
        return Ok(());
    }
    match header_overrun(&head, size) {
        Some(why) => Err(bad(why)),
        None => Ok(()),
    }
}

/// Reads the float array `name` of a `.npz` archive as float32.
pub fn read_npz_f32(path: &Path, name: &str) -> Result<ArrayD<f32>> {
    check_npz_member(path, name)?;
    let a: ArrayD<Widened> = open_npz(path)?.by_name(name).map_err(|e| {
        let why = match e {
            ndarray_npy::ReadNpzError::Npy(e) => describe(e),
            other => other.to_string(),
        };
        Error::format(path, format!("array `{name}`: {why}"))
    })?;
    Ok(a.mapv(|w| w.0))
}

/// Reads every float array of a `.npz` archive as float32, with its name (without `.npy`).
pub fn read_npz_all(path: &Path) -> Result<Vec<(String, ArrayD<f32>)>> {
    npz_names(path)?
        .into_iter()
        .map(|name| read_npz_f32(path, &name).map(|a| (name, a)))
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
