//! The offline tool's one reader of safetensors headers.
//!
//! The header is read from the front of the file alone, so a many-GiB dictionary is never in
//! memory: its length, then its JSON, which is turned into the `safetensors` crate's own
//! [`Metadata`]. That conversion is the crate's validation: tensors in order of their offsets,
//! each starting where the last one ended, each exactly as long as its shape and dtype imply,
//! with no arithmetic overflow. The one check of `SafeTensors::read_metadata` that needs the
//! whole file in a buffer, that the data section ends where the file does, is made here against
//! the file's size. (`SafeTensors::deserialize` and `read_metadata` themselves take the whole file
//! as a slice; the training checkpoints, which are small, are read with them.)

use std::fs::File;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::{Error, Result};

/// The largest header accepted (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors header, validated against the size of its file.
#[derive(Debug)]
pub struct Header {
    /// Where the data section starts: tensor offsets count from here.
    pub data_start: u64,
    /// The tensors, in the order of their data.
    pub tensors: Vec<(String, TensorInfo)>,
    /// The metadata, validated by the `safetensors` crate.
    pub metadata: Metadata,
}

impl Header {
    /// Reads the header of `file` (the file at `path`, `size` bytes long), leaving `file` at the
    /// start of the data. Every failure names the file and says "not a valid safetensors file".
    pub fn read(path: &Path, file: &mut File, size: u64) -> Result<Self> {
        let err = |m: String| Error::format(path, format!("not a valid safetensors file: {m}"));
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| err("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || n + 8 > size {
            return Err(err(format!(
                "its header claims {n} bytes, the file has {size}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| err(format!("its header is not valid: {e}")))?;
        let data_start = 8 + n;
        let end = metadata.data_len() as u64;
        if data_start + end != size {
            return Err(err(format!(
                "its header describes {end} bytes of data, the file holds {}",
                size.saturating_sub(data_start)
            )));
        }
        let mut tensors: Vec<(String, TensorInfo)> = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        tensors.sort_by_key(|(_, i)| i.data_offsets);
        Ok(Self {
            data_start,
            tensors,
            metadata,
        })
    }

    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<(Self, File)> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok((Self::read(path, &mut file, size)?, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn offsets_are_checked_against_shapes_and_the_file() {
        let good = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[3],"data_offsets":[8,14]}}"#;
        let (_d, p) = file(good, 14);
        let (h, _) = Header::open(&p).unwrap();
        assert_eq!(h.data_start, 8 + good.len() as u64);
        assert_eq!(h.tensors.len(), 2);
        // The data section must end where the file does.
        let (_d, p) = file(good, 15);
        let e = Header::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("describes 14 bytes of data, the file holds 15"),
            "{e}"
        );
        // Offsets that do not fit the shape, or leave a gap, are refused by the crate.
        for bad in [
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
        ] {
            let (_d, p) = file(bad, 12);
            let e = Header::open(&p).unwrap_err().to_string();
            assert!(e.contains("not a valid safetensors file"), "{bad}: {e}");
        }
    }
}
