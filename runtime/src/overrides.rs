//! What a request's overrides may change: the operator's `[requests]` ([`RequestsConfig`]),
//! enforced whole when a request begins, so that a refused request leaves nothing behind.
//!
//! Threat model: overrides come from end users through a host (the embedding server forwards a
//! body's `tiller_overrides` as it is). Whatever they say, a request cannot drop the operator's
//! profile unless the operator allows it, name a file (directions are `[[vector]]` entries, by
//! name), make its hook encode the whole dictionary for the batch (its features are those the
//! operator lists, which the sliced encode already serves), or carry unbounded text, rules or
//! values. Each refusal is an [`Error::Override`] naming the field and the bound it crossed.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::config::{Config, Overrides, RequestsConfig};
use crate::{Error, Result};

/// The longest rule name a request may give (names appear in its summary).
const MAX_NAME: usize = 128;

/// How many allowed features an error lists before it says "and N more".
const LISTED: usize = 16;

/// The `[requests]` of one loaded config, resolved against its dictionaries and vectors.
#[derive(Debug, Default)]
pub(crate) struct RequestPolicy {
    config: RequestsConfig,
    /// The dictionaries requests may steer, each with its features (`None`: any).
    features: HashMap<String, Option<BTreeSet<u32>>>,
    /// The `[[vector]]` entries requests may name, with the hook each edits.
    vectors: HashMap<String, String>,
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Override {
        field: field.into(),
        message: message.into(),
    }
}

/// `a, b, c` (or `none`), for messages.
fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<&str> = items.into_iter().collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

impl RequestPolicy {
    /// Resolves `config`'s `[requests]`.
    pub(crate) fn new(config: &Config) -> Self {
        let listed = |name: &str| {
            config.requests.dictionaries.is_empty()
                || config.requests.dictionaries.iter().any(|d| d.name == name)
        };
        let features = config
            .dictionaries
            .iter()
            .filter(|d| listed(&d.name))
            .map(|d| (d.name.clone(), config.request_features(&d.name)))
            .collect();
        let vectors = config
            .requests
            .vectors
            .iter()
            .filter_map(|n| config.vectors.iter().find(|v| &v.name == n))
            .filter_map(|v| Some((v.name.clone(), v.hook.clone()?)))
            .collect();
        Self {
            config: config.requests.clone(),
            features,
            vectors,
        }
    }

    /// Parses the overrides `text` and checks them against the operator's bounds. `dictionaries`
    /// and `monitors` are the config's; `feature_error` says why a dictionary does not have a
    /// feature (out of range, not in a sliced file), for dictionaries that allow any feature.
    pub(crate) fn parse(
        &self,
        text: &str,
        dictionaries: &HashSet<&str>,
        monitors: &HashSet<&str>,
        feature_error: impl Fn(&str, u32) -> Option<String>,
    ) -> Result<Overrides> {
        let c = &self.config;
        // Before parsing, so that an oversized text costs nothing more than its length.
        if text.len() > c.max_bytes {
            return Err(refuse(
                "",
                format!(
                    "{} bytes exceed the operator's bound {} (requests.max_bytes)",
                    text.len(),
                    c.max_bytes
                ),
            ));
        }
        let mut o = Overrides::from_json(text)?;
        self.check(&mut o, dictionaries, monitors, feature_error)?;
        Ok(o)
    }

    /// Checks parsed overrides against the operator's bounds (as [`RequestPolicy::parse`] does
    /// after parsing): at `begin_request`, and again for a running request when a reload brings
    /// other bounds. Fills in the hook of a named `[[vector]]`.
    pub(crate) fn check(
        &self,
        o: &mut Overrides,
        dictionaries: &HashSet<&str>,
        monitors: &HashSet<&str>,
        feature_error: impl Fn(&str, u32) -> Option<String>,
    ) -> Result<()> {
        let c = &self.config;
        if !c.allow && (o.replace || !o.steer.is_empty()) {
            return Err(refuse(
                if o.replace { "replace" } else { "steer" },
                "the operator allows requests no overrides (requests.allow = false)",
            ));
        }
        if o.replace && !c.allow_replace {
            return Err(refuse(
                "replace",
                "the operator does not let a request drop its profile's rules \
                 (requests.allow_replace = false)",
            ));
        }
        if o.steer.len() > c.max_rules {
            return Err(refuse(
                "steer",
                format!(
                    "{} rules exceed the operator's bound {} (requests.max_rules)",
                    o.steer.len(),
                    c.max_rules
                ),
            ));
        }
        for (i, s) in o.steer.iter_mut().enumerate() {
            let at = |key: &str| format!("steer[{i}].{key}");
            if !c.ops.contains(&s.op) {
                return Err(refuse(
                    at("op"),
                    format!(
                        "`{}` is not an op the operator lets requests use (requests.ops: {})",
                        s.op.as_str(),
                        list(c.ops.iter().map(|o| o.as_str()))
                    ),
                ));
            }
            if let Some(name) = s.name.as_deref().filter(|n| n.len() > MAX_NAME) {
                return Err(refuse(
                    at("name"),
                    format!("{} bytes exceed {MAX_NAME}", name.len()),
                ));
            }
            // A direction is a `[[vector]]` entry named by the operator: whatever the request
            // wrote is only ever compared with those names, never opened.
            if let Some(v) = &s.vector {
                let name = v.to_str().unwrap_or_default();
                let Some(hook) = self.vectors.get(name) else {
                    let mut allowed: Vec<&str> = self.vectors.keys().map(String::as_str).collect();
                    allowed.sort_unstable();
                    return Err(refuse(
                        at("vector"),
                        format!(
                            "`{}` is not a direction the operator lets requests use \
                             (requests.vectors: {}); a request names a `[[vector]]` entry, \
                             never a file",
                            v.display(),
                            list(allowed)
                        ),
                    ));
                };
                if s.index.is_some() {
                    return Err(refuse(
                        at("index"),
                        format!("is set by the operator's `[[vector]]` entry `{name}`"),
                    ));
                }
                match &s.hook {
                    Some(h) if h != hook => {
                        return Err(refuse(
                            at("hook"),
                            format!("`{h}` is not the hook of vector `{name}` (`{hook}`)"),
                        ));
                    }
                    Some(_) => {}
                    None => s.hook = Some(hook.clone()),
                }
            }
            for (key, value, bound, setting) in [
                (
                    "strength",
                    s.strength,
                    c.max_abs_strength,
                    "max_abs_strength",
                ),
                ("value", s.value, c.max_abs_value, "max_abs_value"),
                ("factor", s.factor, c.max_abs_factor, "max_abs_factor"),
            ] {
                match value {
                    Some(v) if !v.is_finite() => {
                        return Err(refuse(at(key), format!("{v} is not a finite number")));
                    }
                    Some(v) if v.abs() > bound => {
                        return Err(refuse(
                            at(key),
                            format!(
                                "{} exceeds the operator's bound {bound} (requests.{setting})",
                                if v.abs() < 1e6 {
                                    v.to_string()
                                } else {
                                    format!("{v:e}")
                                }
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            s.check(dictionaries, monitors)
                .map_err(|(key, m)| refuse(at(key), m))?;
            let (Some(d), Some(f)) = (s.dictionary.as_deref(), s.feature) else {
                continue;
            };
            match self.features.get(d) {
                None => {
                    let mut allowed: Vec<&str> = self.features.keys().map(String::as_str).collect();
                    allowed.sort_unstable();
                    return Err(refuse(
                        at("dictionary"),
                        format!(
                            "`{d}` is not a dictionary the operator lets requests steer \
                             (requests.dictionary: {})",
                            list(allowed)
                        ),
                    ));
                }
                Some(None) => {
                    if let Some(m) = feature_error(d, f) {
                        return Err(refuse(at("feature"), m));
                    }
                }
                Some(Some(set)) if !set.contains(&f) => {
                    let shown: Vec<String> = set.iter().take(LISTED).map(u32::to_string).collect();
                    let more = set.len().saturating_sub(LISTED);
                    return Err(refuse(
                        at("feature"),
                        format!(
                            "feature {f} of `{d}` is not one the operator lets requests steer \
                             (requests.dictionary: {}{})",
                            list(shown.iter().map(String::as_str)),
                            if more > 0 {
                                format!(" and {more} more")
                            } else {
                                String::new()
                            }
                        ),
                    ));
                }
                Some(Some(_)) => {}
            }
        }
        Ok(())
    }
}
