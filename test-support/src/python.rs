//! The Python reference runner: a script run with `$TILLER_PYTHON`, JSON in on stdin, JSON out on
//! stdout.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// `$TILLER_PYTHON`, else `fallback` (the caller's default: `python3`, or the workspace's
/// `.venv/bin/python` where `scripts/test` installs what a test needs).
pub fn python(fallback: impl Into<PathBuf>) -> PathBuf {
    std::env::var_os("TILLER_PYTHON").map_or_else(|| fallback.into(), PathBuf::from)
}

/// Runs `script` with `python`, `input` on stdin; its stdout as JSON. `needs` says in the panic
/// messages what that Python must have installed (and where it comes from).
pub fn run_python_json(python: &Path, script: &Path, input: &Value, needs: &str) -> Value {
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); {needs}, or set TILLER_PYTHON",
                python.display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} {} failed ({needs}): {}",
        python.display(),
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
