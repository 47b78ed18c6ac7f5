//! Steering rules compiled from a profile's, a request's or a policy's `[[profile.steer]]`
//! entries: where each writes and along which direction.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::state::{State, column};
use crate::config::{Op, SteerConfig};
use crate::dictionary::{InputNorm, Kind};
use crate::metrics::Metrics;
use crate::steering::Rule;
use crate::{Error, Result};

/// Names of per-request override rules start with this (they are not profiles).
pub(super) const OVERRIDE_PREFIX: &str = "request-";

impl State {
    /// Compiles `rules` (named after `profile`).
    pub(super) fn compile(
        &self,
        profile: &str,
        rules: &[SteerConfig],
        metrics: &Metrics,
    ) -> Result<Vec<Rule>> {
        let dicts: HashSet<&str> = self.dict_index.keys().map(String::as_str).collect();
        let monitors: HashSet<&str> = self.monitor_index.keys().map(String::as_str).collect();
        let mut out = Vec::with_capacity(rules.len());
        for (i, s) in rules.iter().enumerate() {
            s.check(&dicts, &monitors).map_err(|(key, m)| {
                Error::invalid(format!("rule {i} of `{profile}`"), format!("`{key}`: {m}"))
            })?;
            let name = s.name.clone().unwrap_or_else(|| format!("{profile}.{i}"));
            let when = s.when.as_ref().map(|w| self.monitor_index[w]);
            // Per-request rules share one label value: a request id must never become a label.
            let label = if profile.starts_with(OVERRIDE_PREFIX) {
                "request_override"
            } else {
                name.as_str()
            };
            let counter = metrics.steering_tokens.with_label_values(&[label]);
            // Where the rule writes: (hook, direction). Feature ops write the feature's decoder row
            // at each layer it decodes to; raw directions write their one hook.
            let (dictionary, targets, param, feature): (Option<usize>, Vec<Target>, f32, u32) =
                match s.op {
                    Op::Vector | Op::ProjectCap if s.dictionary.is_none() => {
                        let named = self.config.named_vector(s.vector.as_deref());
                        let path = match named {
                            Some(v) => self.config.resolve(&v.path),
                            None => self
                                .config
                                .resolve(s.vector.as_deref().unwrap_or(Path::new(""))),
                        };
                        let mut u = match named.and_then(|v| self.vectors.get(&v.name)) {
                            Some(u) => u.as_ref().clone(),
                            // Only the operator's profiles may name a file; begin_request refuses
                            // any other direction a request names before it gets here.
                            None if profile.starts_with(OVERRIDE_PREFIX) => {
                                return Err(Error::Override {
                                    field: format!("steer[{i}].vector"),
                                    message: "names no `[[vector]]` entry".into(),
                                });
                            }
                            None => load_direction(&path, s.index.unwrap_or(0))?,
                        };
                        if s.op == Op::ProjectCap {
                            let n = u.iter().map(|v| v * v).sum::<f32>().sqrt();
                            if n == 0.0 || !n.is_finite() {
                                return Err(Error::tensor(
                                    path.display().to_string(),
                                    "the direction has zero length",
                                ));
                            }
                            u.iter_mut().for_each(|v| *v /= n);
                        }
                        let param = if s.op == Op::Vector {
                            s.strength
                        } else {
                            s.value
                        };
                        (
                            None,
                            vec![(s.hook.clone().unwrap_or_default(), u, None)],
                            param.unwrap_or(0.0),
                            0,
                        )
                    }
                    _ => {
                        let di = self.dict_index[s.dictionary.as_deref().unwrap_or("")];
                        let d = &self.dicts[di];
                        if !d.meta.has_decoder() {
                            return Err(Error::invalid(
                                format!("rule `{name}`"),
                                probe_steer_message(&name, &d.name, s),
                            ));
                        }
                        let f = column(&d.meta, &d.name, s.feature.unwrap_or(0))
                            .map_err(|m| Error::invalid(format!("rule `{name}`"), m))?;
                        let row = d.w_dec.row(f as usize);
                        // A crosscoder knows its features only once it has read its last layer: it can
                        // edit that layer and later ones, never an earlier one.
                        let known_from = if d.meta.kind == Kind::Crosscoder {
                            d.hooks_in.len() - 1
                        } else {
                            0
                        };
                        let mut targets = Vec::new();
                        for (layer, h) in d.hooks_out.iter().enumerate() {
                            if s.hook.as_ref().is_some_and(|want| want != h) {
                                continue;
                            }
                            let past = d.meta.kind == Kind::Crosscoder
                                && d.hooks_in[..known_from].contains(h);
                            if past {
                                if s.hook.is_some() || d.hooks_out.len() > 1 {
                                    return Err(Error::invalid(
                                        format!("rule `{name}`"),
                                        format!(
                                            "crosscoder `{}` knows its features only at `{}`, so it cannot edit `{h}`, \
                                         which comes earlier: set `hook` to `{}` or a later layer",
                                            d.name, d.hooks_in[known_from], d.hooks_in[known_from]
                                        ),
                                    ));
                                }
                                continue;
                            }
                            let d_out = d.meta.d_out;
                            let mut dir = row
                                .slice(ndarray::s![layer * d_out..(layer + 1) * d_out])
                                .to_vec();
                            // `add` may ask for the unit row; `project_cap` always caps the projection on it.
                            let unit = (s.op == Op::Add && s.normalize) || s.op == Op::ProjectCap;
                            if unit {
                                let n = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
                                if n > 0.0 {
                                    dir.iter_mut().for_each(|v| *v /= n);
                                }
                            }
                            // The reconstruction of a dictionary that normalises its input is
                            // un-normalised, so the decoder row moves the model's activations by
                            // the token's output gain times the row: scaled per token when edited.
                            // A unit direction is the same whichever the gain.
                            let gain = (!unit
                                && d.meta.denormalizes_output()
                                && d.meta.input_norm != InputNorm::None)
                                .then_some(layer);
                            targets.push((h.clone(), dir, gain));
                        }
                        if targets.is_empty() {
                            return Err(Error::invalid(
                                format!("rule `{name}`"),
                                format!(
                                    "`hook` = `{}` is not a hook `{}` writes (it writes {})",
                                    s.hook.as_deref().unwrap_or(""),
                                    d.name,
                                    d.hooks_out.join(", ")
                                ),
                            ));
                        }
                        let param = match s.op {
                            Op::Add => s.strength,
                            Op::Clamp | Op::Cap => s.value,
                            Op::Scale => s.factor,
                            Op::Vector => s.strength,
                            Op::ProjectCap => s.value,
                            Op::Ablate => Some(0.0),
                        };
                        (Some(di), targets, param.unwrap_or(0.0), f)
                    }
                };
            for (k, (hook, direction, gain_layer)) in targets.into_iter().enumerate() {
                out.push(Rule {
                    counter: counter.clone(),
                    name: name.clone(),
                    op: s.op,
                    dictionary,
                    feature,
                    position: dictionary
                        .and_then(|di| self.dicts[di].position.get(&feature).copied()),
                    param,
                    direction_max: direction.iter().fold(0.0, |m, v| m.max(v.abs())),
                    direction: Arc::new(direction),
                    gain_layer,
                    hook,
                    counts: k == 0,
                    apply_to: s.apply_to,
                    only_active: s.only_active,
                    when,
                });
            }
        }
        Ok(out)
    }
}

/// Where a rule writes: a hook, the direction added there, and the input layer whose output gain
/// scales it per token ([`Rule::gain_layer`]).
type Target = (String, Vec<f32>, Option<usize>);

/// Reads a steering direction: row `index` of a `.npy` (`[d]` or `[n, d]`), or layer `index` of a
/// GGUF control vector.
pub(super) fn load_direction(path: &Path, index: usize) -> Result<Vec<f32>> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let cv = crate::vectors::read_gguf_control_vector(path)?;
        return cv.directions.get(&index).cloned().ok_or_else(|| {
            Error::tensor(
                path.display().to_string(),
                format!("has no `direction.{index}`"),
            )
        });
    }
    let v = crate::vectors::read_npy_vectors(path)?;
    if index >= v.nrows() {
        return Err(Error::tensor(
            path.display().to_string(),
            format!("has {} directions, not {}", v.nrows(), index + 1),
        ));
    }
    Ok(v.row(index).to_vec())
}

/// Why a rule cannot steer through probe `dict`.
pub(super) fn probe_steer_message(rule: &str, dict: &str, s: &SteerConfig) -> String {
    format!(
        "rule `{rule}` ({} of output {}) steers through `{dict}`, a probe: a probe has no decoder \
         rows to steer with. Monitor the probe and make rules conditional on the monitor (`when`), \
         or steer along a direction with a `vector` dictionary (`tiller-export diffmeans`)",
        s.op.as_str(),
        s.feature.unwrap_or(0)
    )
}
