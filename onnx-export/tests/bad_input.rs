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

#[test]
fn external_data_escaping_its_folder_is_refused_before_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let good = dictionary(dir.path());
    let mut model =
        onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(&good).unwrap()).unwrap();
    // Point W_enc at a file outside the model's folder.
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
    entry.value = "../../etc/passwd".into();
    t.external_data = vec![entry];
    let evil = dir.path().join("evil.onnx");
    std::fs::write(&evil, model.write_to_bytes().unwrap()).unwrap();

    let err = fails(bin().arg("inspect").arg(&evil));
    assert!(
        err.contains("evil.onnx") && err.contains("../../etc/passwd") && err.contains("climbs out"),
        "{err}"
    );
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
    // The runtime API refuses it too, at validation, before a session exists.
    let e = tiller_runtime::DictionaryFile::open(&evil)
        .unwrap_err()
        .to_string();
    assert!(e.contains("external data location"), "{e}");

    // An absolute path and a symlink that leads outside are refused the same way.
    let t = model
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "W_enc")
        .unwrap();
    t.external_data[0].value = "/etc/passwd".into();
    std::fs::write(&evil, model.write_to_bytes().unwrap()).unwrap();
    assert!(fails(bin().arg("inspect").arg(&evil)).contains("is absolute"));
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.data")).unwrap();
    let t = model
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "W_enc")
        .unwrap();
    t.external_data[0].value = "link.data".into();
    std::fs::write(&evil, model.write_to_bytes().unwrap()).unwrap();
    assert!(fails(bin().arg("inspect").arg(&evil)).contains("outside the model's folder"));
}

#[test]
fn corrupt_dictionary_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dictionary(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(bin().arg("inspect").arg(&cut));
    assert!(
        err.contains("cut.onnx") && err.contains("not a valid ONNX protobuf"),
        "{err}"
    );

    // A valid ONNX model that is not a Tiller dictionary.
    let mut model = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).unwrap();
    model.metadata_props.retain(|p| p.key != "tiller.format");
    let foreign = dir.path().join("foreign.onnx");
    std::fs::write(&foreign, model.write_to_bytes().unwrap()).unwrap();
    assert!(fails(bin().arg("inspect").arg(&foreign)).contains("not a Tiller dictionary"));

    // Metadata that disagrees with the weights.
    let mut model = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).unwrap();
    for p in &mut model.metadata_props {
        if p.key == "tiller.d_sae" {
            p.value = "41".into();
        }
    }
    let lying = dir.path().join("lying.onnx");
    std::fs::write(&lying, model.write_to_bytes().unwrap()).unwrap();
    let err = fails(bin().arg("inspect").arg(&lying));
    assert!(err.contains("lying.onnx") && err.contains("41"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), &cfg(), &tensors(16, 40));
    let w = ckpt.join("sae_weights.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    let err = fails(&mut import(&ckpt, &dir.path().join("o.onnx")));
    assert!(
        err.contains("sae_weights.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
    // A header claiming a huge tensor in a tiny file.
    let header =
        br#"{"W_enc":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&[0u8; 64]);
    std::fs::write(&w, f).unwrap();
    let err = fails(&mut import(&ckpt, &dir.path().join("o.onnx")));
    assert!(err.contains("sae_weights.safetensors"), "{err}");
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg();
    c.as_object_mut().unwrap().remove("d_sae");
    let ckpt = checkpoint(dir.path(), &c, &tensors(16, 40));
    let err = fails(&mut import(&ckpt, &dir.path().join("o.onnx")));
    assert!(
        err.contains("cfg.json") && err.contains("`d_sae` is missing"),
        "{err}"
    );

    let mut c = cfg();
    c["architecture"] = json!("hyperbolic");
    let ckpt = checkpoint(dir.path(), &c, &tensors(16, 40));
    let err = fails(&mut import(&ckpt, &dir.path().join("o.onnx")));
    assert!(
        err.contains("cfg.json") && err.contains("`architecture` = `hyperbolic` is unknown"),
        "{err}"
    );

    std::fs::write(ckpt.join("cfg.json"), "{ not json").unwrap();
    assert!(fails(&mut import(&ckpt, &dir.path().join("o.onnx"))).contains("not valid JSON"));
}

#[test]
fn shapes_that_disagree_with_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tensors(16, 40);
    t.insert("W_dec".into(), Rng::new(1).normal(&[40, 17], 0.3));
    let ckpt = checkpoint(dir.path(), &cfg(), &t);
    let err = fails(&mut import(&ckpt, &dir.path().join("o.onnx")));
    assert!(
        err.contains("sae_weights.safetensors") && err.contains("`W_dec` has shape [40, 17]"),
        "{err}"
    );

    let mut t = tensors(16, 40);
    t.remove("b_enc");
    let ckpt = checkpoint(dir.path(), &cfg(), &t);
    let err = fails(&mut import(&ckpt, &dir.path().join("o.onnx")));
    assert!(err.contains("`b_enc` is missing"), "{err}");

    let err = fails(&mut import(
        &dir.path().join("nowhere"),
        &dir.path().join("o.onnx"),
    ));
    assert!(
        err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn bad_activation_files() {
    let dir = tempfile::tempdir().unwrap();
    let dict = dictionary(dir.path());
    let out = dir.path().join("acts.npy");
    let encode = |x: &Path| {
        let mut c = bin();
        c.arg("encode")
            .arg(&dict)
            .arg("--input")
            .arg(x)
            .arg("--output")
            .arg(&out);
        c
    };
    let wide = dir.path().join("wide.npy");
    tiller_export::npy::write(&wide, &ndarray::Array2::<f32>::ones((3, 17))).unwrap();
    let err = fails(&mut encode(&wide));
    assert!(
        err.contains("wide.npy") && err.contains("width 17") && err.contains("width 16"),
        "{err}"
    );

    let mut x = ndarray::Array2::<f32>::ones((5, 16));
    x[[3, 2]] = f32::NAN;
    let nan = dir.path().join("nan.npy");
    tiller_export::npy::write(&nan, &x).unwrap();
    let err = fails(&mut encode(&nan));
    assert!(
        err.contains("nan.npy") && err.contains("row 3") && err.contains("NaN"),
        "{err}"
    );

    let ints = dir.path().join("ints.npy");
    let bytes = npy_bytes("<i4", (2, 16), &[0u8; 2 * 16 * 4]);
    std::fs::write(&ints, &bytes).unwrap();
    let err = fails(&mut encode(&ints));
    assert!(err.contains("ints.npy") && err.contains("<i4"), "{err}");

    std::fs::write(&ints, &bytes[..bytes.len() - 8]).unwrap();
    let err = fails(&mut encode(&ints));
    assert!(err.contains("ints.npy"), "{err}");
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
