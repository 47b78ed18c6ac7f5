//! What an import yields, and the options some formats need.

use std::path::PathBuf;

use tiller_runtime::{Meta, Weights};

/// Options some formats need.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// A multi-hookpoint folder (sparsify): the hookpoint to read; all when `None`.
    pub hookpoint: Option<String>,
    /// A per-layer checkpoint (circuit-tracer, GGUF control vectors): the layer to read; all when
    /// `None`.
    pub layer: Option<usize>,
    /// The host's hook name to store, overriding the checkpoint's; `{name}` is replaced by the
    /// dictionary's name (a hookpoint or a layer).
    pub hook: Option<String>,
    /// Probes (`--format probe`): the `.npy` bias that goes with a `.npy` weight.
    pub bias: Option<PathBuf>,
    /// Probes: what each read-out outputs (a probability, or the logit).
    pub probe_output: crate::probe::ProbeOutput,
}

/// One dictionary read from a checkpoint.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Distinguishes dictionaries read from one checkpoint (a hookpoint, `layer_3`); `None` when
    /// the checkpoint holds one.
    pub name: Option<String>,
    /// Its metadata.
    pub meta: Meta,
    /// Its weights.
    pub weights: Weights,
}

impl Imported {
    /// A checkpoint's only dictionary.
    pub fn single(meta: Meta, weights: Weights) -> Vec<Self> {
        vec![Self {
            name: None,
            meta,
            weights,
        }]
    }
}
