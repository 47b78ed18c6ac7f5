//! The tensors of one safetensors file, read on demand as float32.
//!
//! The header is read and validated by [`Header`] when the file is opened; each tensor is read from disk only when it is taken, and converted to
//! float32 as it is read, so importing holds one copy of the weights in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

use super::container::Tensors;
use super::header::Header;

use crate::{Error, Result};

/// The tensors of one safetensors file, read on demand as float32.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    /// Where the data section starts.
    data_start: u64,
    infos: BTreeMap<String, TensorInfo>,
}

impl TensorFile {
    /// Opens `path` and checks its header: a truncated file, a header that claims more bytes than
    /// the file has, or overlapping tensors are errors naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let (header, file) = Header::open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start: header.data_start,
            infos: header.tensors.into_iter().collect(),
        })
    }
}

impl Tensors for TensorFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<&str> {
        self.infos.keys().map(String::as_str).collect()
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.infos.get(name).map(|i| i.shape.as_slice())
    }

    /// Reads and returns the tensor `name` as float32, whatever its shape.
    fn take_any(&mut self, name: &str) -> Result<ArrayD<f32>> {
        let info = self.infos.remove(name).ok_or_else(|| self.missing(name))?;
        let width = match info.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F64 => 8,
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor `{name}` has dtype {other:?}, not a float type"),
                ));
            }
        };
        let (s, e) = info.data_offsets;
        let count = (e - s) / width;
        let mut values = Vec::with_capacity(count);
        self.file
            .seek(SeekFrom::Start(self.data_start + s as u64))
            .map_err(|e| Error::io(&self.path, e))?;
        // Convert in chunks: the file's bytes are never all in memory beside the floats.
        let mut buf = vec![0u8; (1 << 20) * width];
        let mut left = e - s;
        while left > 0 {
            let chunk = &mut buf[..left.min((1 << 20) * width)];
            self.file
                .read_exact(chunk)
                .map_err(|e| Error::io(&self.path, e))?;
            match info.dtype {
                Dtype::F32 => values.extend(
                    chunk
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                Dtype::F16 => values.extend(
                    chunk
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                Dtype::BF16 => values.extend(
                    chunk
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                _ => values.extend(chunk.chunks_exact(8).map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })),
            }
            left -= chunk.len();
        }
        ArrayD::from_shape_vec(IxDyn(&info.shape), values)
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))
    }
}
