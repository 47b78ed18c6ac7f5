//! The `torch.save` reader on checkpoints written by `tests/fixtures/make_torch_fixtures.py` with
//! the Python standard library alone (torch is not needed): every storage dtype, strided and
//! shared views, pickle protocols 2-5, both byte orders, nested containers and plain values, each
//! compared element for element with the values the script recorded; and hostile files (code in
//! the pickle, zip bombs, short storages, truncated or legacy files), each refused with a clear
//! error, without running anything or allocating without bound.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tiller_export::torch::{self, Dtype};

/// Runs the fixture script for `group` into a fresh temporary folder.
fn fixtures(group: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_torch_fixtures.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .arg(group)
        .output()
        .expect("python3 runs the fixture script");
    assert!(
        out.status.success(),
        "the fixture script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn reference(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every tensor, integer tensor and value the script recorded is read back exactly, and nothing
/// else is there.
fn check_against_reference(ckpt: &Path, reference_path: &Path) {
    let name = ckpt.display();
    let want = reference(reference_path);
    let mut ck = torch::load(ckpt).unwrap_or_else(|e| panic!("{name}: {e}"));
    let tensors = want["tensors"].as_object().unwrap();
    let empty = serde_json::Map::new();
    let ints = want
        .get("ints")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut expected: Vec<&str> = tensors
        .keys()
        .chain(ints.keys())
        .map(String::as_str)
        .collect();
    expected.sort_unstable();
    assert_eq!(ck.names(), expected, "{name}: tensor names");
    for (t, spec) in tensors {
        let shape: Vec<usize> = spec["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert!(ck.info(t).unwrap().dtype.is_float(), "{name}: `{t}`");
        let a = ck.take(t, &shape).unwrap_or_else(|e| panic!("{name}: {e}"));
        let data: Vec<f32> = spec["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got: Vec<f32> = a.iter().copied().collect();
        assert_eq!(got, data, "{name}: values of `{t}`");
    }
    for (t, v) in ints {
        let got: Vec<i64> = ck.take_ints(t).unwrap().iter().copied().collect();
        let want: Vec<i64> = match v {
            Value::Array(a) => a.iter().map(|x| x.as_i64().unwrap()).collect(),
            x => vec![x.as_i64().unwrap()],
        };
        assert_eq!(got, want, "{name}: integer tensor `{t}`");
    }
    assert!(ck.names().is_empty());
    if let Some(values) = want.get("values").and_then(Value::as_object)
        && !values.is_empty()
    {
        assert_eq!(ck.values.len(), values.len(), "{name}: {:?}", ck.values);
        for (k, v) in values {
            assert_eq!(ck.value(k), Some(v), "{name}: value `{k}`");
        }
    }
}

#[test]
fn reads_every_dtype_view_and_value_in_protocols_2_to_5() {
    let dir = fixtures("pt");
    for p in 2..=5 {
        let ckpt = dir.path().join(format!("pt/protocol{p}.pt"));
        check_against_reference(&ckpt, &dir.path().join(format!("pt/protocol{p}.ref.json")));
        let mut ck = torch::load(&ckpt).unwrap();
        assert_eq!(ck.int("k").unwrap(), Some(7));
        assert_eq!(ck.scalar("scalar").unwrap(), Some(0.75));
        assert_eq!(ck.scalar("lr").unwrap(), Some(0.0004));
        assert_eq!(ck.int("step").unwrap(), Some(1000));
        assert!(ck.has("k"), "int() reads without taking");
        assert_eq!(ck.shape("empty"), Some(&[0, 3][..]));
        // The two tied views share one storage: one is the other's transpose.
        let a = ck.take2("tied.a", 3, 4).unwrap();
        let b = ck.take2("tied.b", 4, 3).unwrap();
        assert_eq!(a.t(), b.view());
        // Taking a matrix transposed gives the same as transposing it, for dense and strided
        // layouts alike.
        let w = ck.take2("w32", 3, 4).unwrap();
        let mut again = torch::load(&ckpt).unwrap();
        assert_eq!(again.take2_transposed("w32", 3, 4).unwrap(), w.t());
        let v = again.take2("t_view", 3, 4).unwrap();
        let mut third = torch::load(&ckpt).unwrap();
        assert_eq!(third.take2_transposed("t_view", 3, 4).unwrap(), v.t());
        let o = again.take2("offset_view", 3, 5).unwrap();
        assert_eq!(third.take2_transposed("offset_view", 3, 5).unwrap(), o.t());
    }
}

#[test]
fn reads_byte_orders_archive_names_and_bare_tensors() {
    let dir = fixtures("pt");
    for name in ["bigendian", "archive_name", "no_byteorder", "bare_tensor"] {
        check_against_reference(
            &dir.path().join(format!("pt/{name}.pt")),
            &dir.path().join(format!("pt/{name}.ref.json")),
        );
    }
}

#[test]
fn load_reads_the_pickle_and_take_reads_the_storage() {
    let dir = fixtures("pt");
    let ck = torch::load(&dir.path().join("pt/protocol2.pt")).unwrap();
    let info = |n: &str| ck.info(n).unwrap();
    assert_eq!(info("w32").shape, vec![3, 4]);
    assert_eq!(info("w32").dtype, Dtype::F32);
    assert_eq!(info("wbf").dtype, Dtype::BF16);
    assert_eq!(info("w16").dtype, Dtype::F16);
    assert_eq!(info("counts").dtype, Dtype::I64);
    assert_eq!(info("flags").dtype, Dtype::Bool);
    assert_eq!(info("t_view").shape, vec![3, 4]);
    assert_eq!(ck.value("name"), Some(&Value::from("sae")));
    // A file whose storage is bad opens: only the pickle is read until a tensor is taken.
    let bad = fixtures("hostile");
    let path = bad.path().join("hostile/short_storage.pt");
    let mut ck = torch::load(&path).unwrap();
    assert_eq!(ck.shape("w"), Some(&[10, 10][..]));
    let e = ck.take2("w", 10, 10).unwrap_err().to_string();
    assert!(
        e.contains("short_storage.pt") && e.contains("shorter than its tensors claim"),
        "{e}"
    );
}

#[test]
fn take_names_the_file_and_tensor() {
    let dir = fixtures("pt");
    let path = dir.path().join("pt/protocol2.pt");
    let mut ck = torch::load(&path).unwrap();
    let e = ck.take("w32", &[4, 3]).unwrap_err().to_string();
    assert!(
        e.contains("protocol2.pt") && e.contains("`w32`") && e.contains("[3, 4]"),
        "{e}"
    );
    let e = ck.take_any("nope").unwrap_err().to_string();
    assert!(e.contains("`nope` is missing") && e.contains("w16"), "{e}");
    let e = ck.take_any("counts").unwrap_err().to_string();
    assert!(e.contains("torch.int64, not floats"), "{e}");
    let e = ck.take_ints("w16").unwrap_err().to_string();
    assert!(e.contains("not integers"), "{e}");
    ck.strip_prefix("nested");
    assert!(ck.has("inner.deep"));
    assert_eq!(ck.int("n").unwrap(), Some(3));
    assert!(!ck.has("w32"));
}

/// Loads a hostile file: it must fail with a message containing `needle` and naming the file.
fn refused(dir: &Path, file: &str, needle: &str) -> String {
    let path: PathBuf = dir.join("hostile").join(file);
    let read_all = || -> tiller_export::Result<()> {
        let mut ck = torch::load(&path)?;
        for name in ck.names().iter().map(|n| n.to_string()).collect::<Vec<_>>() {
            if ck.info(&name).unwrap().dtype.is_float() {
                ck.take_any(&name)?;
            } else {
                ck.take_ints(&name)?;
            }
        }
        Ok(())
    };
    let e = match read_all() {
        Ok(()) => panic!("{file} was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(file),
        "{file}: the error does not name the file: {e}"
    );
    assert!(e.contains(needle), "{file}: expected `{needle}` in: {e}");
    println!("{file}: {e}");
    e
}

#[test]
fn refuses_code_in_the_pickle_without_running_it() {
    let dir = fixtures("hostile");
    let d = dir.path();
    refused(d, "os_system.pt", "refuses to load `os.system`");
    assert!(!d.join("hostile/pwned_os_system").exists());
    refused(d, "eval.pt", "refuses to load `builtins.eval`");
    assert!(!d.join("hostile/pwned_eval").exists());
    // A payload among the plain values of a real state dict: pickle names os.system `posix.system`.
    refused(d, "nested_payload.pt", "refuses to load `posix.system`");
    assert!(!d.join("hostile/pwned_nested").exists());
    refused(d, "os_system_bare.pkl", "bare pickle");
    assert!(!d.join("hostile/pwned_os_bare").exists());
    assert!(torch::load(&d.join("hostile/os_system.pt")).is_err());
}

#[test]
fn refuses_zip_bombs_without_inflating_them() {
    let dir = fixtures("hostile");
    let d = dir.path();
    refused(d, "bomb_ratio.pt", "zip bomb");
    refused(d, "bomb_lying.pt", "declared");
    refused(d, "bomb_declared.pt", "more than the whole file");
}

#[test]
fn refuses_storages_and_views_that_do_not_fit() {
    let dir = fixtures("hostile");
    let d = dir.path();
    refused(d, "short_storage.pt", "shorter than its tensors claim");
    refused(d, "view_past_storage.pt", "past the 10 elements");
    refused(d, "expanded.pt", "would take");
    refused(d, "missing_storage.pt", "is missing");
}

#[test]
fn refuses_broken_and_foreign_files() {
    let dir = fixtures("hostile");
    let d = dir.path();
    refused(d, "truncated.pt", "not a readable zip archive");
    refused(d, "legacy.pt", "legacy torch.save file");
    refused(d, "notes.pt", "not a torch.save checkpoint");
    refused(d, "no_data_pkl.pt", "without `<name>/data.pkl`");
    refused(d, "huge_string.pt", "truncated");
    refused(d, "laughs.pt", "too large to flatten");
    refused(d, "deep.pt", "nested more than 64 deep");
    assert!(!torch::is_archive(&d.join("hostile/legacy.pt")));
    assert!(torch::is_archive(&d.join("hostile/os_system.pt")));
}
