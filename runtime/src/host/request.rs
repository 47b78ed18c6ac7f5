//! A running request: its profile and overrides, its compiled rules, and its tallies across
//! reloads and profile switches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::report::{Event, FeatureStats, RequestSummary};
use super::rules::OVERRIDE_PREFIX;
use super::state::{Names, State, column};
use crate::config::{Overrides, SteerConfig};
use crate::metrics::Metrics;
use crate::steering::Rule;
use crate::{Error, Result};

pub(super) struct Request {
    pub(super) id: u64,
    pub(super) profile: Option<String>,
    /// The request's own overrides, as checked against the operator's `[requests]`.
    pub(super) overrides: Overrides,
    /// Rules WASM policies added (the operator's own: not bounded by `[requests]`).
    pub(super) policy_rules: Vec<SteerConfig>,
    pub(super) compiled: Option<Compiled>,
    /// The state the index-based tallies below refer to.
    pub(super) names: Arc<Names>,
    /// By monitor index.
    pub(super) monitors: Vec<MonitorRun>,
    /// By dictionary index, then feature position; `count == 0` means it never fired.
    pub(super) features: Vec<Vec<FeatureStats>>,
    /// By rule index of `compiled`.
    pub(super) steering: Vec<u64>,
    pub(super) archive: Archive,
    pub(super) events: Vec<Event>,
    pub(super) tokens: u64,
    pub(super) flagged: bool,
    pub(super) stopped: bool,
    /// Rules added by policies since the rules were last compiled.
    pub(super) dirty: bool,
    /// Whether a monitor or a policy switched the profile: from then on its rules apply even
    /// when the request asked to drop them (`replace`).
    pub(super) switched: bool,
}

impl Request {
    pub(super) fn new(id: u64, profile: Option<String>, overrides: Overrides) -> Self {
        Self {
            id,
            profile,
            overrides,
            policy_rules: Vec::new(),
            compiled: None,
            names: Arc::new(Names::default()),
            monitors: Vec::new(),
            features: Vec::new(),
            steering: Vec::new(),
            archive: Archive::default(),
            events: Vec::new(),
            tokens: 0,
            flagged: false,
            stopped: false,
            dirty: false,
            switched: false,
        }
    }

    /// Whether the profile's rules are dropped: the request asked (`replace`, which begin_request
    /// allows only when the operator does) and no monitor or policy has switched its profile since.
    pub(super) fn drops_profile(&self) -> bool {
        self.overrides.replace && !self.switched
    }

    /// Adds the current tallies to `a`, by name.
    fn add_tallies(&self, a: &mut Archive) {
        for (i, run) in self.monitors.iter().enumerate() {
            if let Some(name) = self.names.monitors.get(i) {
                a.monitors.insert(name.clone(), run.clone());
            }
        }
        for (di, stats) in self.features.iter().enumerate() {
            let Some((dname, feats)) = self.names.dicts.get(di) else {
                continue;
            };
            for (pos, s) in stats.iter().enumerate().filter(|(_, s)| s.count > 0) {
                let e = a
                    .features
                    .entry(dname.clone())
                    .or_default()
                    .entry(feats[pos])
                    .or_insert(FeatureStats {
                        max: s.max,
                        count: 0,
                    });
                e.max = e.max.max(s.max);
                e.count += s.count;
            }
        }
        if let Some(c) = &self.compiled {
            for (r, n) in c.rules.iter().zip(&self.steering).filter(|(_, n)| **n > 0) {
                *a.steering.entry(r.name.clone()).or_default() += n;
            }
        }
    }

    /// Files the current tallies by name, leaving none current.
    pub(super) fn archive_tallies(&mut self) {
        let mut a = std::mem::take(&mut self.archive);
        self.add_tallies(&mut a);
        self.archive = a;
        self.monitors.clear();
        self.features.clear();
        self.steering.clear();
    }

    /// Brings the tallies and the compiled rules up to date with `state` (allocates only when the
    /// state or the profile changed).
    pub(super) fn sync(&mut self, state: &State, metrics: &Metrics) -> Result<Arc<Vec<Rule>>> {
        if let Some(c) = &self.compiled
            && c.generation == state.generation
            && c.profile == self.profile
            && c.dropped == self.drops_profile()
            && !self.dirty
        {
            return Ok(c.rules.clone());
        }
        // A running request meets a new config: what it asked for is checked again against the
        // new `[requests]` (the operator's word wins), and what the new config no longer has is
        // dropped, counted and logged, so that one request never fails every step of its batch.
        let running = self.compiled.is_some();
        if self
            .compiled
            .as_ref()
            .is_some_and(|c| c.generation != state.generation)
            && (self.overrides.replace || !self.overrides.steer.is_empty())
        {
            let dicts: HashSet<&str> = state.dict_index.keys().map(String::as_str).collect();
            let monitors: HashSet<&str> = state.monitor_index.keys().map(String::as_str).collect();
            let checked = state
                .requests
                .check(&mut self.overrides, &dicts, &monitors, |d, f| {
                    let d = &state.dicts[*state.dict_index.get(d)?];
                    column(&d.meta, &d.name, f).err()
                });
            if let Err(e) = checked {
                metrics.error("override");
                crate::logging::request_rules_dropped("overrides", &e);
                self.overrides = Overrides::default();
            }
        }
        let mut rules = Vec::new();
        if !self.drops_profile()
            && let Some(p) = &self.profile
        {
            match state.profiles.get(p) {
                Some(r) => rules.extend(state.compile(p, r, metrics)?),
                None => {
                    metrics.error("profile");
                    let e = Error::Unknown {
                        what: "profile",
                        name: p.clone(),
                        message: "not in the current config".into(),
                    };
                    if !running {
                        return Err(e);
                    }
                    crate::logging::request_rules_dropped("profile", &e);
                }
            }
        }
        let prefix = format!("{OVERRIDE_PREFIX}{}", self.id);
        let own = match state.compile(&prefix, &self.overrides.steer, metrics) {
            Ok(own) => own,
            Err(e) => {
                let e = match e {
                    Error::Override { .. } => e,
                    e => Error::Override {
                        field: "steer".into(),
                        message: e.to_string(),
                    },
                };
                if !running {
                    return Err(e);
                }
                metrics.error("override");
                crate::logging::request_rules_dropped("overrides", &e);
                self.overrides.steer.clear();
                Vec::new()
            }
        };
        rules.extend(own);
        match state.compile(&prefix, &self.policy_rules, metrics) {
            Ok(r) => rules.extend(r),
            Err(e) => {
                metrics.error("policy");
                crate::logging::request_rules_dropped("policy rules", &e);
                self.policy_rules.clear();
            }
        }
        self.archive_tallies();
        self.names = state.names.clone();
        self.monitors = self
            .names
            .monitors
            .iter()
            .map(|m| self.archive.monitors.remove(m).unwrap_or_default())
            .collect();
        self.features = self
            .names
            .dicts
            .iter()
            .map(|(_, f)| vec![FeatureStats { max: 0.0, count: 0 }; f.len()])
            .collect();
        self.steering = vec![0; rules.len()];
        let rules = Arc::new(rules);
        self.compiled = Some(Compiled {
            generation: state.generation,
            profile: self.profile.clone(),
            dropped: self.drops_profile(),
            rules: rules.clone(),
        });
        self.dirty = false;
        Ok(rules)
    }

    /// What happened to the request so far.
    pub(super) fn summary(&self) -> RequestSummary {
        let mut a = self.archive.clone();
        self.add_tallies(&mut a);
        RequestSummary {
            request: self.id,
            profile: self.profile.clone(),
            tokens: self.tokens,
            features: a.features,
            events: self.events.clone(),
            steering: a.steering,
            flagged: self.flagged,
            stopped: self.stopped,
        }
    }
}

pub(super) struct Compiled {
    pub(super) generation: u64,
    pub(super) profile: Option<String>,
    /// Whether the profile's rules were dropped (`replace`).
    pub(super) dropped: bool,
    pub(super) rules: Arc<Vec<Rule>>,
}

/// A request's tallies from earlier states or profiles, by name.
#[derive(Debug, Default, Clone)]
pub(super) struct Archive {
    pub(super) monitors: HashMap<String, MonitorRun>,
    pub(super) features: BTreeMap<String, BTreeMap<u32, FeatureStats>>,
    pub(super) steering: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Clone)]
pub(super) struct MonitorRun {
    pub(super) count: usize,
    pub(super) max: f32,
    pub(super) sum: f64,
    pub(super) n: u64,
    pub(super) fired: bool,
    /// The request's token index at which it first fired: a `when` rule edits from there on,
    /// not the earlier tokens of the same step.
    pub(super) fired_at: u64,
}

pub(super) fn lock(r: &Mutex<Request>) -> std::sync::MutexGuard<'_, Request> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}
