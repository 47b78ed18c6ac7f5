//! The status every call returns, the thread's last error message, and the panic boundary every
//! call runs inside.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};

use ::tiller_runtime::Error;

/// The result of every call. Values are fixed: they never change between versions.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tiller_status {
    /// Success.
    TILLER_OK = 0,
    /// A required pointer argument was NULL.
    TILLER_NULL_ARGUMENT = 1,
    /// An argument was out of range or malformed (bad UTF-8, wrong size, unknown dtype or phase).
    TILLER_INVALID_ARGUMENT = 2,
    /// A request, hook or profile does not exist (or a request was used after it ended).
    TILLER_NOT_FOUND = 3,
    /// The configuration is invalid; the message names the file, line and key.
    TILLER_CONFIG = 4,
    /// A dictionary file is invalid.
    TILLER_DICTIONARY = 5,
    /// ONNX Runtime could not be loaded or failed.
    TILLER_ONNXRUNTIME = 6,
    /// A file could not be read.
    TILLER_IO = 7,
    /// The caller's buffer is too small; the size needed was written to `*needed`.
    TILLER_BUFFER_TOO_SMALL = 8,
    /// The runtime panicked; the call had no effect on the caller's memory beyond what the message says.
    TILLER_PANIC = 9,
    /// The operation is not available in this build (e.g. CUDA pointers without the CUDA build).
    TILLER_UNSUPPORTED = 10,
}

thread_local! {
    /// The message of the last failed call on this thread (empty after a success).
    pub(crate) static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_error(msg: impl Into<String>) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg.into());
}

fn status_of(e: &Error) -> tiller_status {
    match e {
        Error::Config { .. } => tiller_status::TILLER_CONFIG,
        Error::Dictionary { .. } => tiller_status::TILLER_DICTIONARY,
        Error::OnnxRuntime(_) | Error::Ort { .. } => tiller_status::TILLER_ONNXRUNTIME,
        Error::Io { .. } => tiller_status::TILLER_IO,
        Error::Unknown { .. } => tiller_status::TILLER_NOT_FOUND,
        Error::Tensor { .. } | Error::Invalid { .. } | Error::Override { .. } => {
            tiller_status::TILLER_INVALID_ARGUMENT
        }
    }
}

pub(crate) fn fail(e: Error) -> tiller_status {
    let s = status_of(&e);
    set_error(e.to_string());
    s
}

pub(crate) fn invalid(msg: impl Into<String>) -> tiller_status {
    set_error(msg);
    tiller_status::TILLER_INVALID_ARGUMENT
}

/// Runs `body` inside a panic boundary: a panic becomes `TILLER_PANIC` with its message.
pub(crate) fn boundary(body: impl FnOnce() -> tiller_status) -> tiller_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(s) => {
            if s == tiller_status::TILLER_OK {
                set_error("");
            }
            s
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("panic inside tiller: {msg}"));
            tiller_status::TILLER_PANIC
        }
    }
}

/// Returns `TILLER_NULL_ARGUMENT` (with the message) when one of the pointers is NULL. Used in the
/// sibling modules, which it names through `super::`.
macro_rules! nonnull {
    ($($p:ident),+) => {
        $(if $p.is_null() {
            super::error::set_error(concat!("`", stringify!($p), "` is NULL"));
            return super::error::tiller_status::TILLER_NULL_ARGUMENT;
        })+
    };
}
