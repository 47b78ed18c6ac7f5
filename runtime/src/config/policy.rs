//! `[[policy]]`: a WASM policy plugin and what its failure means.

use std::path::PathBuf;

use serde::Deserialize;

use super::defaults::one;

/// What a failing policy means for its requests (as Envoy's WASM filters do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Serve the request without the policy's effect (counted).
    #[default]
    Open,
    /// Stop the request.
    Closed,
}

/// `[[policy]]`: a WASM policy plugin (see `plugin-abi/policy/POLICY_ABI.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Its name (a metric label).
    pub name: String,
    /// The module: `.wasm`, or `.wat` text; relative to the config file.
    pub module: PathBuf,
    /// The dictionary whose features it sees.
    pub dictionary: String,
    /// The features it sees (active ones are handed over per token).
    pub features: Vec<u32>,
    /// A string the policy reads with `tiller_runtime::config`.
    #[serde(default)]
    pub config: String,
    /// Fuel per call.
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    /// Memory limit, MiB.
    #[serde(default = "default_policy_memory")]
    pub memory_mb: usize,
    /// `open` (serve unsteered) or `closed` (stop the request) when a call fails.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Consecutive failures after which the policy is disabled.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// Counters the policy may increment (`tiller_policy_counter_total{policy,counter}`).
    #[serde(default)]
    pub counters: Vec<String>,
    /// Instances (requests are spread over them by id; each keeps its requests' state).
    #[serde(default = "one")]
    pub instances: usize,
}

fn default_fuel() -> u64 {
    1_000_000
}
fn default_policy_memory() -> usize {
    16
}
fn default_max_failures() -> u32 {
    5
}
