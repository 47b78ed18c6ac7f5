//! What a dashboard holds: the options it is built from, and the data written as JSON.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Bins of the activation histogram (before the empty ones past the maximum are dropped).
pub const BINS: usize = 32;

/// Top activations kept per feature for its label (at least; `--contexts` if larger).
pub const LABEL_POOL: usize = 32;

/// The version written in `format`.
pub const FORMAT: &str = "tiller-dashboard/1";

/// Features processed together when the context windows are encoded again (bounds memory).
pub(super) const CONTEXT_GROUP: usize = 64;

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// The dictionary (`.onnx`, format v1).
    pub dictionary: PathBuf,
    /// The folder of `shard-*.npy` + `shard-*.jsonl`.
    pub activations: PathBuf,
    /// The HTML page to write; the JSON goes beside it (see [`json_path`](super::json_path)).
    pub output: PathBuf,
    /// Features to show (ids as the dictionary names them); `None`: the `top_features` densest.
    pub features: Option<Vec<u32>>,
    /// How many features to show when `features` is `None`.
    pub top_features: usize,
    /// Top contexts per feature.
    pub contexts: usize,
    /// Tokens shown either side of the top token.
    pub window: usize,
    /// Read at most this many rows (from the first shards on).
    pub max_rows: Option<u64>,
    /// Rows per encode call.
    pub batch: usize,
    /// Show a progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
}

impl Options {
    /// The defaults of the command line: 64 densest features, 12 contexts of ±8 tokens.
    pub fn new(
        dictionary: impl Into<PathBuf>,
        activations: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> Self {
        Self {
            dictionary: dictionary.into(),
            activations: activations.into(),
            output: output.into(),
            features: None,
            top_features: 64,
            contexts: 12,
            window: 8,
            max_rows: None,
            batch: 1024,
            progress: false,
        }
    }
}

/// Everything the page shows; written as JSON beside it (see the module docs for the fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dashboard {
    /// `tiller-dashboard/1`.
    pub format: String,
    /// The dictionary's path.
    pub dictionary: String,
    /// The activations folder.
    pub activations: String,
    /// `tiller.kind`.
    pub kind: String,
    /// `tiller.activation`.
    pub activation: String,
    /// `tiller.model`.
    pub model: String,
    /// `tiller.hook_in`.
    pub hook_in: String,
    /// Width of a row.
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// Rows encoded.
    pub rows: u64,
    /// Shards read.
    pub shards: usize,
    /// Fraction of features that never fired.
    pub dead_fraction: f64,
    /// Active features per row, on average.
    pub mean_l0: f64,
    /// The collector's `meta.json`, if there was one.
    pub collector: Option<serde_json::Value>,
    /// The chosen features.
    pub features: Vec<Feature>,
}

/// One feature's card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feature {
    /// Its id (the original id for a sliced dictionary).
    pub id: u32,
    /// Its column in the dictionary's `acts`.
    pub column: usize,
    /// The auto label: words joined with ` · ` (empty for a feature that never fired).
    pub label: String,
    /// The label's words and their share of the top activations' weight.
    pub label_words: Vec<LabelWord>,
    /// The label stored in the dictionary (`tiller.labels`).
    pub given_label: Option<String>,
    /// Rows where it fired.
    pub count: u64,
    /// `count / rows`.
    pub density: f64,
    /// Its largest activation (0 if it never fired).
    pub max: f32,
    /// Its nonzero activations, binned.
    pub histogram: Histogram,
    /// The kinds of its shown contexts, most frequent first.
    pub kinds: Vec<KindCount>,
    /// Its top contexts, largest activation first.
    pub contexts: Vec<Context>,
}

/// A word of an auto label.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelWord {
    /// The whole word (`##` pieces joined).
    pub word: String,
    /// Its share of the summed top activations.
    pub share: f64,
}

/// A histogram of equal-width bins starting at 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Histogram {
    /// Width of each bin (a power of two).
    pub bin_width: f64,
    /// `counts[i]`: activations in `[i·bin_width, (i+1)·bin_width)`.
    pub counts: Vec<u64>,
}

/// How many of a feature's contexts have a kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindCount {
    /// The `kind` field of the `.jsonl` lines.
    pub kind: String,
    /// Contexts of that kind.
    pub count: usize,
}

/// One top activation with the tokens around it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Context {
    /// The shard's file name.
    pub shard: String,
    /// The row in the shard.
    pub row: u64,
    /// The line of the `.jsonl` (0-based) holding the sequence.
    pub sequence: usize,
    /// The `source` of that line.
    pub source: String,
    /// The `kind` of that line.
    pub kind: String,
    /// Model position of the top token.
    pub position: u64,
    /// Index of the top token in its sequence.
    pub token_index: usize,
    /// Tokens in the sequence.
    pub sequence_len: usize,
    /// Index in the sequence of `tokens[0]`.
    pub window_start: usize,
    /// Index of the top token in `tokens`.
    pub top: usize,
    /// The feature's activation on the top token.
    pub activation: f32,
    /// The window's tokens, as the tokenizer wrote them.
    pub tokens: Vec<String>,
    /// The feature's activation on each token of the window.
    pub activations: Vec<f32>,
}
