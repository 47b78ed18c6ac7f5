//! The buffers a step reuses (so that a steady-state step allocates nothing) and what they carry
//! from hook to hook: a dictionary's activations, the rows sampled for its FVU, per-feature counts.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ndarray::Array2;

use super::request::Request;
use super::token::Token;
use crate::steering::Rule;

/// Buffers a step reuses, so that a steady-state step allocates nothing.
#[derive(Default)]
pub(super) struct StepBuffers {
    pub(super) tokens: Vec<Token>,
    pub(super) token_req: Vec<usize>,
    pub(super) token_index: Vec<u64>,
    pub(super) ids: Vec<u64>,
    pub(super) reqs: Vec<Arc<Mutex<Request>>>,
    pub(super) rules: Vec<Arc<Vec<Rule>>>,
    pub(super) x: Vec<f32>,
    pub(super) finite: Vec<bool>,
    /// Per token, an upper bound of `max|x|` (kept up to date by the edits).
    pub(super) bound: Vec<f32>,
    pub(super) edited: Vec<bool>,
    pub(super) enc_in: Vec<f32>,
    pub(super) enc_scratch: Vec<f32>,
    pub(super) full_scratch: crate::encode::native::Scratch,
    /// By dictionary index: the activations computed at its input hook during this step.
    pub(super) pending: Vec<Pending>,
    /// By dictionary index: the rows sampled for its FVU at its input hook during this step,
    /// waiting for the activations it reconstructs (transcoders, CLTs).
    pub(super) fvu: Vec<FvuRows>,
    /// The `(feature, value)` pairs handed to a policy for one token.
    pub(super) pairs: Vec<(u32, f32)>,
    /// The per-feature counts of this buffer's steps, shared with the scrape (registered in
    /// the runtime's `locals` when the buffer is made).
    pub(super) local: Arc<Mutex<Locals>>,
}

/// A step buffer's per-feature counts: by dictionary, then feature, local histograms and active
/// counts (for the state of `generation`), added to the registry's at most every
/// [`crate::metrics::FLUSH_EVERY`] and at each scrape. Behind their own lock, which only the
/// buffer's step (once per hook) and a scrape take, so that a scrape also reaches the counts of a
/// buffer in use: the steps that ended before it and left their counts in a buffer that another
/// step has since taken.
#[derive(Default)]
pub(super) struct Locals {
    pub(super) features: Vec<Vec<crate::metrics::LocalFeature>>,
    pub(super) generation: u64,
    /// When `features` were last flushed (`None`: never).
    pub(super) flushed_at: Option<Instant>,
}

impl Locals {
    /// Adds the per-feature counts held here to the registry's.
    pub(super) fn flush(&mut self) {
        for f in self.features.iter_mut().flatten() {
            f.flush();
        }
    }
}

/// Tokens sampled for a dictionary's FVU whose target is read at later hooks of the step.
#[derive(Default)]
pub(super) struct FvuRows {
    /// The sampled tokens (empty: none waiting).
    pub(super) rows: Vec<usize>,
    /// `[rows, input width]`.
    pub(super) input: Vec<f32>,
    /// `[rows, output layers·d_out]`, filled layer by layer.
    pub(super) target: Vec<f32>,
    /// Which output layers `target` holds.
    pub(super) seen: Vec<bool>,
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) valid: bool,
    /// `[n, m]`: the features the config names.
    pub(super) named: Vec<f32>,
    pub(super) m: usize,
    /// Every feature, when a request's own rules needed the full dictionary.
    pub(super) full: Option<Array2<f32>>,
    /// The storage of the last native full encode, kept for the next.
    pub(super) spare: Vec<f32>,
    /// A crosscoder's input layers gathered so far in this step, `[n, layers·d_in]`.
    pub(super) stash: Vec<f32>,
    pub(super) stash_finite: Vec<bool>,
    /// `[n, input layers]`: each token's output gain ([`InputNorm::output_gain`]) at each input
    /// layer, for a dictionary that normalises its input and un-normalises its reconstruction
    /// (empty otherwise).
    pub(super) gains: Vec<f32>,
    pub(super) gain_layers: usize,
}

impl Pending {
    /// Token `t`'s coefficient `c` of `rule` moved into the model's space: times its output gain
    /// when the rule's direction is a raw decoder row of a normalising dictionary.
    pub(super) fn in_model_space(&self, t: usize, rule: &Rule, c: f32) -> f32 {
        match rule.gain_layer {
            Some(l) => c * self.gains[t * self.gain_layers + l],
            None => c,
        }
    }

    /// Token `t`'s activation of `rule`'s feature.
    pub(super) fn get(&self, t: usize, rule: &Rule) -> f32 {
        match (rule.position, &self.full) {
            (Some(p), _) => self.named[t * self.m + p],
            (None, Some(full)) => full[[t, rule.feature as usize]],
            (None, None) => 0.0,
        }
    }
}
