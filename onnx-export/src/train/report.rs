//! What a training run reports: progress points, the held-out evaluation, the JSON report.

use serde::{Deserialize, Serialize};

/// One recorded moment of training (the values of that step's batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Steps done.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// The whole loss.
    pub loss: f64,
    /// Mean squared error per token.
    pub mse: f64,
    /// Fraction of variance unexplained.
    pub fvu: f64,
    /// Active features per token.
    pub l0: f64,
    /// Fraction of features that have not fired within the dead window.
    pub dead_fraction: f64,
    /// The learning rate of the step.
    pub lr: f64,
}

/// The evaluation on the held-out rows, with the dictionary as exported (BatchTopK with its
/// learned threshold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Held-out tokens.
    pub tokens: u64,
    /// `Σ‖ŷ - y‖² / Σ‖y - ȳ‖²` over the split.
    pub fvu: f64,
    /// Mean squared error per token.
    pub mse: f64,
    /// Active features per token.
    pub l0: f64,
    /// Fraction of features that never fired on the split.
    pub dead_fraction: f64,
    /// Fraction of features that fired on more than [`DENSE_ABOVE`] of its tokens.
    pub dense_fraction: f64,
}

/// A feature firing on more than this fraction of tokens counts as dense.
pub const DENSE_ABOVE: f64 = 0.1;

/// The JSON report of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `sae`, `transcoder`, `skip_transcoder`, `crosscoder`.
    pub kind: String,
    /// `relu`, `topk`, `batchtopk`, `jumprelu`.
    pub activation: String,
    /// Input width per layer.
    pub d_in: usize,
    /// Output width per layer.
    pub d_out: usize,
    /// Features.
    pub d_sae: usize,
    /// Layers (crosscoders).
    pub n_layers: usize,
    /// TopK / BatchTopK's k.
    pub k: Option<usize>,
    /// The normalisation stored in the dictionary.
    pub input_norm: String,
    /// The seed.
    pub seed: u64,
    /// Rows per step.
    pub batch: usize,
    /// Steps of the run.
    pub steps: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// The sparsity coefficient (L1 for ReLU, L0 for JumpReLU).
    pub sparsity_coeff: f64,
    /// Where a resumed run started.
    pub resumed_from: Option<u64>,
    /// Wall-clock seconds of training, all sessions together.
    pub seconds: f64,
    /// Tokens per second of this session.
    pub tokens_per_second: f64,
    /// The last step's values.
    pub last: Option<Point>,
    /// The held-out evaluation.
    pub eval: Option<Eval>,
    /// BatchTopK: the threshold exported.
    pub batchtopk_threshold: Option<f64>,
    /// Progress recorded during the run.
    pub history: Vec<Point>,
    /// The dictionary written.
    pub output: String,
    /// The SAELens folder written.
    pub saelens: Option<String>,
}
