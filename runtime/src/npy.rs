//! The project's one reader of NumPy `.npy` files and `.npz` archives: steering vectors in the
//! runtime, activations, labels and checkpoint parameters in the offline tool.
//!
//! Every file is treated as hostile (docs/design.md#10-bad-input): the header length is capped
//! before anything is allocated for it, the header is parsed by a small parser of the few Python
//! literals NumPy writes (a dict of `descr`, `fortran_order` and `shape`), and the bytes the shape
//! needs are checked against the bytes that are actually there before any data is read.
//!
//! # Byte order
//!
//! Both byte orders are read, as the descriptor says: `<` and `=` are little-endian, `>` is
//! big-endian and swapped as it is read, `|` marks one-byte types that have no order. Nothing is
//! misread either way, and NumPy on a big-endian host writes `>` arrays by default, so refusing
//! them would only turn away valid files. This is the policy of every caller.
//!
//! # What is read
//!
//! [`read_header`] reads only the header, for callers that stream the data themselves (the
//! trainer reads rows of activation shards as it needs them). [`read_f32`] reads a whole float
//! array (float16, float32 or float64) as float32, in C order whatever order the file is in.
//! [`Element`] decodes the elements of any bool, integer or float type for callers with their
//! own rules (0/1 labels).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use half::f16;
use ndarray::{ArrayD, IxDyn, ShapeBuilder};

/// Longest `.npy` header accepted (NumPy itself refuses more than 10 000 bytes by default).
pub const MAX_HEADER: u64 = 1 << 16;

/// Why a `.npy` or `.npz` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The file could not be read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is not a valid array of the kind asked for; the message says what is wrong.
    #[error("{0}")]
    Format(String),
}

impl From<String> for NpyError {
    fn from(message: String) -> Self {
        Self::Format(message)
    }
}

impl From<&str> for NpyError {
    fn from(message: &str) -> Self {
        Self::Format(message.to_string())
    }
}

/// The result type of this module.
pub type NpyResult<T> = std::result::Result<T, NpyError>;

/// What an element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `b`: a bool, one byte.
    Bool,
    /// `i`: a signed integer.
    Int,
    /// `u`: an unsigned integer.
    Uint,
    /// `f`: an IEEE float (half, single or double).
    Float,
}

/// An element type read from a descriptor such as `<f4` or `>i8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    /// What it is.
    pub kind: Kind,
    /// Bytes per element: 1, 2, 4 or 8 (floats: 2, 4 or 8).
    pub size: usize,
    /// Whether multi-byte elements are stored most significant byte first.
    pub big_endian: bool,
}

impl Element {
    /// Reads a descriptor; `None` for types this reader does not decode.
    pub fn parse(descr: &str) -> Option<Self> {
        let (order, rest) = descr.split_at_checked(1)?;
        let big_endian = match order {
            "<" | "=" | "|" => false,
            ">" => true,
            _ => return None,
        };
        let (kind, size) = rest.split_at_checked(1)?;
        let size: usize = size.parse().ok()?;
        let kind = match (kind, size) {
            ("b", 1) => Kind::Bool,
            ("i", 1 | 2 | 4 | 8) => Kind::Int,
            ("u", 1 | 2 | 4 | 8) => Kind::Uint,
            ("f", 2 | 4 | 8) => Kind::Float,
            _ => return None,
        };
        Some(Self {
            kind,
            size,
            big_endian,
        })
    }

    /// The float type's name ("float32"), or the kind and width of another type.
    pub fn name(self) -> String {
        match self.kind {
            Kind::Float => format!("float{}", self.size * 8),
            Kind::Int => format!("int{}", self.size * 8),
            Kind::Uint => format!("uint{}", self.size * 8),
            Kind::Bool => "bool".to_string(),
        }
    }

    /// The element `c` (`size` bytes) as little-endian bytes, zero-padded to 8.
    fn le(self, c: &[u8]) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        if self.big_endian {
            b[..c.len()].reverse();
        }
        b
    }

    /// The element `c` (`size` bytes) as a float64; 64-bit integers past 2^53 are rounded.
    pub fn to_f64(self, c: &[u8]) -> f64 {
        let b = self.le(c);
        match (self.kind, self.size) {
            (Kind::Float, 2) => f64::from(f16::from_le_bytes([b[0], b[1]]).to_f32()),
            (Kind::Float, 4) => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (Kind::Float, _) => f64::from_le_bytes(b),
            (Kind::Int, 1) => f64::from(b[0] as i8),
            (Kind::Int, 2) => f64::from(i16::from_le_bytes([b[0], b[1]])),
            (Kind::Int, 4) => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (Kind::Int, _) => i64::from_le_bytes(b) as f64,
            (_, 1) => f64::from(b[0]),
            (_, 2) => f64::from(u16::from_le_bytes([b[0], b[1]])),
            (_, 4) => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => u64::from_le_bytes(b) as f64,
        }
    }

    /// The element `c` as a float32 (float16 widened exactly, float64 rounded).
    pub fn to_f32(self, c: &[u8]) -> f32 {
        let b = self.le(c);
        match (self.kind, self.size) {
            (Kind::Float, 2) => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            (Kind::Float, 4) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            _ => self.to_f64(c) as f32,
        }
    }

    /// Appends the elements in `bytes` to `out` as float32. Returns the index in `bytes` and the
    /// stored value of the first one that is not a finite float32 (a NaN, an infinity or a
    /// float64 outside the float32 range), if any; every element is appended either way.
    pub fn decode_f32(self, bytes: &[u8], out: &mut Vec<f32>) -> Option<(usize, f64)> {
        let mut bad = None;
        for (j, c) in bytes.chunks_exact(self.size).enumerate() {
            let x = self.to_f32(c);
            if bad.is_none() && !x.is_finite() {
                bad = Some((j, self.to_f64(c)));
            }
            out.push(x);
        }
        bad
    }
}

/// Says why a decoded value `v` (as stored) is not a usable float32.
pub fn describe_non_finite(v: f64) -> String {
    if v.is_finite() {
        format!("{v:e}, outside the float32 range")
    } else {
        format!("{v}, not finite")
    }
}

/// What a `.npy` header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The descriptor as written (`<f4`).
    pub descr: String,
    /// Whether the data is in Fortran (column-major) order.
    pub fortran_order: bool,
    /// The array's shape.
    pub shape: Vec<u64>,
    /// Where the data starts: the byte after the header.
    pub data_offset: u64,
}

impl Header {
    /// The element type, if this reader decodes it.
    pub fn element(&self) -> Option<Element> {
        Element::parse(&self.descr)
    }

    /// The element type, which must be a float.
    pub fn float(&self) -> NpyResult<Element> {
        match self.element() {
            Some(e) if e.kind == Kind::Float => Ok(e),
            _ => Err(format!(
                "dtype `{}` is not supported (only float16, float32 or float64: \
                 '<f2', '<f4', '<f8', or the same big-endian)",
                self.descr
            )
            .into()),
        }
    }

    /// Checks that exactly the bytes the shape needs, of `element`s, follow the header in a
    /// file of `size` bytes.
    pub fn check_data_len(&self, element: Element, size: u64) -> NpyResult<()> {
        let shape = &self.shape;
        let remaining = size.saturating_sub(self.data_offset);
        let data_bytes = shape
            .iter()
            .try_fold(element.size as u64, |n, &d| n.checked_mul(d));
        match data_bytes {
            Some(n) if n == remaining => Ok(()),
            Some(n) if n < remaining => {
                Err(format!("{} bytes follow the data of shape {shape:?}", remaining - n).into())
            }
            _ => Err(format!(
                "truncated: shape {shape:?} of {} needs {} bytes of data but only {remaining} \
                 follow the header",
                element.name(),
                data_bytes.map_or_else(|| "over 2^64".to_string(), |n| n.to_string()),
            )
            .into()),
        }
    }
}

/// Reads `n` bytes at byte `pos` of a file of `size` bytes, refusing to run past its end.
fn take(r: &mut impl Read, pos: &mut u64, size: u64, n: u64, what: &str) -> NpyResult<Vec<u8>> {
    let remaining = size.saturating_sub(*pos);
    if n > remaining {
        return Err(format!(
            "truncated: {what} needs {n} bytes at byte {pos} but only {remaining} remain"
        )
        .into());
    }
    // `n <= size`, the size of something that exists.
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf)?;
    *pos += n;
    Ok(buf)
}

/// The bytes of a `.npy` header (format 1.0, or 2.0 when longer), padded as NumPy pads it (the data
/// starts at a multiple of 64 bytes): for writing arrays NumPy's writers here do not (another byte
/// order, another element type), and for tests of this reader.
pub fn header_bytes(descr: &str, fortran_order: bool, shape: &[u64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let order = if fortran_order { "True" } else { "False" };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    // Format 1.0 has a 2-byte header length; longer headers need 2.0 and its 4-byte one.
    let (version, prefix) = if dict.len() + 10 + 64 <= usize::from(u16::MAX) {
        (1u8, 10)
    } else {
        (2, 12)
    };
    let mut h = dict;
    while (prefix + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[version, 0]);
    match u16::try_from(h.len()) {
        Ok(n) if version == 1 => out.extend_from_slice(&n.to_le_bytes()),
        _ => out.extend_from_slice(&(h.len() as u32).to_le_bytes()),
    }
    out.extend_from_slice(h.as_bytes());
    out
}

/// Reads the header of a `.npy` of `size` bytes from `r`, leaving `r` at the data.
pub fn read_header(r: &mut impl Read, size: u64) -> NpyResult<Header> {
    let mut pos = 0;
    let magic = take(r, &mut pos, size, 6, "the magic")?;
    if magic != b"\x93NUMPY" {
        return Err(format!(
            "not a .npy file: it starts with \"{}\", not \"\\x93NUMPY\"",
            magic.escape_ascii()
        )
        .into());
    }
    let version = take(r, &mut pos, size, 2, "the format version")?;
    let (major, minor) = (version[0], version[1]);
    let header_len = match major {
        1 => {
            let b = take(r, &mut pos, size, 2, "the header length")?;
            u64::from(u16::from_le_bytes([b[0], b[1]]))
        }
        2 | 3 => {
            let b = take(r, &mut pos, size, 4, "the header length")?;
            u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        _ => {
            return Err(format!(
                ".npy format version {major}.{minor} is not supported (only 1, 2 and 3)"
            )
            .into());
        }
    };
    if header_len > MAX_HEADER {
        return Err(
            format!("its header is {header_len} bytes, over the {MAX_HEADER} allowed").into(),
        );
    }
    let header = take(r, &mut pos, size, header_len, "the header")?;
    let header = String::from_utf8(header)
        .map_err(|_| NpyError::from("the header is not ASCII / UTF-8 text"))?;
    let header = header.trim_end();
    let (descr, fortran_order, shape) =
        parse_dict(header).map_err(|m| format!("header `{header}`: {m}"))?;
    Ok(Header {
        descr,
        fortran_order,
        shape,
        data_offset: pos,
    })
}

/// Reads the float array of a `.npy` of `size` bytes from `r` as float32, in C order.
pub fn read_f32(r: &mut impl Read, size: u64) -> NpyResult<ArrayD<f32>> {
    let header = read_header(r, size)?;
    let element = header.float()?;
    header.check_data_len(element, size)?;
    // Checked against `size` just above.
    let n = (size - header.data_offset) as usize;
    let mut bytes = vec![0u8; n];
    r.read_exact(&mut bytes)?;
    let mut values = Vec::with_capacity(n / element.size);
    element.decode_f32(&bytes, &mut values);
    let shape: Vec<usize> = header.shape.iter().map(|&d| d as usize).collect();
    let a = if header.fortran_order {
        ArrayD::from_shape_vec(IxDyn(&shape).f(), values)
            .map(|a| a.as_standard_layout().into_owned())
    } else {
        ArrayD::from_shape_vec(IxDyn(&shape), values)
    };
    a.map_err(|e| format!("shape {:?}: {e}", header.shape).into())
}

/// Reads the float `.npy` file at `path` as float32, in C order.
pub fn read_f32_file(path: &Path) -> NpyResult<ArrayD<f32>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    read_f32(&mut BufReader::new(file), size)
}

/// An open `.npz` archive: a zip of `.npy` members.
#[derive(Debug)]
pub struct Npz {
    zip: zip::ZipArchive<BufReader<File>>,
}

impl Npz {
    /// Opens the archive at `path`.
    pub fn open(path: &Path) -> NpyResult<Self> {
        let file = File::open(path)?;
        let zip = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| format!("not a valid .npz archive: {e}"))?;
        Ok(Self { zip })
    }

    /// The names of the arrays (without `.npy`, as NumPy names them).
    pub fn names(&self) -> NpyResult<Vec<String>> {
        self.zip
            .file_names()
            .map(|n| {
                let n = n.map_err(|e| format!("not a valid .npz archive: {e}"))?;
                Ok(n.strip_suffix(".npy").unwrap_or(&n).to_string())
            })
            .collect()
    }

    /// Reads the float array `name` (member `name` or `name.npy`) as float32. Errors do not name
    /// the array: callers add it.
    pub fn read_f32(&mut self, name: &str) -> NpyResult<ArrayD<f32>> {
        let index = self
            .zip
            .index_for_name(&format!("{name}.npy"))
            .or_else(|| self.zip.index_for_name(name))
            .ok_or_else(|| format!("there is no array `{name}` in the archive"))?;
        let mut entry = self
            .zip
            .by_index(index)
            .map_err(|e| format!("not a valid .npz archive: {e}"))?;
        let size = entry.size();
        read_f32(&mut entry, size)
    }
}

/// The parts of a `.npy` header this reader uses: dtype, Fortran order, shape.
fn parse_dict(text: &str) -> std::result::Result<(String, bool, Vec<u64>), String> {
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
    Ok((descr, fortran, shape))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.npy` of `descr`, `shape` and raw `data`.
    fn npy(descr: &str, fortran: bool, shape: &[u64], data: &[u8]) -> Vec<u8> {
        let mut out = header_bytes(descr, fortran, shape);
        out.extend_from_slice(data);
        out
    }

    fn read(bytes: &[u8]) -> NpyResult<ArrayD<f32>> {
        read_f32(&mut &bytes[..], bytes.len() as u64)
    }

    #[test]
    fn big_endian_reads_as_little_endian() {
        let v = [1.5f32, -2.25, 3.0e-7, 65504.0, -0.0, 7.0];
        let le: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let be: Vec<u8> = v.iter().flat_map(|x| x.to_be_bytes()).collect();
        let a = read(&npy("<f4", false, &[2, 3], &le)).unwrap();
        let b = read(&npy(">f4", false, &[2, 3], &be)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_slice().unwrap(), &v);

        let le: Vec<u8> = v.iter().flat_map(|&x| f64::from(x).to_le_bytes()).collect();
        let be: Vec<u8> = v.iter().flat_map(|&x| f64::from(x).to_be_bytes()).collect();
        let c = read(&npy("<f8", false, &[2, 3], &le)).unwrap();
        let d = read(&npy(">f8", false, &[2, 3], &be)).unwrap();
        assert_eq!(c, d);
        assert_eq!(c, a);

        let h: Vec<u8> = v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_be_bytes())
            .collect();
        let e = read(&npy(">f2", false, &[2, 3], &h)).unwrap();
        assert_eq!(e[[0, 0]], 1.5);
        assert_eq!(e[[1, 0]], 65504.0);
    }

    #[test]
    fn big_endian_integers_decode() {
        let e = Element::parse(">i4").unwrap();
        assert_eq!(e.to_f64(&(-7i32).to_be_bytes()), -7.0);
        let e = Element::parse("<u2").unwrap();
        assert_eq!(e.to_f64(&513u16.to_le_bytes()), 513.0);
        assert_eq!(Element::parse("|b1").unwrap().kind, Kind::Bool);
        assert!(Element::parse("<c8").is_none());
        assert!(Element::parse("<f16").is_none());
    }

    #[test]
    fn fortran_order_is_read_into_c_order() {
        // [[1, 2, 3], [4, 5, 6]] stored column by column.
        let v = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0];
        let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = read(&npy("<f4", true, &[2, 3], &data)).unwrap();
        assert_eq!(a.as_slice().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn header_only_read_stops_at_the_data() {
        let data = [0u8; 24];
        let bytes = npy("<f4", false, &[2, 3], &data);
        let mut r = &bytes[..];
        let h = read_header(&mut r, bytes.len() as u64).unwrap();
        assert_eq!(h.shape, vec![2, 3]);
        assert_eq!(h.data_offset as usize, bytes.len() - 24);
        assert_eq!(r.len(), 24);
    }

    #[test]
    fn bad_lengths_are_refused() {
        let data = [0u8; 24];
        let good = npy("<f4", false, &[2, 3], &data);
        let e = read(&good[..good.len() - 1]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut extra = good.clone();
        extra.push(0);
        let e = read(&extra).unwrap_err().to_string();
        assert!(e.contains("1 bytes follow the data"), "{e}");
        let mut long = good.clone();
        long[6] = 2;
        long.splice(8..10, u32::MAX.to_le_bytes());
        let e = read(&long).unwrap_err().to_string();
        assert!(e.contains("over the 65536 allowed"), "{e}");
        let e = read(&npy("<i4", false, &[2, 3], &data))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype `<i4` is not supported"), "{e}");
    }
}
