//! The reader of llama.cpp / repeng control vectors in GGUF; see the `vectors` module docs for
//! how layer indices map to blocks and where this reader is stricter than llama.cpp.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::control_vector::ControlVector;
use crate::npy::{Element, Kind, describe_non_finite};
use crate::{Error, Result};

/// A GGUF key, tensor name or kept string value longer than this is refused; real ones are tens
/// of bytes, and ggml itself caps tensor names at 63.
const MAX_NAME_LEN: u64 = 1 << 16;
/// Deepest nesting of arrays in metadata that is skipped (ggml allows none; the spec allows it).
const MAX_ARRAY_DEPTH: u32 = 8;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// `general.alignment` when the file does not set it.
const DEFAULT_ALIGNMENT: u64 = 32;

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
        let float = Element {
            kind: Kind::Float,
            size: if info.ggml_type == GGML_F16 { 2 } else { 4 },
            big_endian: false,
        };
        src.seek_to(start)?;
        let bytes = src.bytes(
            (n_embd * float.size) as u64,
            format_args!("tensor `{name}`"),
        )?;
        let mut values = Vec::with_capacity(n_embd);
        if let Some((j, v)) = float.decode_f32(&bytes, &mut values) {
            return Err(src.err(format!(
                "tensor `{name}`: element {j} is {}",
                describe_non_finite(v)
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

/// Shows raw bytes from a file, printable ASCII as is and the rest escaped.
fn show_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}
