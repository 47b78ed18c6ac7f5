//! String arguments in, and strings out into the caller's buffers.

use std::ffi::{CStr, c_char};

use super::error::{invalid, set_error, tiller_status};

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
pub(crate) unsafe fn str_arg<'a>(
    p: *const c_char,
    name: &str,
) -> Result<Option<&'a str>, tiller_status> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller promises a NUL-terminated string.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map(Some)
        .map_err(|_| invalid(format!("`{name}` is not valid UTF-8")))
}

/// Copies `text` (and a NUL) into the caller's buffer, or reports the size needed.
///
/// # Safety
/// `buf` is NULL or valid for `len` bytes; `needed` is NULL or valid for one write.
pub(crate) unsafe fn write_out(
    text: &str,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> tiller_status {
    // SAFETY: forwarded from the caller.
    let s = unsafe { copy_out(text, buf, len, needed) };
    if s == tiller_status::TILLER_BUFFER_TOO_SMALL {
        set_error(format!(
            "the buffer holds {len} bytes; {} are needed",
            text.len() + 1
        ));
    }
    s
}

/// [`write_out`] without touching the thread's last error (for `tiller_last_error` itself).
///
/// # Safety
/// As [`write_out`].
pub(crate) unsafe fn copy_out(
    text: &str,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> tiller_status {
    let n = text.len() + 1;
    if !needed.is_null() {
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { *needed = n };
    }
    if buf.is_null() || len < n {
        return tiller_status::TILLER_BUFFER_TOO_SMALL;
    }
    // SAFETY: `buf` is valid for `len >= n` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        *buf.add(text.len()) = 0;
    }
    tiller_status::TILLER_OK
}
