//! A dictionary loaded into ONNX Runtime sessions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use protobuf::Message;

use crate::dictionary::{Activation, DictionaryFile, Kind, Meta, WeightDtype};
use crate::encode::native::{FullEncoder, Scratch};
use crate::graph::prune;
use crate::{Error, Result};

/// How sessions are built. Defaults are tuned for latency inside a server: one intra-op thread, no
/// spinning, one session per dictionary.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Intra-op threads of each session (default 1).
    pub intra_threads: usize,
    /// Sessions kept per graph; calls beyond this many at once wait (default 1).
    pub pool_size: usize,
    /// The ONNX Runtime library to load, instead of `ORT_DYLIB_PATH` or the cached copy.
    pub onnxruntime: Option<PathBuf>,
    /// Encode natively where the dictionary allows (every kind but crosscoders, every
    /// activation; see [`Backend`]) instead of through ONNX Runtime. Default false: a
    /// `Dictionary` runs its ONNX graph as written, which is what `verify` and graph tests
    /// check; the [`crate::Runtime`] turns this on for its hooks.
    pub native: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            intra_threads: 1,
            pool_size: 1,
            onnxruntime: None,
            native: false,
        }
    }
}

/// A few sessions of one graph; a call takes whichever is free.
struct Pool {
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Pool {
    fn new(file: &DictionaryFile, outputs: &[&str], opts: &SessionOptions) -> Result<Self> {
        let env = crate::onnxruntime::init(opts.onnxruntime.as_deref())?;
        let model = prune(file.model(), outputs)?;
        let bytes = model.write_to_bytes().map_err(|e| {
            Error::dictionary(
                file.path(),
                format!("cannot serialise the pruned graph: {e}"),
            )
        })?;
        let ctx = || format!("loading {}", file.path().display());
        let mut sessions = Vec::with_capacity(opts.pool_size.max(1));
        for _ in 0..opts.pool_size.max(1) {
            let mut builder = Session::builder(&env)
                .map_err(|e| Error::ort(ctx(), e))?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(|e| Error::ort(ctx(), e))?
                .with_intra_threads(opts.intra_threads.max(1))
                .map_err(|e| Error::ort(ctx(), e))?
                .with_inter_threads(1)
                .map_err(|e| Error::ort(ctx(), e))?
                .with_intra_op_spinning(false)
                .map_err(|e| Error::ort(ctx(), e))?
                .with_inter_op_spinning(false)
                .map_err(|e| Error::ort(ctx(), e))?;
            if file.has_external_data() {
                let dir = file.base_dir();
                let dir = if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir
                };
                builder = builder
                    .with_config_entry(
                        "session.model_external_initializers_file_folder_path",
                        dir.to_string_lossy(),
                    )
                    .map_err(|e| Error::ort(ctx(), e))?;
            }
            let session = builder
                .commit_from_memory(&bytes)
                .map_err(|e| Error::ort(ctx(), e))?;
            sessions.push(Mutex::new(session));
        }
        Ok(Self {
            sessions,
            next: AtomicUsize::new(0),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Session) -> Result<T>) -> Result<T> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(mut s) = self.sessions[(start + i) % n].try_lock() {
                return f(&mut s);
            }
        }
        let mut s = self.sessions[start]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }
}

/// How a [`Dictionary`] computes its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Natively: `W_enc` packed for streaming and read at its stored width (see
    /// [`SessionOptions::native`]).
    Native(WeightDtype),
    /// ONNX Runtime, on the dictionary's graph.
    OnnxRuntime,
}

/// A dictionary ready to encode and decode on the CPU execution provider.
///
/// `Send + Sync`: share it between threads; each call takes a free session from a small pool.
#[derive(Debug)]
pub struct Dictionary {
    file: DictionaryFile,
    opts: SessionOptions,
    /// The encode graph's sessions: built at load, or on first use when `native` encodes.
    encoder: Mutex<Option<Arc<Pool>>>,
    full: Mutex<Option<Arc<Pool>>>,
    native: Option<Arc<FullEncoder>>,
    /// The native encoder's buffers, one per concurrent call.
    scratch: Mutex<Vec<Scratch>>,
}

/// The outputs of one encode.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[batch, d_sae]` feature activations.
    pub acts: Array2<f32>,
    /// `[batch, k]` TopK values and indices, for TopK dictionaries.
    pub top: Option<(Array2<f32>, Array2<i64>)>,
}

impl Dictionary {
    /// Loads and validates the dictionary at `path`.
    pub fn load(path: impl AsRef<Path>, opts: &SessionOptions) -> Result<Self> {
        let file = DictionaryFile::open(path.as_ref())?;
        Self::from_file(file, opts)
    }

    /// Builds sessions for an already validated file (with [`SessionOptions::native`] where the
    /// native encoder applies, the encode sessions only when first needed; ONNX Runtime is loaded
    /// either way).
    pub fn from_file(file: DictionaryFile, opts: &SessionOptions) -> Result<Self> {
        let native = if opts.native {
            FullEncoder::new(&file)?.map(Arc::new)
        } else {
            None
        };
        let encoder = match native {
            Some(_) => {
                crate::onnxruntime::init(opts.onnxruntime.as_deref())?;
                None
            }
            None => Some(Arc::new(Pool::new(
                &file,
                Self::encode_outputs(&file),
                opts,
            )?)),
        };
        Ok(Self {
            file,
            opts: opts.clone(),
            encoder: Mutex::new(encoder),
            full: Mutex::new(None),
            native,
            scratch: Mutex::new(Vec::new()),
        })
    }

    fn encode_outputs(file: &DictionaryFile) -> &'static [&'static str] {
        if file.meta().activation == Activation::TopK {
            &["acts", "top_values", "top_indices"]
        } else {
            &["acts"]
        }
    }

    /// The sessions in `slot`, built on first use for `outputs`.
    fn pool(&self, slot: &Mutex<Option<Arc<Pool>>>, outputs: &[&str]) -> Result<Arc<Pool>> {
        let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some(p) => Ok(p.clone()),
            None => {
                let p = Arc::new(Pool::new(&self.file, outputs, &self.opts)?);
                *g = Some(p.clone());
                Ok(p)
            }
        }
    }

    /// How [`Dictionary::encode`] computes the features.
    pub fn backend(&self) -> Backend {
        self.native
            .as_ref()
            .map_or(Backend::OnnxRuntime, |n| Backend::Native(n.dtype()))
    }

    /// The native encoder, where it applies (shared: a runtime's hooks keep it in their plan).
    pub(crate) fn native(&self) -> Option<Arc<FullEncoder>> {
        self.native.clone()
    }

    /// The dictionary's metadata.
    pub fn meta(&self) -> &Meta {
        self.file.meta()
    }

    /// The validated file.
    pub fn file(&self) -> &DictionaryFile {
        &self.file
    }

    fn input_width(&self) -> usize {
        self.meta().input_layers() * self.meta().d_in
    }

    fn check_input(&self, x: &ArrayView2<'_, f32>) -> Result<()> {
        let w = self.input_width();
        if x.ncols() != w {
            return Err(Error::tensor(
                "x",
                format!(
                    "has {} columns but {} expects {w}",
                    x.ncols(),
                    self.file.path().display()
                ),
            ));
        }
        if let Some((i, _)) = x
            .rows()
            .into_iter()
            .enumerate()
            .find(|(_, r)| r.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::tensor(
                "x",
                format!("row {i} has a NaN or infinite value"),
            ));
        }
        Ok(())
    }

    fn input_shape(&self, batch: usize) -> Vec<usize> {
        let m = self.meta();
        if m.kind == Kind::Crosscoder {
            vec![batch, m.input_layers(), m.d_in]
        } else {
            vec![batch, m.d_in]
        }
    }

    /// Feature activations of `x` (`[batch, n_layers·d_in]`, crosscoder layers concatenated).
    pub fn encode(&self, x: ArrayView2<'_, f32>) -> Result<Encoded> {
        self.check_input(&x)?;
        let x = x.as_standard_layout();
        let shape = self.input_shape(x.nrows());
        let data = x.as_slice().unwrap_or(&[]);
        let topk = self.meta().activation == Activation::TopK;
        if let Some(native) = &self.native {
            let n = x.nrows();
            let mut acts = Array2::zeros((n, self.meta().d_sae));
            let k = self.meta().k.unwrap_or(0);
            let mut top = topk.then(|| (Array2::zeros((n, k)), Array2::zeros((n, k))));
            let mut scratch = self.take_scratch();
            let out = acts.as_slice_mut().unwrap_or(&mut []);
            let top_out = top.as_mut().map(|(v, i)| {
                (
                    v.as_slice_mut().unwrap_or(&mut []),
                    i.as_slice_mut().unwrap_or(&mut []),
                )
            });
            native.encode(data, n, None, &mut scratch, out, top_out);
            self.put_scratch(scratch);
            return Ok(Encoded { acts, top });
        }
        let path = self.file.path().to_path_buf();
        let pool = self.pool(&self.encoder, Self::encode_outputs(&self.file))?;
        pool.with(|s| {
            let input = TensorRef::from_array_view((shape.clone(), data))
                .map_err(|e| Error::ort("binding `x`", e))?;
            let out = s
                .run(ort::inputs!["x" => input])
                .map_err(|e| Error::ort(format!("encoding with {}", path.display()), e))?;
            let acts = extract_f32(&out, "acts")?;
            let top = if topk {
                let v = extract_f32(&out, "top_values")?;
                let i = out["top_indices"]
                    .try_extract_array::<i64>()
                    .map_err(|e| Error::ort("reading `top_indices`", e))?
                    .to_owned()
                    .into_dimensionality()
                    .map_err(|e| Error::tensor("top_indices", e.to_string()))?;
                Some((v, i))
            } else {
                None
            };
            Ok(Encoded { acts, top })
        })
    }

    /// [`Dictionary::encode`] into `acts` (`[batch, d_sae]`), for hosts that keep their buffers:
    /// on the native path a call allocates nothing once warm (TopK's values and indices stay in
    /// place in `acts`).
    pub fn encode_into(
        &self,
        x: ArrayView2<'_, f32>,
        mut acts: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let want = (x.nrows(), self.meta().d_sae);
        if acts.dim() != want {
            return Err(Error::tensor(
                "acts",
                format!("has shape {:?}; {want:?} expected", acts.dim()),
            ));
        }
        match (&self.native, acts.as_slice_mut()) {
            (Some(native), Some(out)) => {
                self.check_input(&x)?;
                let x = x.as_standard_layout();
                let data = x.as_slice().unwrap_or(&[]);
                let mut scratch = self.take_scratch();
                native.encode(data, x.nrows(), None, &mut scratch, out, None);
                self.put_scratch(scratch);
            }
            _ => acts.assign(&self.encode(x)?.acts),
        }
        Ok(())
    }

    fn take_scratch(&self) -> Scratch {
        let mut g = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        g.pop().unwrap_or_default()
    }

    fn put_scratch(&self, s: Scratch) {
        let mut g = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        g.push(s);
    }

    /// Feature activations and the reconstruction (`[batch, n_layers·d_out]`). A probe has no
    /// decoder: asking one for a reconstruction is an error.
    pub fn encode_decode(&self, x: ArrayView2<'_, f32>) -> Result<(Array2<f32>, Array2<f32>)> {
        if !self.meta().has_decoder() {
            return Err(Error::dictionary(
                self.file.path(),
                format!(
                    "a {} has no decoder, so no reconstruction: use `encode`",
                    self.meta().kind
                ),
            ));
        }
        self.check_input(&x)?;
        let pool = self.pool(&self.full, &["acts", "recon"])?;
        let x = x.as_standard_layout();
        let shape = self.input_shape(x.nrows());
        let data = x.as_slice().unwrap_or(&[]);
        let path = self.file.path().to_path_buf();
        pool.with(|s| {
            let input = TensorRef::from_array_view((shape.clone(), data))
                .map_err(|e| Error::ort("binding `x`", e))?;
            let out = s
                .run(ort::inputs!["x" => input])
                .map_err(|e| Error::ort(format!("decoding with {}", path.display()), e))?;
            let acts = extract_f32(&out, "acts")?;
            let recon = out["recon"]
                .try_extract_array::<f32>()
                .map_err(|e| Error::ort("reading `recon`", e))?;
            let b = recon.shape()[0];
            let recon = recon
                .to_owned()
                .into_shape_with_order((b, recon.len() / b.max(1)))
                .map_err(|e| Error::tensor("recon", e.to_string()))?;
            Ok((acts, recon))
        })
    }
}

fn extract_f32(out: &ort::session::SessionOutputs<'_>, name: &str) -> Result<Array2<f32>> {
    out[name]
        .try_extract_array::<f32>()
        .map_err(|e| Error::ort(format!("reading `{name}`"), e))?
        .to_owned()
        .into_dimensionality()
        .map_err(|e| Error::tensor(name, e.to_string()))
}
