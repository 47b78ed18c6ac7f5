//! The C ABI over the Tiller runtime: `libtiller.so` / `libtiller.a` and `include/tiller.h`.
//!
//! Every function returns a [`tiller_status`] with a fixed value; the message of the last failure
//! on the calling thread is read with [`tiller_last_error`]. Every pointer is checked for NULL,
//! and every body runs inside a panic boundary: a bug in the runtime reaches the caller as
//! `TILLER_PANIC`, never as an abort.
#![deny(missing_docs)]
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use ::tiller_runtime::{ActivationsMut, Error, Phase, Runtime, Step, Token};

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

/// The element type of activations handed to a hook.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tiller_dtype {
    /// 32-bit float.
    TILLER_F32 = 0,
    /// IEEE half precision.
    TILLER_F16 = 1,
    /// bfloat16.
    TILLER_BF16 = 2,
}

/// A token's phase, as the `phases` array of [`tiller_step_open`] gives it.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tiller_phase {
    /// A prompt (prefill) token.
    TILLER_PROMPT = 0,
    /// A generated (decode) token.
    TILLER_GENERATED = 1,
}

/// A runtime: a `tiller_runtime::Runtime` behind an `Arc`. Created by `tiller_runtime_new_*`, freed by
/// [`tiller_runtime_free`]. Thread-safe: share one handle between all of the host's threads.
#[derive(Debug)]
pub struct tiller_runtime {
    inner: Arc<Runtime>,
}

/// One forward step, opened by [`tiller_step_open`] and closed by [`tiller_step_close`] (or freed
/// with [`tiller_step_free`]). Not thread-safe: use a step from one thread at a time. It keeps its
/// runtime alive, so it may outlive `tiller_runtime_free`.
#[derive(Debug)]
pub struct tiller_step {
    inner: Step<'static>,
    /// The step's token count: every hook call must pass it.
    n_tokens: usize,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_error(msg: impl Into<String>) {
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

fn fail(e: Error) -> tiller_status {
    let s = status_of(&e);
    set_error(e.to_string());
    s
}

fn invalid(msg: impl Into<String>) -> tiller_status {
    set_error(msg);
    tiller_status::TILLER_INVALID_ARGUMENT
}

/// Runs `body` inside a panic boundary: a panic becomes `TILLER_PANIC` with its message.
fn boundary(body: impl FnOnce() -> tiller_status) -> tiller_status {
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

macro_rules! nonnull {
    ($($p:ident),+) => {
        $(if $p.is_null() {
            set_error(concat!("`", stringify!($p), "` is NULL"));
            return tiller_status::TILLER_NULL_ARGUMENT;
        })+
    };
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>, tiller_status> {
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
unsafe fn write_out(text: &str, buf: *mut c_char, len: usize, needed: *mut usize) -> tiller_status {
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
unsafe fn copy_out(text: &str, buf: *mut c_char, len: usize, needed: *mut usize) -> tiller_status {
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

/// Opens a forward step over `n_tokens` tokens: `request_ids[i]` and `phases[i]`
/// (`TILLER_PROMPT`/`TILLER_GENERATED`) for token `i`. `*out` receives the step. Thread-safe
/// (each step belongs to one thread afterwards).
///
/// # Safety
/// `rt` is a live handle; `request_ids` and `phases` are valid for `n_tokens` elements; `out` is
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_step_open(
    rt: *const tiller_runtime,
    request_ids: *const u64,
    phases: *const u8,
    n_tokens: usize,
    out: *mut *mut tiller_step,
) -> tiller_status {
    boundary(|| {
        nonnull!(rt, out);
        // SAFETY: forwarded from the caller.
        let tokens = match unsafe { tokens_arg(request_ids, phases, n_tokens) } {
            Ok(t) => t,
            Err(s) => return s,
        };
        // SAFETY: checked non-NULL; a live handle per the contract.
        let rt = unsafe { &*rt };
        match rt.inner.step_shared(&tokens) {
            Ok(step) => {
                // SAFETY: `out` checked non-NULL.
                unsafe {
                    *out = Box::into_raw(Box::new(tiller_step {
                        inner: step,
                        n_tokens,
                    }))
                };
                tiller_status::TILLER_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Processes the activations at hook `hook` in place: `data` holds `n_tokens × width` values of
/// `dtype`, row-major, in host memory. `n_tokens` must be the step's token count. Not thread-safe
/// on the same step.
///
/// # Safety
/// `step` is a live step; `hook` is a NUL-terminated string; `data` is valid for reads and writes
/// of `n_tokens × width` elements of `dtype`, suitably aligned, and not accessed by others during
/// the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_step_hook(
    step: *mut tiller_step,
    hook: *const c_char,
    data: *mut std::ffi::c_void,
    dtype: u32,
    n_tokens: usize,
    width: usize,
) -> tiller_status {
    boundary(|| {
        nonnull!(step, hook, data);
        // SAFETY: checked non-NULL; a live step used by one thread per the contract.
        let step = unsafe { &mut *step };
        // SAFETY: forwarded from the caller.
        let (hook, acts) =
            match unsafe { host_activations(hook, data, dtype, n_tokens, width, step.n_tokens) } {
                Ok(h) => h,
                Err(s) => return s,
            };
        step.inner
            .hook(hook, acts)
            .map_or_else(fail, |()| tiller_status::TILLER_OK)
    })
}

/// Processes activations that live in GPU memory. Only the CUDA build supports it; this build
/// returns `TILLER_UNSUPPORTED`.
///
/// # Safety
/// Arguments as for [`tiller_step_hook`], with `data` a CUDA device pointer and `stream` a CUDA stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_step_hook_cuda(
    step: *mut tiller_step,
    hook: *const c_char,
    data: *mut std::ffi::c_void,
    dtype: u32,
    n_tokens: usize,
    width: usize,
    stream: *mut std::ffi::c_void,
) -> tiller_status {
    boundary(|| {
        nonnull!(step, hook, data);
        let _ = (dtype, n_tokens, width, stream);
        set_error(
            "this build of libtiller has no CUDA support (build tiller-capi with --features cuda)",
        );
        tiller_status::TILLER_UNSUPPORTED
    })
}

/// Closes and frees a step. Up to `stop_cap` ids of requests a monitor asked to stop are written to
/// `stop_ids`, and their count to `*n_stop` (which may exceed `stop_cap`: the rest were not
/// written). `stop_ids`/`n_stop` may be NULL when not wanted. The step must not be used afterwards.
///
/// # Safety
/// `step` is a live step; `stop_ids` is NULL or valid for `stop_cap` elements; `n_stop` is NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_step_close(
    step: *mut tiller_step,
    stop_ids: *mut u64,
    stop_cap: usize,
    n_stop: *mut usize,
) -> tiller_status {
    boundary(|| {
        nonnull!(step);
        // SAFETY: a live step from Box::into_raw, consumed once per the contract.
        let step = unsafe { Box::from_raw(step) };
        let result = step.inner.finish();
        // SAFETY: forwarded from the caller.
        unsafe { write_stops(&result.stop, stop_ids, stop_cap, n_stop) };
        tiller_status::TILLER_OK
    })
}

/// One whole step with a single hook, in one call: [`tiller_step_open`], [`tiller_step_hook`] and
/// [`tiller_step_close`], for hosts with one hook per forward pass (from Python, one crossing
/// instead of three). The arguments are those of the three calls, with the same checks and the
/// same results. When any part fails, the step is dropped unclosed (as [`tiller_step_free`]
/// drops it) and nothing is written to `stop_ids` or `n_stop`. Thread-safe.
///
/// # Safety
/// As for the three calls: `rt` is a live handle; `request_ids` and `phases` are valid for
/// `n_tokens` elements; `hook` is a NUL-terminated string; `data` is valid for reads and writes of
/// `n_tokens × width` elements of `dtype`, suitably aligned, and not accessed by others during the
/// call; `stop_ids` is NULL or valid for `stop_cap` elements; `n_stop` is NULL or writable.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tiller_step_run(
    rt: *const tiller_runtime,
    request_ids: *const u64,
    phases: *const u8,
    n_tokens: usize,
    hook: *const c_char,
    data: *mut std::ffi::c_void,
    dtype: u32,
    width: usize,
    stop_ids: *mut u64,
    stop_cap: usize,
    n_stop: *mut usize,
) -> tiller_status {
    boundary(|| {
        nonnull!(rt, hook, data);
        // SAFETY: forwarded from the caller.
        let tokens = match unsafe { tokens_arg(request_ids, phases, n_tokens) } {
            Ok(t) => t,
            Err(s) => return s,
        };
        // SAFETY: forwarded from the caller.
        let (hook, acts) =
            match unsafe { host_activations(hook, data, dtype, n_tokens, width, n_tokens) } {
                Ok(h) => h,
                Err(s) => return s,
            };
        // SAFETY: checked non-NULL; a live handle per the contract.
        let rt = unsafe { &*rt };
        let mut step = match rt.inner.step(&tokens) {
            Ok(step) => step,
            Err(e) => return fail(e),
        };
        if let Err(e) = step.hook(hook, acts) {
            return fail(e);
        }
        let result = step.finish();
        // SAFETY: forwarded from the caller.
        unsafe { write_stops(&result.stop, stop_ids, stop_cap, n_stop) };
        tiller_status::TILLER_OK
    })
}

/// The tokens of a step from the arrays of [`tiller_step_open`], each phase checked.
///
/// # Safety
/// `request_ids` and `phases` are NULL (refused unless `n_tokens` is 0) or valid for `n_tokens`
/// elements.
unsafe fn tokens_arg(
    request_ids: *const u64,
    phases: *const u8,
    n_tokens: usize,
) -> Result<Vec<Token>, tiller_status> {
    if n_tokens == 0 {
        return Ok(Vec::new());
    }
    if n_tokens > isize::MAX as usize / size_of::<u64>() {
        return Err(invalid(format!(
            "n_tokens {n_tokens} is more than any array can hold"
        )));
    }
    for (null, name) in [
        (request_ids.is_null(), "request_ids"),
        (phases.is_null(), "phases"),
    ] {
        if null {
            set_error(format!("`{name}` is NULL"));
            return Err(tiller_status::TILLER_NULL_ARGUMENT);
        }
    }
    // SAFETY: checked non-NULL; the caller promises `n_tokens` valid elements.
    let (ids, ph) = unsafe {
        (
            std::slice::from_raw_parts(request_ids, n_tokens),
            std::slice::from_raw_parts(phases, n_tokens),
        )
    };
    let mut tokens = Vec::with_capacity(n_tokens);
    for (i, (&request, &p)) in ids.iter().zip(ph).enumerate() {
        let phase = match p {
            0 => Phase::Prompt,
            1 => Phase::Generated,
            other => {
                return Err(invalid(format!(
                    "phases[{i}] = {other}: not TILLER_PROMPT (0) or TILLER_GENERATED (1)"
                )));
            }
        };
        tokens.push(Token { request, phase });
    }
    Ok(tokens)
}

/// The hook name and host activations of [`tiller_step_hook`], checked: the name's UTF-8, the
/// dtype, the size, the token count against the step's (`step_tokens`) and the alignment.
///
/// # Safety
/// `hook` and `data` are non-NULL and as [`tiller_step_hook`] requires.
unsafe fn host_activations<'a>(
    hook: *const c_char,
    data: *mut std::ffi::c_void,
    dtype: u32,
    n_tokens: usize,
    width: usize,
    step_tokens: usize,
) -> Result<(&'a str, ActivationsMut<'a>), tiller_status> {
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let hook = match unsafe { str_arg(hook, "hook") }? {
        Some(h) => h,
        None => return Err(tiller_status::TILLER_NULL_ARGUMENT),
    };
    // The element's size, which is also the alignment `data` needs.
    let size = match dtype {
        0 => 4,
        1 | 2 => 2,
        other => {
            return Err(invalid(format!(
                "dtype {other} is not TILLER_F32, TILLER_F16 or TILLER_BF16"
            )));
        }
    };
    let Some(len) = n_tokens.checked_mul(width).filter(|len| {
        len.checked_mul(size)
            .is_some_and(|b| b <= isize::MAX as usize)
    }) else {
        return Err(invalid(format!(
            "n_tokens {n_tokens} × width {width} overflows"
        )));
    };
    if n_tokens != step_tokens {
        return Err(invalid(format!(
            "hook `{hook}`: n_tokens is {n_tokens}, but the step was opened with {step_tokens} tokens"
        )));
    }
    // Alignment is checked before any slice is made over `data`.
    if !(data as usize).is_multiple_of(size) {
        return Err(invalid(format!("`data` is not aligned to {size} bytes")));
    }
    Ok((
        hook,
        match dtype {
            // SAFETY: the caller promises `len` valid, exclusive elements; alignment checked above.
            0 => ActivationsMut::F32(unsafe {
                std::slice::from_raw_parts_mut(data.cast::<f32>(), len)
            }),
            // SAFETY: as above.
            1 => ActivationsMut::F16(unsafe {
                std::slice::from_raw_parts_mut(data.cast::<half::f16>(), len)
            }),
            // SAFETY: as above.
            _ => ActivationsMut::Bf16(unsafe {
                std::slice::from_raw_parts_mut(data.cast::<half::bf16>(), len)
            }),
        },
    ))
}

/// Writes up to `stop_cap` of `stop` to `stop_ids` and their count to `*n_stop`, each skipped
/// when NULL.
///
/// # Safety
/// `stop_ids` is NULL or valid for `stop_cap` elements; `n_stop` is NULL or writable.
unsafe fn write_stops(stop: &[u64], stop_ids: *mut u64, stop_cap: usize, n_stop: *mut usize) {
    if !n_stop.is_null() {
        // SAFETY: checked non-NULL.
        unsafe { *n_stop = stop.len() };
    }
    if !stop_ids.is_null() {
        for (i, id) in stop.iter().take(stop_cap).enumerate() {
            // SAFETY: `stop_ids` is valid for `stop_cap` elements.
            unsafe { *stop_ids.add(i) = *id };
        }
    }
}

/// Frees a step without closing it (its events are dropped). NULL is ignored.
///
/// # Safety
/// `step` is NULL or a live step, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tiller_step_free(step: *mut tiller_step) {
    if !step.is_null() {
        // SAFETY: a step from Box::into_raw, freed once per the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(step) })));
    }
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
