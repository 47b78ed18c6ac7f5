//! Reading raw steering vectors: llama.cpp / repeng GGUF control vectors and `.npy` arrays.
//!
//! The files are written by hand here (a small GGUF writer and a small `.npy` writer follow the
//! formats byte for byte), so each test says exactly what is in the file. Values must round-trip
//! exactly: f32 and f64-that-fits-f32 bit for bit, f16 as the f16-rounded value.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use half::f16;
use tiller_runtime::vectors::{read_gguf_control_vector, read_npy_vectors};

// GGUF metadata value types and ggml tensor types, as in ggml's `gguf.h` / `ggml.h`.
const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_F64: u32 = 12;
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q8_0: u32 = 8;
const GGML_BF16: u32 = 30;

fn gstr(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Written instead of the offset the writer computes.
    offset: Option<u64>,
}

/// A GGUF file under construction: header, metadata, tensor infos, padding, aligned data.
struct Gguf {
    version: u32,
    n_kv: Option<u64>,
    n_kv_written: u64,
    kv: Vec<u8>,
    alignment: u64,
    tensors: Vec<Tensor>,
}

impl Gguf {
    fn new(version: u32) -> Self {
        Gguf {
            version,
            n_kv: None,
            n_kv_written: 0,
            kv: Vec::new(),
            alignment: 32,
            tensors: Vec::new(),
        }
    }

    /// A control vector as repeng writes it, plus an array-valued and a few more entries.
    fn control_vector(version: u32) -> Self {
        let mut g = Gguf::new(version);
        g.kv_str("general.architecture", "controlvector");
        g.kv_str("controlvector.model_hint", "llama");
        g.kv("controlvector.layer_count", T_U32, &4u32.to_le_bytes());
        let mut arr = Vec::new();
        arr.extend_from_slice(&T_I32.to_le_bytes());
        arr.extend_from_slice(&3u64.to_le_bytes());
        for v in [7i32, -1, 12] {
            arr.extend_from_slice(&v.to_le_bytes());
        }
        g.kv("tiller.test.ints", T_ARRAY, &arr);
        let mut arr = Vec::new();
        arr.extend_from_slice(&T_STRING.to_le_bytes());
        arr.extend_from_slice(&2u64.to_le_bytes());
        arr.extend(gstr("happy"));
        arr.extend(gstr("sad"));
        g.kv("tiller.test.prompts", T_ARRAY, &arr);
        g.kv_str("general.name", "a test vector");
        g.kv("tiller.test.flag", T_BOOL, &[1]);
        g.kv("tiller.test.f64", T_F64, &1.5f64.to_le_bytes());
        g
    }

    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        self.kv.extend(gstr(key));
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.kv.extend_from_slice(value);
        self.n_kv_written += 1;
        self
    }

    fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        self.kv(key, T_STRING, &gstr(value))
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data,
            offset: None,
        });
        self
    }

    fn f32_tensor(&mut self, name: &str, values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &[values.len() as u64], GGML_F32, data)
    }

    fn f16_tensor(&mut self, name: &str, values: &[f32]) -> &mut Self {
        let data = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        self.tensor(name, &[values.len() as u64], GGML_F16, data)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.n_kv.unwrap_or(self.n_kv_written).to_le_bytes());
        out.extend_from_slice(&self.kv);
        let pad = |n: u64| n.next_multiple_of(self.alignment);
        let mut offset = 0;
        for t in &self.tensors {
            out.extend(gstr(&t.name));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            out.extend_from_slice(&t.offset.unwrap_or(offset).to_le_bytes());
            offset = pad(offset + t.data.len() as u64);
        }
        out.resize(pad(out.len() as u64) as usize, 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(pad(out.len() as u64) as usize, 0);
        }
        out
    }
}

fn direction(layer: usize, n: usize) -> Vec<f32> {
    // Values that are not exact in f16, of both signs and a few magnitudes.
    (0..n)
        .map(|j| ((layer * 31 + j * 7) % 23) as f32 * 0.0371 - 0.4 + (j as f32) * 1e-3)
        .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The error message of reading `bytes` as a control vector; panics if it reads.
fn gguf_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.gguf", bytes);
    let err = read_gguf_control_vector(&path).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()),
        "the error does not name the file: {err}"
    );
    err
}

fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "expected `{p}` in: {err}");
    }
}

#[test]
fn gguf_f32_round_trips_v3_and_v2() {
    let dir = tempfile::tempdir().unwrap();
    for version in [3, 2] {
        let mut g = Gguf::control_vector(version);
        for layer in 1..=4 {
            g.f32_tensor(&format!("direction.{layer}"), &direction(layer, 40));
        }
        let path = write(dir.path(), &format!("v{version}.gguf"), &g.bytes());
        let cv = read_gguf_control_vector(&path).unwrap();
        assert_eq!(cv.model_hint.as_deref(), Some("llama"));
        assert_eq!(cv.n_embd, 40);
        assert_eq!(
            cv.directions.keys().copied().collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        for (layer, values) in &cv.directions {
            let want = direction(*layer, 40);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(values), bits(&want), "layer {layer}");
        }
    }
}

#[test]
fn gguf_f16_round_trips_to_the_f16_rounded_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gguf::control_vector(3);
    for layer in 1..=4 {
        // 37 elements: 74 bytes, so every tensor after the first needs alignment padding.
        g.f16_tensor(&format!("direction.{layer}"), &direction(layer, 37));
    }
    let path = write(dir.path(), "f16.gguf", &g.bytes());
    let cv = read_gguf_control_vector(&path).unwrap();
    assert_eq!(cv.n_embd, 37);
    assert_eq!(cv.directions.len(), 4);
    for (layer, values) in &cv.directions {
        let want: Vec<f32> = direction(*layer, 37)
            .iter()
            .map(|v| f16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(values, &want, "layer {layer}");
        assert_ne!(values, &direction(*layer, 37), "f16 rounding must show");
    }
}

#[test]
fn gguf_mixed_types_custom_alignment_sparse_layers_and_no_metadata() {
    let dir = tempfile::tempdir().unwrap();
    // Only some layers, out of order, F32 and F16 mixed, alignment 64, a [d, 1] shape (which
    // llama.cpp's `ggml_n_dims` counts as 1-D), no architecture and no model hint.
    let mut g = Gguf::new(3);
    g.alignment = 64;
    g.kv("general.alignment", T_U32, &64u32.to_le_bytes());
    g.f16_tensor("direction.12", &direction(12, 9));
    g.f32_tensor("direction.3", &direction(3, 9));
    let data = direction(30, 9)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    g.tensor("direction.30", &[9, 1], GGML_F32, data);
    let path = write(dir.path(), "sparse.gguf", &g.bytes());
    let cv = read_gguf_control_vector(&path).unwrap();
    assert_eq!(cv.model_hint, None);
    assert_eq!(
        cv.directions.keys().copied().collect::<Vec<_>>(),
        [3, 12, 30]
    );
    assert_eq!(cv.directions[&3], direction(3, 9));
    assert_eq!(cv.directions[&30], direction(30, 9));
    let f16_12: Vec<f32> = direction(12, 9)
        .iter()
        .map(|v| f16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(cv.directions[&12], f16_12);
}

#[test]
fn gguf_nested_arrays_and_every_scalar_type_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gguf::control_vector(3);
    for (ty, size) in [
        (0u32, 1usize),
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 4),
        (5, 4),
        (6, 4),
    ] {
        g.kv(&format!("t.scalar{ty}"), ty, &vec![0xAB; size]);
    }
    for (ty, size) in [(7u32, 1usize), (10, 8), (11, 8), (12, 8)] {
        g.kv(&format!("t.scalar{ty}"), ty, &vec![0x01; size]);
    }
    // An array of two arrays of u8: [[1, 2], [3]].
    let mut arr = Vec::new();
    arr.extend_from_slice(&T_ARRAY.to_le_bytes());
    arr.extend_from_slice(&2u64.to_le_bytes());
    for inner in [&[1u8, 2][..], &[3u8][..]] {
        arr.extend_from_slice(&T_U8.to_le_bytes());
        arr.extend_from_slice(&(inner.len() as u64).to_le_bytes());
        arr.extend_from_slice(inner);
    }
    g.kv("t.nested", T_ARRAY, &arr);
    // An empty array of f32.
    let mut arr = T_F32.to_le_bytes().to_vec();
    arr.extend_from_slice(&0u64.to_le_bytes());
    g.kv("t.empty", T_ARRAY, &arr);
    g.f32_tensor("direction.1", &[1.0, -2.0, 0.5]);
    let path = write(dir.path(), "kv.gguf", &g.bytes());
    let cv = read_gguf_control_vector(&path).unwrap();
    assert_eq!(cv.directions[&1], [1.0, -2.0, 0.5]);
}

fn good_gguf() -> Vec<u8> {
    let mut g = Gguf::control_vector(3);
    for layer in 1..=4 {
        g.f32_tensor(&format!("direction.{layer}"), &direction(layer, 16));
    }
    g.bytes()
}

#[test]
fn gguf_truncated_anywhere_is_an_error() {
    let bytes = good_gguf();
    // Inside the magic, the version, the counts, a key, a value, an array, the tensor infos,
    // the padding and the data; and one byte short of the end.
    let header_end = 4 + 4 + 8 + 8;
    let mut cuts = vec![
        0,
        2,
        4,
        6,
        10,
        20,
        header_end,
        header_end + 5,
        header_end + 30,
    ];
    cuts.extend((header_end + 40..bytes.len()).step_by(37));
    cuts.push(bytes.len() - 1);
    for cut in cuts {
        let err = gguf_err(&bytes[..cut]);
        assert!(
            err.contains("truncated") || err.contains("past the end of the file"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn gguf_wrong_magic_and_versions() {
    let mut bytes = good_gguf();
    bytes[..4].copy_from_slice(b"GGML");
    assert_has(&gguf_err(&bytes), &["not a GGUF file", "GGML"]);

    let mut bytes = good_gguf();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_has(&gguf_err(&bytes), &["version 1 is not supported"]);
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_has(&gguf_err(&bytes), &["big-endian"]);
    bytes[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert_has(&gguf_err(&bytes), &["version 4 is not supported"]);
}

#[test]
fn gguf_hostile_counts_and_lengths() {
    let mut g = Gguf::control_vector(3);
    g.f32_tensor("direction.1", &[1.0; 8]);
    g.n_kv = Some(1 << 60);
    assert_has(
        &gguf_err(&g.bytes()),
        &["1152921504606846976 metadata entries", "bytes follow"],
    );

    // A tensor count of 2^60, patched into a good file.
    let mut bytes = good_gguf();
    bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert_has(&gguf_err(&bytes), &["1152921504606846976 tensor infos"]);

    // A string value claiming 1 TB.
    let mut g = Gguf::new(3);
    let mut value = (1u64 << 40).to_le_bytes().to_vec();
    value.extend_from_slice(b"llama");
    g.kv("controlvector.model_hint", T_STRING, &value);
    g.f32_tensor("direction.1", &[1.0; 8]);
    assert_has(
        &gguf_err(&g.bytes()),
        &[
            "`controlvector.model_hint`",
            "string length 1099511627776 runs past the end",
        ],
    );

    // The same in a key we skip, and a key length of 2^63.
    let mut g = Gguf::new(3);
    g.kv("general.name", T_STRING, &(1u64 << 40).to_le_bytes());
    assert_has(
        &gguf_err(&g.bytes()),
        &["`general.name`", "runs past the end"],
    );
    let mut g = Gguf::new(3);
    g.kv.extend_from_slice(&(1u64 << 63).to_le_bytes());
    g.kv.extend_from_slice(&[0; 16]);
    g.n_kv_written = 1;
    assert_has(
        &gguf_err(&g.bytes()),
        &["metadata key 0", "runs past the end"],
    );

    // An array claiming 2^62 u64s, and 2^61 strings.
    for (elem, what) in [(T_U64, "u64 elements"), (T_STRING, "string elements")] {
        let mut g = Gguf::new(3);
        let mut arr = elem.to_le_bytes().to_vec();
        arr.extend_from_slice(&(1u64 << 62).to_le_bytes());
        g.kv("t.big", T_ARRAY, &arr);
        g.f32_tensor("direction.1", &[1.0; 8]);
        assert_has(
            &gguf_err(&g.bytes()),
            &["`t.big`", "array of 4611686018427387904", what],
        );
    }

    // Arrays nested past the limit.
    let mut g = Gguf::new(3);
    let mut arr = Vec::new();
    for _ in 0..20 {
        arr.extend_from_slice(&T_ARRAY.to_le_bytes());
        arr.extend_from_slice(&1u64.to_le_bytes());
    }
    g.kv("t.deep", T_ARRAY, &arr);
    assert_has(&gguf_err(&g.bytes()), &["`t.deep`", "nested"]);

    // An unknown value type.
    let mut g = Gguf::new(3);
    g.kv("t.odd", 13, &[0; 8]);
    assert_has(&gguf_err(&g.bytes()), &["`t.odd`", "unknown value type 13"]);
}

#[test]
fn gguf_hostile_tensors() {
    // Data offset past the end.
    let mut g = Gguf::control_vector(3);
    for layer in 1..=4 {
        g.f32_tensor(&format!("direction.{layer}"), &direction(layer, 16));
    }
    g.tensors[2].offset = Some(1 << 20);
    assert_has(
        &gguf_err(&g.bytes()),
        &["tensor `direction.3`", "runs past the end of the file"],
    );
    g.tensors[2].offset = Some(u64::MAX - 31);
    assert_has(
        &gguf_err(&g.bytes()),
        &["tensor `direction.3`", "runs past the end"],
    );
    g.tensors[2].offset = Some(4);
    assert_has(
        &gguf_err(&g.bytes()),
        &["`direction.3`", "not a multiple of the alignment 32"],
    );

    // A dimension of 2^62 elements.
    let mut g = Gguf::new(3);
    g.tensor("direction.1", &[1 << 62], GGML_F32, vec![0; 64]);
    assert_has(
        &gguf_err(&g.bytes()),
        &["`direction.1`", "runs past the end"],
    );

    // Unsupported types.
    for (ty, name) in [
        (GGML_Q8_0, "Q8_0"),
        (GGML_BF16, "BF16"),
        (99, "ggml type 99"),
    ] {
        let mut g = Gguf::control_vector(3);
        g.f32_tensor("direction.1", &[1.0; 32]);
        g.tensor("direction.2", &[32], ty, vec![0; 64]);
        assert_has(
            &gguf_err(&g.bytes()),
            &["tensor `direction.2`", name, "only F32 and F16"],
        );
    }

    // Mismatched lengths.
    let mut g = Gguf::control_vector(3);
    g.f32_tensor("direction.1", &[1.0; 16]);
    g.f16_tensor("direction.2", &[1.0; 15]);
    assert_has(
        &gguf_err(&g.bytes()),
        &[
            "`direction.2` has 15 elements but `direction.1` has 16",
            "same length",
        ],
    );

    // Not 1-D, too many dimensions, no elements.
    let mut g = Gguf::new(3);
    g.tensor("direction.1", &[4, 2], GGML_F32, vec![0; 32]);
    assert_has(
        &gguf_err(&g.bytes()),
        &["`direction.1`", "[4, 2] is not 1-D"],
    );
    let mut g = Gguf::new(3);
    g.tensor("direction.1", &[1; 5], GGML_F32, vec![0; 4]);
    assert_has(&gguf_err(&g.bytes()), &["5 dimensions"]);
    let mut g = Gguf::new(3);
    g.tensor("direction.1", &[0], GGML_F32, vec![]);
    assert_has(&gguf_err(&g.bytes()), &["`direction.1` has no elements"]);

    // Names: layer 0, not a direction, an index past usize, the same layer twice.
    for (name, want) in [
        ("direction.0", "layer indices start at 1"),
        (
            "token_embd.weight",
            "only tensors named `direction.{layer}`",
        ),
        ("direction.-1", "only tensors named `direction.{layer}`"),
        ("direction.", "only tensors named `direction.{layer}`"),
        ("direction.99999999999999999999999", "too large"),
    ] {
        let mut g = Gguf::control_vector(3);
        g.f32_tensor(name, &[1.0; 4]);
        assert_has(&gguf_err(&g.bytes()), &[&format!("tensor `{name}`"), want]);
    }
    let mut g = Gguf::control_vector(3);
    g.f32_tensor("direction.3", &[1.0; 4]);
    g.f32_tensor("direction.03", &[2.0; 4]);
    assert_has(
        &gguf_err(&g.bytes()),
        &["`direction.3` and `direction.03` both name layer 3"],
    );

    // Not finite.
    let mut g = Gguf::control_vector(3);
    g.f32_tensor("direction.1", &[1.0, f32::NAN, 0.0]);
    assert_has(
        &gguf_err(&g.bytes()),
        &["`direction.1`", "element 1 is NaN"],
    );
    let mut g = Gguf::control_vector(3);
    g.f16_tensor("direction.1", &[1.0, 0.0, f32::INFINITY]);
    assert_has(
        &gguf_err(&g.bytes()),
        &["`direction.1`", "element 2 is inf"],
    );

    // No tensors at all.
    assert_has(&gguf_err(&Gguf::control_vector(3).bytes()), &["no tensors"]);
}

#[test]
fn gguf_hostile_metadata() {
    let with_tensor = |mut g: Gguf| {
        g.f32_tensor("direction.1", &[1.0; 4]);
        gguf_err(&g.bytes())
    };
    let mut g = Gguf::new(3);
    g.kv_str("general.architecture", "llama");
    assert_has(&with_tensor(g), &["`llama`", "not a control vector"]);

    let mut g = Gguf::new(3);
    g.kv("controlvector.model_hint", T_U32, &1u32.to_le_bytes());
    assert_has(
        &with_tensor(g),
        &["`controlvector.model_hint` has type u32, not string"],
    );

    let mut g = Gguf::new(3);
    g.kv("general.alignment", T_U64, &32u64.to_le_bytes());
    assert_has(
        &with_tensor(g),
        &["`general.alignment` has type u64, not u32"],
    );

    let mut g = Gguf::new(3);
    g.kv("general.alignment", T_U32, &48u32.to_le_bytes());
    assert_has(&with_tensor(g), &["48, not a power of two"]);

    let mut g = Gguf::new(3);
    g.kv_str("general.name", "a").kv_str("general.name", "b");
    assert_has(&with_tensor(g), &["`general.name` appears twice"]);

    let mut g = Gguf::new(3);
    g.kv_str("", "a");
    assert_has(&with_tensor(g), &["metadata key 0 is empty"]);

    let mut g = Gguf::new(3);
    g.kv(
        "general.architecture",
        T_STRING,
        &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe],
    );
    assert_has(&with_tensor(g), &["not valid UTF-8"]);
}

#[test]
fn gguf_missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.gguf");
    let err = read_gguf_control_vector(&path).unwrap_err();
    assert!(matches!(err, tiller_runtime::Error::Io { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// .npy

/// A `.npy` file (format 1.0) with the given header dict and raw data.
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    // Pad so that magic + version + length + header is a multiple of 64, ending in '\n'.
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn npy_dict(descr: &str, fortran: bool, shape: &str) -> String {
    let fortran = if fortran { "True" } else { "False" };
    format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}")
}

fn le_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn npy_read(bytes: &[u8]) -> tiller_runtime::Result<ndarray::Array2<f32>> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "v.npy", bytes);
    read_npy_vectors(&path)
}

fn npy_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.npy", bytes);
    let err = read_npy_vectors(&path).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()),
        "the error does not name the file: {err}"
    );
    err
}

#[test]
fn npy_one_direction_f32() {
    let v = direction(1, 10);
    let a = npy_read(&npy(&npy_dict("<f4", false, "(10,)"), &le_f32(&v))).unwrap();
    assert_eq!(a.shape(), [1, 10]);
    assert_eq!(a.row(0).to_vec(), v);
}

#[test]
fn npy_several_directions_f32_f64_f16() {
    let rows: Vec<Vec<f32>> = (1..=3).map(|l| direction(l, 6)).collect();
    let flat: Vec<f32> = rows.concat();

    let a = npy_read(&npy(&npy_dict("<f4", false, "(3, 6)"), &le_f32(&flat))).unwrap();
    assert_eq!(a.shape(), [3, 6]);
    assert_eq!(a.iter().copied().collect::<Vec<_>>(), flat);

    // f64 values that are exact in f32 round-trip exactly.
    let data: Vec<u8> = flat
        .iter()
        .flat_map(|v| f64::from(*v).to_le_bytes())
        .collect();
    let a = npy_read(&npy(&npy_dict("<f8", false, "(3, 6)"), &data)).unwrap();
    assert_eq!(a.iter().copied().collect::<Vec<_>>(), flat);

    let data: Vec<u8> = flat
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    let a = npy_read(&npy(&npy_dict("<f2", false, "(3, 6)"), &data)).unwrap();
    let want: Vec<f32> = flat.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
    assert_eq!(a.iter().copied().collect::<Vec<_>>(), want);

    // Format 2.0 (a 4-byte header length) and a header with the keys in another order.
    let dict = "{'shape': (2, 2), 'fortran_order': False, 'descr': '<f4'}";
    let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
    bytes.extend_from_slice(&(dict.len() as u32 + 1).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.push(b'\n');
    bytes.extend(le_f32(&[1.0, 2.0, 3.0, 4.0]));
    let a = npy_read(&bytes).unwrap();
    assert_eq!(a, ndarray::array![[1.0, 2.0], [3.0, 4.0]]);
}

#[test]
fn npy_bad_files() {
    let good = npy(&npy_dict("<f4", false, "(2, 4)"), &le_f32(&[0.5; 8]));
    // Truncated in the magic, the header length, the header and the data.
    for cut in [0, 3, 8, 9, 30, good.len() - 17, good.len() - 1] {
        let err = npy_err(&good[..cut]);
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
    assert_has(
        &npy_err(b"PK\x03\x04 not an npy file"),
        &["not a .npy file"],
    );

    let mut extra = good.clone();
    extra.extend_from_slice(&[0; 4]);
    assert_has(&npy_err(&extra), &["4 bytes follow the data"]);

    // A header length past the end of the file.
    let mut long = good.clone();
    long[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
    assert_has(&npy_err(&long), &["truncated", "the header"]);

    // A shape whose data cannot fit, and one whose byte count overflows.
    let huge = npy(
        &npy_dict("<f4", false, "(1152921504606846976, 1024)"),
        &[0; 16],
    );
    assert_has(&npy_err(&huge), &["truncated", "over 2^64"]);
    let big = npy(&npy_dict("<f8", false, "(100000, 100000)"), &[0; 16]);
    assert_has(&npy_err(&big), &["truncated", "80000000000 bytes"]);

    assert_has(
        &npy_err(&npy(&npy_dict("<f4", true, "(2, 4)"), &le_f32(&[0.5; 8]))),
        &["Fortran order"],
    );
    assert_has(
        &npy_err(&npy(&npy_dict("<i4", false, "(2, 4)"), &[0; 32])),
        &["dtype `<i4` is not supported"],
    );
    // Big-endian data is read as its descriptor says.
    let be: Vec<u8> = [0.5f32; 8].iter().flat_map(|v| v.to_be_bytes()).collect();
    assert_eq!(
        npy_read(&npy(&npy_dict(">f4", false, "(2, 4)"), &be)).unwrap(),
        npy_read(&good).unwrap()
    );
    assert_has(
        &npy_err(&npy(&npy_dict("<f4", false, "(2, 2, 2)"), &[0; 32])),
        &["shape [2, 2, 2]"],
    );
    assert_has(
        &npy_err(&npy(&npy_dict("<f4", false, "()"), &[0; 4])),
        &["shape []"],
    );
    assert_has(
        &npy_err(&npy(&npy_dict("<f4", false, "(0, 4)"), &[])),
        &["holds no values"],
    );
    assert_has(
        &npy_err(&npy("{'descr': '<f4', 'shape': (1,)}", &[0; 4])),
        &["no `fortran_order`"],
    );
    assert_has(
        &npy_err(&npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
            &[0; 4],
        )),
        &["unexpected key `x`"],
    );
    assert_has(
        &npy_err(&npy(
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
            &[0; 4],
        )),
        &["unsupported value"],
    );
    assert_has(&npy_err(&npy("not a dict", &[0; 4])), &["expected `{`"]);
}

#[test]
fn npy_non_finite_rows_are_named() {
    let mut v = vec![0.25f32; 12];
    v[4 + 2] = f32::NAN;
    assert_has(
        &npy_err(&npy(&npy_dict("<f4", false, "(3, 4)"), &le_f32(&v))),
        &["row 1: element 2 is NaN"],
    );
    let mut v = [0.25f64; 8];
    v[7] = f64::NEG_INFINITY;
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_has(
        &npy_err(&npy(&npy_dict("<f8", false, "(2, 4)"), &data)),
        &["row 1: element 3 is -inf"],
    );
    let mut v = [0.25f64; 4];
    v[0] = 1e300;
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_has(
        &npy_err(&npy(&npy_dict("<f8", false, "(4,)"), &data)),
        &["row 0: element 0 is 1e300, outside the float32 range"],
    );
    let data: Vec<u8> = [1.0f32, f32::INFINITY]
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    assert_has(
        &npy_err(&npy(&npy_dict("<f2", false, "(1, 2)"), &data)),
        &["row 0: element 1 is inf"],
    );
}

#[test]
fn every_truncation_and_random_corruption_errs_or_reads_cleanly() {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    let mut g = Gguf::control_vector(3);
    g.f32_tensor("direction.1", &direction(1, 8));
    g.f16_tensor("direction.2", &direction(2, 8));
    let gguf = g.bytes();
    let npy_file = npy(
        &npy_dict("<f4", false, "(2, 8)"),
        &le_f32(&direction(1, 16)),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutated");

    // The last tensor (8 f16, 16 bytes) is followed by 16 bytes of padding that may go.
    let data_end = gguf.len() - 16;
    for cut in 0..gguf.len() {
        std::fs::write(&path, &gguf[..cut]).unwrap();
        let read = read_gguf_control_vector(&path);
        assert_eq!(read.is_ok(), cut >= data_end, "gguf cut at {cut}");
    }
    for cut in 0..npy_file.len() {
        std::fs::write(&path, &npy_file[..cut]).unwrap();
        assert!(read_npy_vectors(&path).is_err(), "npy cut at {cut}");
    }

    // Flip a few random bytes at a time: the readers may accept or refuse the result, but
    // never panic, and what they accept is consistent.
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..3000 {
        let mut bytes = gguf.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random();
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(cv) = read_gguf_control_vector(&path) {
            assert!(cv.directions.keys().all(|&l| l >= 1));
            for v in cv.directions.values() {
                assert_eq!(v.len(), cv.n_embd);
                assert!(v.iter().all(|x| x.is_finite()));
            }
        }
        let mut bytes = npy_file.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random();
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(a) = read_npy_vectors(&path) {
            assert!(a.iter().all(|x| x.is_finite()));
        }
    }
}
