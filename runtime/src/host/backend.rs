//! How a hook computes a dictionary's features: chosen once, when the state is built, among the
//! native sliced encoder, the native full encoder and ONNX Runtime's sessions, so that the hook
//! path matches on the choice instead of working it out on every call.

use std::sync::Arc;

use crate::encode::native::{FullEncoder, SlicedEncoder};
use crate::encode::session::Dictionary;

/// One way of computing features.
#[derive(Clone)]
pub(super) enum Pass {
    /// The features the config names, natively from their own encoder columns (boxed: it is
    /// far larger than the other passes).
    Sliced(Box<SlicedEncoder>),
    /// Every feature natively, from `W_enc` packed at its stored width.
    Native(Arc<FullEncoder>),
    /// Every feature through the dictionary's ONNX Runtime sessions.
    OnnxRuntime,
}

/// A dictionary's encoder at its input hook.
pub(super) struct Encoder {
    /// For the features the config names; `None` when it names none (the hook then computes
    /// nothing unless a request needs every feature).
    named: Option<Pass>,
    /// For every feature: when a request's own rules name one outside those the config names.
    every: Pass,
}

impl Encoder {
    /// Chooses for `dict`, whose config names `named` features (`sliced`: their own encoder
    /// columns, where slicing is exact).
    pub(super) fn new(dict: &Dictionary, sliced: Option<SlicedEncoder>, named: usize) -> Self {
        let every = dict.native().map_or(Pass::OnnxRuntime, Pass::Native);
        let named = (named > 0)
            .then(|| sliced.map_or_else(|| every.clone(), |s| Pass::Sliced(Box::new(s))));
        Self { named, every }
    }

    /// What a call computes: every feature when `needs_full`, else the named ones (`None`:
    /// nothing).
    pub(super) fn pass(&self, needs_full: bool) -> Option<&Pass> {
        if needs_full {
            Some(&self.every)
        } else {
            self.named.as_ref()
        }
    }

    /// Whether the call reads the activations as they are, before their statistics are taken
    /// (see [`SlicedEncoder::reads_input_as_is`]).
    pub(super) fn reads_input_as_is(&self, needs_full: bool) -> bool {
        matches!(self.pass(needs_full), Some(Pass::Sliced(s)) if s.reads_input_as_is())
    }
}
