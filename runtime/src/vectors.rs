//! Raw steering directions written by other tools: llama.cpp / repeng control vectors (GGUF) and
//! NumPy `.npy` arrays. These feed the `vector` steering op (design.md section 4).
//!
//! Both readers treat the file as hostile (design.md section 10): every count, length, offset and
//! shape is checked against the bytes that are actually left in the file before anything is
//! allocated or read, and every failure is an [`Error::Invalid`] that names the file and what
//! was wrong in it.
//!
//! # Layer indices in control vectors
//!
//! A control vector holds one tensor `direction.{N}` per steered layer. [`ControlVector`] keeps
//! `N` exactly as the file spells it. What llama.cpp does with it:
//! - `common_control_vector_load_one` refuses `N = 0` and stores `direction.N` at row `N - 1` of
//!   a flat `n_embd`-wide buffer ("do not store data for layer 0").
//! - `llama_adapter_cvec::apply` fills the vector of block `il` (0-based, `il = 1..n_layer`) from
//!   row `il - 1` of that buffer, and every model graph adds it to that block's output
//!   (`build_cvec(cur, il)` right before `l_out`).
//!
//! The two shifts cancel: `direction.N` is added to the residual stream after block `N`
//! (0-based), i.e. Hugging Face's `hidden_states[N + 1]`. The first block's output (N = 0) can
//! never be steered, and `N >= n_layer` is silently ignored by llama.cpp. repeng numbers the same
//! way: its layer ids index `model.layers` and it trains on `hidden_states[layer + 1]`.
//!
//! Where this reader differs from llama.cpp, it is stricter or documents why: F16 directions are
//! accepted (llama.cpp takes F32 only), two tensors naming the same layer (`direction.3` and
//! `direction.03`) are an error (llama.cpp sums them), non-finite values are an error, and
//! `controlvector.layer_count` is read past but not trusted, because writers disagree on it
//! (repeng writes the number of directions, others the model's layer count) and llama.cpp
//! ignores it.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use half::f16;
use ndarray::Array2;

use crate::{Error, Result};

/// A control vector read from a GGUF file: one direction per layer, all of one length.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVector {
    /// `controlvector.model_hint`: the model type the vector was made for, when the file says.
    pub model_hint: Option<String>,
    /// The direction of each layer, keyed by `N` of the tensor `direction.{N}` (1-based; see the
    /// module docs for which block that is).
    pub directions: BTreeMap<usize, Vec<f32>>,
    /// The length of every direction (the model's hidden size).
    pub n_embd: usize,
}

/// A GGUF key, tensor name or kept string value longer than this is refused; real ones are tens
/// of bytes, and ggml itself caps tensor names at 63.
const MAX_NAME_LEN: u64 = 1 << 16;
/// Deepest nesting of arrays in metadata that is skipped (ggml allows none; the spec allows it).
const MAX_ARRAY_DEPTH: u32 = 8;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// `general.alignment` when the file does not set it.
const DEFAULT_ALIGNMENT: u64 = 32;
/// numpy's own default `max_header_size` is 10000; leave room above it.
const MAX_NPY_HEADER: u64 = 1 << 16;

// GGUF metadata value types.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

// ggml tensor types this reader decodes.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;

/// The smallest encodings, used to refuse counts that cannot fit in what is left of the file:
/// a metadata entry is a key length (8), a type (4) and at least a one-byte value; a tensor info
/// is a name length (8), a dimension count (4), a type (4) and an offset (8).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// A string is at least its length; an array at least its element type and length.
const MIN_STRING_BYTES: u64 = 8;
const MIN_ARRAY_BYTES: u64 = 4 + 8;

/// Reads `path`, a llama.cpp / repeng control vector in GGUF (versions 2 and 3, little-endian),
/// and returns its `direction.{N}` tensors (F32 or F16, 1-D, all of one length).
pub fn read_gguf_control_vector(path: &Path) -> Result<ControlVector> {
    let mut src = Source::open(path, "control vector")?;

    let magic = src.array::<4>("the magic")?;
    if &magic != b"GGUF" {
        return Err(src.err(format!(
            "not a GGUF file: it starts with {}, not \"GGUF\"",
            show_bytes(&magic)
        )));
    }
    let version = src.u32("the GGUF version")?;
    match version {
        2 | 3 => {}
        0 => return Err(src.err("GGUF version 0 is not valid")),
        1 => {
            return Err(
                src.err("GGUF version 1 is not supported (only 2 and 3; v1 used 32-bit counts)")
            );
        }
        v if v & 0xFFFF == 0 => {
            return Err(src.err(format!(
                "GGUF version {v:#010x} looks byte-swapped: big-endian GGUF is not supported"
            )));
        }
        v => return Err(src.err(format!("GGUF version {v} is not supported (only 2 and 3)"))),
    }
    let n_tensors = src.u64("the tensor count")?;
    let n_kv = src.u64("the metadata count")?;
    src.fits(n_kv, MIN_KV_BYTES, "metadata entries")?;
    src.fits(n_tensors, MIN_TENSOR_INFO_BYTES, "tensor infos")?;

    // Metadata: keep the few keys a control vector has, skip (but fully check) the rest.
    let mut architecture = None;
    let mut model_hint = None;
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let key = gguf_string(&mut src, format_args!("metadata key {i}"), MAX_NAME_LEN)?;
        if key.is_empty() {
            return Err(src.err(format!("metadata key {i} is empty")));
        }
        if !keys.insert(key.clone()) {
            return Err(src.err(format!("metadata key `{key}` appears twice")));
        }
        let ty = src.u32(format_args!("the type of `{key}`"))?;
        match key.as_str() {
            "general.architecture" | "controlvector.model_hint" => {
                if ty != T_STRING {
                    return Err(src.err(format!(
                        "`{key}` has type {}, not string",
                        value_type_name(ty)
                    )));
                }
                let value = gguf_string(&mut src, format_args!("`{key}`"), MAX_NAME_LEN)?;
                if key == "general.architecture" {
                    architecture = Some(value);
                } else {
                    model_hint = Some(value);
                }
            }
            "general.alignment" => {
                // ggml accepts only a u32 here.
                if ty != T_U32 {
                    return Err(src.err(format!(
                        "`general.alignment` has type {}, not u32",
                        value_type_name(ty)
                    )));
                }
                let a = src.u32("`general.alignment`")?;
                if !a.is_power_of_two() {
                    return Err(src.err(format!("`general.alignment` is {a}, not a power of two")));
                }
                alignment = u64::from(a);
            }
            _ => skip_value(&mut src, ty, &key, 0)?,
        }
    }
    if let Some(arch) = &architecture
        && arch != "controlvector"
    {
        return Err(src.err(format!(
            "`general.architecture` is `{arch}`, not `controlvector`: this is not a control vector"
        )));
    }

    // Tensor infos.
    let mut infos = Vec::new();
    for i in 0..n_tensors {
        let name = gguf_string(
            &mut src,
            format_args!("the name of tensor {i}"),
            MAX_NAME_LEN,
        )?;
        let n_dims = src.u32(format_args!("tensor `{name}`: the dimension count"))?;
        if n_dims > MAX_DIMS {
            return Err(src.err(format!(
                "tensor `{name}`: {n_dims} dimensions (GGUF allows at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::new();
        for d in 0..n_dims {
            dims.push(src.u64(format_args!("tensor `{name}`: dimension {d}"))?);
        }
        let ggml_type = src.u32(format_args!("tensor `{name}`: the type"))?;
        let offset = src.u64(format_args!("tensor `{name}`: the data offset"))?;
        infos.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    if infos.is_empty() {
        return Err(src.err("it holds no tensors; a control vector holds `direction.{layer}`"));
    }
    let data_start = src
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| src.err("the data section starts past 2^64"))?;

    // Check every tensor before reading any of them.
    let mut n_embd = None::<(u64, &str)>;
    let mut layers = BTreeMap::<usize, (&TensorInfo, u64)>::new();
    for info in &infos {
        let name = info.name.as_str();
        let layer = direction_layer(name).map_err(|m| src.err(format!("tensor `{name}`: {m}")))?;
        // Trailing dimensions of 1 are allowed, as by llama.cpp's `ggml_n_dims(t) != 1` check.
        let len = match info.dims.split_first() {
            Some((&len, rest)) if rest.iter().all(|&d| d == 1) => len,
            _ => {
                return Err(src.err(format!("tensor `{name}`: shape {:?} is not 1-D", info.dims)));
            }
        };
        if len == 0 {
            return Err(src.err(format!("tensor `{name}` has no elements")));
        }
        match n_embd {
            None => n_embd = Some((len, name)),
            Some((first, first_name)) if first != len => {
                return Err(src.err(format!(
                    "tensor `{name}` has {len} elements but `{first_name}` has {first}: \
                     all directions must have the same length"
                )));
            }
            Some(_) => {}
        }
        let elem = match info.ggml_type {
            GGML_F32 => 4,
            GGML_F16 => 2,
            t => {
                return Err(src.err(format!(
                    "tensor `{name}` has type {}; only F32 and F16 directions are supported",
                    ggml_type_name(t)
                )));
            }
        };
        if info.offset % alignment != 0 {
            return Err(src.err(format!(
                "tensor `{name}`: data offset {} is not a multiple of the alignment {alignment}",
                info.offset
            )));
        }
        let past_end = || {
            src.err(format!(
                "tensor `{name}`: data [{}, +{}) runs past the end of the file ({} bytes)",
                data_start.saturating_add(info.offset),
                len.saturating_mul(elem),
                src.len
            ))
        };
        let nbytes = len.checked_mul(elem).ok_or_else(past_end)?;
        let start = data_start.checked_add(info.offset).ok_or_else(past_end)?;
        match start.checked_add(nbytes) {
            Some(end) if end <= src.len => {}
            _ => return Err(past_end()),
        }
        if let Some((other, _)) = layers.insert(layer, (info, start)) {
            return Err(src.err(format!(
                "tensors `{}` and `{name}` both name layer {layer}",
                other.name
            )));
        }
    }
    let n_embd = match n_embd {
        Some((n, _)) => usize::try_from(n)
            .map_err(|_| src.err(format!("directions of {n} elements do not fit in memory")))?,
        None => return Err(src.err("it holds no direction tensors")),
    };

    let mut directions = BTreeMap::new();
    for (layer, (info, start)) in layers {
        let name = info.name.as_str();
        let float = if info.ggml_type == GGML_F16 {
            Float::F16
        } else {
            Float::F32
        };
        src.seek_to(start)?;
        let bytes = src.bytes(
            n_embd as u64 * float.size(),
            format_args!("tensor `{name}`"),
        )?;
        let mut values = Vec::with_capacity(n_embd);
        if let Some((j, v)) = decode(&bytes, float, &mut values) {
            return Err(src.err(format!(
                "tensor `{name}`: element {j} is {}",
                describe_bad(v)
            )));
        }
        directions.insert(layer, values);
    }
    Ok(ControlVector {
        model_hint,
        directions,
        n_embd,
    })
}

/// Reads `path`, a `.npy` holding one direction `[d]` (returned as `[1, d]`) or several `[n, d]`,
/// float16, float32 or float64, little-endian, C order. Values must be finite.
pub fn read_npy_vectors(path: &Path) -> Result<Array2<f32>> {
    let mut src = Source::open(path, "vector file")?;
    let magic = src.array::<6>("the magic")?;
    if &magic != b"\x93NUMPY" {
        return Err(src.err(format!(
            "not a .npy file: it starts with {}, not \"\\x93NUMPY\"",
            show_bytes(&magic)
        )));
    }
    let [major, minor] = src.array::<2>("the format version")?;
    let header_len = match major {
        1 => u64::from(u16::from_le_bytes(src.array("the header length")?)),
        2 | 3 => u64::from(u32::from_le_bytes(src.array("the header length")?)),
        _ => {
            return Err(src.err(format!(
                ".npy format version {major}.{minor} is not supported (only 1, 2 and 3)"
            )));
        }
    };
    src.need(header_len, "the header")?;
    if header_len > MAX_NPY_HEADER {
        return Err(src.err(format!(
            "the header is {header_len} bytes, over the {MAX_NPY_HEADER} allowed"
        )));
    }
    let header = src.bytes(header_len, "the header")?;
    let header =
        String::from_utf8(header).map_err(|_| src.err("the header is not ASCII / UTF-8 text"))?;
    let header = header.trim_end();
    let (float, fortran, shape) =
        npy_header(header).map_err(|m| src.err(format!("header `{header}`: {m}")))?;
    if fortran {
        return Err(src.err(
            "the array is in Fortran order; only C order is supported \
             (save np.ascontiguousarray(a))",
        ));
    }
    let (rows, cols) = match shape[..] {
        [d] => (1, d),
        [n, d] => (n, d),
        _ => {
            return Err(src.err(format!(
                "shape {shape:?}: want one direction [d] or several [n, d]"
            )));
        }
    };
    if rows == 0 || cols == 0 {
        return Err(src.err(format!("shape {shape:?} holds no values")));
    }
    let row_bytes = cols.checked_mul(float.size());
    let data_bytes = row_bytes.and_then(|r| r.checked_mul(rows));
    match data_bytes {
        Some(n) if n == src.remaining() => {}
        Some(n) if n < src.remaining() => {
            return Err(src.err(format!(
                "{} bytes follow the data of shape {shape:?}",
                src.remaining() - n
            )));
        }
        _ => {
            return Err(src.err(format!(
                "truncated: shape {shape:?} of {} needs {} bytes of data but only {} follow \
                 the header",
                float.name(),
                data_bytes.map_or_else(|| "over 2^64".to_string(), |n| n.to_string()),
                src.remaining()
            )));
        }
    }
    // Bounded by the file size just checked.
    let (rows, cols) = (rows as usize, cols as usize);
    let mut row = vec![0u8; cols * float.size() as usize];
    let mut values = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        src.fill(&mut row, format_args!("row {r}"))?;
        if let Some((c, v)) = decode(&row, float, &mut values) {
            return Err(src.err(format!("row {r}: element {c} is {}", describe_bad(v))));
        }
    }
    Array2::from_shape_vec((rows, cols), values)
        .map_err(|e| src.err(format!("shape {shape:?}: {e}")))
}

/// One tensor info of a GGUF file.
struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

/// A file read front to back, where every read is first checked against the bytes left.
struct Source<'a> {
    path: &'a Path,
    /// What the file is, for messages: "control vector", "vector file".
    kind: &'static str,
    reader: BufReader<File>,
    /// Always `<= len`.
    pos: u64,
    len: u64,
}

impl<'a> Source<'a> {
    fn open(path: &'a Path, kind: &'static str) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(Self {
            path,
            kind,
            reader: BufReader::new(file),
            pos: 0,
            len,
        })
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::invalid(format!("{} {}", self.kind, self.path.display()), message)
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn need(&self, n: u64, what: impl Display) -> Result<()> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes at byte {} but only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        Ok(())
    }

    /// Refuses `count` items of at least `min_size` bytes each that cannot fit in what is left.
    fn fits(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() => Ok(()),
            _ => Err(self.err(format!(
                "the header claims {count} {what} (at least {min_size} bytes each), which would run \
                 past the end of the file ({} bytes follow)",
                self.remaining()
            ))),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: impl Display) -> Result<()> {
        self.need(buf.len() as u64, what)?;
        self.reader
            .read_exact(buf)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: impl Display) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: impl Display) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: impl Display) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bytes(&mut self, n: u64, what: impl Display) -> Result<Vec<u8>> {
        self.need(n, &what)?;
        // `n <= len`, the size of a file that exists, so it fits in memory's address space.
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: impl Display) -> Result<()> {
        self.need(n, what)?;
        let step = i64::try_from(n).map_err(|_| self.err(format!("cannot skip {n} bytes")))?;
        self.reader
            .seek_relative(step)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(())
    }

    fn seek_to(&mut self, pos: u64) -> Result<()> {
        if pos > self.len {
            return Err(self.err(format!("byte {pos} is past the end ({} bytes)", self.len)));
        }
        self.reader
            .seek(SeekFrom::Start(pos))
            .map_err(|e| Error::io(self.path, e))?;
        self.pos = pos;
        Ok(())
    }
}

/// Reads a GGUF string (u64 length, then bytes) of at most `max` bytes, as UTF-8.
fn gguf_string(src: &mut Source<'_>, what: impl Display, max: u64) -> Result<String> {
    let len = src.u64(format_args!("the length of {what}"))?;
    if len > src.remaining() {
        return Err(src.err(format!(
            "{what}: string length {len} runs past the end of the file ({} bytes remain)",
            src.remaining()
        )));
    }
    if len > max {
        return Err(src.err(format!(
            "{what}: string length {len} is over the {max} bytes allowed"
        )));
    }
    let bytes = src.bytes(len, &what)?;
    String::from_utf8(bytes).map_err(|_| src.err(format!("{what} is not valid UTF-8")))
}

/// The size of a fixed-size GGUF metadata value type.
fn value_size(ty: u32) -> Option<u64> {
    match ty {
        T_U8 | T_I8 | T_BOOL => Some(1),
        T_U16 | T_I16 => Some(2),
        T_U32 | T_I32 | T_F32 => Some(4),
        T_U64 | T_I64 | T_F64 => Some(8),
        _ => None,
    }
}

fn value_type_name(ty: u32) -> String {
    let name = match ty {
        T_U8 => "u8",
        T_I8 => "i8",
        T_U16 => "u16",
        T_I16 => "i16",
        T_U32 => "u32",
        T_I32 => "i32",
        T_F32 => "f32",
        T_BOOL => "bool",
        T_STRING => "string",
        T_ARRAY => "array",
        T_U64 => "u64",
        T_I64 => "i64",
        T_F64 => "f64",
        t => return format!("unknown ({t})"),
    };
    name.to_string()
}

/// Skips one metadata value of type `ty`, checking its every length against the file.
fn skip_value(src: &mut Source<'_>, ty: u32, key: &str, depth: u32) -> Result<()> {
    if let Some(size) = value_size(ty) {
        return src.skip(size, format_args!("the value of `{key}`"));
    }
    match ty {
        T_STRING => {
            let len = src.u64(format_args!("the string length of `{key}`"))?;
            if len > src.remaining() {
                return Err(src.err(format!(
                    "`{key}`: string length {len} runs past the end of the file ({} bytes remain)",
                    src.remaining()
                )));
            }
            src.skip(len, format_args!("the string `{key}`"))
        }
        T_ARRAY => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(src.err(format!(
                    "`{key}`: arrays nested more than {MAX_ARRAY_DEPTH} deep"
                )));
            }
            let elem = src.u32(format_args!("the element type of `{key}`"))?;
            let n = src.u64(format_args!("the length of `{key}`"))?;
            let too_long = |min: u64| {
                src.err(format!(
                    "`{key}`: an array of {n} {} elements (at least {min} bytes each) runs \
                     past the end of the file ({} bytes remain)",
                    value_type_name(elem),
                    src.remaining()
                ))
            };
            if let Some(size) = value_size(elem) {
                return match n.checked_mul(size) {
                    Some(total) if total <= src.remaining() => {
                        src.skip(total, format_args!("the array `{key}`"))
                    }
                    _ => Err(too_long(size)),
                };
            }
            let min = match elem {
                T_STRING => MIN_STRING_BYTES,
                T_ARRAY => MIN_ARRAY_BYTES,
                t => {
                    return Err(src.err(format!("`{key}`: array elements of unknown type {t}")));
                }
            };
            if n.checked_mul(min)
                .is_none_or(|total| total > src.remaining())
            {
                return Err(too_long(min));
            }
            for _ in 0..n {
                skip_value(src, elem, key, depth + 1)?;
            }
            Ok(())
        }
        t => Err(src.err(format!("`{key}` has unknown value type {t}"))),
    }
}

/// The layer `N` of a tensor named `direction.{N}`.
fn direction_layer(name: &str) -> std::result::Result<usize, String> {
    let digits = name
        .strip_prefix("direction.")
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            "a control vector holds only tensors named `direction.{layer}`".to_string()
        })?;
    let layer = digits
        .parse::<usize>()
        .map_err(|_| format!("layer index {digits} is too large"))?;
    if layer == 0 {
        return Err(
            "layer indices start at 1 (llama.cpp refuses `direction.0`: the \
                    output of the first block cannot be steered)"
                .to_string(),
        );
    }
    Ok(layer)
}

fn ggml_type_name(ty: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "", "", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
        "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
        "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    match NAMES.get(ty as usize) {
        Some(name) if !name.is_empty() => (*name).to_string(),
        _ => format!("ggml type {ty}"),
    }
}

/// A little-endian float encoding.
#[derive(Clone, Copy)]
enum Float {
    F16,
    F32,
    F64,
}

impl Float {
    fn size(self) -> u64 {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::F16 => "float16",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }
}

/// Appends the floats in `bytes` to `out` as f32. Returns the index in `bytes` and the stored
/// value of the first one that is not a finite f32, if any.
fn decode(bytes: &[u8], float: Float, out: &mut Vec<f32>) -> Option<(usize, f64)> {
    let start = out.len();
    match float {
        Float::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Float::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Float::F64 => {
            for (j, c) in bytes.chunks_exact(8).enumerate() {
                let v = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                let x = v as f32;
                if !x.is_finite() {
                    return Some((j, v));
                }
                out.push(x);
            }
            return None;
        }
    }
    out[start..]
        .iter()
        .position(|v| !v.is_finite())
        .map(|j| (j, f64::from(out[start + j])))
}

fn describe_bad(v: f64) -> String {
    if v.is_finite() {
        format!("{v:e}, outside the float32 range")
    } else {
        format!("{v}, not finite")
    }
}

/// Shows raw bytes from a file, printable ASCII as is and the rest escaped.
fn show_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// The parts of a `.npy` header this reader uses: dtype, Fortran order, shape.
fn npy_header(text: &str) -> std::result::Result<(Float, bool, Vec<u64>), String> {
    let mut lit = PyLit {
        s: text.as_bytes(),
        i: 0,
    };
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    lit.require(b'{')?;
    loop {
        if lit.eat(b'}') {
            break;
        }
        let key = lit.string()?;
        if !matches!(key.as_str(), "descr" | "fortran_order" | "shape") {
            return Err(format!("unexpected key `{key}`"));
        }
        lit.require(b':')?;
        let value = lit.value()?;
        let slot_taken = match (key.as_str(), value) {
            ("descr", PyValue::Str(s)) => descr.replace(s).is_some(),
            ("fortran_order", PyValue::Bool(b)) => fortran.replace(b).is_some(),
            ("shape", PyValue::Tuple(t)) => shape.replace(t).is_some(),
            (_, v) => {
                return Err(format!(
                    "`{key}` has the wrong kind of value ({})",
                    v.kind()
                ));
            }
        };
        if slot_taken {
            return Err(format!("key `{key}` appears twice"));
        }
        if lit.eat(b',') {
            continue;
        }
        lit.require(b'}')?;
        break;
    }
    lit.ws();
    if lit.i != lit.s.len() {
        return Err(format!("unexpected text after the dictionary at {}", lit.i));
    }
    let descr = descr.ok_or("no `descr`")?;
    let fortran = fortran.ok_or("no `fortran_order`")?;
    let shape = shape.ok_or("no `shape`")?;
    let float = match descr.as_str() {
        "<f2" => Float::F16,
        "<f4" => Float::F32,
        "<f8" => Float::F64,
        d if d.starts_with('>') => {
            return Err(format!(
                "dtype `{d}` is big-endian; only little-endian '<f2', '<f4', '<f8' are supported"
            ));
        }
        d => {
            return Err(format!(
                "dtype `{d}` is not supported (only float16, float32, float64, \
                 little-endian: '<f2', '<f4', '<f8')"
            ));
        }
    };
    Ok((float, fortran, shape))
}

/// A value in a `.npy` header, which is a Python dict literal.
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

impl PyValue {
    fn kind(&self) -> &'static str {
        match self {
            Self::Str(_) => "a string",
            Self::Bool(_) => "a bool",
            Self::Tuple(_) => "a tuple",
        }
    }
}

/// A cursor over the few Python literals numpy writes in a `.npy` header.
struct PyLit<'a> {
    s: &'a [u8],
    i: usize,
}

impl PyLit<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn require(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected `{}` at {}", c as char, self.i))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        self.ws();
        let quote = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at {}", self.i)),
        };
        self.i += 1;
        let start = self.i;
        loop {
            match self.s.get(self.i) {
                Some(&c) if c == quote => break,
                Some(b'\\') => {
                    return Err(format!("escapes in strings are not supported ({})", self.i));
                }
                Some(_) => self.i += 1,
                None => return Err("unterminated string".to_string()),
            }
        }
        let text = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(text)
    }

    fn value(&mut self) -> std::result::Result<PyValue, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'\'' | b'"') => Ok(PyValue::Str(self.string()?)),
            Some(b'(') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.eat(b')') {
                        break;
                    }
                    items.push(self.int()?);
                    if self.eat(b',') {
                        continue;
                    }
                    self.require(b')')?;
                    break;
                }
                Ok(PyValue::Tuple(items))
            }
            _ => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(u8::is_ascii_alphanumeric) {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    _ => Err(format!("unsupported value at {start}")),
                }
            }
        }
    }

    fn int(&mut self) -> std::result::Result<u64, String> {
        self.ws();
        let start = self.i;
        while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        let digits = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        if digits.is_empty() {
            return Err(format!("expected an integer at {start}"));
        }
        // Python 2 wrote longs as `3L`.
        if self.s.get(self.i) == Some(&b'L') {
            self.i += 1;
        }
        digits
            .parse()
            .map_err(|_| format!("dimension {digits} is too large"))
    }
}
