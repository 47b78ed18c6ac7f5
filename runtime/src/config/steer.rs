//! `[[profile]]` and its `[[profile.steer]]` rules, and the per-request overrides made of the
//! same rules.

use std::path::PathBuf;

use serde::Deserialize;

use super::monitor::ApplyTo;
use crate::{Error, Result};

/// `[[profile]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Its name, given by the host at request begin.
    pub name: String,
    /// Its rules.
    #[serde(default)]
    pub steer: Vec<SteerConfig>,
}

/// A steering op (docs/design.md#4-steering-edits-that-keep-the-dictionarys-error-term).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `x += α d_i`.
    Add,
    /// Set `f_i` to `value`.
    Clamp,
    /// Set `f_i` to 0.
    Ablate,
    /// Multiply `f_i` by `factor`.
    Scale,
    /// Cap `f_i` at `value`.
    Cap,
    /// `x += α u` for a raw direction `u`.
    Vector,
    /// Cap the projection `x·u` at `value`.
    ProjectCap,
}

impl Op {
    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Clamp => "clamp",
            Self::Ablate => "ablate",
            Self::Scale => "scale",
            Self::Cap => "cap",
            Self::Vector => "vector",
            Self::ProjectCap => "project_cap",
        }
    }
}

/// `[[profile.steer]]` (and per-request override rules, in JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerConfig {
    /// The rule's name (a metric label; default `<profile>.<index>`).
    pub name: Option<String>,
    /// The op.
    pub op: Op,
    /// The dictionary whose feature it edits (feature ops).
    pub dictionary: Option<String>,
    /// The feature (feature ops).
    pub feature: Option<u32>,
    /// clamp/cap/project_cap value.
    pub value: Option<f32>,
    /// add/vector strength.
    pub strength: Option<f32>,
    /// scale factor.
    pub factor: Option<f32>,
    /// add: use the unit decoder row.
    #[serde(default)]
    pub normalize: bool,
    /// Which tokens.
    #[serde(default)]
    pub apply_to: ApplyTo,
    /// Only where the feature is active (`f_i > 0`).
    #[serde(default)]
    pub only_active: bool,
    /// Only once this monitor has fired for the request.
    pub when: Option<String>,
    /// vector/project_cap: the direction file (`.npy`, or a GGUF control vector).
    pub vector: Option<PathBuf>,
    /// vector/project_cap: which row of a `.npy`, or which layer of a GGUF file.
    pub index: Option<usize>,
    /// vector/project_cap: the hook it edits.
    pub hook: Option<String>,
}

/// Per-request overrides, given as JSON at request begin. They come from end users: what they
/// may change is the operator's `[requests]` ([`crate::config::RequestsConfig`]), enforced when
/// the request begins.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Extra rules for this request.
    #[serde(default)]
    pub steer: Vec<SteerConfig>,
    /// Drop the profile's own rules (only the extra ones apply); refused unless
    /// `requests.allow_replace`, and undone by a monitor's or policy's `switch_profile`.
    #[serde(default)]
    pub replace: bool,
}

impl Overrides {
    /// Parses the JSON overrides of a request, without the operator's bounds (see
    /// `RequestsConfig`); an error names the field (`steer[3].op`) as an [`Error::Override`].
    pub fn from_json(text: &str) -> Result<Self> {
        // serde_json stops at 128 levels of nesting with an error, so no input overflows the stack.
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed: Self = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            // serde_json's message ends with the line and column.
            Error::Override {
                // `.` is the whole text, `?` a place the parser could not name (a key not a string).
                field: if field == "." || field == "?" {
                    String::new()
                } else {
                    field
                },
                message: inner.to_string(),
            }
        })?;
        de.end().map_err(|e| Error::Override {
            field: String::new(),
            message: e.to_string(),
        })?;
        Ok(parsed)
    }
}

impl SteerConfig {
    /// Checks the fields the op needs; returns the offending key and why.
    pub fn check(
        &self,
        dictionaries: &std::collections::HashSet<&str>,
        monitors: &std::collections::HashSet<&str>,
    ) -> std::result::Result<(), (&'static str, String)> {
        let finite = |key: &'static str,
                      v: Option<f32>|
         -> std::result::Result<f32, (&'static str, String)> {
            match v {
                Some(v) if v.is_finite() => Ok(v),
                Some(_) => Err((key, "is not a finite number".into())),
                None => Err((key, format!("op `{:?}` needs it", self.op).to_lowercase())),
            }
        };
        match self.op {
            // A raw direction from a file at a named hook (with a dictionary, the direction is a
            // row of its decoder, checked with the feature ops below).
            Op::Vector | Op::ProjectCap if self.dictionary.is_none() => {
                if self.vector.is_none() {
                    return Err((
                        "vector",
                        "names no direction file (or give `dictionary` and `feature`)".into(),
                    ));
                }
                if self.hook.is_none() {
                    return Err(("hook", "names no hook".into()));
                }
                if self.op == Op::Vector {
                    finite("strength", self.strength)?;
                } else {
                    finite("value", self.value)?;
                }
            }
            _ => {
                match &self.dictionary {
                    Some(d) if dictionaries.contains(d.as_str()) => {}
                    Some(d) => return Err(("dictionary", format!("no dictionary is named `{d}`"))),
                    None => return Err(("dictionary", "a feature op needs a dictionary".into())),
                }
                if self.feature.is_none() {
                    return Err(("feature", "a feature op needs a feature".into()));
                }
                match self.op {
                    Op::Add => {
                        finite("strength", self.strength)?;
                    }
                    Op::Clamp | Op::Cap => {
                        finite("value", self.value)?;
                    }
                    Op::Scale => {
                        finite("factor", self.factor)?;
                    }
                    Op::Vector => {
                        finite("strength", self.strength)?;
                    }
                    Op::ProjectCap => {
                        finite("value", self.value)?;
                    }
                    Op::Ablate => {}
                }
            }
        }
        if let Some(w) = &self.when
            && !monitors.contains(w.as_str())
        {
            return Err(("when", format!("no monitor is named `{w}`")));
        }
        Ok(())
    }
}
