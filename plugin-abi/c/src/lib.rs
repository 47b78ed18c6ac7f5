//! The C ABI over the Tiller runtime: `libtiller.so` / `libtiller.a` and `include/tiller.h`.
//!
//! Every function returns a [`tiller_status`] with a fixed value; the message of the last failure
//! on the calling thread is read with [`tiller_last_error`]. Every pointer is checked for NULL,
//! and every body runs inside a panic boundary: a bug in the runtime reaches the caller as
//! `TILLER_PANIC`, never as an abort.
#![deny(missing_docs)]
#![allow(non_camel_case_types)]

// The modules name their siblings through `super::`, not `crate::`: the fuzz target compiles this
// source as a module of its own crate. They are declared in the order of `include/tiller.h`
// (cbindgen writes the functions in the order it reads them).
#[macro_use]
mod error;

mod strings;

mod library;

mod runtime;

mod request;

mod step;

pub use error::tiller_status;
pub use library::{tiller_build_info, tiller_last_error, tiller_version};
pub use request::{tiller_request_begin, tiller_request_end, tiller_request_summary};
pub use runtime::{
    tiller_metrics_text, tiller_runtime, tiller_runtime_free, tiller_runtime_new_from_file,
    tiller_runtime_new_from_toml, tiller_runtime_reload,
};
pub use step::{
    tiller_dtype, tiller_phase, tiller_step, tiller_step_close, tiller_step_free, tiller_step_hook,
    tiller_step_hook_cuda, tiller_step_open, tiller_step_run,
};
