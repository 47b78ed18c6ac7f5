//! `tiller-export setup`: download ONNX Runtime into the cache (done on first use otherwise) and
//! print its path.

use anyhow::Result;

/// Runs the command.
pub fn run() -> Result<()> {
    let p = tiller_runtime::onnxruntime::resolve_library(None)?;
    tiller_runtime::onnxruntime::init(Some(&p))?;
    println!("{}", p.display());
    Ok(())
}
