//! Steering rules compiled against a loaded config, and the edits of
//! docs/design.md#4-steering-edits-that-keep-the-dictionarys-error-term: every edit is `x ← x +
//! c·d` with `d` a decoder row (or a raw direction), so the part of `x` the dictionary does not
//! explain is never touched.

use std::sync::Arc;

use prometheus::IntCounter;

use crate::config::{ApplyTo, Op};

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name (a metric label).
    pub name: String,
    /// The op.
    pub op: Op,
    /// The dictionary it edits through (feature ops), as an index into the state's dictionaries.
    pub dictionary: Option<usize>,
    /// The feature (feature ops).
    pub feature: u32,
    /// The feature's place among the features the dictionary's hook encodes (`None`: not among
    /// them, so the hook encodes the whole dictionary for this rule), resolved when the rule is
    /// compiled so that a hook call looks nothing up.
    pub position: Option<usize>,
    /// The op's parameter: strength, value or factor.
    pub param: f32,
    /// The direction added (`d_i`, unit `d_i` for normalised `add`, or a raw `u`), `[d_out]`.
    pub direction: Arc<Vec<f32>>,
    /// `max|direction|`.
    pub direction_max: f32,
    /// `Some(layer)`: the direction is a raw decoder row of a dictionary whose reconstruction is
    /// un-normalised, and each token's coefficient is multiplied by that token's output gain at
    /// the dictionary's input `layer` ([`crate::InputNorm::output_gain`]), so that the edit is
    /// `decode(f') − decode(f)` in the model's space. `None`: the direction is already in it.
    pub gain_layer: Option<usize>,
    /// The hook it writes.
    pub hook: String,
    /// Whether edits by this rule count in the metrics and the summary (a feature that writes
    /// several layers is one rule with one target per layer; only the first counts).
    pub counts: bool,
    /// Which tokens.
    pub apply_to: ApplyTo,
    /// Only where the feature is active.
    pub only_active: bool,
    /// Only once this monitor (an index) has fired for the request.
    pub when: Option<usize>,
    /// `steering_tokens_total{rule}`.
    pub counter: IntCounter,
}

impl Rule {
    /// The coefficient `c` for a token with feature activation `f` and input `x`; `None` when the
    /// rule leaves the token alone.
    pub fn coefficient(&self, f: f32, x: &[f32]) -> Option<f32> {
        if self.only_active && self.dictionary.is_some() && f <= 0.0 {
            return None;
        }
        let c = match self.op {
            Op::Add | Op::Vector => self.param,
            Op::Clamp => self.param - f,
            Op::Ablate => -f,
            Op::Scale => (self.param - 1.0) * f,
            Op::Cap => f.min(self.param) - f,
            Op::ProjectCap => {
                let p = crate::encode::kernels::dot(x, &self.direction);
                -(p.max(self.param) - self.param)
            }
        };
        (c != 0.0 && c.is_finite()).then_some(c)
    }

    /// The bound of `max|x|` after `x += c·d`, when it shows without looking at `x` that the result
    /// is finite (`bound`, an upper bound of `max|x|` before, plus `|c|·max|d|` stays far from
    /// `f32::MAX`): the common case, where the edit can be applied together with others in one
    /// pass (the runtime's `kernels::axpy_many`). `None`: [`Rule::apply`] must look.
    pub fn fast_bound(&self, c: f32, bound: f32) -> Option<f32> {
        let grown = bound + c.abs() * self.direction_max;
        (grown < f32::MAX / 4.0).then_some(grown)
    }

    /// Applies `x += c·d` unless the result would not be finite; returns whether it did.
    ///
    /// `bound` is an upper bound of `max|x|`, kept up to date: see [`Rule::fast_bound`].
    pub fn apply(&self, c: f32, x: &mut [f32], bound: &mut f32) -> bool {
        let d = &self.direction;
        let grown = *bound + c.abs() * self.direction_max;
        if self.fast_bound(c, *bound).is_none()
            && x.iter()
                .zip(d.iter())
                .any(|(a, b)| !(a + c * b).is_finite())
        {
            return false;
        }
        crate::encode::kernels::axpy(c, d, x);
        *bound = if grown.is_finite() {
            grown
        } else {
            x.iter().fold(0.0, |m, v| m.max(v.abs()))
        };
        true
    }
}

/// Whether a token of `phase` is covered by `apply_to`.
pub fn covers(apply_to: ApplyTo, phase: crate::Phase) -> bool {
    match apply_to {
        ApplyTo::All => true,
        ApplyTo::Prompt => phase == crate::Phase::Prompt,
        ApplyTo::Generated => phase == crate::Phase::Generated,
    }
}
