//! Guest SDK for Tiller policies (ABI v1, `plugin-abi/policy/POLICY_ABI.md`).
//!
//! Implement [`Policy`] (every callback has a no-op default) and export it with
//! [`export_policy!`]; build for `wasm32-unknown-unknown`. On other targets the same code runs
//! natively, driven by a [`Harness`], so policies are unit-tested without a wasm toolchain.
//!
//! ```ignore
//! use tiller_policy_sdk::{Actions, Pair, Policy, export_policy};
//! struct StopOnPii;
//! impl Policy for StopOnPii {
//!     fn on_features(&mut self, _req: u64, _tok: u64, generated: bool, pairs: &[Pair], out: &mut Actions) {
//!         if generated && !pairs.is_empty() { out.stop(); }
//!     }
//! }
//! export_policy!(StopOnPii, StopOnPii);
//! ```
#![no_std]
#![deny(missing_docs)]

#[doc(hidden)]
pub extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub use dlmalloc;

/// The ABI's constants (action codes, names, limits), shared with the host.
pub use tiller_policy_abi as abi;
/// Action codes of ABI v1.
pub use tiller_policy_abi::action as code;

/// One monitored feature of a token: its original id and its activation (> 0).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Pair {
    /// The feature.
    pub feature: u32,
    /// Its activation.
    pub value: f32,
}

/// An action, as the host will see it.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Flag with a reason.
    Flag(String),
    /// Switch profile.
    SwitchProfile(String),
    /// Stop.
    Stop,
    /// Clamp `feature` to `value`.
    Clamp(u32, f32),
    /// Ablate `feature`.
    Ablate(u32),
    /// Add `value` × the decoder row of `feature`.
    Add(u32, f32),
    /// Remove this policy's steering of the request.
    Clear,
}

/// The most actions one answer holds (the host's limit).
pub use tiller_policy_abi::MAX_ACTIONS;

/// The actions of one callback; the SDK lays them out as the ABI's records.
#[derive(Debug, Default)]
pub struct Actions {
    list: Vec<Action>,
}

impl Actions {
    /// Flags the request.
    pub fn flag(&mut self, reason: &str) {
        self.push(Action::Flag(String::from(
            &reason[..reason.len().min(abi::MAX_STRING)],
        )));
    }
    /// Switches the request's steering profile from its next step.
    pub fn switch_profile(&mut self, profile: &str) {
        self.push(Action::SwitchProfile(String::from(profile)));
    }
    /// Asks the host to stop the request.
    pub fn stop(&mut self) {
        self.push(Action::Stop);
    }
    /// Clamps `feature` to `value` from the request's next step.
    pub fn clamp(&mut self, feature: u32, value: f32) {
        self.push(Action::Clamp(feature, value));
    }
    /// Ablates `feature` from the request's next step.
    pub fn ablate(&mut self, feature: u32) {
        self.push(Action::Ablate(feature));
    }
    /// Adds `strength` × `feature`'s decoder row from the request's next step.
    pub fn add(&mut self, feature: u32, strength: f32) {
        self.push(Action::Add(feature, strength));
    }
    /// Removes the steering this policy added to the request.
    pub fn clear(&mut self) {
        self.push(Action::Clear);
    }
    fn push(&mut self, a: Action) {
        if self.list.len() < MAX_ACTIONS {
            self.list.push(a);
        }
    }
    /// The actions so far.
    pub fn as_slice(&self) -> &[Action] {
        &self.list
    }
    /// Takes the actions out.
    pub fn take(&mut self) -> Vec<Action> {
        core::mem::take(&mut self.list)
    }
}

/// A policy. Every callback has a default that does nothing.
pub trait Policy {
    /// A request begins with a profile (empty when none).
    fn on_request_begin(&mut self, _request: u64, _profile: &str, _out: &mut Actions) {}
    /// One token of `request`: its index, phase and active monitored features.
    fn on_features(
        &mut self,
        _request: u64,
        _token: u64,
        _generated: bool,
        _pairs: &[Pair],
        _out: &mut Actions,
    ) {
    }
    /// The request ends.
    fn on_request_end(&mut self, _request: u64, _out: &mut Actions) {}
}

/// Host calls: logging, the policy's config string, counters.
pub mod host {
    use alloc::string::String;

    #[cfg(target_arch = "wasm32")]
    #[link(wasm_import_module = "tiller")]
    unsafe extern "C" {
        fn log(level: i32, ptr: i32, len: i32);
        fn config(ptr: i32, cap: i32) -> i32;
        fn counter_add(index: i32, delta: i64);
    }

    /// Logs a line at `level` (0 debug, 1 info, 2 warn, 3 error).
    pub fn log_line(level: i32, text: &str) {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: the host reads `len` bytes at `ptr`, inside this module's memory.
        unsafe {
            log(level, text.as_ptr() as i32, text.len() as i32)
        };
        #[cfg(not(target_arch = "wasm32"))]
        let _ = (level, text);
    }

    /// The policy's `config` string from the Tiller config.
    pub fn config_string() -> String {
        #[cfg(target_arch = "wasm32")]
        {
            // SAFETY: the host writes at most `cap` bytes at `ptr`, inside this module's memory.
            let n = unsafe { config(0, 0) };
            if n <= 0 {
                return String::new();
            }
            let mut buf = alloc::vec![0u8; n as usize];
            // SAFETY: as above, into a buffer of `n` bytes.
            unsafe { config(buf.as_mut_ptr() as i32, n) };
            String::from_utf8(buf).unwrap_or_default()
        }
        #[cfg(not(target_arch = "wasm32"))]
        native::config()
    }

    /// Adds `delta` to the `index`-th counter the config declares.
    pub fn count(index: i32, delta: i64) {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: a plain host call.
        unsafe {
            counter_add(index, delta)
        };
        #[cfg(not(target_arch = "wasm32"))]
        native::count(index, delta);
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) mod native {
        use alloc::string::String;
        use core::cell::RefCell;

        // Native runs (tests) are single-threaded per harness; a critical section is not needed.
        pub(crate) struct Local<T>(pub(crate) RefCell<T>);
        // SAFETY: native harness state is only touched from the thread that runs the harness.
        unsafe impl<T> Sync for Local<T> {}

        pub(crate) static CONFIG: Local<String> = Local(RefCell::new(String::new()));
        pub(crate) static COUNTERS: Local<[i64; 64]> = Local(RefCell::new([0; 64]));

        pub(crate) fn config() -> String {
            CONFIG.0.borrow().clone()
        }
        pub(crate) fn count(index: i32, delta: i64) {
            if let Some(c) = usize::try_from(index).ok().filter(|i| *i < 64) {
                COUNTERS.0.borrow_mut()[c] += delta;
            }
        }
    }
}

/// Drives a policy natively with scripted feature streams (unit tests; not on wasm32).
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub struct Harness<P: Policy> {
    /// The policy.
    pub policy: P,
}

#[cfg(not(target_arch = "wasm32"))]
impl<P: Policy> Harness<P> {
    /// A harness whose policy reads `config` as its config string.
    pub fn new(policy: P, config: &str) -> Self {
        *host::native::CONFIG.0.borrow_mut() = String::from(config);
        *host::native::COUNTERS.0.borrow_mut() = [0; 64];
        Self { policy }
    }
    /// Sets the config string the policy reads (before constructing it with [`host::config_string`]).
    pub fn set_config(config: &str) {
        *host::native::CONFIG.0.borrow_mut() = String::from(config);
    }
    /// Calls `on_request_begin`.
    pub fn begin(&mut self, request: u64, profile: &str) -> Vec<Action> {
        let mut out = Actions::default();
        self.policy.on_request_begin(request, profile, &mut out);
        out.take()
    }
    /// Calls `on_features`.
    pub fn token(
        &mut self,
        request: u64,
        token: u64,
        generated: bool,
        pairs: &[(u32, f32)],
    ) -> Vec<Action> {
        let pairs: Vec<Pair> = pairs
            .iter()
            .map(|&(feature, value)| Pair { feature, value })
            .collect();
        let mut out = Actions::default();
        self.policy
            .on_features(request, token, generated, &pairs, &mut out);
        out.take()
    }
    /// Calls `on_request_end`.
    pub fn end(&mut self, request: u64) -> Vec<Action> {
        let mut out = Actions::default();
        self.policy.on_request_end(request, &mut out);
        out.take()
    }
    /// The value of counter `index`.
    pub fn counter(&self, index: usize) -> i64 {
        host::native::COUNTERS
            .0
            .borrow()
            .get(index)
            .copied()
            .unwrap_or(0)
    }
}

/// Encodes actions as ABI records; `strings` holds their strings. Returns the answer word for
/// `records` placed at `records_addr`, strings at `strings_addr`.
#[doc(hidden)]
pub fn encode(
    actions: &[Action],
    records: &mut Vec<u8>,
    strings: &mut Vec<u8>,
    records_addr: u32,
    strings_addr: u32,
) -> i64 {
    records.clear();
    strings.clear();
    if actions.is_empty() {
        return 0;
    }
    for a in actions {
        let (code, feature, value, text): (u32, u32, f32, &str) = match a {
            Action::Flag(s) => (code::FLAG, 0, 0.0, s),
            Action::SwitchProfile(s) => (code::SWITCH_PROFILE, 0, 0.0, s),
            Action::Stop => (code::STOP, 0, 0.0, ""),
            Action::Clamp(f, v) => (code::CLAMP, *f, *v, ""),
            Action::Ablate(f) => (code::ABLATE, *f, 0.0, ""),
            Action::Add(f, v) => (code::ADD, *f, *v, ""),
            Action::Clear => (code::CLEAR, 0, 0.0, ""),
        };
        let sptr = strings_addr + strings.len() as u32;
        strings.extend_from_slice(text.as_bytes());
        for v in [code, feature, value.to_bits(), sptr, text.len() as u32] {
            records.extend_from_slice(&v.to_le_bytes());
        }
    }
    ((u64::from(records_addr) << 32) | actions.len() as u64) as i64
}

/// Exports a [`Policy`] as a Tiller ABI v1 module: `export_policy!(Type, constructor_expression)`.
/// The constructor runs on the first callback (after the host can answer `host::config_string`).
#[macro_export]
macro_rules! export_policy {
    ($ty:ty, $ctor:expr) => {
        #[cfg(target_arch = "wasm32")]
        mod __tiller_policy_exports {
            use super::*;
            use core::cell::UnsafeCell;
            use $crate::alloc::vec::Vec;

            #[global_allocator]
            static ALLOC: $crate::dlmalloc::GlobalDlmalloc = $crate::dlmalloc::GlobalDlmalloc;

            #[panic_handler]
            fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
                core::arch::wasm32::unreachable()
            }

            struct State {
                policy: Option<$ty>,
                records: Vec<u8>,
                strings: Vec<u8>,
                out: $crate::Actions,
            }
            struct Global(UnsafeCell<State>);
            // SAFETY: a wasm32 guest without threads runs one callback at a time.
            unsafe impl Sync for Global {}
            static STATE: Global = Global(UnsafeCell::new(State {
                policy: None,
                records: Vec::new(),
                strings: Vec::new(),
                out: $crate::Actions::new_const(),
            }));

            fn with<R>(f: impl FnOnce(&mut $ty, &mut $crate::Actions) -> R) -> (R, i64) {
                // SAFETY: single-threaded, and callbacks do not re-enter.
                let s = unsafe { &mut *STATE.0.get() };
                let p = s.policy.get_or_insert_with(|| $ctor);
                let r = f(p, &mut s.out);
                let actions = s.out.take();
                s.records.reserve(actions.len() * $crate::abi::ACTION_SIZE);
                let total: usize = actions.iter().map(|a| match a {
                    $crate::Action::Flag(t) | $crate::Action::SwitchProfile(t) => t.len(),
                    _ => 0,
                }).sum();
                s.strings.reserve(total);
                let (ra, sa) = (s.records.as_ptr() as u32, s.strings.as_ptr() as u32);
                let answer = $crate::encode(&actions, &mut s.records, &mut s.strings, ra, sa);
                (r, answer)
            }

            #[unsafe(no_mangle)]
            extern "C" fn tiller_policy_abi_v1() {}

            #[unsafe(no_mangle)]
            extern "C" fn tiller_alloc(size: i32) -> i32 {
                let v: Vec<u8> = $crate::alloc::vec![0u8; size.max(0) as usize];
                v.leak().as_mut_ptr() as i32
            }

            #[unsafe(no_mangle)]
            extern "C" fn tiller_on_request_begin(request: i64, ptr: i32, len: i32) -> i64 {
                // SAFETY: the host wrote `len` bytes of UTF-8 at `ptr`, in the buffer it allocated.
                let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len.max(0) as usize) };
                let profile = core::str::from_utf8(bytes).unwrap_or("");
                with(|p, out| $crate::Policy::on_request_begin(p, request as u64, profile, out)).1
            }

            #[unsafe(no_mangle)]
            extern "C" fn tiller_on_features(request: i64, token: i64, generated: i32, ptr: i32, n: i32) -> i64 {
                // SAFETY: the host wrote `n` 8-byte pairs at `ptr`, in the buffer it allocated.
                let pairs = unsafe { core::slice::from_raw_parts(ptr as *const $crate::Pair, n.max(0) as usize) };
                with(|p, out| $crate::Policy::on_features(p, request as u64, token as u64, generated != 0, pairs, out)).1
            }

            #[unsafe(no_mangle)]
            extern "C" fn tiller_on_request_end(request: i64) -> i64 {
                with(|p, out| $crate::Policy::on_request_end(p, request as u64, out)).1
            }
        }
    };
}

impl Actions {
    /// An empty list, usable in statics.
    pub const fn new_const() -> Self {
        Self { list: Vec::new() }
    }
}
