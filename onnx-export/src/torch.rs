//! `torch.save` checkpoints, read without Python.
//!
//! Since PyTorch 1.6 `torch.save` writes a zip archive: `<name>/data.pkl` (a pickle of the saved
//! object), one `<name>/data/<key>` member per storage (raw elements in the order of
//! `<name>/byteorder`), and bookkeeping records (`<name>/version`, `.format_version`, …). The
//! pickle names each storage by a persistent id `('storage', torch.FloatStorage, key, location,
//! numel)` and rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size,
//! stride, …)`.
//!
//! The pickle is run here by a small machine that knows the opcodes state dicts and plain configs
//! use (protocols 2 to 5, and the common protocol 0/1 ones) and an allow-list of globals:
//! `collections.OrderedDict`, the tensor rebuild functions of `torch._utils` and `torch._tensor`,
//! the storage classes, the dtypes, `torch.Tensor` and `torch.nn.parameter.Parameter`. Any other
//! global is refused as soon as the pickle names it, and only allow-listed functions are ever
//! applied, so a checkpoint cannot run code. Legacy (pre-1.6) and bare pickle files are refused
//! with a message saying how to re-save them.
//!
//! [`load`] reads and checks the pickle; each tensor is read from the archive when it is taken,
//! converted to float32 (or int64) as it streams in, in the axis order asked for:
//!
//! ```no_run
//! # fn main() -> tiller_export::Result<()> {
//! let mut ck = tiller_export::torch::load(std::path::Path::new("ae.pt"))?;
//! // An `nn.Linear(2304, 16384)` weight, `[16384, 2304]`, read as the `[2304, 16384]` of `x · W`.
//! let w_enc = ck.take2_transposed("encoder.weight", 16384, 2304)?;
//! let k = ck.int("k")?;
//! # Ok(()) }
//! ```
//!
//! Every size read from the file is checked against the data before anything is allocated: the
//! archive's declared member sizes against the file size ([`MAX_COMPRESSION_RATIO`]) and an
//! absolute cap ([`MAX_TOTAL_BYTES`]); each member is read through a limit, so a header that lies
//! cannot make the reader allocate without bound; every length and count in the pickle against the
//! bytes that remain, with caps on its size, operations and nesting; every tensor's extent against
//! its storage.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use serde_json::Value;
use zip::{CompressionMethod, ZipArchive};

use crate::{Error, Result};

/// The most `data.pkl` may hold.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The most the members of an archive may hold once uncompressed, whatever the archive's size.
pub const MAX_TOTAL_BYTES: u64 = 128 << 30;
/// The most the members may hold uncompressed, as a multiple of the archive's size (above 1 MiB).
/// `torch.save` stores its members uncompressed, so a real checkpoint is near 1.
pub const MAX_COMPRESSION_RATIO: u64 = 32;
/// The most members an archive may have.
pub const MAX_MEMBERS: usize = 1 << 20;

/// Pickle operations run before the pickle is refused as too large.
const MAX_OPS: u64 = 8 << 20;
/// Objects visited while flattening the unpickled object.
const MAX_NODES: u64 = 8 << 20;
/// Nesting of dicts and lists in the unpickled object.
const MAX_DEPTH: usize = 64;
/// Dimensions of one tensor.
const MAX_DIMS: usize = 32;
/// The first bytes of a zip archive.
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
/// `torch.save`'s legacy magic number, `0x1950a86a20f9469cfc6c`, as the little-endian payload of
/// the `LONG1` opcode that opens a legacy file.
const LEGACY_MAGIC: &[u8] = &[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `torch.float64`.
    F64,
    /// `torch.float32`.
    F32,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.int64`.
    I64,
    /// `torch.int32`.
    I32,
    /// `torch.int16`.
    I16,
    /// `torch.int8`.
    I8,
    /// `torch.uint8`.
    U8,
    /// `torch.bool`.
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Whether it is a floating-point type (read into the checkpoint's tensors).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }

    /// PyTorch's name, `torch.float32`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "torch.float64",
            Self::F32 => "torch.float32",
            Self::F16 => "torch.float16",
            Self::BF16 => "torch.bfloat16",
            Self::I64 => "torch.int64",
            Self::I32 => "torch.int32",
            Self::I16 => "torch.int16",
            Self::I8 => "torch.int8",
            Self::U8 => "torch.uint8",
            Self::Bool => "torch.bool",
        }
    }

    /// The dtype of a typed storage class `torch.<name>`.
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// The dtype object `torch.<name>`.
    fn from_dtype(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => Self::F64,
            "float32" | "float" => Self::F32,
            "float16" | "half" => Self::F16,
            "bfloat16" => Self::BF16,
            "int64" | "long" => Self::I64,
            "int32" | "int" => Self::I32,
            "int16" | "short" => Self::I16,
            "int8" => Self::I8,
            "uint8" => Self::U8,
            "bool" => Self::Bool,
            _ => return None,
        })
    }
}

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
    path: PathBuf,
    archive: Archive,
    order: ByteOrder,
    tensors: BTreeMap<String, TensorRef>,
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
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it has a tensor `name` (not taken yet).
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The names of all tensors not taken yet.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The shape of the tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

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

    fn missing(&self, name: &str) -> Error {
        Error::format(
            &self.path,
            format!(
                "tensor `{name}` is missing (the checkpoint has: {})",
                self.names().join(", ")
            ),
        )
    }

    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.shape(name) {
            None => Err(self.missing(name)),
            Some(have) if have != shape => Err(Error::format(
                &self.path,
                format!("tensor `{name}` has shape {have:?}, but {shape:?} was expected"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Reads the float tensor `name` with its axes in the order `perm`; removes it when `take`.
    fn read_float(&mut self, name: &str, perm: &[usize], take: bool) -> Result<ArrayD<f32>> {
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
    fn read_int(&mut self, name: &str, take: bool) -> Result<ArrayD<i64>> {
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

    /// Reads and removes the float tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        self.check_shape(name, shape)?;
        self.take_any(name)
    }

    /// Reads and removes the float tensor `name` whatever its shape.
    pub fn take_any(&mut self, name: &str) -> Result<ArrayD<f32>> {
        let rank = self.shape(name).map_or(0, <[usize]>::len);
        let identity: Vec<usize> = (0..rank).collect();
        self.read_float(name, &identity, true)
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

    /// Reads and removes a matrix of the given shape.
    pub fn take2(&mut self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let a = self.take(name, &[rows, cols])?;
        a.into_dimensionality()
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))
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

    /// Reads and removes a vector of the given length.
    pub fn take1(&mut self, name: &str, len: usize) -> Result<Array1<f32>> {
        let a = self.take(name, &[len])?;
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

// ---------------------------------------------------------------------------------------------
// The archive.

/// An open `torch.save` archive.
#[derive(Debug)]
struct Archive {
    path: PathBuf,
    zip: ZipArchive<BufReader<File>>,
    /// `<name>/`, the folder every record lives in.
    prefix: String,
    /// The most all members may hold uncompressed.
    budget: u64,
    /// The archive's size.
    file_len: u64,
}

impl Archive {
    fn open(path: &Path) -> Result<Self> {
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
    fn read(&mut self, name: &str, limit: u64) -> Result<Vec<u8>> {
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

    fn has(&self, name: &str) -> bool {
        self.zip
            .index_for_name(&format!("{}{name}", self.prefix))
            .is_some()
    }

    fn unpickle(&mut self) -> Result<Flat> {
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

    fn byteorder(&mut self) -> Result<ByteOrder> {
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
    fn read_tensor(
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
fn not_an_archive(head: &[u8]) -> String {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteOrder {
    Little,
    Big,
}

// ---------------------------------------------------------------------------------------------
// Unpickled objects.

/// An allow-listed global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// A storage class; `None` for `torch.UntypedStorage` (bytes).
    StorageType(Option<Dtype>),
    Dtype(Dtype),
    TensorType,
    ParameterType,
}

impl Global {
    /// Resolves `module.name`, or says why not.
    fn resolve(module: &str, name: &str) -> std::result::Result<Self, String> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Self::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Self::RebuildFromTypeV2,
            ("torch", "UntypedStorage") => Self::StorageType(None),
            ("torch", "Tensor") => Self::TensorType,
            ("torch.nn.parameter", "Parameter") => Self::ParameterType,
            ("torch", n) => {
                if let Some(d) = Dtype::from_storage(n) {
                    Self::StorageType(Some(d))
                } else if let Some(d) = Dtype::from_dtype(n) {
                    Self::Dtype(d)
                } else {
                    return Err(refusal(module, name));
                }
            }
            _ => return Err(refusal(module, name)),
        };
        Ok(g)
    }

    fn name(self) -> String {
        match self {
            Self::OrderedDict => "collections.OrderedDict".into(),
            Self::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Self::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Self::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3".into(),
            Self::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Self::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state".into(),
            Self::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2".into(),
            Self::StorageType(None) => "torch.UntypedStorage".into(),
            Self::StorageType(Some(d)) => format!("{} storage", d.name()),
            Self::Dtype(d) => d.name().into(),
            Self::TensorType => "torch.Tensor".into(),
            Self::ParameterType => "torch.nn.parameter.Parameter".into(),
        }
    }
}

fn refusal(module: &str, name: &str) -> String {
    format!("refuses to load `{module}.{name}`: only tensors and plain values are read")
}

/// A storage named by a persistent id.
#[derive(Debug, Clone)]
struct StorageRef {
    key: String,
    /// `None` for an untyped (byte) storage.
    dtype: Option<Dtype>,
    /// Elements (bytes when untyped).
    numel: u64,
}

impl StorageRef {
    fn elem_size(&self) -> usize {
        self.dtype.map_or(1, Dtype::size)
    }
}

/// A tensor: a strided view of a storage.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: StorageRef,
    dtype: Dtype,
    /// In elements of `dtype`.
    offset: u64,
    shape: Vec<usize>,
    stride: Vec<u64>,
    numel: u64,
}

/// Bytes read from a member at a time.
const CHUNK: usize = 1 << 20;

/// The axes of a view ordered as they lie in its storage, outer to inner, when the view covers
/// consecutive elements each exactly once (contiguous, or a permutation of a contiguous tensor);
/// axes of length 1 are left out.
fn dense_axes(shape: &[usize], stride: &[u64]) -> Option<Vec<usize>> {
    let mut axes: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] > 1).collect();
    axes.sort_by_key(|&a| std::cmp::Reverse(stride[a]));
    let mut want = 1u64;
    for &a in axes.iter().rev() {
        if stride[a] != want {
            return None;
        }
        want = want.checked_mul(shape[a] as u64)?;
    }
    Some(axes)
}

/// Counts through a box of `(length, step)` axes, inner axis fastest, yielding `start` plus the
/// steps taken: the place of each element in the order it is visited.
struct Odometer {
    axes: Vec<(usize, usize)>,
    counter: Vec<usize>,
    at: usize,
}

impl Odometer {
    fn new(axes: impl Iterator<Item = (usize, usize)>, start: usize) -> Self {
        let axes: Vec<(usize, usize)> = axes.collect();
        Self {
            counter: vec![0; axes.len()],
            axes,
            at: start,
        }
    }

    fn next(&mut self) -> usize {
        let here = self.at;
        for k in (0..self.axes.len()).rev() {
            let (len, step) = self.axes[k];
            self.counter[k] += 1;
            self.at += step;
            if self.counter[k] < len {
                return here;
            }
            self.at -= len * step;
            self.counter[k] = 0;
        }
        here
    }
}

/// Decodes one element of a storage.
#[derive(Clone, Copy)]
enum Decoder {
    Float(fn(&[u8]) -> f32),
    Int(fn(&[u8]) -> i64),
}

fn bytes<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn decoder(dtype: Dtype, order: ByteOrder) -> Decoder {
    use ByteOrder::{Big, Little};
    match (dtype, order) {
        (Dtype::F32, Little) => Decoder::Float(|b| f32::from_le_bytes(bytes(b))),
        (Dtype::F32, Big) => Decoder::Float(|b| f32::from_be_bytes(bytes(b))),
        (Dtype::F64, Little) => Decoder::Float(|b| f64::from_le_bytes(bytes(b)) as f32),
        (Dtype::F64, Big) => Decoder::Float(|b| f64::from_be_bytes(bytes(b)) as f32),
        (Dtype::F16, Little) => {
            Decoder::Float(|b| half::f16::from_bits(u16::from_le_bytes(bytes(b))).to_f32())
        }
        (Dtype::F16, Big) => {
            Decoder::Float(|b| half::f16::from_bits(u16::from_be_bytes(bytes(b))).to_f32())
        }
        (Dtype::BF16, Little) => {
            Decoder::Float(|b| half::bf16::from_bits(u16::from_le_bytes(bytes(b))).to_f32())
        }
        (Dtype::BF16, Big) => {
            Decoder::Float(|b| half::bf16::from_bits(u16::from_be_bytes(bytes(b))).to_f32())
        }
        (Dtype::I64, Little) => Decoder::Int(|b| i64::from_le_bytes(bytes(b))),
        (Dtype::I64, Big) => Decoder::Int(|b| i64::from_be_bytes(bytes(b))),
        (Dtype::I32, Little) => Decoder::Int(|b| i64::from(i32::from_le_bytes(bytes(b)))),
        (Dtype::I32, Big) => Decoder::Int(|b| i64::from(i32::from_be_bytes(bytes(b)))),
        (Dtype::I16, Little) => Decoder::Int(|b| i64::from(i16::from_le_bytes(bytes(b)))),
        (Dtype::I16, Big) => Decoder::Int(|b| i64::from(i16::from_be_bytes(bytes(b)))),
        (Dtype::I8, _) => Decoder::Int(|b| i64::from(i8::from_le_bytes(bytes(b)))),
        (Dtype::U8 | Dtype::Bool, _) => Decoder::Int(|b| i64::from(b[0])),
    }
}

/// A tensor's elements, row-major.
enum Elements {
    Float(Vec<f32>),
    Int(Vec<i64>),
}

impl Elements {
    fn zeros(d: Decoder, n: usize) -> Self {
        match d {
            Decoder::Float(_) => Self::Float(vec![0.0; n]),
            Decoder::Int(_) => Self::Int(vec![0; n]),
        }
    }

    fn set(&mut self, d: Decoder, i: usize, b: &[u8]) {
        match (self, d) {
            (Self::Float(v), Decoder::Float(f)) => {
                if let Some(slot) = v.get_mut(i) {
                    *slot = f(b);
                }
            }
            (Self::Int(v), Decoder::Int(f)) => {
                if let Some(slot) = v.get_mut(i) {
                    *slot = f(b);
                }
            }
            _ => {}
        }
    }
}

/// An unpickled object. Containers are shared, as in Python: the memo and the stack hold the same
/// list, so appending through one is seen through the other.
#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    List(Rc<RefCell<Vec<Obj>>>),
    Tuple(Rc<[Obj]>),
    Dict(Rc<RefCell<Vec<(Obj, Obj)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Bool(_) => "a bool",
            Self::Int(_) => "an int",
            Self::Float(_) => "a float",
            Self::Str(_) => "a string",
            Self::Bytes(_) => "bytes",
            Self::List(_) => "a list",
            Self::Tuple(_) => "a tuple",
            Self::Dict(_) => "a dict",
            Self::Global(_) => "a global",
            Self::Storage(_) => "a storage",
            Self::Tensor(_) => "a tensor",
        }
    }

    fn list(v: Vec<Obj>) -> Self {
        Self::List(Rc::new(RefCell::new(v)))
    }

    fn int(&self, what: &str) -> std::result::Result<i64, String> {
        match self {
            Self::Int(i) => Ok(*i),
            Self::Bool(b) => Ok(i64::from(*b)),
            other => Err(format!("{what} is {}, not an int", other.kind())),
        }
    }

    /// The items of a tuple or list.
    fn items(&self, what: &str) -> std::result::Result<Vec<Obj>, String> {
        match self {
            Self::Tuple(t) => Ok(t.to_vec()),
            Self::List(l) => Ok(l.borrow().clone()),
            other => Err(format!("{what} is {}, not a tuple", other.kind())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pickle machine.

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    marks: Vec<usize>,
    memo: HashMap<u64, Obj>,
    ops: u64,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            ops: 0,
        }
    }

    fn bytes(&mut self, n: u64) -> PResult<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated at byte {}: an operand of {n} bytes, {left} left",
                self.pos
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.data[start..self.pos])
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> PResult<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> PResult<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A text operand, up to (not including) the next newline.
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated at byte {}: an unterminated line", self.pos))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| "a text operand is not UTF-8".to_string())
    }

    fn string(&mut self, n: u64) -> PResult<Obj> {
        let b = self.bytes(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "a string is not valid UTF-8".to_string())?;
        Ok(Obj::Str(Rc::from(s)))
    }

    fn push(&mut self, o: Obj) {
        self.stack.push(o);
    }

    fn pop(&mut self) -> PResult<Obj> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("an operation pops past a MARK".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn top(&mut self) -> PResult<&mut Obj> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("an operation reads past a MARK".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Obj>> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("a MARK past the stack".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, i: u64) -> PResult<Obj> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} is read before it is written"))
    }

    fn memo_put(&mut self, i: u64) -> PResult<()> {
        let top = self.stack.last().cloned().ok_or("stack underflow")?;
        self.memo.insert(i, top);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> PResult<()> {
        let g = Global::resolve(module, name)?;
        self.push(Obj::Global(g));
        Ok(())
    }

    fn run(mut self) -> PResult<Obj> {
        loop {
            self.ops += 1;
            if self.ops > MAX_OPS {
                return Err(format!(
                    "more than {MAX_OPS} pickle operations: too large for a state dict"
                ));
            }
            let at = self.pos;
            let op = self.u8().map_err(|_| "ends without STOP".to_string())?;
            match op {
                // Framing and protocol.
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("pickle protocol {p} is newer than 5"));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                // The stack.
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
                        self.pop_mark()?;
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?.clone();
                    self.push(t);
                }
                // Constants and numbers.
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(i64::from(v)));
                }
                0x8a => {
                    let n = self.u8()?;
                    let b = self.bytes(u64::from(n))?;
                    self.push(Obj::Int(long(b)?));
                }
                0x8b => {
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return Err("LONG4 with a negative length".into());
                    }
                    let b = self.bytes(n as u64)?;
                    self.push(Obj::Int(long(b)?));
                }
                b'I' => {
                    let l = self.line()?;
                    let o = match l {
                        "00" => Obj::Bool(false),
                        "01" => Obj::Bool(true),
                        _ => Obj::Int(
                            l.parse()
                                .map_err(|_| format!("INT `{l}` is not an integer"))?,
                        ),
                    };
                    self.push(o);
                }
                b'L' => {
                    let l = self.line()?;
                    let v = l
                        .trim_end_matches('L')
                        .parse()
                        .map_err(|_| format!("LONG `{l}` is not a 64-bit integer"))?;
                    self.push(Obj::Int(v));
                }
                b'G' => {
                    let b = self.bytes(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Obj::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let l = self.line()?;
                    let v = l
                        .parse()
                        .map_err(|_| format!("FLOAT `{l}` is not a number"))?;
                    self.push(Obj::Float(v));
                }
                // Strings and bytes.
                b'X' => {
                    let n = self.u32()?;
                    let s = self.string(u64::from(n))?;
                    self.push(s);
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.string(u64::from(n))?;
                    self.push(s);
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.push(s);
                }
                // Python 2 `str`: bytes that Python 3 reads as text.
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        let n = self.u32()? as i32;
                        if n < 0 {
                            return Err("BINSTRING with a negative length".into());
                        }
                        n as u64
                    } else {
                        u64::from(self.u8()?)
                    };
                    let b = self.bytes(n)?;
                    let s: String = b.iter().map(|&c| char::from(c)).collect();
                    self.push(Obj::Str(Rc::from(s)));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => u64::from(self.u32()?),
                        b'C' => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let b = self.bytes(n)?;
                    self.push(Obj::Bytes(Rc::from(b)));
                }
                // Containers.
                b']' => self.push(Obj::list(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::list(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b')' => self.push(Obj::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        return Err("stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(Rc::from(items)));
                }
                b'}' => self.push(Obj::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.push(Obj::Dict(Rc::new(RefCell::new(pairs))));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let p = pairs(items)?;
                    self.set_items(p)?;
                }
                // Sets are read as lists: nothing here needs their semantics.
                0x8f => self.push(Obj::list(Vec::new())),
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Obj::list(items));
                }
                // The memo.
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u64::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(u64::from(i))?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let l = self.line()?;
                    let i = l
                        .parse()
                        .map_err(|_| format!("PUT `{l}` is not an index"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    let o = self.memo_get(u64::from(i))?;
                    self.push(o);
                }
                b'j' => {
                    let i = self.u32()?;
                    let o = self.memo_get(u64::from(i))?;
                    self.push(o);
                }
                b'g' => {
                    let l = self.line()?;
                    let i = l
                        .parse()
                        .map_err(|_| format!("GET `{l}` is not an index"))?;
                    let o = self.memo_get(i)?;
                    self.push(o);
                }
                // Globals: refused unless allow-listed, before anything uses them.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?;
                        }
                        _ => return Err("STACK_GLOBAL with operands that are not strings".into()),
                    }
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    return Err(refusal(module, name));
                }
                b'o' => return Err("refuses OBJ: it instantiates an arbitrary class".into()),
                0x82..=0x84 => {
                    return Err("refuses EXT opcodes: they name globals through copyreg".into());
                }
                0x97 | 0x98 => {
                    return Err("refuses out-of-band buffers (pickle protocol 5 buffers)".into());
                }
                // Calls: only to allow-listed functions.
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let r = call(&func, &args)?;
                    self.push(r);
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match cls {
                        Obj::Global(Global::OrderedDict) => {
                            args.items("NEWOBJ arguments")?;
                            self.push(Obj::Dict(Rc::new(RefCell::new(Vec::new()))));
                        }
                        Obj::Global(g) => {
                            return Err(format!("refuses to instantiate `{}`", g.name()));
                        }
                        other => {
                            return Err(format!("NEWOBJ of {}, not a class", other.kind()));
                        }
                    }
                }
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // An OrderedDict's attributes (`_metadata`) and a tensor's Python
                        // attributes carry nothing Tiller reads.
                        Obj::Dict(_) | Obj::Tensor(_) => {}
                        other => return Err(format!("BUILD on {}", other.kind())),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = persistent_storage(&pid)?;
                    self.push(s);
                }
                b'P' => return Err("text persistent ids are not torch.save's".into()),
                other => {
                    return Err(format!(
                        "opcode 0x{other:02x} at byte {at} is not supported (not in pickle \
                         protocols 0-5 as state dicts use them)"
                    ));
                }
            }
        }
    }

    fn append(&mut self, items: Vec<Obj>) -> PResult<()> {
        match self.top()? {
            Obj::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("APPEND to {}, not a list", other.kind())),
        }
    }

    fn set_items(&mut self, p: Vec<(Obj, Obj)>) -> PResult<()> {
        match self.top()? {
            Obj::Dict(d) => {
                d.borrow_mut().extend(p);
                Ok(())
            }
            other => Err(format!("SETITEM on {}, not a dict", other.kind())),
        }
    }
}

/// A little-endian two's-complement integer of at most 8 bytes.
fn long(b: &[u8]) -> PResult<i64> {
    if b.len() > 8 {
        return Err(format!(
            "an integer of {} bytes does not fit in 64 bits",
            b.len()
        ));
    }
    if b.is_empty() {
        return Ok(0);
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Ok(i64::from_le_bytes(a))
}

fn pairs(items: Vec<Obj>) -> PResult<Vec<(Obj, Obj)>> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict with an odd number of keys and values".into());
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// `('storage', torch.FloatStorage, key, location, numel)`.
fn persistent_storage(pid: &Obj) -> PResult<Obj> {
    let items = pid.items("a persistent id")?;
    let [tag, ty, key, _location, numel] = items.as_slice() else {
        return Err(format!(
            "a persistent id has {} fields, not torch.save's 5",
            items.len()
        ));
    };
    if !matches!(tag, Obj::Str(s) if &**s == "storage") {
        return Err("a persistent id that is not a storage".into());
    }
    let Obj::Global(Global::StorageType(dtype)) = ty else {
        return Err(format!("a storage whose type is {}", ty.kind()));
    };
    let Obj::Str(key) = key else {
        return Err(format!("a storage key that is {}", key.kind()));
    };
    if key.is_empty()
        || key.len() > 64
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!("storage key `{key}` is not a plain name"));
    }
    let numel = numel.int("a storage's element count")?;
    let numel =
        u64::try_from(numel).map_err(|_| format!("storage `{key}` has {numel} elements"))?;
    Ok(Obj::Storage(Rc::new(StorageRef {
        key: key.to_string(),
        dtype: *dtype,
        numel,
    })))
}

/// Applies an allow-listed function.
fn call(func: &Obj, args: &Obj) -> PResult<Obj> {
    let g = match func {
        Obj::Global(g) => *g,
        other => return Err(format!("REDUCE calls {}, not a function", other.kind())),
    };
    let a = args.items("call arguments")?;
    match g {
        Global::OrderedDict => {
            let mut d = Vec::new();
            if let Some(init) = a.first() {
                for p in init.items("OrderedDict's argument")? {
                    let kv = p.items("an OrderedDict item")?;
                    let [k, v] = kv.as_slice() else {
                        return Err("an OrderedDict item is not a pair".into());
                    };
                    d.push((k.clone(), v.clone()));
                }
            }
            Ok(Obj::Dict(Rc::new(RefCell::new(d))))
        }
        Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
            rebuild_tensor(g, &a)
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match a.first() {
            Some(t @ Obj::Tensor(_)) => Ok(t.clone()),
            _ => Err(format!("`{}` without a tensor", g.name())),
        },
        Global::RebuildFromTypeV2 => {
            let [f, ty, inner, ..] = a.as_slice() else {
                return Err("`torch._tensor._rebuild_from_type_v2` with too few arguments".into());
            };
            if !matches!(ty, Obj::Global(Global::TensorType | Global::ParameterType)) {
                return Err("`torch._tensor._rebuild_from_type_v2` of a tensor subclass".into());
            }
            match f {
                Obj::Global(
                    Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3,
                ) => call(f, inner),
                _ => Err("`torch._tensor._rebuild_from_type_v2` with another function".into()),
            }
        }
        other => Err(format!(
            "refuses to call `{}`: only tensor rebuilds and OrderedDict are applied",
            other.name()
        )),
    }
}

/// `_rebuild_tensor(storage, offset, size, stride)`, `_v2(…, requires_grad, hooks[, metadata])`,
/// `_v3(…, requires_grad, hooks, dtype[, metadata])`.
fn rebuild_tensor(g: Global, a: &[Obj]) -> PResult<Obj> {
    let name = g.name();
    if a.len() < 4 {
        return Err(format!("`{name}` with {} arguments", a.len()));
    }
    let Obj::Storage(storage) = &a[0] else {
        return Err(format!("`{name}` of {}, not a storage", a[0].kind()));
    };
    let offset = a[1].int("a storage offset")?;
    let offset =
        u64::try_from(offset).map_err(|_| format!("a negative storage offset {offset}"))?;
    let dims = |o: &Obj, what: &str| -> PResult<Vec<u64>> {
        let items = o.items(what)?;
        if items.len() > MAX_DIMS {
            return Err(format!("{what} has {} dimensions", items.len()));
        }
        items
            .iter()
            .map(|i| {
                let v = i.int(what)?;
                u64::try_from(v).map_err(|_| format!("{what} has a negative entry {v}"))
            })
            .collect()
    };
    let shape = dims(&a[2], "a tensor's size")?;
    let stride = dims(&a[3], "a tensor's stride")?;
    if shape.len() != stride.len() {
        return Err(format!("a tensor of size {shape:?} has stride {stride:?}"));
    }
    let metadata = match g {
        Global::RebuildTensorV2 => a.get(6),
        Global::RebuildTensorV3 => a.get(7),
        _ => None,
    };
    if let Some(Obj::Dict(d)) = metadata
        && d.borrow()
            .iter()
            .any(|(_, v)| !matches!(v, Obj::Bool(false) | Obj::None))
    {
        return Err("a tensor with its conjugate or negative bit set".into());
    }
    let dtype = if g == Global::RebuildTensorV3 {
        match a.get(6) {
            Some(Obj::Global(Global::Dtype(d))) => *d,
            Some(o) => return Err(format!("`{name}` with a dtype that is {}", o.kind())),
            None => return Err(format!("`{name}` without its dtype")),
        }
    } else {
        storage
            .dtype
            .ok_or_else(|| format!("`{name}` of an untyped storage"))?
    };
    if storage.dtype.is_some_and(|d| d != dtype) {
        return Err(format!(
            "a {} tensor of a {} storage",
            dtype.name(),
            storage.dtype.map_or("byte", Dtype::name)
        ));
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("a tensor of size {shape:?} has too many elements"))?;
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("size {d} does not fit")))
        .collect::<PResult<Vec<usize>>>()?;
    Ok(Obj::Tensor(Rc::new(TensorRef {
        storage: storage.as_ref().clone(),
        dtype,
        offset,
        shape,
        stride,
        numel,
    })))
}

// ---------------------------------------------------------------------------------------------
// Flattening.

#[derive(Default)]
struct Flat {
    tensors: BTreeMap<String, TensorRef>,
    values: BTreeMap<String, Value>,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn spend(budget: &mut u64) -> PResult<()> {
    *budget = budget
        .checked_sub(1)
        .ok_or("the unpickled object is too large to flatten (shared references?)")?;
    Ok(())
}

impl Flat {
    fn add(&mut self, o: &Obj, name: String, depth: usize, budget: &mut u64) -> PResult<()> {
        spend(budget)?;
        if depth > MAX_DEPTH {
            let shown: String = name.chars().take(60).collect();
            return Err(format!(
                "`{shown}…` is nested more than {MAX_DEPTH} deep (or refers to itself)"
            ));
        }
        match o {
            Obj::Dict(d) => {
                for (k, v) in d.borrow().iter() {
                    let key = match k {
                        Obj::Str(s) => s.to_string(),
                        Obj::Int(i) => i.to_string(),
                        Obj::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                        Obj::None => "None".to_string(),
                        other => {
                            return Err(format!(
                                "a key of `{name}` is {}, not a string or int",
                                other.kind()
                            ));
                        }
                    };
                    self.add(v, join(&name, &key), depth + 1, budget)?;
                }
            }
            Obj::List(_) | Obj::Tuple(_) if holds_tensor(o, depth, budget)? => {
                let items = o.items("")?;
                for (i, v) in items.iter().enumerate() {
                    self.add(v, join(&name, &i.to_string()), depth + 1, budget)?;
                }
            }
            Obj::Tensor(t) => {
                self.values.remove(&name);
                self.tensors.insert(name, t.as_ref().clone());
            }
            // A storage not wrapped in a tensor carries no shape: nothing to name.
            Obj::Storage(_) => {}
            other => {
                let v = to_json(other, depth, budget)?;
                self.tensors.remove(&name);
                self.values.insert(name, v);
            }
        }
        Ok(())
    }
}

fn holds_tensor(o: &Obj, depth: usize, budget: &mut u64) -> PResult<bool> {
    spend(budget)?;
    if depth > MAX_DEPTH {
        return Err(format!(
            "nested more than {MAX_DEPTH} deep (or refers to itself)"
        ));
    }
    Ok(match o {
        Obj::Tensor(_) => true,
        Obj::List(l) => {
            let mut any = false;
            for i in l.borrow().iter() {
                any |= holds_tensor(i, depth + 1, budget)?;
            }
            any
        }
        Obj::Tuple(t) => {
            let mut any = false;
            for i in t.iter() {
                any |= holds_tensor(i, depth + 1, budget)?;
            }
            any
        }
        Obj::Dict(d) => {
            let mut any = false;
            for (_, v) in d.borrow().iter() {
                any |= holds_tensor(v, depth + 1, budget)?;
            }
            any
        }
        _ => false,
    })
}

fn to_json(o: &Obj, depth: usize, budget: &mut u64) -> PResult<Value> {
    spend(budget)?;
    if depth > MAX_DEPTH {
        return Err(format!(
            "nested more than {MAX_DEPTH} deep (or refers to itself)"
        ));
    }
    Ok(match o {
        Obj::None => Value::Null,
        Obj::Bool(b) => Value::Bool(*b),
        Obj::Int(i) => Value::from(*i),
        Obj::Float(f) => match serde_json::Number::from_f64(*f) {
            Some(n) => Value::Number(n),
            None if f.is_nan() => Value::String("nan".into()),
            None if *f > 0.0 => Value::String("inf".into()),
            None => Value::String("-inf".into()),
        },
        Obj::Str(s) => Value::String(s.to_string()),
        Obj::Bytes(b) => Value::Array(b.iter().map(|&x| Value::from(x)).collect()),
        Obj::List(l) => Value::Array(
            l.borrow()
                .iter()
                .map(|i| to_json(i, depth + 1, budget))
                .collect::<PResult<_>>()?,
        ),
        Obj::Tuple(t) => Value::Array(
            t.iter()
                .map(|i| to_json(i, depth + 1, budget))
                .collect::<PResult<_>>()?,
        ),
        Obj::Dict(d) => {
            let mut m = serde_json::Map::new();
            for (k, v) in d.borrow().iter() {
                let key = match k {
                    Obj::Str(s) => s.to_string(),
                    Obj::Int(i) => i.to_string(),
                    other => return Err(format!("a dict key is {}", other.kind())),
                };
                m.insert(key, to_json(v, depth + 1, budget)?);
            }
            Value::Object(m)
        }
        Obj::Global(g) => Value::String(g.name()),
        Obj::Storage(_) | Obj::Tensor(_) => Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &[u8]) -> PResult<Obj> {
        Machine::new(p).run()
    }

    #[test]
    fn plain_values() {
        // {'a': 1, 'b': [2.5, None, True], 'c': 'x'} at protocol 2.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00b]q\x01(G@\x04\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00cX\x01\x00\x00\x00xu.";
        let o = run(p).unwrap();
        let mut f = Flat::default();
        f.add(&o, String::new(), 0, &mut 1000).unwrap();
        assert_eq!(f.values["a"], Value::from(1));
        assert_eq!(f.values["b"], serde_json::json!([2.5, null, true]));
        assert_eq!(f.values["c"], Value::from("x"));
    }

    #[test]
    fn refuses_globals_when_named() {
        let e = run(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.").unwrap_err();
        assert!(e.contains("`os.system`"), "{e}");
        let e = run(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.").unwrap_err();
        assert!(e.contains("`builtins.eval`"), "{e}");
    }

    #[test]
    fn refuses_calls_to_types() {
        let e = run(b"\x80\x02ctorch\nFloatStorage\n)R.").unwrap_err();
        assert!(e.contains("refuses to call"), "{e}");
    }

    #[test]
    fn bounds_lengths_and_memo() {
        assert!(
            run(b"\x80\x02X\xff\xff\xff\xffab.")
                .unwrap_err()
                .contains("truncated")
        );
        assert!(run(b"\x80\x02h\x05.").unwrap_err().contains("memo"));
        assert!(run(b"\x80\x02").unwrap_err().contains("STOP"));
        assert!(
            run(b"\x80\x02\x8a\x0a0123456789.")
                .unwrap_err()
                .contains("64 bits")
        );
    }

    #[test]
    fn self_reference_is_bounded() {
        // l = []; l.append(l)
        let o = run(b"\x80\x02]q\x00h\x00a.").unwrap();
        let mut f = Flat::default();
        let mut budget = MAX_NODES;
        let e = f.add(&o, "l".into(), 0, &mut budget).unwrap_err();
        assert!(e.contains("nested"), "{e}");
    }

    #[test]
    fn negative_ints() {
        assert_eq!(long(&[0xff]).unwrap(), -1);
        assert_eq!(long(&[0x00, 0x80]).unwrap(), -32768);
        assert_eq!(long(&[0xff, 0x00]).unwrap(), 255);
    }
}
