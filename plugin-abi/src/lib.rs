//! The C ABI over the Tiller runtime. For now it exposes the version; the full host API follows.
#![deny(missing_docs)]

use std::ffi::c_char;

/// The library's version as a NUL-terminated string; static, never freed. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn tiller_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_nul_terminated() {
        // SAFETY: tiller_version returns a pointer to a static NUL-terminated string.
        let s = unsafe { std::ffi::CStr::from_ptr(super::tiller_version()) };
        assert_eq!(s.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
    }
}
