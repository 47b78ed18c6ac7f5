//! One file of training activations: a `.npy` or `.safetensors` shard, its header read when it
//! is opened and its rows read on demand, widened to float32.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A stored element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// float32.
    F32,
    /// float64.
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

/// One file of activations.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The file.
    pub path: PathBuf,
    /// Where its data starts.
    pub offset: u64,
    /// Its element type.
    pub dtype: DType,
    /// Rows (tokens).
    pub rows: u64,
    /// Floats per row (all layers).
    pub width: usize,
    /// Layers per row: the middle dimension of a `[n, layers, d]` array, else 1.
    pub layers: usize,
    /// Whether its elements are stored most significant byte first (a `>` `.npy`).
    pub big_endian: bool,
}

fn shape_of(path: &Path, shape: &[u64]) -> Result<(u64, usize, usize)> {
    match shape {
        [n, d] if *d > 0 => Ok((*n, *d as usize, 1)),
        [n, l, d] if *l > 0 && *d > 0 => Ok((*n, (*l * *d) as usize, *l as usize)),
        _ => Err(Error::format(
            path,
            format!("has shape {shape:?}; expected [tokens, d] or [tokens, layers, d] activations"),
        )),
    }
}

impl Shard {
    /// Reads the header of a `.npy` or `.safetensors` file; `tensor` names the tensor of a
    /// safetensors file that holds several.
    pub fn open(path: &Path, tensor: Option<&str>) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let is_npy = path.extension().is_some_and(|e| e == "npy");
        let (offset, dtype, big_endian, shape) = if is_npy {
            npy_header(path, &mut file, size)?
        } else {
            let (offset, dtype, shape) = safetensors_header(path, &mut file, size, tensor)?;
            (offset, dtype, false, shape)
        };
        let (rows, width, layers) = shape_of(path, &shape)?;
        let need = rows
            .checked_mul(width as u64)
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .and_then(|n| n.checked_add(offset));
        match need {
            Some(n) if n <= size => {}
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "is truncated: its header declares {rows} rows of {width} values, the file has {size} bytes"
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            offset,
            dtype,
            rows,
            width,
            layers,
            big_endian,
        })
    }

    /// Reads rows `start..start + count` into `out` (`count·width` floats), widening to float32
    /// and checking every value is finite.
    pub fn read(&self, start: u64, count: usize, out: &mut [f32]) -> Result<()> {
        let n = count * self.width;
        if out.len() != n || start + count as u64 > self.rows {
            return Err(Error::format(
                &self.path,
                format!(
                    "rows {start}..{} are out of range ({} rows)",
                    start + count as u64,
                    self.rows
                ),
            ));
        }
        let size = self.dtype.size();
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(
            self.offset + start * (self.width * size) as u64,
        ))
        .map_err(|e| Error::io(&self.path, e))?;
        let mut buf = vec![0u8; n * size];
        file.read_exact(&mut buf)
            .map_err(|e| Error::io(&self.path, e))?;
        if self.big_endian {
            for c in buf.chunks_exact_mut(size) {
                c.reverse();
            }
        }
        match self.dtype {
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F64 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(8)) {
                    *o =
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
                }
            }
        }
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                &self.path,
                format!(
                    "row {} contains NaN or infinite values",
                    start + (i / self.width) as u64
                ),
            ));
        }
        Ok(())
    }
}

/// Reads the header of a `.npy` activation shard through the project's one `.npy` reader: where
/// the data starts, its element type and byte order, and its shape.
fn npy_header(path: &Path, file: &mut File, size: u64) -> Result<(u64, DType, bool, Vec<u64>)> {
    let header = tiller_runtime::npy::read_header(&mut std::io::BufReader::new(file), size)
        .map_err(|e| crate::npy::lift(path, e))?;
    let element = header.float().map_err(|e| crate::npy::lift(path, e))?;
    let dtype = match element.size {
        2 => DType::F16,
        4 => DType::F32,
        _ => DType::F64,
    };
    if header.fortran_order {
        return Err(Error::format(
            path,
            "is stored in Fortran order; rows cannot be streamed (save it C-contiguous)",
        ));
    }
    Ok((header.data_offset, dtype, element.big_endian, header.shape))
}

fn safetensors_header(
    path: &Path,
    file: &mut File,
    size: u64,
    tensor: Option<&str>,
) -> Result<(u64, DType, Vec<u64>)> {
    let header = crate::tensors::Header::read(path, file, size)?;
    let meta = &header.metadata;
    let tensors = meta.tensors();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let name = match tensor {
        Some(t) => t.to_string(),
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(Error::format(
                path,
                format!(
                    "holds {} tensors ({}); choose one with --tensor",
                    names.len(),
                    names
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    let info = tensors.get(&name).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "has no tensor `{name}` (it has: {})",
                names
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let dtype = match info.dtype {
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        other => {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has dtype {other:?}, not a float type"),
            ));
        }
    };
    let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
    // The crate checked that the offsets fit the shape and dtype.
    Ok((header.data_start + info.data_offsets.0 as u64, dtype, shape))
}
