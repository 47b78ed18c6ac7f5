//! Finding, provisioning and loading the ONNX Runtime shared library.
//!
//! Tiller loads `libonnxruntime` at run time (ort's `load-dynamic`), from the PyPI wheel
//! `onnxruntime==1.31.1`. The library is searched, in order, at:
//! 1. the path given in the config (`[runtime] onnxruntime = "…"`) or to [`init`];
//! 2. `ORT_DYLIB_PATH`;
//! 3. the cached copy under `$TILLER_CACHE_DIR` (default `$XDG_CACHE_HOME/tiller` or
//!    `~/.cache/tiller`), which is downloaded from PyPI on first use (with `pip download`, the wheel's
//!    SHA-256 pinned) unless `TILLER_NO_DOWNLOAD=1`.
//!
//! A process loads one copy of ONNX Runtime: the first successful [`init`] wins.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The ONNX Runtime release Tiller is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";
/// The file name of the library inside the wheel's `onnxruntime/capi/` folder.
pub const LIBRARY_NAME: &str = "libonnxruntime.so.1.31.1";

/// The pinned wheels: (target arch, pip platform tag, wheel SHA-256).
const WHEELS: &[(&str, &str, &str)] = &[
    (
        "x86_64",
        "manylinux_2_28_x86_64",
        "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    ),
    (
        "aarch64",
        "manylinux_2_28_aarch64",
        "da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3",
    ),
];

fn how_to_fix() -> String {
    format!(
        "get it with `pip download --no-deps onnxruntime=={ORT_VERSION}`, unzip the wheel, and set \
         ORT_DYLIB_PATH (or `[runtime] onnxruntime` in the config) to its onnxruntime/capi/{LIBRARY_NAME}; \
         or run `tiller-export setup` to download it into the cache"
    )
}

/// The folder Tiller caches downloaded files in.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TILLER_CACHE_DIR").filter(|s| !s.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(dir).join("tiller");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(home).join(".cache").join("tiller");
    }
    std::env::temp_dir().join("tiller-cache")
}

/// Where the provisioned library lives in the cache.
pub fn cached_library_path() -> PathBuf {
    cache_dir()
        .join(format!("onnxruntime-{ORT_VERSION}"))
        .join(LIBRARY_NAME)
}

/// Returns the cached library, downloading the pinned wheel from PyPI first if it is not there.
///
/// Safe to call from several processes at once: a file lock serialises the download and the
/// library is moved into place atomically.
pub fn provision() -> Result<PathBuf> {
    let target = cached_library_path();
    if target.is_file() {
        return Ok(target);
    }
    if std::env::var_os("TILLER_NO_DOWNLOAD").is_some_and(|v| v == "1") {
        return Err(Error::OnnxRuntime(format!(
            "the library is not at {} and TILLER_NO_DOWNLOAD=1 forbids downloading it; {}",
            target.display(),
            how_to_fix()
        )));
    }
    let arch = std::env::consts::ARCH;
    let Some(&(_, platform, wheel_sha)) = WHEELS.iter().find(|(a, _, _)| *a == arch) else {
        return Err(Error::OnnxRuntime(format!(
            "no pinned onnxruntime wheel for the architecture {arch}; {}",
            how_to_fix()
        )));
    };
    let dir = target
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(cache_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    if target.is_file() {
        return Ok(target);
    }

    let work = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = download_and_extract(&work, platform, wheel_sha, &target);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(target)
}

fn download_and_extract(work: &Path, platform: &str, wheel_sha: &str, target: &Path) -> Result<()> {
    let req = work.join("requirements.txt");
    std::fs::write(
        &req,
        format!("onnxruntime=={ORT_VERSION} --hash=sha256:{wheel_sha}\n"),
    )
    .map_err(|e| Error::io(&req, e))?;
    let python = std::env::var("TILLER_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
        ])
        .args([
            "--platform",
            platform,
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
        ])
        .arg("-r")
        .arg(&req)
        .arg("-d")
        .arg(work)
        .output()
        .map_err(|e| {
            Error::OnnxRuntime(format!(
                "cannot run `{python} -m pip` to download onnxruntime=={ORT_VERSION}: {e}; {}",
                how_to_fix()
            ))
        })?;
    if !output.status.success() {
        return Err(Error::OnnxRuntime(format!(
            "`pip download onnxruntime=={ORT_VERSION}` failed: {}; {}",
            String::from_utf8_lossy(&output.stderr).trim(),
            how_to_fix()
        )));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::OnnxRuntime(format!("pip left no wheel in {}", work.display())))?;

    let bytes = std::fs::read(&wheel).map_err(|e| Error::io(&wheel, e))?;
    let digest = hex(&Sha256::digest(&bytes));
    if digest != wheel_sha {
        return Err(Error::OnnxRuntime(format!(
            "{} has SHA-256 {digest}, expected {wheel_sha}",
            wheel.display()
        )));
    }
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
        Error::OnnxRuntime(format!("{} is not a zip archive: {e}", wheel.display()))
    })?;
    let member = format!("onnxruntime/capi/{LIBRARY_NAME}");
    let mut entry = archive
        .by_name(&member)
        .map_err(|e| Error::OnnxRuntime(format!("{} has no {member}: {e}", wheel.display())))?;
    let mut lib = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut lib).map_err(|e| {
        Error::OnnxRuntime(format!(
            "cannot unpack {member} from {}: {e}",
            wheel.display()
        ))
    })?;
    let tmp = work.join(LIBRARY_NAME);
    std::fs::write(&tmp, &lib).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Picks the library to load: `explicit`, then `ORT_DYLIB_PATH`, then the provisioned copy.
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf> {
    let check = |p: PathBuf, from: &str| -> Result<PathBuf> {
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::OnnxRuntime(format!(
                "{from} names {}, which is not a file; {}",
                p.display(),
                how_to_fix()
            )))
        }
    };
    if let Some(p) = explicit {
        return check(p.to_path_buf(), "the config");
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|s| !s.is_empty()) {
        return check(PathBuf::from(p), "ORT_DYLIB_PATH");
    }
    provision()
}

struct Loaded {
    path: PathBuf,
    env: ort::environment::Environment,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime once per process and returns its environment.
///
/// A library older than 1.31 is refused with an error (ort would otherwise panic on first use). A
/// later call that names a different file than the one loaded is an error: a process holds one copy.
pub fn init(explicit: Option<&Path>) -> Result<ort::environment::Environment> {
    if let Some(l) = LOADED.get() {
        return check_same(l, explicit);
    }
    let _guard = LOADING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = LOADED.get() {
        return check_same(l, explicit);
    }
    let path = resolve_library(explicit)?;
    let path = path.canonicalize().map_err(|e| Error::io(&path, e))?;
    let builder = ort::init_from(&path).map_err(|e| {
        Error::OnnxRuntime(format!(
            "cannot load {}: {e}; {}",
            path.display(),
            how_to_fix()
        ))
    })?;
    let env = builder
        .with_name("tiller")
        .with_telemetry(false)
        .build()
        .map_err(|e| Error::ort("creating the environment", e))?;
    let loaded = LOADED.get_or_init(|| Loaded { path, env });
    Ok(loaded.env.clone())
}

fn check_same(l: &Loaded, explicit: Option<&Path>) -> Result<ort::environment::Environment> {
    if let Some(p) = explicit {
        let p = p.canonicalize().map_err(|e| Error::io(p, e))?;
        if p != l.path {
            return Err(Error::OnnxRuntime(format!(
                "{} is requested but {} is already loaded in this process; a process loads one ONNX Runtime",
                p.display(),
                l.path.display()
            )));
        }
    }
    Ok(l.env.clone())
}

/// The path of the library this process loaded, if any.
pub fn loaded_library() -> Option<&'static Path> {
    LOADED.get().map(|l| l.path.as_path())
}
