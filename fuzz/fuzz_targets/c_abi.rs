//! The C ABI entry points that take buffers, called as a C host would, with buffers this target
//! owns (so every pointer is valid for the length passed): a TOML config in memory, the
//! out-buffers of `tiller_last_error` / `tiller_build_info` at every length, and, when the config
//! gives a runtime, overrides JSON, step tokens and hook activations with lengths and `n_tokens` /
//! `width` that need not agree.
//!
//! A small ReLU SAE (`d.onnx`: 16 → 32 features, hook `model.layers.0`) is written once per
//! process into a scratch folder, which is the configs' base folder: a fuzzed config naming
//! `path = "d.onnx"` loads it, so the hook, the monitors, the steering and the request summary are
//! reached with real work (the seeds do). ONNX Runtime is loaded as Tiller loads it (`scripts/fuzz`
//! sets `ORT_DYLIB_PATH`).
#![no_main]
#![allow(unsafe_code, dead_code)]

// The ABI crate builds only a cdylib and a staticlib (no rlib to link): compile its source here.
#[path = "../../plugin-abi/c/src/lib.rs"]
#[allow(missing_docs, unused)]
mod abi;

#[path = "common.rs"]
mod common;

use abi::*;
use libfuzzer_sys::fuzz_target;
use std::ffi::{CString, c_char};
use std::sync::OnceLock;

/// The scratch folder holding `d.onnx`, as a C string (the configs' base folder).
fn fixture_dir() -> &'static CString {
    static DIR: OnceLock<CString> = OnceLock::new();
    DIR.get_or_init(|| {
        let (d, f) = (16usize, 32usize);
        let mut meta = ::tiller_runtime::Meta::new(::tiller_runtime::Kind::Sae, ::tiller_runtime::Activation::Relu, d, f, d);
        meta.hook_in = "model.layers.0".into();
        meta.hook_out = "model.layers.0".into();
        // Deterministic weights: a small integer pattern, scaled.
        let w_dec = ndarray::Array2::from_shape_fn((f, d), |(i, j)| {
            ((i * 7 + j * 3) % 11) as f32 / 11.0 - 0.45
        });
        let weights = ::tiller_runtime::Weights::new(
            w_dec.t().to_owned(),
            ndarray::Array1::from_elem(f, -0.1),
            w_dec,
            ndarray::Array1::zeros(d),
        );
        let path = common::scratch_file("d.onnx", b"");
        ::tiller_runtime::dictionary::write_dictionary(&meta, &weights, &path).expect("fixture dictionary");
        let dir = path.parent().expect("scratch folder").to_string_lossy().into_owned();
        CString::new(dir).expect("a path without NUL")
    })
}

/// Splits off a `u16`-length-prefixed field.
fn field<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let n = match data.split_first_chunk::<2>() {
        Some((n, rest)) => {
            *data = rest;
            u16::from_le_bytes(*n) as usize
        }
        None => return &[],
    };
    let (f, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    f
}

fn cstring(b: &[u8]) -> CString {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    CString::new(&b[..end]).unwrap_or_default()
}

/// Calls an out-buffer function at a fuzzed length and checks what it promises.
fn out_buffer(
    len: usize,
    f: unsafe extern "C" fn(*mut c_char, usize, *mut usize) -> tiller_status,
) {
    let mut buf = vec![0x55 as c_char; len];
    let mut needed = 0usize;
    let ptr = if len == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr()
    };
    // SAFETY: `buf` is valid for `len` bytes (or NULL with 0); `needed` is writable.
    let s = unsafe { f(ptr, len, &mut needed) };
    assert_ne!(s, tiller_status::TILLER_PANIC);
    if s == tiller_status::TILLER_OK {
        assert!(needed <= len, "needed {needed} > len {len} but OK");
        assert_eq!(buf[needed - 1], 0, "not NUL-terminated");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let toml = cstring(field(&mut rest));
    let overrides = field(&mut rest);
    let tokens = field(&mut rest);
    let acts = field(&mut rest);
    let knobs: [u8; 4] = rest
        .get(..4)
        .and_then(|k| k.try_into().ok())
        .unwrap_or_default();

    let mut rt: *mut tiller_runtime = std::ptr::null_mut();
    let base = fixture_dir();
    // SAFETY: NUL-terminated strings; `rt` is writable.
    let s = unsafe { tiller_runtime_new_from_toml(toml.as_ptr(), base.as_ptr(), &mut rt) };
    assert_ne!(s, tiller_status::TILLER_PANIC);
    out_buffer(knobs[0] as usize, tiller_last_error);
    out_buffer(knobs[1] as usize, tiller_build_info);
    if s != tiller_status::TILLER_OK {
        return;
    }

    let o = cstring(overrides);
    // SAFETY: `rt` is live; the strings are NUL-terminated.
    let s = unsafe { tiller_request_begin(rt, 1, std::ptr::null(), o.as_ptr()) };
    assert_ne!(s, tiller_status::TILLER_PANIC);

    // Tokens: each byte a phase (0, 1, or something else) of request 1 or 2.
    let n = tokens.len().min(64);
    let ids: Vec<u64> = tokens[..n].iter().map(|&b| 1 + u64::from(b >> 7)).collect();
    let phases: Vec<u8> = tokens[..n].iter().map(|&b| b & 3).collect();
    let mut step: *mut tiller_step = std::ptr::null_mut();
    // SAFETY: `ids` and `phases` hold `n` elements; `step` is writable.
    let s = unsafe { tiller_step_open(rt, ids.as_ptr(), phases.as_ptr(), n, &mut step) };
    assert_ne!(s, tiller_status::TILLER_PANIC);
    if s == tiller_status::TILLER_OK {
        // The hook's data: `acts` as f32 values; n_tokens and width from the knobs, the data
        // sized to what they claim so the pointer stays valid for it.
        let n_tokens = if knobs[2] & 1 == 0 {
            n
        } else {
            knobs[2] as usize >> 1
        };
        let width = (knobs[3] as usize).max(1);
        let dtype = u32::from(knobs[2] >> 6);
        let len = n_tokens * width;
        let mut buf: Vec<f32> = (0..len)
            .map(|i| {
                let b = acts.get(i % acts.len().max(1)).copied().unwrap_or(0);
                f32::from(b as i8) / 8.0
            })
            .collect();
        // SAFETY: `buf` holds `len` f32s (and twice that many 16-bit values).
        let s = unsafe {
            tiller_step_hook(
                step,
                c"model.layers.0".as_ptr(),
                buf.as_mut_ptr().cast(),
                dtype,
                n_tokens,
                width,
            )
        };
        assert_ne!(s, tiller_status::TILLER_PANIC);
        // Room for fewer stop ids than there may be.
        let cap = usize::from(knobs[3] & 3);
        let mut stops = vec![0u64; cap];
        let mut n_stop = 0usize;
        // SAFETY: a step from `tiller_step_open`, closed (which frees it) once; `stops` holds `cap`.
        let s = unsafe { tiller_step_close(step, stops.as_mut_ptr(), cap, &mut n_stop) };
        assert_ne!(s, tiller_status::TILLER_PANIC);
    }
    // The same tokens as one call (its token count is also the data's), the width and dtype from
    // the knobs.
    let width = (knobs[3] as usize).max(1);
    let mut buf: Vec<f32> = (0..n * width)
        .map(|i| f32::from(acts.get(i % acts.len().max(1)).copied().unwrap_or(0) as i8) / 8.0)
        .collect();
    let cap = usize::from(knobs[1] & 3);
    let mut stops = vec![0u64; cap];
    let mut n_stop = 0usize;
    // SAFETY: `ids`, `phases` hold `n` elements and `buf` `n × width` f32s (twice that many 16-bit
    // values); `stops` holds `cap`.
    let s = unsafe {
        tiller_step_run(
            rt,
            ids.as_ptr(),
            phases.as_ptr(),
            n,
            c"model.layers.0".as_ptr(),
            buf.as_mut_ptr().cast(),
            u32::from(knobs[2] >> 6),
            width,
            stops.as_mut_ptr(),
            cap,
            &mut n_stop,
        )
    };
    assert_ne!(s, tiller_status::TILLER_PANIC);
    let len = usize::from(knobs[0]);
    let mut summary = vec![0 as c_char; len];
    let mut needed = 0usize;
    // SAFETY: `rt` is live and not used after the free; `summary` holds `len` bytes.
    unsafe {
        let s = tiller_request_end(rt, 1, summary.as_mut_ptr(), len, &mut needed);
        assert_ne!(s, tiller_status::TILLER_PANIC);
        tiller_runtime_free(rt);
    }
});
