//! The constants of the Tiller WASM policy ABI, version 1 (`plugin-abi/policy/POLICY_ABI.md`),
//! defined once for both sides: the host (`tiller-runtime`) and the guest SDK
//! (`tiller-policy-sdk`).
#![no_std]
#![deny(missing_docs)]

/// The ABI version these constants describe.
pub const ABI_VERSION: u32 = 1;

/// The exported marker of ABI version 1: a module without it is refused.
pub const ABI_MARKER: &str = "tiller_policy_abi_v1";

/// The module name of the host calls the guest imports (`log`, `config`, `counter_add`).
pub const IMPORT_MODULE: &str = "tiller";

/// The names of the host calls, in [`IMPORT_MODULE`].
pub mod import {
    /// `log(level: i32, ptr: i32, len: i32)`.
    pub const LOG: &str = "log";
    /// `config(ptr: i32, cap: i32) -> i32`.
    pub const CONFIG: &str = "config";
    /// `counter_add(index: i32, delta: i64)`.
    pub const COUNTER_ADD: &str = "counter_add";
}

/// The names of the guest's exports (besides [`ABI_MARKER`] and its `memory`).
pub mod export {
    /// `tiller_alloc(size: i32) -> i32`.
    pub const ALLOC: &str = "tiller_alloc";
    /// `tiller_on_request_begin(request: i64, ptr: i32, len: i32) -> i64`.
    pub const ON_REQUEST_BEGIN: &str = "tiller_on_request_begin";
    /// `tiller_on_features(request: i64, token: i64, generated: i32, ptr: i32, n: i32) -> i64`.
    pub const ON_FEATURES: &str = "tiller_on_features";
    /// `tiller_on_request_end(request: i64) -> i64`.
    pub const ON_REQUEST_END: &str = "tiller_on_request_end";
    /// The guest's linear memory.
    pub const MEMORY: &str = "memory";
}

/// Size of one action record in guest memory.
pub const ACTION_SIZE: usize = 20;
/// Most actions one answer may hold.
pub const MAX_ACTIONS: usize = 64;
/// Longest string (reason, profile name) an action may carry.
pub const MAX_STRING: usize = 256;
/// Largest number of `(feature, value)` pairs handed over in one call.
pub const MAX_PAIRS: usize = 4096;

/// Action codes (the `code` field of an action record).
pub mod action {
    /// Flag the request; the string is the reason.
    pub const FLAG: u32 = 1;
    /// Switch the request's steering profile; the string is the profile name.
    pub const SWITCH_PROFILE: u32 = 2;
    /// Ask the host to stop the request.
    pub const STOP: u32 = 3;
    /// Clamp `feature` to `value` for this request, from its next token.
    pub const CLAMP: u32 = 4;
    /// Ablate `feature` for this request, from its next token.
    pub const ABLATE: u32 = 5;
    /// Add `value` times `feature`'s decoder row for this request, from its next token.
    pub const ADD: u32 = 6;
    /// Remove the steering this policy added to the request.
    pub const CLEAR: u32 = 7;
}
