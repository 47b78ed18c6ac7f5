//! `[requests]`: what a request's own overrides may change.

use serde::Deserialize;

use super::steer::Op;

/// `[requests]`: what a request's overrides may change. The default lets a request steer within
/// bounds that cannot reach beyond its own tokens or undo the operator's steering: the feature
/// ops but `vector`/`project_cap`, at most 8 rules, on the features the config already names
/// (so the hooks' sliced encode serves them) less those a profile steers, never dropping the
/// profile, never a direction the operator has not listed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestsConfig {
    /// Whether requests may carry overrides at all (`false`: any rule or `replace` is refused).
    #[serde(default = "yes")]
    pub allow: bool,
    /// The ops a request's rules may use.
    #[serde(default = "default_request_ops")]
    pub ops: Vec<Op>,
    /// The most rules one request may carry.
    #[serde(default = "default_max_rules")]
    pub max_rules: usize,
    /// The longest overrides text, in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// The bound of `|strength|` (add, vector).
    #[serde(default = "default_max_abs_strength")]
    pub max_abs_strength: f32,
    /// The bound of `|value|` (clamp, cap, project_cap).
    #[serde(default = "default_max_abs_value")]
    pub max_abs_value: f32,
    /// The bound of `|factor|` (scale).
    #[serde(default = "default_max_abs_factor")]
    pub max_abs_factor: f32,
    /// Whether a request may drop its profile's rules (`replace: true`). A monitor's or policy's
    /// `switch_profile` brings the switched-to profile's rules back whatever this says.
    #[serde(default)]
    pub allow_replace: bool,
    /// The `[[vector]]` entries a request may name (each must set `hook`).
    #[serde(default)]
    pub vectors: Vec<String>,
    /// `[[requests.dictionary]]`: the dictionaries whose features requests may steer; when none
    /// is listed, every dictionary with its default features.
    #[serde(default, rename = "dictionary")]
    pub dictionaries: Vec<RequestDictionary>,
}

/// `[[requests.dictionary]]`: one dictionary whose features requests may steer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestDictionary {
    /// The dictionary.
    pub name: String,
    /// The features (original ids) requests may steer; they join the hook's sliced encode. When
    /// absent: the features the config names for the dictionary (monitors, policies, profile
    /// rules) less those a profile steers, whose edits a request's would add to and could undo.
    pub features: Option<Vec<u32>>,
    /// Any feature: a rule on one outside the sliced encode makes its hook encode the whole
    /// dictionary for every token of the batch.
    #[serde(default)]
    pub any_feature: bool,
}

fn yes() -> bool {
    true
}
fn default_request_ops() -> Vec<Op> {
    vec![Op::Add, Op::Clamp, Op::Ablate, Op::Scale, Op::Cap]
}
fn default_max_rules() -> usize {
    8
}
fn default_max_bytes() -> usize {
    64 * 1024
}
fn default_max_abs_strength() -> f32 {
    100.0
}
fn default_max_abs_value() -> f32 {
    100.0
}
fn default_max_abs_factor() -> f32 {
    10.0
}

impl Default for RequestsConfig {
    fn default() -> Self {
        Self {
            allow: true,
            ops: default_request_ops(),
            max_rules: default_max_rules(),
            max_bytes: default_max_bytes(),
            max_abs_strength: default_max_abs_strength(),
            max_abs_value: default_max_abs_value(),
            max_abs_factor: default_max_abs_factor(),
            allow_replace: false,
            vectors: Vec::new(),
            dictionaries: Vec::new(),
        }
    }
}
