//! llama.cpp, the llama.cpp adapter and Tiller's C ABI, loaded at run time from
//! `libtiller_llama_host.so` (built by `build.sh`; it links the other three, so every symbol
//! resolves through it). The server reaches the runtime only through `tiller.h` and
//! `tiller_llama.h`, as any host does.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use libloading::Library;

/// `TILLER_OK`.
pub const TILLER_OK: u32 = 0;
/// `TILLER_NOT_FOUND`: an unknown profile or request.
pub const TILLER_NOT_FOUND: u32 = 3;
/// `TILLER_BUFFER_TOO_SMALL`.
pub const TILLER_BUFFER_TOO_SMALL: u32 = 8;
/// `TILLER_LLAMA_ERROR`: the adapter (not llama.cpp) failed a decode.
pub const TILLER_LLAMA_ERROR: i32 = -1000;
/// `GGML_TYPE_F32` and `GGML_TYPE_F16`, the KV cache types offered.
pub const GGML_TYPE_F32: i32 = 0;
/// See [`GGML_TYPE_F32`].
pub const GGML_TYPE_F16: i32 = 1;

/// Opaque C handles.
pub type Model = c_void;
/// See [`Model`].
pub type Context_ = c_void;
/// See [`Model`].
pub type Vocab = c_void;
/// See [`Model`].
pub type Batch = c_void;
/// See [`Model`].
pub type Runtime = c_void;
/// See [`Model`].
pub type Adapter = c_void;

macro_rules! api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// The functions the server calls, resolved once.
        #[allow(non_snake_case, missing_docs)]
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            _lib: Library,
        }

        impl Api {
            fn resolve(lib: Library) -> Result<Self> {
                // SAFETY: each symbol is declared with the signature its header gives it
                // (llama.h of the provisioned llama.cpp, tiller.h, tiller_llama.h, llama_host.c).
                unsafe {
                    $(
                        let $name = *lib
                            .get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                            .with_context(|| format!("symbol {}", stringify!($name)))?;
                    )*
                    Ok(Self { $($name,)* _lib: lib })
                }
            }
        }
    };
}

api! {
    tls_init: fn();
    tls_model_load: fn(*const c_char) -> *mut Model;
    tls_context_new: fn(*mut Model, *mut Adapter, u32, u32, u32, i32, i32, bool) -> *mut Context_;
    tls_batch_new: fn(i32) -> *mut Batch;
    tls_batch_free: fn(*mut Batch);
    tls_batch_clear: fn(*mut Batch);
    tls_batch_add: fn(*mut Batch, i32, i32, i32, bool);
    tls_decode: fn(*mut Context_, *mut Adapter, *const Batch) -> i32;
    tls_seq_rm: fn(*mut Context_, i32);
    tls_memory_clear: fn(*mut Context_);
    tls_chat_template: fn(*const Model) -> *const c_char;
    tls_chat_apply: fn(*const c_char, *const *const c_char, *const *const c_char, usize, *mut c_char, i32) -> i32;
    llama_model_free: fn(*mut Model);
    llama_free: fn(*mut Context_);
    llama_model_get_vocab: fn(*const Model) -> *const Vocab;
    llama_model_n_embd: fn(*const Model) -> i32;
    llama_model_n_layer: fn(*const Model) -> i32;
    llama_vocab_n_tokens: fn(*const Vocab) -> i32;
    llama_vocab_is_eog: fn(*const Vocab, i32) -> bool;
    llama_tokenize: fn(*const Vocab, *const c_char, i32, *mut i32, i32, bool, bool) -> i32;
    llama_token_to_piece: fn(*const Vocab, i32, *mut c_char, i32, i32, bool) -> i32;
    llama_get_logits_ith: fn(*mut Context_, i32) -> *mut f32;
    llama_get_embeddings_seq: fn(*mut Context_, i32) -> *mut f32;
    tiller_last_error: fn(*mut c_char, usize, *mut usize) -> u32;
    tiller_runtime_new_from_file: fn(*const c_char, *mut *mut Runtime) -> u32;
    tiller_runtime_free: fn(*mut Runtime);
    tiller_runtime_reload: fn(*const Runtime, *const c_char) -> u32;
    tiller_metrics_text: fn(*const Runtime, *mut c_char, usize, *mut usize) -> u32;
    tiller_request_begin: fn(*const Runtime, u64, *const c_char, *const c_char) -> u32;
    tiller_request_summary: fn(*const Runtime, u64, *mut c_char, usize, *mut usize) -> u32;
    tiller_request_end: fn(*const Runtime, u64, *mut c_char, usize, *mut usize) -> u32;
    tiller_llama_new: fn(*const Runtime, *const Model, *const i32, usize, *const c_char) -> *mut Adapter;
    tiller_llama_free: fn(*mut Adapter);
    tiller_llama_seq_begin: fn(*mut Adapter, i32, u64) -> i32;
    tiller_llama_seq_prompt: fn(*mut Adapter, i32, usize) -> i32;
    tiller_llama_seq_end: fn(*mut Adapter, i32) -> i32;
    tiller_llama_seq_stopped: fn(*const Adapter, i32) -> i32;
    tiller_llama_last_error: fn() -> *const c_char;
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Api(libtiller_llama_host)")
    }
}

/// Where the host library is: `explicit`, else `$TILLER_LLAMA_HOST_LIB`, else
/// `../llama-cpp/libtiller_llama_host.so` beside this executable (where `build.sh` puts it for
/// `cargo run`; `../llama-cpp-release/` for a release build).
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("TILLER_LLAMA_HOST_LIB") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the executable has no folder")?;
    let release = exe.parent().is_some_and(|d| d.ends_with("release"));
    let candidates = if release {
        ["llama-cpp-release", "llama-cpp"]
    } else {
        ["llama-cpp", "llama-cpp-release"]
    };
    for c in candidates {
        let p = dir.join(c).join("libtiller_llama_host.so");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "libtiller_llama_host.so not found beside {} (run examples/llama-server/build.sh, or give --lib or TILLER_LLAMA_HOST_LIB)",
        exe.display()
    )
}

impl Api {
    /// Loads the host library and resolves every function.
    pub fn load(path: &Path) -> Result<Self> {
        // SAFETY: loading runs the library's initialisers: llama.cpp's, ggml's and libtiller's,
        // which have no preconditions.
        let lib =
            unsafe { Library::new(path) }.with_context(|| format!("loading {}", path.display()))?;
        Self::resolve(lib).with_context(|| format!("in {}", path.display()))
    }

    /// Tiller's message for the last failed call on this thread.
    pub fn tiller_error(&self) -> String {
        let mut buf = vec![0u8; 4096];
        let mut needed = 0usize;
        // SAFETY: `buf` is valid for its length; `needed` is writable.
        let s =
            unsafe { (self.tiller_last_error)(buf.as_mut_ptr().cast(), buf.len(), &mut needed) };
        if s == TILLER_BUFFER_TOO_SMALL {
            buf = vec![0u8; needed + 1];
            // SAFETY: as above.
            unsafe { (self.tiller_last_error)(buf.as_mut_ptr().cast(), buf.len(), &mut needed) };
        }
        c_buf_to_string(&buf)
    }

    /// The adapter's message for the last failed call on this thread.
    pub fn adapter_error(&self) -> String {
        // SAFETY: the adapter returns a NUL-terminated per-thread buffer.
        unsafe { CStr::from_ptr((self.tiller_llama_last_error)()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Calls a Tiller function that writes a string into a buffer (growing it as `needed` says).
    /// `Err((status, message))` when it fails.
    pub fn tiller_string(
        &self,
        mut call: impl FnMut(*mut c_char, usize, *mut usize) -> u32,
    ) -> std::result::Result<String, (u32, String)> {
        let mut len = 8192usize;
        loop {
            let mut buf = vec![0u8; len];
            let mut needed = 0usize;
            let s = call(buf.as_mut_ptr().cast(), len, &mut needed);
            match s {
                TILLER_OK => return Ok(c_buf_to_string(&buf)),
                TILLER_BUFFER_TOO_SMALL if needed >= len => len = needed + 1,
                _ => return Err((s, self.tiller_error())),
            }
        }
    }
}

fn c_buf_to_string(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A NUL-terminated copy of `s` (an interior NUL is refused by naming `what`).
pub fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{what} contains a NUL byte"))
}
