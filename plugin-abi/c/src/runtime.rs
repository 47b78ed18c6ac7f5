//! The runtime handle: created from a config, reloaded, freed, and its metrics.

use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use ::tiller_runtime::Runtime;

use super::error::{boundary, fail, tiller_status};
use super::strings::{str_arg, write_out};

/// A runtime: a `tiller_runtime::Runtime` behind an `Arc`. Created by `tiller_runtime_new_*`, freed by
/// [`tiller_runtime_free`]. Thread-safe: share one handle between all of the host's threads.
#[derive(Debug)]
pub struct tiller_runtime {
    pub(crate) inner: Arc<Runtime>,
}

fn new_runtime(
    r: ::tiller_runtime::Result<Runtime>,
    out: *mut *mut tiller_runtime,
) -> tiller_status {
    match r {
        Ok(rt) => {
            let h = Box::new(tiller_runtime {
                inner: Arc::new(rt),
            });
            // SAFETY: `out` was checked non-NULL by the caller of this helper.
            unsafe { *out = Box::into_raw(h) };
            tiller_status::TILLER_OK
        }
        Err(e) => fail(e),
    }
}

/// Creates a runtime from the TOML config file at `path`; `*out` receives the handle (free it with
/// [`tiller_runtime_free`]). Thread-safe.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_runtime_new_from_file(
    path: *const c_char,
    out: *mut *mut tiller_runtime,
) -> tiller_status {
    boundary(|| {
        nonnull!(path, out);
        // SAFETY: checked non-NULL; NUL-terminated per the contract.
        let path = match unsafe { str_arg(path, "path") } {
            Ok(Some(p)) => p,
            Ok(None) => return tiller_status::TILLER_NULL_ARGUMENT,
            Err(s) => return s,
        };
        new_runtime(Runtime::from_config_file(path), out)
    })
}

/// Creates a runtime from a TOML config held in `toml`; relative paths in it resolve against
/// `base_dir` (NULL: the current directory). Thread-safe.
///
/// # Safety
/// `toml` is a NUL-terminated string; `base_dir` is NULL or one; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_runtime_new_from_toml(
    toml: *const c_char,
    base_dir: *const c_char,
    out: *mut *mut tiller_runtime,
) -> tiller_status {
    boundary(|| {
        nonnull!(toml, out);
        // SAFETY: checked non-NULL / NULL allowed; NUL-terminated per the contract.
        let (text, base) = match unsafe { (str_arg(toml, "toml"), str_arg(base_dir, "base_dir")) } {
            (Ok(Some(t)), Ok(b)) => (t, b),
            (Err(s), _) | (_, Err(s)) => return s,
            (Ok(None), _) => return tiller_status::TILLER_NULL_ARGUMENT,
        };
        // A config in memory anchors its relative paths on a virtual file in `base_dir`.
        let anchor = base.map(|b| Path::new(b).join("<config>"));
        new_runtime(
            ::tiller_runtime::config::Config::parse(text, anchor.as_deref()).and_then(Runtime::new),
            out,
        )
    })
}

/// Frees a runtime handle (NULL is ignored). Steps still open keep the runtime alive until closed.
/// Not thread-safe with other calls on the same handle.
///
/// # Safety
/// `rt` is NULL or a handle from `tiller_runtime_new_*`, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_runtime_free(rt: *mut tiller_runtime) {
    if !rt.is_null() {
        // SAFETY: a handle from Box::into_raw, freed once per the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(rt) })));
    }
}

/// Reloads the config (from `path`, or NULL for the file the runtime was built from). On failure
/// the running state is untouched. Thread-safe.
///
/// # Safety
/// `rt` is a live handle; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_runtime_reload(
    rt: *const tiller_runtime,
    path: *const c_char,
) -> tiller_status {
    boundary(|| {
        nonnull!(rt);
        // SAFETY: checked non-NULL; a live handle per the contract.
        let rt = unsafe { &*rt };
        // SAFETY: NULL allowed; NUL-terminated per the contract.
        match unsafe { str_arg(path, "path") } {
            Ok(p) => rt
                .inner
                .reload(p.map(Path::new))
                .map_or_else(fail, |()| tiller_status::TILLER_OK),
            Err(s) => s,
        }
    })
}

/// Writes the Prometheus text exposition of the runtime's metrics into `buf`. Thread-safe.
/// Every step closed before the call is counted in it; a step still open on another thread may
/// show up in a later call (its per-feature series within 10 ms of its close).
///
/// # Safety
/// `rt` is a live handle; `buf` is NULL or valid for `len` bytes; `needed` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_metrics_text(
    rt: *const tiller_runtime,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> tiller_status {
    boundary(|| {
        nonnull!(rt);
        // SAFETY: checked non-NULL; a live handle per the contract.
        let rt = unsafe { &*rt };
        // SAFETY: forwarded from the caller.
        unsafe { write_out(&rt.inner.metrics_text(), buf, len, needed) }
    })
}
