//! The runtime's state for one config: its dictionaries, monitors and hooks, as built from the
//! config (see `build`) and swapped whole on a reload.

use std::collections::HashMap;
use std::sync::Arc;

use ndarray::Array2;

use super::backend::Encoder;
use crate::config::{Action, Aggregate, ApplyTo, Config, SteerConfig, Window};
use crate::dictionary::Meta;
use crate::encode::session::Dictionary;
use crate::fvu::{Meter, Sampler};
use crate::metrics::{FeatureMetrics, HookMetrics};

pub(super) struct State {
    pub(super) config: Config,
    pub(super) generation: u64,
    pub(super) names: Arc<Names>,
    pub(super) dicts: Vec<DictState>,
    /// WASM policies, compiled for this state.
    pub(super) policies: Vec<crate::policy::Policy>,
    pub(super) dict_index: HashMap<String, usize>,
    pub(super) monitors: Vec<MonitorState>,
    pub(super) monitor_index: HashMap<String, usize>,
    pub(super) profiles: HashMap<String, Vec<SteerConfig>>,
    pub(super) hooks: HashMap<String, HookPlan>,
    /// The `[[vector]]` directions, read once at load: no request reaches a file.
    pub(super) vectors: HashMap<String, Arc<Vec<f32>>>,
    /// What requests' overrides may change.
    pub(super) requests: crate::overrides::RequestPolicy,
}

pub(super) struct DictState {
    pub(super) name: String,
    pub(super) meta: Meta,
    /// The hooks it reads: one, or a crosscoder's layers in model order.
    pub(super) hooks_in: Vec<String>,
    /// The hooks it writes: one, or each layer of a crosscoder's or CLT's decoder.
    pub(super) hooks_out: Vec<String>,
    pub(super) dict: Dictionary,
    pub(super) w_dec: Arc<Array2<f32>>,
    /// The features the config names (monitored or steered), sorted.
    pub(super) features: Vec<u32>,
    pub(super) position: HashMap<u32, usize>,
    /// A feature counts as active (metrics, summaries, policies) above this: 0, or 0.5 for a
    /// sigmoid probe (its positive calls).
    pub(super) active_above: f32,
    /// How its input hook computes its features.
    pub(super) encoder: Encoder,
    pub(super) feature_metrics: Vec<FeatureMetrics>,
    /// The FVU and L0 gauges (none for a probe, which reconstructs nothing).
    pub(super) meter: Option<Meter>,
    /// Which tokens those gauges sample.
    pub(super) sampler: Sampler,
    /// Whether the reconstruction's target is the input (SAEs, crosscoders), rather than the
    /// activations at `hooks_out` (transcoders, CLTs).
    pub(super) target_is_input: bool,
}

pub(super) struct MonitorState {
    pub(super) name: String,
    pub(super) dictionary: usize,
    pub(super) positions: Vec<usize>,
    pub(super) threshold: f32,
    pub(super) window: Window,
    pub(super) aggregate: Aggregate,
    pub(super) count: usize,
    pub(super) action: Action,
    pub(super) profile: Option<String>,
    pub(super) apply_to: ApplyTo,
    pub(super) events: prometheus::IntCounter,
}

pub(super) struct HookPlan {
    pub(super) width: usize,
    /// `(dictionary, input layer)` pairs read here.
    pub(super) reads: Vec<(usize, usize)>,
    pub(super) writes: Vec<usize>,
    pub(super) vector_rules: bool,
    pub(super) metrics: HookMetrics,
}

/// Names of the state's tables, so a request can file its tallies by name when the state changes.
#[derive(Debug, Default)]
pub(super) struct Names {
    pub(super) dicts: Vec<(String, Vec<u32>)>,
    pub(super) monitors: Vec<String>,
}

pub(super) fn action_name(a: Action) -> &'static str {
    match a {
        Action::Flag => "flag",
        Action::SwitchProfile => "switch_profile",
        Action::Stop => "stop",
    }
}

/// The column of feature `id` (an original feature index) in a dictionary that may be sliced.
pub(super) fn column(meta: &Meta, name: &str, id: u32) -> std::result::Result<u32, String> {
    match &meta.feature_ids {
        Some(ids) => ids
            .iter()
            .position(|&i| i == id)
            .map(|c| c as u32)
            .ok_or_else(|| {
                format!(
                    "feature {id} is not in the sliced dictionary `{name}` (it keeps {} features)",
                    ids.len()
                )
            }),
        None if (id as usize) < meta.d_sae => Ok(id),
        None => Err(format!(
            "feature {id} is out of range: `{name}` has {} features",
            meta.d_sae
        )),
    }
}

/// The original index of column `c`.
pub(super) fn original_id(meta: &Meta, c: u32) -> u32 {
    meta.feature_ids
        .as_ref()
        .and_then(|ids| ids.get(c as usize).copied())
        .unwrap_or(c)
}
