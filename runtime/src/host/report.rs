//! What the runtime reports back: monitor events, feature statistics, request summaries and
//! step results.

use std::collections::BTreeMap;

use serde::Serialize;

/// A monitor event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// The monitor.
    pub monitor: String,
    /// What it did.
    pub action: &'static str,
    /// The request.
    pub request: u64,
    /// The request's token index at which it fired.
    pub token: u64,
    /// The value that crossed the threshold (the aggregate for request monitors).
    pub value: f32,
    /// A policy's reason for a flag, or why a policy failed; empty for monitors.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A feature's statistics over a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FeatureStats {
    /// Largest activation.
    pub max: f32,
    /// Tokens on which it was active.
    pub count: u64,
}

/// What happened to a request, returned by [`crate::Runtime::end_request`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestSummary {
    /// The request id.
    pub request: u64,
    /// The profile it ended with.
    pub profile: Option<String>,
    /// Tokens seen (at the first hook of each step).
    pub tokens: u64,
    /// Features that fired: `dictionary → feature → stats`, for the features the config names.
    pub features: BTreeMap<String, BTreeMap<u32, FeatureStats>>,
    /// Monitor events, in order.
    pub events: Vec<Event>,
    /// Tokens edited per rule.
    pub steering: BTreeMap<String, u64>,
    /// Whether a monitor flagged it.
    pub flagged: bool,
    /// Whether a monitor asked to stop it.
    pub stopped: bool,
}

/// What a step tells the host.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepResult {
    /// Requests a monitor asked to stop during this step.
    pub stop: Vec<u64>,
    /// Events fired during this step.
    pub events: Vec<Event>,
}
