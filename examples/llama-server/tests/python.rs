//! The server's end-to-end tests, in Python with the official `openai` client
//! (`examples/llama-server/tests/test_*.py`): this runs them with pytest against the server built
//! here, on the models `examples/llama-cpp/convert.py` writes. See the module docstrings there for
//! what each checks.
//!
//! They need llama.cpp (built once by `examples/llama-cpp/provision.sh`: cmake and a C++
//! compiler) and the Python of `scripts/test` (`.venv`, or `$TILLER_PYTHON`: numpy, pytest,
//! openai, gguf). Without cmake the test says so and passes, unless `TILLER_REQUIRE_LLAMA=1` (CI
//! sets it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn required() -> bool {
    std::env::var("TILLER_REQUIRE_LLAMA").is_ok_and(|v| v == "1")
}

/// Builds the adapter and the server's host library; returns the library's path.
fn build_host_library(root: &Path) -> PathBuf {
    let out = Command::new("bash")
        .arg(root.join("examples/llama-server/build.sh"))
        .env("TILLER_PYTHON", tiller_llama_cpp::python())
        .output()
        .expect("running examples/llama-server/build.sh");
    assert!(
        out.status.success(),
        "examples/llama-server/build.sh failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build.sh printed nothing")
            .trim(),
    )
}

#[test]
fn openai_client_against_the_server() {
    if !tiller_llama_cpp::can_build() && std::env::var_os("TILLER_LLAMA_DIR").is_none() {
        assert!(
            !required(),
            "TILLER_REQUIRE_LLAMA=1 but cmake or a C/C++ compiler is missing"
        );
        eprintln!("skipped: llama.cpp cannot be built here (needs cmake, cc and c++)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().expect("the workspace root");
    let lib = build_host_library(&root);
    // The embeddings tests convert all-MiniLM-L6-v2: fetched here on a machine that has no copy.
    let minilm = tiller_minilm::provision::model_dir().expect("all-MiniLM-L6-v2");
    let target = lib
        .parent()
        .and_then(Path::parent)
        .expect("the target folder");
    let python = std::env::var("TILLER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".venv/bin/python"));
    let status = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "examples/llama-server/tests",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .current_dir(&root)
        .env(
            "TILLER_LLAMA_SERVER",
            env!("CARGO_BIN_EXE_tiller-llama-server"),
        )
        .env("TILLER_LLAMA_HOST_LIB", &lib)
        .env("TILLER_LIB", target.join("debug/libtiller.so"))
        .env("TILLER_EXPORT", target.join("debug/tiller-export"))
        .env("TILLER_PYTHON", &python)
        .env("TILLER_MINILM_DIR", &minilm)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); scripts/test makes .venv",
                python.display()
            )
        });
    assert!(
        status.success(),
        "pytest examples/llama-server/tests failed ({status})"
    );
}
