//! The zip archive `torch.save` writes: its members, read through limits.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use zip::{CompressionMethod, ZipArchive};

use super::dtype::*;
use super::elements::*;
use super::flatten::*;
use super::limits::*;
use super::objects::*;
use super::pickle::*;
use crate::{Error, Result};

/// An open `torch.save` archive.
#[derive(Debug)]
pub(super) struct Archive {
    pub(super) path: PathBuf,
    pub(super) zip: ZipArchive<BufReader<File>>,
    /// `<name>/`, the folder every record lives in.
    pub(super) prefix: String,
    /// The most all members may hold uncompressed.
    pub(super) budget: u64,
    /// The archive's size.
    pub(super) file_len: u64,
}

impl Archive {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut head = Vec::with_capacity(16);
        (&mut file)
            .take(16)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(path, e))?;
        if !head.starts_with(ZIP_MAGIC) {
            return Err(Error::format(path, not_an_archive(&head)));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let zip = ZipArchive::new(BufReader::new(file)).map_err(|e| {
            Error::format(
                path,
                format!("is not a readable zip archive (truncated or corrupt?): {e}"),
            )
        })?;
        if zip.len() > MAX_MEMBERS {
            return Err(Error::format(
                path,
                format!("has {} members, more than {MAX_MEMBERS}", zip.len()),
            ));
        }
        let budget =
            MAX_TOTAL_BYTES.min(file_len.saturating_mul(MAX_COMPRESSION_RATIO).max(1 << 20));
        let mut total: u64 = 0;
        let mut prefix = None;
        for i in 0..zip.len() {
            let entry = zip
                .by_index_data(i)
                .map_err(|e| Error::format(path, format!("zip member {i}: {e}")))?;
            let name = entry
                .name()
                .map_err(|e| Error::format(path, format!("zip member {i}: {e}")))?
                .to_string();
            let method = entry.compression();
            if entry.encrypted() {
                return Err(Error::format(path, format!("member `{name}` is encrypted")));
            }
            if method != CompressionMethod::Stored && method != CompressionMethod::Deflated {
                return Err(Error::format(
                    path,
                    format!(
                        "member `{name}` uses compression {method:?}; torch.save stores members"
                    ),
                ));
            }
            if method == CompressionMethod::Stored && entry.size() != entry.compressed_size() {
                return Err(Error::format(
                    path,
                    format!(
                        "member `{name}` is stored uncompressed but declares {} bytes in {} \
                         bytes of archive",
                        entry.size(),
                        entry.compressed_size()
                    ),
                ));
            }
            if method == CompressionMethod::Stored && entry.size() > file_len {
                return Err(Error::format(
                    path,
                    format!(
                        "member `{name}` is stored uncompressed but declares {} bytes, more than \
                         the whole file's {file_len}",
                        entry.size()
                    ),
                ));
            }
            total = total.saturating_add(entry.size());
            if total > budget {
                return Err(Error::format(
                    path,
                    format!(
                        "its members declare more than {budget} bytes uncompressed (at member \
                         `{name}`), over {MAX_COMPRESSION_RATIO}x the archive's {file_len} \
                         bytes or the {MAX_TOTAL_BYTES}-byte cap: refused as a zip bomb"
                    ),
                ));
            }
            if let Some(dir) = name.strip_suffix("/data.pkl")
                && !dir.is_empty()
                && !dir.contains('/')
            {
                if prefix.is_some() {
                    return Err(Error::format(path, "holds more than one `data.pkl`"));
                }
                prefix = Some(format!("{dir}/"));
            }
        }
        let prefix = prefix.ok_or_else(|| {
            Error::format(
                path,
                "is a zip archive without `<name>/data.pkl`: not a torch.save checkpoint",
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            zip,
            prefix,
            budget,
            file_len,
        })
    }

    /// Reads the record `name` (under the archive's folder), at most `limit` bytes.
    pub(super) fn read(&mut self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let full = format!("{}{name}", self.prefix);
        let path = &self.path;
        let mut entry = self
            .zip
            .by_name(&full)
            .map_err(|e| Error::format(path, format!("member `{full}` cannot be read: {e}")))?;
        let size = entry.size();
        if size > limit {
            return Err(Error::format(
                path,
                format!("member `{full}` declares {size} bytes, more than the {limit} allowed"),
            ));
        }
        // A stored member's size is bounded by the file's; a compressed one may still lie, so its
        // buffer grows with what actually inflates, and no more than it declares is read.
        let reserve = if entry.compression() == CompressionMethod::Stored {
            size.min(self.file_len)
        } else {
            size.min(entry.compressed_size().saturating_mul(4))
        };
        let mut buf = Vec::with_capacity(usize::try_from(reserve).unwrap_or(0));
        (&mut entry)
            .take(size.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| Error::format(path, format!("member `{full}`: {e}")))?;
        if buf.len() as u64 != size {
            let held = if buf.len() as u64 > size {
                "more".to_string()
            } else {
                buf.len().to_string()
            };
            return Err(Error::format(
                path,
                format!("member `{full}` declares {size} bytes but holds {held}"),
            ));
        }
        Ok(buf)
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.zip
            .index_for_name(&format!("{}{name}", self.prefix))
            .is_some()
    }

    pub(super) fn unpickle(&mut self) -> Result<Flat> {
        let data = self.read("data.pkl", MAX_PICKLE_BYTES)?;
        let obj = Machine::new(&data)
            .run()
            .map_err(|m| Error::format(&self.path, format!("`{}data.pkl`: {m}", self.prefix)))?;
        let mut flat = Flat::default();
        let mut budget = MAX_NODES;
        flat.add(&obj, String::new(), 0, &mut budget)
            .map_err(|m| Error::format(&self.path, format!("`{}data.pkl`: {m}", self.prefix)))?;
        Ok(flat)
    }

    pub(super) fn byteorder(&mut self) -> Result<ByteOrder> {
        if !self.has("byteorder") {
            // Files from before the record existed were written on little-endian machines.
            return Ok(ByteOrder::Little);
        }
        let b = self.read("byteorder", 16)?;
        match b.trim_ascii() {
            b"little" => Ok(ByteOrder::Little),
            b"big" => Ok(ByteOrder::Big),
            other => Err(Error::format(
                &self.path,
                format!(
                    "record `byteorder` is `{}`, not little or big",
                    String::from_utf8_lossy(other)
                ),
            )),
        }
    }

    /// Reads the view `t` (named `name`) with its axes in the order `perm`: returns the shape
    /// read and its elements, row-major. A dense view streams from the member into its place in
    /// the result; others read their storage whole, then gather.
    pub(super) fn read_tensor(
        &mut self,
        name: &str,
        t: &TensorRef,
        perm: &[usize],
        order: ByteOrder,
    ) -> Result<(Vec<usize>, Elements)> {
        let path = self.path.clone();
        let key = t.storage.key.clone();
        let err = |m: String| {
            Error::format(
                &path,
                format!("tensor `{name}` (storage `data/{key}`): {m}"),
            )
        };
        let member = format!("data/{key}");
        let full = format!("{}{member}", self.prefix);
        let member_len = match self.zip.index_for_name(&full) {
            Some(i) => self
                .zip
                .by_index_data(i)
                .map_err(|e| err(format!("member `{full}`: {e}")))?
                .size(),
            None => return Err(err(format!("member `{full}` (its storage) is missing"))),
        };
        let es = t.dtype.size();
        let declared = t.storage.numel.checked_mul(t.storage.elem_size() as u64);
        let declared = match declared {
            Some(d) if d <= member_len => d,
            _ => {
                return Err(err(format!(
                    "the storage holds {member_len} bytes, but the pickle says {} elements of {} \
                     bytes: the storage is shorter than its tensors claim",
                    t.storage.numel,
                    t.storage.elem_size()
                )));
            }
        };
        // The last element the view touches must lie inside what the persistent id declares, as
        // torch sizes the storage by it.
        let available = declared / es as u64;
        let mut last = t.offset;
        for (&n, &s) in t.shape.iter().zip(&t.stride) {
            if n == 0 {
                break;
            }
            last = (n as u64 - 1)
                .checked_mul(s)
                .and_then(|v| last.checked_add(v))
                .ok_or_else(|| err("its strides overflow".into()))?;
        }
        if t.numel > 0 && last >= available {
            return Err(err(format!(
                "the view (offset {}, shape {:?}, stride {:?}) reaches element {last}, past the \
                 {available} elements of {} its storage holds",
                t.offset,
                t.shape,
                t.stride,
                t.dtype.name()
            )));
        }
        let rank = t.shape.len();
        let out_shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
        let n = usize::try_from(t.numel).map_err(|_| err("too many elements".into()))?;
        let dec = decoder(t.dtype, order);
        let mut out = Elements::zeros(dec, n);
        if n == 0 {
            return Ok((out_shape, out));
        }
        // Where axis `a` of the view steps in the (permuted, row-major) result.
        let mut out_step = vec![0usize; rank];
        let mut acc = 1usize;
        for k in (0..rank).rev() {
            out_step[perm[k]] = acc;
            acc *= out_shape[k];
        }
        let offset = usize::try_from(t.offset).map_err(|_| err("offset too large".into()))?;
        if let Some(axes) = dense_axes(&t.shape, &t.stride) {
            // Storage order, outer to inner: each element read lands at its place in the result.
            let mut place = Odometer::new(axes.iter().map(|&a| (t.shape[a], out_step[a])), 0);
            let mut entry = self
                .zip
                .by_name(&full)
                .map_err(|e| err(format!("member `{full}` cannot be read: {e}")))?;
            let io = |e: std::io::Error| err(format!("member `{full}`: {e}"));
            let skip = t.offset * es as u64;
            let skipped =
                std::io::copy(&mut (&mut entry).take(skip), &mut std::io::sink()).map_err(io)?;
            let mut left = n * es;
            let mut buf = vec![0u8; CHUNK.min(left)];
            while left > 0 && skipped == skip {
                let m = CHUNK.min(left);
                entry.read_exact(&mut buf[..m]).map_err(io)?;
                for e in buf[..m].chunks_exact(es) {
                    out.set(dec, place.next(), e);
                }
                left -= m;
            }
            // Reading to the end checks the member's declared size and checksum.
            let consumed = skip + (n * es) as u64;
            let rest = std::io::copy(
                &mut (&mut entry).take((member_len - consumed).saturating_add(1)),
                &mut std::io::sink(),
            )
            .map_err(io)?;
            if skipped != skip || consumed + rest != member_len {
                return Err(err(format!(
                    "member `{full}` declares {member_len} bytes but holds {}",
                    if skipped != skip {
                        skipped.to_string()
                    } else if consumed + rest > member_len {
                        "more".into()
                    } else {
                        (consumed + rest).to_string()
                    }
                )));
            }
        } else {
            // Gaps or overlaps: the storage whole, then each element of the result from it.
            let blob = self.read(&member, self.budget)?;
            let steps = perm
                .iter()
                .zip(&out_shape)
                .map(|(&p, &len)| usize::try_from(t.stride[p]).map(|s| (len, s)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| err("stride too large".into()))?;
            let mut from = Odometer::new(steps.into_iter(), offset);
            for i in 0..n {
                let at = from.next() * es;
                let bytes = blob
                    .get(at..at + es)
                    .ok_or_else(|| err(format!("element {} is past the storage", at / es)))?;
                out.set(dec, i, bytes);
            }
        }
        Ok((out_shape, out))
    }
}

/// Explains what a file that is not a zip archive is.
pub(super) fn not_an_archive(head: &[u8]) -> String {
    let m = LEGACY_MAGIC.len();
    let legacy = head.len() >= 4 + m
        && head[0] == 0x80
        && head[2] == 0x8a
        && usize::from(head[3]) == m
        && head[4..4 + m] == *LEGACY_MAGIC;
    if legacy {
        "is a legacy torch.save file (PyTorch before 1.6, or _use_new_zipfile_serialization=False), \
         which Tiller does not read; load it in Python and save it again with torch.save(obj, path)"
            .into()
    } else if head.first() == Some(&0x80) {
        "is a bare pickle, not a torch.save zip archive; Tiller does not run pickles outside \
         torch.save archives"
            .into()
    } else {
        "is not a torch.save checkpoint (a zip archive with `<name>/data.pkl`)".into()
    }
}
