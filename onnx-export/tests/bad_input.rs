//! Bad input from outside: each case gives a clear error that names the file and the problem, and
//! none panics (a panic exits with 101; a handled error with 1).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, Tensors, write_saelens};
use protobuf::Message;
use safetensors::Dtype;
use serde_json::json;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tiller-export"))
}

/// Runs the tool, expects a handled failure, returns stderr.
fn fails(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a handled error, got {:?}: {err}",
        o.status
    );
    err
}

fn cfg() -> serde_json::Value {
    json!({"architecture": "standard", "d_in": 16, "d_sae": 40, "dtype": "float32",
           "apply_b_dec_to_input": true, "metadata": {"sae_lens_version": "6.18.0"}})
}

fn tensors(d_in: usize, d_sae: usize) -> Tensors {
    let mut rng = Rng::new(5);
    let mut t = Tensors::new();
    t.insert("W_enc".into(), rng.normal(&[d_in, d_sae], 0.3));
    t.insert("b_enc".into(), rng.normal(&[d_sae], 0.1));
    t.insert("W_dec".into(), rng.normal(&[d_sae, d_in], 0.3));
    t.insert("b_dec".into(), rng.normal(&[d_in], 0.1));
    t
}

fn checkpoint(dir: &Path, cfg: &serde_json::Value, t: &Tensors) -> PathBuf {
    let p = dir.join("ckpt");
    write_saelens(&p, cfg, t, Dtype::F32);
    p
}

fn import(ckpt: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("import").arg(ckpt).arg("-o").arg(out);
    c
}

/// A valid dictionary in `dir`, for the runtime-side cases.
fn dictionary(dir: &Path) -> PathBuf {
    let ckpt = checkpoint(dir, &cfg(), &tensors(16, 40));
    let out = dir.join("dict.onnx");
    assert!(import(&ckpt, &out).status().unwrap().success());
    out
}

/// `model` with `W_enc`'s data moved to an external file at `location`.
fn w_enc_at(model: &onnx_protobuf::ModelProto, location: &str) -> Vec<u8> {
    let mut model = model.clone();
    let g = model.graph.as_mut().unwrap();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.name == "W_enc")
        .unwrap();
    t.raw_data.clear();
    t.data_location =
        protobuf::EnumOrUnknown::new(onnx_protobuf::tensor_proto::DataLocation::EXTERNAL);
    let mut entry = onnx_protobuf::StringStringEntryProto::new();
    entry.key = "location".into();
    entry.value = location.into();
    t.external_data = vec![entry];
    model.write_to_bytes().unwrap()
}

/// Where an external-data location points outside the model's folder, and what `inspect`'s
/// message must name.
const ESCAPING_LOCATIONS: [(&str, &[&str]); 3] = [
    (
        "../../etc/passwd",
        &["evil.onnx", "../../etc/passwd", "climbs out"],
    ),
    ("/etc/passwd", &["is absolute"]),
    // A symlink beside the model that leads outside it.
    ("link.data", &["outside the model's folder"]),
];

#[test]
fn external_data_escaping_its_folder_is_refused_before_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let good = dictionary(dir.path());
    let model =
        onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(&good).unwrap()).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.data")).unwrap();
    let evil = dir.path().join("evil.onnx");
    for (location, names) in ESCAPING_LOCATIONS {
        std::fs::write(&evil, w_enc_at(&model, location)).unwrap();
        let err = fails(bin().arg("inspect").arg(&evil));
        assert!(names.iter().all(|n| err.contains(n)), "{location}: {err}");
    }

    // Encoding and the runtime API refuse it too, the runtime at validation, before a session
    // exists.
    std::fs::write(&evil, w_enc_at(&model, ESCAPING_LOCATIONS[0].0)).unwrap();
    let x = dir.path().join("x.npy");
    tiller_export::npy::write(&x, &ndarray::Array2::<f32>::zeros((2, 16))).unwrap();
    let err = fails(
        bin()
            .arg("encode")
            .arg(&evil)
            .arg("--input")
            .arg(&x)
            .arg("--output")
            .arg(dir.path().join("a.npy")),
    );
    assert!(err.contains("climbs out"), "{err}");
    let e = tiller_runtime::DictionaryFile::open(&evil)
        .unwrap_err()
        .to_string();
    assert!(e.contains("external data location"), "{e}");
}

/// A dictionary file spoilt after import: what is wrong with it, the file it is written to, how
/// the good file's bytes are changed, and what `inspect`'s message must name.
struct CorruptDictionary {
    what: &'static str,
    file: &'static str,
    corrupt: fn(&[u8]) -> Vec<u8>,
    names: &'static [&'static str],
}

const CORRUPT_DICTIONARIES: [CorruptDictionary; 3] = [
    CorruptDictionary {
        what: "cut in half",
        file: "cut.onnx",
        corrupt: |bytes| bytes[..bytes.len() / 2].to_vec(),
        names: &["cut.onnx", "not a valid ONNX protobuf"],
    },
    CorruptDictionary {
        what: "a valid ONNX model that is not a Tiller dictionary",
        file: "foreign.onnx",
        corrupt: |bytes| {
            let mut model = onnx_protobuf::ModelProto::parse_from_bytes(bytes).unwrap();
            model.metadata_props.retain(|p| p.key != "tiller.format");
            model.write_to_bytes().unwrap()
        },
        names: &["not a Tiller dictionary"],
    },
    CorruptDictionary {
        what: "metadata that disagrees with the weights",
        file: "lying.onnx",
        corrupt: |bytes| {
            let mut model = onnx_protobuf::ModelProto::parse_from_bytes(bytes).unwrap();
            for p in &mut model.metadata_props {
                if p.key == "tiller.d_sae" {
                    p.value = "41".into();
                }
            }
            model.write_to_bytes().unwrap()
        },
        names: &["lying.onnx", "41"],
    },
];

#[test]
fn corrupt_dictionary_files() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(dictionary(dir.path())).unwrap();
    for case in &CORRUPT_DICTIONARIES {
        let path = dir.path().join(case.file);
        std::fs::write(&path, (case.corrupt)(&bytes)).unwrap();
        let err = fails(bin().arg("inspect").arg(&path));
        assert!(
            case.names.iter().all(|n| err.contains(n)),
            "{}: {err}",
            case.what
        );
    }
}

/// A bad SAELens checkpoint: what is wrong with it, the folder it is written to, how (nothing, for
/// a folder that does not exist), and what the import's message must name.
struct BadCheckpoint {
    what: &'static str,
    folder: &'static str,
    write: fn(&Path),
    names: &'static [&'static str],
}

/// A valid checkpoint in `ckpt` whose weights file is then replaced by `corrupt` of its bytes.
fn with_weights(ckpt: &Path, corrupt: fn(Vec<u8>) -> Vec<u8>) {
    write_saelens(ckpt, &cfg(), &tensors(16, 40), Dtype::F32);
    let w = ckpt.join("sae_weights.safetensors");
    std::fs::write(&w, corrupt(std::fs::read(&w).unwrap())).unwrap();
}

const BAD_CHECKPOINTS: [BadCheckpoint; 8] = [
    BadCheckpoint {
        what: "truncated safetensors",
        folder: "truncated",
        write: |ckpt| with_weights(ckpt, |bytes| bytes[..bytes.len() - 100].to_vec()),
        names: &["sae_weights.safetensors", "not a valid safetensors"],
    },
    BadCheckpoint {
        what: "a header claiming a huge tensor in a tiny file",
        folder: "huge",
        write: |ckpt| {
            with_weights(ckpt, |_| {
                let header = br#"{"W_enc":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}"#;
                let mut f = (header.len() as u64).to_le_bytes().to_vec();
                f.extend_from_slice(header);
                f.extend_from_slice(&[0u8; 64]);
                f
            })
        },
        names: &["sae_weights.safetensors"],
    },
    BadCheckpoint {
        what: "a config key missing",
        folder: "no_d_sae",
        write: |ckpt| {
            let mut c = cfg();
            c.as_object_mut().unwrap().remove("d_sae");
            write_saelens(ckpt, &c, &tensors(16, 40), Dtype::F32);
        },
        names: &["cfg.json", "`d_sae` is missing"],
    },
    BadCheckpoint {
        what: "an unknown architecture",
        folder: "hyperbolic",
        write: |ckpt| {
            let mut c = cfg();
            c["architecture"] = json!("hyperbolic");
            write_saelens(ckpt, &c, &tensors(16, 40), Dtype::F32);
        },
        names: &["cfg.json", "`architecture` = `hyperbolic` is unknown"],
    },
    BadCheckpoint {
        what: "a config that is not JSON",
        folder: "not_json",
        write: |ckpt| {
            write_saelens(ckpt, &cfg(), &tensors(16, 40), Dtype::F32);
            std::fs::write(ckpt.join("cfg.json"), "{ not json").unwrap();
        },
        names: &["not valid JSON"],
    },
    BadCheckpoint {
        what: "a decoder wider than the config's d_in",
        folder: "wide_decoder",
        write: |ckpt| {
            let mut t = tensors(16, 40);
            t.insert("W_dec".into(), Rng::new(1).normal(&[40, 17], 0.3));
            write_saelens(ckpt, &cfg(), &t, Dtype::F32);
        },
        names: &["sae_weights.safetensors", "`W_dec` has shape [40, 17]"],
    },
    BadCheckpoint {
        what: "a missing tensor",
        folder: "no_b_enc",
        write: |ckpt| {
            let mut t = tensors(16, 40);
            t.remove("b_enc");
            write_saelens(ckpt, &cfg(), &t, Dtype::F32);
        },
        names: &["`b_enc` is missing"],
    },
    BadCheckpoint {
        what: "a folder that does not exist",
        folder: "nowhere",
        write: |_| {},
        names: &["nowhere", "does not exist"],
    },
];

#[test]
fn bad_checkpoints_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    for case in &BAD_CHECKPOINTS {
        let ckpt = dir.path().join(case.folder);
        (case.write)(&ckpt);
        let err = fails(&mut import(&ckpt, &out));
        assert!(
            case.names.iter().all(|n| err.contains(n)),
            "{}: {err}",
            case.what
        );
    }
}

/// A bad activation file: what is wrong with it, its path, how it is written, and what
/// `encode`'s message must name.
struct BadActivations {
    what: &'static str,
    file: &'static str,
    write: fn(&Path),
    names: &'static [&'static str],
}

/// An int32 `.npy` file of 2 × 16 zeros.
fn int32_npy() -> Vec<u8> {
    npy_bytes("<i4", (2, 16), &[0u8; 2 * 16 * 4])
}

const BAD_ACTIVATIONS: [BadActivations; 4] = [
    BadActivations {
        what: "rows wider than the dictionary's input",
        file: "wide.npy",
        write: |p| tiller_export::npy::write(p, &ndarray::Array2::<f32>::ones((3, 17))).unwrap(),
        names: &["wide.npy", "width 17", "width 16"],
    },
    BadActivations {
        what: "a NaN",
        file: "nan.npy",
        write: |p| {
            let mut x = ndarray::Array2::<f32>::ones((5, 16));
            x[[3, 2]] = f32::NAN;
            tiller_export::npy::write(p, &x).unwrap();
        },
        names: &["nan.npy", "row 3", "NaN"],
    },
    BadActivations {
        what: "an integer dtype",
        file: "ints.npy",
        write: |p| std::fs::write(p, int32_npy()).unwrap(),
        names: &["ints.npy", "<i4"],
    },
    BadActivations {
        what: "data shorter than the header's shape",
        file: "short/ints.npy",
        write: |p| {
            let bytes = int32_npy();
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, &bytes[..bytes.len() - 8]).unwrap();
        },
        names: &["ints.npy"],
    },
];

#[test]
fn bad_activation_files() {
    let dir = tempfile::tempdir().unwrap();
    let dict = dictionary(dir.path());
    let out = dir.path().join("acts.npy");
    for case in &BAD_ACTIVATIONS {
        let x = dir.path().join(case.file);
        (case.write)(&x);
        let err = fails(
            bin()
                .arg("encode")
                .arg(&dict)
                .arg("--input")
                .arg(&x)
                .arg("--output")
                .arg(&out),
        );
        assert!(
            case.names.iter().all(|n| err.contains(n)),
            "{}: {err}",
            case.what
        );
    }
}

/// A `.npy` file's bytes, written by hand for dtypes ndarray-npy does not write (float16, int32).
fn npy_bytes(descr: &str, shape: (usize, usize), data: &[u8]) -> Vec<u8> {
    let mut h = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}), }}",
        shape.0, shape.1
    );
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn write_f16_npy(path: &Path, a: &ndarray::Array2<f32>) {
    let data: Vec<u8> = a
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    std::fs::write(path, npy_bytes("<f2", a.dim(), &data)).unwrap();
}

#[test]
fn f16_activations_are_widened() {
    let dir = tempfile::tempdir().unwrap();
    let dict = dictionary(dir.path());
    let x = Rng::new(3)
        .matrix(7, 16, 1.0)
        .mapv(|v| half::f16::from_f32(v).to_f32());
    let (p16, p32) = (dir.path().join("x16.npy"), dir.path().join("x32.npy"));
    write_f16_npy(&p16, &x);
    tiller_export::npy::write(&p32, &x).unwrap();
    for (input, out) in [(&p16, "a16.npy"), (&p32, "a32.npy")] {
        let st = bin()
            .arg("encode")
            .arg(&dict)
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(dir.path().join(out))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let a16 = tiller_export::npy::read_f32_dyn(&dir.path().join("a16.npy")).unwrap();
    let a32 = tiller_export::npy::read_f32_dyn(&dir.path().join("a32.npy")).unwrap();
    assert_eq!(a16.shape(), &[7, 40]);
    assert_eq!(
        a16, a32,
        "the same values in f16 and f32 files encode identically"
    );
}
