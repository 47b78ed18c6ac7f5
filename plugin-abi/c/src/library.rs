//! Calls about the library itself: its version, its build, the thread's last error.

use std::ffi::c_char;
use std::panic::catch_unwind;

use super::error::{LAST_ERROR, boundary, tiller_status};
use super::strings::{copy_out, write_out};

/// The library's version, a static NUL-terminated string (never freed). Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn tiller_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Writes build information as JSON (`version`, `onnxruntime`, `cuda`) into `buf`. Thread-safe.
///
/// # Safety
/// `buf` is NULL or valid for `len` bytes; `needed` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_build_info(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> tiller_status {
    boundary(|| {
        let info = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "onnxruntime": ::tiller_runtime::onnxruntime::ORT_VERSION,
            "cuda": false,
        });
        // SAFETY: forwarded from the caller.
        unsafe { write_out(&info.to_string(), buf, len, needed) }
    })
}

/// Copies the message of the last failed call on this thread into `buf` (empty after a success).
/// Thread-safe (each thread has its own message).
///
/// # Safety
/// `buf` is NULL or valid for `len` bytes; `needed` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_last_error(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> tiller_status {
    let msg = LAST_ERROR.with(|e| e.borrow().clone());
    // SAFETY: forwarded from the caller. No boundary: this must not overwrite the message.
    match catch_unwind(|| unsafe { copy_out(&msg, buf, len, needed) }) {
        Ok(s) => s,
        Err(_) => tiller_status::TILLER_PANIC,
    }
}
