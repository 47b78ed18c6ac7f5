//! Loading ONNX Runtime: a missing file, a file that is not a library, and a library of the wrong
//! version each give a clear error that says how to fix it, never a panic; afterwards the right
//! library still loads. (Its own test binary: a process loads one ONNX Runtime.)
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

/// Builds a shared library that exports `OrtGetApiBase` and claims to be ONNX Runtime `version`.
fn fake_onnxruntime(dir: &Path, version: &str) -> std::path::PathBuf {
    let src = dir.join("fake.c");
    std::fs::write(
        &src,
        format!(
            r#"#include <stddef.h>
#include <stdint.h>
typedef struct {{ const void* (*GetApi)(uint32_t); const char* (*GetVersionString)(void); }} OrtApiBase;
static const void* get_api(uint32_t v) {{ (void)v; return NULL; }}
static const char* version(void) {{ return "{version}"; }}
static const OrtApiBase base = {{ get_api, version }};
const OrtApiBase* OrtGetApiBase(void) {{ return &base; }}
"#
        ),
    )
    .unwrap();
    let lib = dir.join("libonnxruntime.so.fake");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    lib
}

#[test]
fn bad_libraries_are_clear_errors_and_the_right_one_still_loads() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("nope.so");
    let e = tiller_runtime::onnxruntime::init(Some(&missing))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nope.so") && e.contains("not a file") && e.contains("pip download"),
        "{e}"
    );

    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"this is not an ELF file").unwrap();
    let e = tiller_runtime::onnxruntime::init(Some(&garbage))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.so") && e.contains("cannot load") && e.contains("ORT_DYLIB_PATH"),
        "{e}"
    );

    let old = fake_onnxruntime(dir.path(), "1.20.0");
    let e = tiller_runtime::onnxruntime::init(Some(&old))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1.20.0") && e.contains("onnxruntime==1.31.1"),
        "{e}"
    );

    // Nothing above poisoned the process: the provisioned library loads.
    let good = tiller_runtime::onnxruntime::resolve_library(None).unwrap();
    tiller_runtime::onnxruntime::init(Some(&good)).unwrap();
    assert_eq!(
        tiller_runtime::onnxruntime::loaded_library(),
        Some(good.canonicalize().unwrap().as_path())
    );
    // Asking for another file once one is loaded is refused, not silently ignored.
    let e = tiller_runtime::onnxruntime::init(Some(&old))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already loaded"), "{e}");
}
