//! `[[monitor]]` and the token and request windows it reads over.

use serde::Deserialize;

use super::defaults::one;

/// When a monitor or rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyTo {
    /// Every token.
    #[default]
    All,
    /// Prompt tokens only.
    Prompt,
    /// Generated tokens only.
    Generated,
}

/// A monitor's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// Decide per token.
    Token,
    /// Aggregate over the request so far.
    #[default]
    Request,
}

/// How a request-window monitor aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Any token over the threshold.
    #[default]
    Any,
    /// At least `count` tokens over the threshold.
    Count,
    /// The request's maximum over the threshold.
    Max,
    /// The mean over tokens (of the largest listed feature) over the threshold.
    Mean,
}

/// What a monitor does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Mark the request flagged.
    #[default]
    Flag,
    /// Switch the request to another steering profile from the next token.
    SwitchProfile,
    /// Ask the host to stop the request.
    Stop,
}

/// `[[monitor]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Its name (a metric label).
    pub name: String,
    /// The dictionary it reads.
    pub dictionary: String,
    /// The features it watches.
    pub features: Vec<u32>,
    /// Activation threshold.
    pub threshold: f32,
    /// `token` or `request`.
    #[serde(default)]
    pub window: Window,
    /// `any`, `count`, `max`, `mean`.
    #[serde(default)]
    pub aggregate: Aggregate,
    /// For `count`: how many tokens.
    #[serde(default = "one")]
    pub count: usize,
    /// `flag`, `switch_profile`, `stop`.
    #[serde(default)]
    pub action: Action,
    /// The profile `switch_profile` moves to.
    pub profile: Option<String>,
    /// Which tokens it reads.
    #[serde(default)]
    pub apply_to: ApplyTo,
}
