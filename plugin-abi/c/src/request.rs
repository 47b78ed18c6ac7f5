//! Requests: begun with a profile and overrides, summarised, ended.

use std::ffi::c_char;

use super::error::{boundary, fail, tiller_status};
use super::runtime::tiller_runtime;
use super::strings::{str_arg, write_out};

/// Begins request `id` with a steering profile (NULL: none) and per-request overrides as JSON
/// (NULL: none). Thread-safe.
///
/// # Safety
/// `rt` is a live handle; `profile` and `overrides_json` are NULL or NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_request_begin(
    rt: *const tiller_runtime,
    id: u64,
    profile: *const c_char,
    overrides_json: *const c_char,
) -> tiller_status {
    boundary(|| {
        nonnull!(rt);
        // SAFETY: checked non-NULL; a live handle per the contract.
        let rt = unsafe { &*rt };
        // SAFETY: NULL allowed; NUL-terminated per the contract.
        let (p, o) = match unsafe {
            (
                str_arg(profile, "profile"),
                str_arg(overrides_json, "overrides_json"),
            )
        } {
            (Ok(p), Ok(o)) => (p, o),
            (Err(s), _) | (_, Err(s)) => return s,
        };
        rt.inner
            .begin_request(id, p, o)
            .map_or_else(fail, |()| tiller_status::TILLER_OK)
    })
}

/// Writes the summary (JSON) of running request `id` into `buf`. Thread-safe.
///
/// # Safety
/// `rt` is a live handle; `buf` is NULL or valid for `len` bytes; `needed` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_request_summary(
    rt: *const tiller_runtime,
    id: u64,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> tiller_status {
    boundary(|| {
        nonnull!(rt);
        // SAFETY: checked non-NULL; a live handle per the contract.
        let rt = unsafe { &*rt };
        match rt.inner.request_summary(id) {
            // SAFETY: forwarded from the caller.
            Ok(s) => unsafe {
                write_out(
                    &serde_json::to_string(&s).unwrap_or_default(),
                    buf,
                    len,
                    needed,
                )
            },
            Err(e) => fail(e),
        }
    })
}

/// Ends request `id` and writes its summary (JSON) into `buf`. When `buf` is too small the request
/// is NOT ended: the size needed is in `*needed`; call again with a larger buffer. With `buf` NULL
/// and `len` 0 the request is ended without a summary. Thread-safe.
///
/// # Safety
/// `rt` is a live handle; `buf` is NULL or valid for `len` bytes; `needed` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_request_end(
    rt: *const tiller_runtime,
    id: u64,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> tiller_status {
    boundary(|| {
        nonnull!(rt);
        // SAFETY: checked non-NULL; a live handle per the contract.
        let rt = unsafe { &*rt };
        if !buf.is_null() || len > 0 {
            let summary = match rt.inner.request_summary(id) {
                Ok(s) => serde_json::to_string(&s).unwrap_or_default(),
                Err(e) => return fail(e),
            };
            if len < summary.len() + 1 || buf.is_null() {
                // SAFETY: forwarded from the caller; reports the size needed.
                return unsafe { write_out(&summary, std::ptr::null_mut(), len, needed) };
            }
            return match rt.inner.end_request(id) {
                // SAFETY: forwarded from the caller.
                Ok(s) => unsafe {
                    write_out(
                        &serde_json::to_string(&s).unwrap_or_default(),
                        buf,
                        len,
                        needed,
                    )
                },
                Err(e) => fail(e),
            };
        }
        rt.inner
            .end_request(id)
            .map_or_else(fail, |_| tiller_status::TILLER_OK)
    })
}
