//! Forward steps: opened over tokens, hooks called on activations, closed (or freed).

use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

use ::tiller_runtime::{ActivationsMut, Phase, Step, Token};

use super::error::{boundary, fail, invalid, set_error, tiller_status};
use super::runtime::tiller_runtime;
use super::strings::str_arg;

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

/// One forward step, opened by [`tiller_step_open`] and closed by [`tiller_step_close`] (or freed
/// with [`tiller_step_free`]). Not thread-safe: use a step from one thread at a time. It keeps its
/// runtime alive, so it may outlive `tiller_runtime_free`.
#[derive(Debug)]
pub struct tiller_step {
    inner: Step<'static>,
    /// The step's token count: every hook call must pass it.
    n_tokens: usize,
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
