//! The loaded model and the Tiller runtime: what the HTTP handlers and the engine share.

use std::ffi::{CStr, CString, c_char};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::ffi::{self, Api, TILLER_NOT_FOUND, TILLER_OK};

/// A GGUF model loaded by llama.cpp, and its vocabulary.
#[derive(Debug)]
pub struct Model {
    /// The C functions.
    pub api: Arc<Api>,
    ptr: *mut ffi::Model,
    vocab: *const ffi::Vocab,
    /// Tokens in the vocabulary (the logits' width).
    pub n_vocab: usize,
    /// The residual stream's width (the embeddings' width).
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// The chat template `/v1/chat/completions` renders with (a text or built-in name).
    pub chat_template: Option<CString>,
}

// SAFETY: after loading, llama.cpp only reads the model and its vocabulary (tokenizing and
// detokenizing are const operations on `llama_vocab`, which llama.cpp's own server runs from
// its HTTP threads); the context that writes is the engine's alone.
unsafe impl Send for Model {}
// SAFETY: as above.
unsafe impl Sync for Model {}

impl Model {
    /// Loads `path` on the CPU; `template` overrides the model's own chat template.
    pub fn load(api: Arc<Api>, path: &Path, template: Option<&str>) -> Result<Self> {
        let c = ffi::cstring(&path.to_string_lossy(), "the model path")?;
        // SAFETY: `c` is NUL-terminated; the returned model is freed in Drop.
        let ptr = unsafe { (api.tls_model_load)(c.as_ptr()) };
        if ptr.is_null() {
            bail!("llama.cpp could not load {}", path.display());
        }
        // SAFETY: `ptr` is a live model for the rest of these calls.
        let (vocab, n_embd, n_layer, model_template) = unsafe {
            let vocab = (api.llama_model_get_vocab)(ptr);
            let t = (api.tls_chat_template)(ptr);
            let t = (!t.is_null()).then(|| CStr::from_ptr(t).to_owned());
            (
                vocab,
                (api.llama_model_n_embd)(ptr),
                (api.llama_model_n_layer)(ptr),
                t,
            )
        };
        // SAFETY: `vocab` belongs to the live model.
        let n_vocab = unsafe { (api.llama_vocab_n_tokens)(vocab) };
        let chat_template = match template {
            Some(t) => Some(ffi::cstring(t, "--chat-template")?),
            None => model_template,
        };
        let m = Self {
            api,
            ptr,
            vocab,
            n_vocab: usize::try_from(n_vocab).context("the vocabulary's size")?,
            n_embd: usize::try_from(n_embd).context("the model's width")?,
            n_layer: usize::try_from(n_layer).context("the model's layers")?,
            chat_template,
        };
        if let Some(t) = &m.chat_template
            && let Err(e) = m.render_chat(&[("user".into(), "hello".into())])
        {
            match template {
                Some(_) => bail!("--chat-template {:?}: {e}", t),
                None => {
                    tracing::warn!("the model's chat template: {e}; chat completions are refused")
                }
            }
        }
        Ok(m)
    }

    /// The raw model, for the engine's context.
    pub fn ptr(&self) -> *mut ffi::Model {
        self.ptr
    }

    /// Tokenizes `text`, with the model's BOS where it uses one (`add_special`) and special tokens
    /// written as text recognised (`parse_special`, for rendered chat templates).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>> {
        let len = i32::try_from(text.len()).context("the text is over 2 GiB")?;
        let mut out = vec![0i32; text.len() + 8];
        for _ in 0..2 {
            // SAFETY: `text` is valid for `len` bytes, `out` for its length.
            let n = unsafe {
                (self.api.llama_tokenize)(
                    self.vocab,
                    text.as_ptr().cast(),
                    len,
                    out.as_mut_ptr(),
                    i32::try_from(out.len()).unwrap_or(i32::MAX),
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            if n == i32::MIN {
                bail!("the text is too long to tokenize");
            }
            out.resize(n.unsigned_abs() as usize, 0);
        }
        bail!("llama.cpp could not tokenize the text")
    }

    /// The bytes token `t` stands for (special tokens as nothing).
    pub fn piece(&self, t: i32) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        for _ in 0..2 {
            // SAFETY: `buf` is valid for its length; `t` is a token of this vocabulary.
            let n = unsafe {
                (self.api.llama_token_to_piece)(
                    self.vocab,
                    t,
                    buf.as_mut_ptr().cast::<c_char>(),
                    buf.len() as i32,
                    0,
                    false,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
        Vec::new()
    }

    /// Whether `t` ends generation (EOS, EOT, ...).
    pub fn is_eog(&self, t: i32) -> bool {
        // SAFETY: `t` is a token of this vocabulary.
        unsafe { (self.api.llama_vocab_is_eog)(self.vocab, t) }
    }

    /// Renders `(role, content)` messages with the chat template and the assistant's prefix.
    pub fn render_chat(&self, messages: &[(String, String)]) -> Result<String> {
        let Some(tmpl) = &self.chat_template else {
            bail!("the model has no chat template (start the server with --chat-template NAME)");
        };
        let roles: Vec<CString> = messages
            .iter()
            .map(|(r, _)| ffi::cstring(r, "a message's role"))
            .collect::<Result<_>>()?;
        let contents: Vec<CString> = messages
            .iter()
            .map(|(_, c)| ffi::cstring(c, "a message's content"))
            .collect::<Result<_>>()?;
        let rp: Vec<*const c_char> = roles.iter().map(|c| c.as_ptr()).collect();
        let cp: Vec<*const c_char> = contents.iter().map(|c| c.as_ptr()).collect();
        let mut len = 1024
            + messages
                .iter()
                .map(|(r, c)| r.len() + c.len())
                .sum::<usize>()
                * 2;
        for _ in 0..2 {
            let mut buf = vec![0u8; len];
            // SAFETY: the arrays hold `messages.len()` NUL-terminated strings; `buf` is valid for
            // `len` bytes.
            let n = unsafe {
                (self.api.tls_chat_apply)(
                    tmpl.as_ptr(),
                    rp.as_ptr(),
                    cp.as_ptr(),
                    messages.len(),
                    buf.as_mut_ptr().cast(),
                    i32::try_from(len).unwrap_or(i32::MAX),
                )
            };
            if n < 0 {
                bail!(
                    "llama.cpp does not know this chat template (llama_chat_apply_template failed)"
                );
            }
            let n = n as usize;
            if n <= len {
                buf.truncate(n);
                return String::from_utf8(buf).context("the rendered chat is not UTF-8");
            }
            len = n + 1;
        }
        bail!("the rendered chat did not fit")
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the model is live and no context of it remains (the engine frees its own first).
        unsafe { (self.api.llama_model_free)(self.ptr) }
    }
}

/// Why a Tiller request could not begin.
#[derive(Debug)]
pub enum BeginError {
    /// The profile is not in the config.
    UnknownProfile(String),
    /// The runtime refused the request (its overrides, mostly): its message.
    Refused(String),
}

/// The Tiller runtime, through `tiller.h`.
#[derive(Debug)]
pub struct Tiller {
    api: Arc<Api>,
    ptr: *mut ffi::Runtime,
}

// SAFETY: a `tiller_runtime` is thread-safe (tiller.h): every function used here says so.
unsafe impl Send for Tiller {}
// SAFETY: as above.
unsafe impl Sync for Tiller {}

impl Tiller {
    /// Builds the runtime from a config file.
    pub fn new(api: Arc<Api>, config: &Path) -> Result<Self> {
        let c = ffi::cstring(&config.to_string_lossy(), "the config path")?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `c` is NUL-terminated and `ptr` writable.
        if unsafe { (api.tiller_runtime_new_from_file)(c.as_ptr(), &mut ptr) } != TILLER_OK {
            bail!("{}: {}", config.display(), api.tiller_error());
        }
        Ok(Self { api, ptr })
    }

    /// The raw runtime, for the adapter.
    pub fn ptr(&self) -> *mut ffi::Runtime {
        self.ptr
    }

    /// Reloads the config file; on failure the running config is kept and the message returned.
    pub fn reload(&self) -> std::result::Result<(), String> {
        // SAFETY: a live handle; NULL reloads the file it was built from.
        if unsafe { (self.api.tiller_runtime_reload)(self.ptr, std::ptr::null()) } == TILLER_OK {
            Ok(())
        } else {
            Err(self.api.tiller_error())
        }
    }

    /// The runtime's metrics, Prometheus text.
    pub fn metrics(&self) -> String {
        self.api
            // SAFETY: a live handle; the buffer arguments come from `tiller_string`.
            .tiller_string(|b, l, n| unsafe { (self.api.tiller_metrics_text)(self.ptr, b, l, n) })
            .unwrap_or_else(|(_, e)| format!("# tiller_metrics_text failed: {e}\n"))
    }

    /// Begins request `id` with a profile and overrides (JSON).
    pub fn begin(
        &self,
        id: u64,
        profile: Option<&str>,
        overrides: Option<&str>,
    ) -> std::result::Result<(), BeginError> {
        let p = profile
            .map(|p| ffi::cstring(p, "tiller_profile"))
            .transpose()
            .map_err(|e| BeginError::Refused(e.to_string()))?;
        let o = overrides
            .map(|o| ffi::cstring(o, "tiller_overrides"))
            .transpose()
            .map_err(|e| BeginError::Refused(e.to_string()))?;
        // SAFETY: a live handle; the strings are NUL-terminated or NULL.
        let s = unsafe {
            (self.api.tiller_request_begin)(
                self.ptr,
                id,
                p.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                o.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        match s {
            TILLER_OK => Ok(()),
            TILLER_NOT_FOUND => Err(BeginError::UnknownProfile(self.api.tiller_error())),
            _ => Err(BeginError::Refused(self.api.tiller_error())),
        }
    }

    /// The running request's summary (JSON).
    pub fn summary(&self, id: u64) -> Option<serde_json::Value> {
        self.api
            // SAFETY: a live handle; the buffer arguments come from `tiller_string`.
            .tiller_string(|b, l, n| unsafe {
                (self.api.tiller_request_summary)(self.ptr, id, b, l, n)
            })
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
    }

    /// Ends request `id` and returns its summary (JSON).
    pub fn end(&self, id: u64) -> Option<serde_json::Value> {
        match self
            .api
            // SAFETY: a live handle; the buffer arguments come from `tiller_string`.
            .tiller_string(|b, l, n| unsafe {
                (self.api.tiller_request_end)(self.ptr, id, b, l, n)
            }) {
            Ok(s) => serde_json::from_str(&s).ok(),
            Err((_, e)) => {
                tracing::warn!("ending Tiller request {id}: {e}");
                None
            }
        }
    }
}

impl Drop for Tiller {
    fn drop(&mut self) {
        // SAFETY: a live handle, not used afterwards (the adapter using it is freed first).
        unsafe { (self.api.tiller_runtime_free)(self.ptr) }
    }
}
