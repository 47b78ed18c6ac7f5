//! Tiller attached to llama.cpp: the C adapter (`tiller_llama.h`, `tiller_llama.c`) hooks the
//! residual stream through llama.cpp's per-node eval callback, and `python/tiller_llama.py` does
//! the same for `llama-cpp-python`. This crate builds them for the tests: llama.cpp comes from the
//! pinned `llama-cpp-python` sdist on PyPI, built once with cmake (`provision.sh`), and the
//! adapter is compiled against it and `libtiller` (`build.sh`). See
//! docs/integrations/llama-cpp.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// This example's folder.
pub fn dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python that runs the converters and references: `$TILLER_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("TILLER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether llama.cpp can be built here (cmake and a C compiler are on the PATH).
pub fn can_build() -> bool {
    ["cmake", "cc", "c++"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn run_script(script: &Path, args: &[&str]) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .env("TILLER_PYTHON", python())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout).context("the script's output is not UTF-8")?;
    let last = stdout
        .lines()
        .last()
        .context("the script printed no folder")?;
    Ok(PathBuf::from(last.trim()))
}

/// The provisioned llama.cpp: `$TILLER_LLAMA_DIR`, else `provision.sh`'s cached build (built on
/// first use, about 8 minutes on 2 cores). Holds `include/`, `lib/` and `wheel/`.
pub fn llama_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TILLER_LLAMA_DIR") {
        return Ok(PathBuf::from(d));
    }
    run_script(&dir().join("provision.sh"), &[])
}

/// Builds the adapter and `tiller-llama-run` (debug `libtiller`); returns their folder.
pub fn build() -> Result<PathBuf> {
    llama_dir()?;
    run_script(&dir().join("build.sh"), &[])
}

/// Converts the all-MiniLM-L6-v2 folder `model_dir` to GGUF at `out` (`convert.py minilm`).
pub fn convert_minilm(model_dir: &Path, out: &Path) -> Result<()> {
    let status = Command::new(python())
        .arg(dir().join("convert.py"))
        .arg("minilm")
        .arg("--model-dir")
        .arg(model_dir)
        .arg("--out")
        .arg(out)
        .status()
        .context("running convert.py")?;
    if !status.success() {
        bail!("convert.py minilm failed ({status})");
    }
    Ok(())
}
