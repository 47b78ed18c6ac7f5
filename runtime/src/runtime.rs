//! The host-facing runtime (design.md section 5): requests, forward steps, hooks, monitors,
//! steering, metrics, reloads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use serde::Serialize;

use crate::config::{Action, Aggregate, ApplyTo, Config, Op, Overrides, SteerConfig, Window};
use crate::dictionary::{Activation, DictionaryFile, InputNorm, Kind, Meta, split_hooks};
use crate::fvu::{Meter, Reconstruct, Sample, Sampler, Worker};
use crate::metrics::{DictionaryMetrics, FeatureMetrics, HookMetrics, Metrics};
use crate::native::SlicedEncoder;
use crate::session::{Backend, Dictionary, SessionOptions};
use crate::steering::{Rule, covers};
use crate::{Error, Result};

/// Names of per-request override rules start with this (they are not profiles).
const OVERRIDE_PREFIX: &str = "request-";

/// Whether a token belongs to the prompt or was generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A prompt token (prefill).
    Prompt,
    /// A generated token (decode).
    Generated,
}

/// One token of a forward step: the request it belongs to and its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The request id given to [`Runtime::begin_request`].
    pub request: u64,
    /// Prompt or generated.
    pub phase: Phase,
}

/// Activations handed to a hook, `[n_tokens, width]` row-major, edited in place.
#[derive(Debug)]
pub enum ActivationsMut<'a> {
    /// float32.
    F32(&'a mut [f32]),
    /// float16.
    F16(&'a mut [half::f16]),
    /// bfloat16.
    Bf16(&'a mut [half::bf16]),
}

impl ActivationsMut<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(a) => a.len(),
            Self::F16(a) => a.len(),
            Self::Bf16(a) => a.len(),
        }
    }

    fn read_into(&self, out: &mut [f32]) {
        match self {
            Self::F32(a) => out.copy_from_slice(a),
            Self::F16(a) => out
                .iter_mut()
                .zip(a.iter())
                .for_each(|(o, v)| *o = v.to_f32()),
            Self::Bf16(a) => out
                .iter_mut()
                .zip(a.iter())
                .for_each(|(o, v)| *o = v.to_f32()),
        }
    }

    fn write_row(&mut self, start: usize, row: &[f32]) {
        let end = start + row.len();
        match self {
            Self::F32(a) => a[start..end].copy_from_slice(row),
            Self::F16(a) => a[start..end]
                .iter_mut()
                .zip(row)
                .for_each(|(o, v)| *o = half::f16::from_f32(*v)),
            Self::Bf16(a) => a[start..end]
                .iter_mut()
                .zip(row)
                .for_each(|(o, v)| *o = half::bf16::from_f32(*v)),
        }
    }
}

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

/// What happened to a request, returned by [`Runtime::end_request`].
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

struct DictState {
    name: String,
    meta: Meta,
    /// The hooks it reads: one, or a crosscoder's layers in model order.
    hooks_in: Vec<String>,
    /// The hooks it writes: one, or each layer of a crosscoder's or CLT's decoder.
    hooks_out: Vec<String>,
    dict: Dictionary,
    w_dec: Arc<Array2<f32>>,
    /// The features the config names (monitored or steered), sorted.
    features: Vec<u32>,
    position: HashMap<u32, usize>,
    /// A feature counts as active (metrics, summaries, policies) above this: 0, or 0.5 for a
    /// sigmoid probe (its positive calls).
    active_above: f32,
    sliced: Option<SlicedEncoder>,
    feature_metrics: Vec<FeatureMetrics>,
    /// The FVU and L0 gauges (none for a probe, which reconstructs nothing).
    meter: Option<Meter>,
    /// Which tokens those gauges sample.
    sampler: Sampler,
    /// Whether the reconstruction's target is the input (SAEs, crosscoders), rather than the
    /// activations at `hooks_out` (transcoders, CLTs).
    target_is_input: bool,
}

struct MonitorState {
    name: String,
    dictionary: usize,
    positions: Vec<usize>,
    threshold: f32,
    window: Window,
    aggregate: Aggregate,
    count: usize,
    action: Action,
    profile: Option<String>,
    apply_to: ApplyTo,
    events: prometheus::IntCounter,
}

struct HookPlan {
    width: usize,
    /// `(dictionary, input layer)` pairs read here.
    reads: Vec<(usize, usize)>,
    writes: Vec<usize>,
    vector_rules: bool,
    metrics: HookMetrics,
}

struct State {
    config: Config,
    generation: u64,
    names: Arc<Names>,
    dicts: Vec<DictState>,
    /// WASM policies, compiled for this state.
    policies: Vec<crate::policy::Policy>,
    dict_index: HashMap<String, usize>,
    monitors: Vec<MonitorState>,
    monitor_index: HashMap<String, usize>,
    profiles: HashMap<String, Vec<SteerConfig>>,
    hooks: HashMap<String, HookPlan>,
    /// The `[[vector]]` directions, read once at load: no request reaches a file.
    vectors: HashMap<String, Arc<Vec<f32>>>,
    /// What requests' overrides may change.
    requests: crate::overrides::RequestPolicy,
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Flag => "flag",
        Action::SwitchProfile => "switch_profile",
        Action::Stop => "stop",
    }
}

impl State {
    fn build(config: Config, generation: u64, metrics: &Metrics) -> Result<Self> {
        let opts = SessionOptions {
            intra_threads: config.runtime.threads,
            pool_size: config.runtime.pool_size,
            onnxruntime: config
                .runtime
                .onnxruntime
                .as_ref()
                .map(|p| config.resolve(p)),
            native: true,
        };
        // Features each dictionary must produce: monitored and steered ones.
        let mut needed: HashMap<&str, HashSet<u32>> = HashMap::new();
        for m in &config.monitors {
            needed
                .entry(m.dictionary.as_str())
                .or_default()
                .extend(&m.features);
        }
        for p in &config.profiles {
            for s in &p.steer {
                if let (Some(d), Some(f)) = (&s.dictionary, s.feature) {
                    needed.entry(d.as_str()).or_default().insert(f);
                }
            }
        }
        // What policies see is computed like what monitors see.
        for p in &config.policies {
            needed
                .entry(p.dictionary.as_str())
                .or_default()
                .extend(&p.features);
        }
        // Features the operator lets requests steer join the sliced encode, so that a request's
        // rule on one never makes its hook encode the whole dictionary.
        for d in &config.requests.dictionaries {
            needed
                .entry(d.name.as_str())
                .or_default()
                .extend(d.features.iter().flatten());
        }
        let mut dicts = Vec::new();
        let mut dict_index = HashMap::new();
        for dc in &config.dictionaries {
            let path = config.resolve(&dc.path);
            let file = DictionaryFile::open(&path)?;
            let meta = file.meta().clone();
            if !meta.has_decoder() && dc.hook_out.is_some() {
                return Err(config_error(
                    &config,
                    "dictionary",
                    config.dictionaries.iter().position(|d| d.name == dc.name),
                    None,
                    "hook_out",
                    format!(
                        "dictionary `{}` is a probe: it reads its hook and writes none",
                        dc.name
                    ),
                ));
            }
            let hooks_in = dc
                .hook
                .as_deref()
                .map_or_else(|| meta.hooks_in(), split_hooks);
            let mut hooks_out = dc
                .hook_out
                .as_deref()
                .or(dc.hook.as_deref())
                .map_or_else(|| meta.hooks_out(), split_hooks);
            if !meta.has_decoder() {
                hooks_out.clear();
            } else if hooks_out.is_empty() && !meta.layered_decoder() {
                hooks_out = hooks_in.clone();
            }
            if hooks_in.is_empty() {
                return Err(Error::dictionary(
                    &path,
                    format!(
                        "dictionary `{}` names no hook: set `hook` in the config",
                        dc.name
                    ),
                ));
            }
            if hooks_in.len() != meta.input_layers() || hooks_out.len() != meta.output_layers() {
                return Err(Error::dictionary(
                    &path,
                    format!(
                        "dictionary `{}` reads {} and writes {} layers, but names the hooks in [{}] and out [{}]: \
                         give one hook per layer (comma separated `hook` / `hook_out`)",
                        dc.name,
                        meta.input_layers(),
                        meta.output_layers(),
                        hooks_in.join(", "),
                        hooks_out.join(", ")
                    ),
                ));
            }
            // The config names features by their original ids; a sliced file maps them to columns.
            let mut features = Vec::new();
            for &id in needed.get(dc.name.as_str()).into_iter().flatten() {
                features
                    .push(column(&meta, &dc.name, id).map_err(|m| Error::dictionary(&path, m))?);
            }
            features.sort_unstable();
            let position = features.iter().enumerate().map(|(i, &f)| (f, i)).collect();
            let sliced = if features.is_empty() {
                None
            } else {
                SlicedEncoder::new(&file, &features)?
            };
            let w_dec = Arc::new(file.w_dec()?);
            let feature_metrics = features
                .iter()
                .map(|&f| {
                    let l = [dc.name.as_str(), &original_id(&meta, f).to_string()];
                    FeatureMetrics {
                        activation: metrics.feature_activation.with_label_values(&l),
                        active: metrics.feature_active.with_label_values(&l),
                    }
                })
                .collect();
            // A probe has no reconstruction: no FVU or L0 series.
            let meter = meta.has_decoder().then(|| {
                let name = dc.name.as_str();
                Meter::new(DictionaryMetrics {
                    l0: metrics.l0.with_label_values(&[name]),
                    fvu: metrics.fvu.with_label_values(&[name]),
                    measured: metrics.fvu_samples.with_label_values(&[name, "measured"]),
                    dropped: metrics.fvu_samples.with_label_values(&[name, "dropped"]),
                })
            });
            let every = if config.runtime.fvu_sample_rate > 0.0 && meta.has_decoder() {
                (1.0 / config.runtime.fvu_sample_rate).round().max(1.0) as u64
            } else {
                0
            };
            let target_is_input = matches!(meta.kind, Kind::Sae | Kind::Crosscoder | Kind::Vector);
            let dict = Dictionary::from_file(file, &opts)?;
            let active_above = if meta.activation == Activation::Sigmoid {
                0.5
            } else {
                0.0
            };
            dict_index.insert(dc.name.clone(), dicts.len());
            dicts.push(DictState {
                name: dc.name.clone(),
                meta,
                hooks_in,
                hooks_out,
                dict,
                w_dec,
                features,
                position,
                active_above,
                sliced,
                feature_metrics,
                meter,
                sampler: Sampler::new(every),
                target_is_input,
            });
        }
        let mut monitors = Vec::new();
        let mut monitor_index = HashMap::new();
        for m in &config.monitors {
            let di = dict_index[&m.dictionary];
            let d = &dicts[di];
            let positions = m
                .features
                .iter()
                .map(|&id| column(&d.meta, &d.name, id).map(|c| d.position[&c]))
                .collect::<std::result::Result<Vec<usize>, String>>()
                .map_err(|msg| Error::invalid(format!("monitor `{}`", m.name), msg))?;
            monitor_index.insert(m.name.clone(), monitors.len());
            monitors.push(MonitorState {
                name: m.name.clone(),
                dictionary: di,
                positions,
                threshold: m.threshold,
                window: m.window,
                aggregate: m.aggregate,
                count: m.count.max(1),
                action: m.action,
                profile: m.profile.clone(),
                apply_to: m.apply_to,
                events: metrics
                    .monitor_events
                    .with_label_values(&[m.name.as_str(), action_name(m.action)]),
            });
        }
        // A probe has no decoder rows: refuse every rule that would steer with one, naming it.
        for (pi, p) in config.profiles.iter().enumerate() {
            for (ri, s) in p.steer.iter().enumerate() {
                let Some(d) = s.dictionary.as_deref().and_then(|n| dict_index.get(n)) else {
                    continue;
                };
                let d: &DictState = &dicts[*d];
                if !d.meta.has_decoder() {
                    let name = s.name.clone().unwrap_or_else(|| format!("{}.{ri}", p.name));
                    return Err(config_error(
                        &config,
                        "profile",
                        Some(pi),
                        Some(ri),
                        "dictionary",
                        probe_steer_message(&name, &d.name, s),
                    ));
                }
            }
        }
        let profiles: HashMap<String, Vec<SteerConfig>> = config
            .profiles
            .iter()
            .map(|p| (p.name.clone(), p.steer.clone()))
            .collect();
        let mut hooks: HashMap<String, HookPlan> = HashMap::new();
        let plan =
            |hooks: &mut HashMap<String, HookPlan>, name: &str, width: usize| -> Result<()> {
                let p = hooks.entry(name.to_string()).or_insert_with(|| HookPlan {
                    width,
                    reads: Vec::new(),
                    writes: Vec::new(),
                    vector_rules: false,
                    metrics: HookMetrics {
                        tokens: metrics.tokens.with_label_values(&[name]),
                        duration: metrics.hook_duration.with_label_values(&[name]),
                        nonfinite: metrics.nonfinite.with_label_values(&[name]),
                    },
                });
                if p.width != width {
                    return Err(Error::invalid(
                        format!("hook `{name}`"),
                        format!(
                            "dictionaries disagree on its width ({} and {width})",
                            p.width
                        ),
                    ));
                }
                Ok(())
            };
        for (i, d) in dicts.iter().enumerate() {
            for (layer, h) in d.hooks_in.iter().enumerate() {
                plan(&mut hooks, h, d.meta.d_in)?;
                if let Some(p) = hooks.get_mut(h) {
                    p.reads.push((i, layer));
                }
            }
            for h in &d.hooks_out {
                plan(&mut hooks, h, d.meta.d_out)?;
                if let Some(p) = hooks.get_mut(h)
                    && !p.writes.contains(&i)
                {
                    p.writes.push(i);
                }
            }
        }
        let names = Arc::new(Names {
            dicts: dicts
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        d.features
                            .iter()
                            .map(|&c| original_id(&d.meta, c))
                            .collect(),
                    )
                })
                .collect(),
            monitors: monitors.iter().map(|m| m.name.clone()).collect(),
        });
        let mut state = Self {
            names,
            policies: Vec::new(),
            vectors: HashMap::new(),
            requests: crate::overrides::RequestPolicy::new(&config),
            config,
            generation,
            dicts,
            dict_index,
            monitors,
            monitor_index,
            profiles,
            hooks,
        };
        state.policies = load_policies(&state, metrics)?;
        for v in &state.config.vectors {
            let path = state.config.resolve(&v.path);
            let u = load_direction(&path, v.index)?;
            // A vector with a hook may be used by a request's rule: plan its hook like a profile's.
            if let Some(h) = &v.hook {
                plan(&mut state.hooks, h, u.len())?;
                if let Some(p) = state.hooks.get_mut(h) {
                    p.vector_rules = true;
                }
            }
            state.vectors.insert(v.name.clone(), Arc::new(u));
        }
        // Compile every profile once, so a bad rule is a load error, not a request error.
        let names: Vec<String> = state.profiles.keys().cloned().collect();
        for name in names {
            let rules = state.profiles[&name].clone();
            let compiled = state.compile(&name, &rules, metrics)?;
            for r in compiled
                .iter()
                .filter(|r| r.op == Op::Vector || r.op == Op::ProjectCap)
            {
                let width = r.direction.len();
                plan(&mut state.hooks, &r.hook, width)?;
                if let Some(p) = state.hooks.get_mut(&r.hook) {
                    p.vector_rules = true;
                }
            }
        }
        Ok(state)
    }

    /// Compiles `rules` (named after `profile`).
    fn compile(
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

/// Why a rule cannot steer through probe `dict`.
fn probe_steer_message(rule: &str, dict: &str, s: &SteerConfig) -> String {
    format!(
        "rule `{rule}` ({} of output {}) steers through `{dict}`, a probe: a probe has no decoder \
         rows to steer with. Monitor the probe and make rules conditional on the monitor (`when`), \
         or steer along a direction with a `vector` dictionary (`tiller-export diffmeans`)",
        s.op.as_str(),
        s.feature.unwrap_or(0)
    )
}

/// A [`Error::Config`] at `key` of the `index`-th `[[table]]` (and its `rule`-th
/// `[[profile.steer]]`) of the file the config came from; the line is 0 when unknown.
fn config_error(
    config: &Config,
    table: &str,
    index: Option<usize>,
    rule: Option<usize>,
    key: &str,
    message: String,
) -> Error {
    let file = config
        .source
        .as_ref()
        .map_or_else(|| "<config>".to_string(), |p| p.display().to_string());
    let line = match (index, &config.source) {
        (Some(i), Some(p)) => std::fs::read_to_string(p).map_or(0, |text| {
            crate::config::locate_key(&text, table, i, rule, key)
        }),
        _ => 0,
    };
    Error::Config {
        file,
        line,
        message: format!("`{key}`: {message}"),
    }
}

/// The column of feature `id` (an original feature index) in a dictionary that may be sliced.
fn column(meta: &Meta, name: &str, id: u32) -> std::result::Result<u32, String> {
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
fn original_id(meta: &Meta, c: u32) -> u32 {
    meta.feature_ids
        .as_ref()
        .and_then(|ids| ids.get(c as usize).copied())
        .unwrap_or(c)
}

/// Where a rule writes: a hook, the direction added there, and the input layer whose output gain
/// scales it per token ([`Rule::gain_layer`]).
type Target = (String, Vec<f32>, Option<usize>);

/// Reads a steering direction: row `index` of a `.npy` (`[d]` or `[n, d]`), or layer `index` of a
/// GGUF control vector.
fn load_direction(path: &Path, index: usize) -> Result<Vec<f32>> {
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

#[derive(Debug, Default, Clone)]
struct MonitorRun {
    count: usize,
    max: f32,
    sum: f64,
    n: u64,
    fired: bool,
    /// The request's token index at which it first fired: a `when` rule edits from there on,
    /// not the earlier tokens of the same step.
    fired_at: u64,
}

/// Names of the state's tables, so a request can file its tallies by name when the state changes.
#[derive(Debug, Default)]
struct Names {
    dicts: Vec<(String, Vec<u32>)>,
    monitors: Vec<String>,
}

/// A request's tallies from earlier states or profiles, by name.
#[derive(Debug, Default, Clone)]
struct Archive {
    monitors: HashMap<String, MonitorRun>,
    features: BTreeMap<String, BTreeMap<u32, FeatureStats>>,
    steering: BTreeMap<String, u64>,
}

struct Compiled {
    generation: u64,
    profile: Option<String>,
    /// Whether the profile's rules were dropped (`replace`).
    dropped: bool,
    rules: Arc<Vec<Rule>>,
}

struct Request {
    id: u64,
    profile: Option<String>,
    /// The request's own overrides, as checked against the operator's `[requests]`.
    overrides: Overrides,
    /// Rules WASM policies added (the operator's own: not bounded by `[requests]`).
    policy_rules: Vec<SteerConfig>,
    compiled: Option<Compiled>,
    /// The state the index-based tallies below refer to.
    names: Arc<Names>,
    /// By monitor index.
    monitors: Vec<MonitorRun>,
    /// By dictionary index, then feature position; `count == 0` means it never fired.
    features: Vec<Vec<FeatureStats>>,
    /// By rule index of `compiled`.
    steering: Vec<u64>,
    archive: Archive,
    events: Vec<Event>,
    tokens: u64,
    flagged: bool,
    stopped: bool,
    /// Rules added by policies since the rules were last compiled.
    dirty: bool,
    /// Whether a monitor or a policy switched the profile: from then on its rules apply even
    /// when the request asked to drop them (`replace`).
    switched: bool,
}

impl Request {
    fn new(id: u64, profile: Option<String>, overrides: Overrides) -> Self {
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
    fn drops_profile(&self) -> bool {
        self.overrides.replace && !self.switched
    }

    /// Files the current tallies by name.
    fn archive_tallies(&mut self) {
        for (i, run) in self.monitors.drain(..).enumerate() {
            if let Some(name) = self.names.monitors.get(i) {
                self.archive.monitors.insert(name.clone(), run);
            }
        }
        for (di, stats) in self.features.drain(..).enumerate() {
            let Some((dname, feats)) = self.names.dicts.get(di) else {
                continue;
            };
            for (pos, s) in stats.into_iter().enumerate().filter(|(_, s)| s.count > 0) {
                let e = self
                    .archive
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
            for (r, n) in c
                .rules
                .iter()
                .zip(self.steering.drain(..))
                .filter(|(_, n)| *n > 0)
            {
                *self.archive.steering.entry(r.name.clone()).or_default() += n;
            }
        }
    }

    /// Brings the tallies and the compiled rules up to date with `state` (allocates only when the
    /// state or the profile changed).
    fn sync(&mut self, state: &State, metrics: &Metrics) -> Result<Arc<Vec<Rule>>> {
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

    fn summary(&self) -> RequestSummary {
        let mut a = self.archive.clone();
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

/// Buffers a step reuses, so that a steady-state step allocates nothing.
#[derive(Default)]
struct Scratch {
    tokens: Vec<Token>,
    token_req: Vec<usize>,
    token_index: Vec<u64>,
    ids: Vec<u64>,
    reqs: Vec<Arc<Mutex<Request>>>,
    rules: Vec<Arc<Vec<Rule>>>,
    x: Vec<f32>,
    finite: Vec<bool>,
    /// Per token, an upper bound of `max|x|` (kept up to date by the edits).
    bound: Vec<f32>,
    edited: Vec<bool>,
    enc_in: Vec<f32>,
    enc_scratch: Vec<f32>,
    full_scratch: crate::native::Scratch,
    /// By dictionary index: the activations computed at its input hook during this step.
    pending: Vec<Pending>,
    /// By dictionary index: the rows sampled for its FVU at its input hook during this step,
    /// waiting for the activations it reconstructs (transcoders, CLTs).
    fvu: Vec<FvuRows>,
    /// The `(feature, value)` pairs handed to a policy for one token.
    pairs: Vec<(u32, f32)>,
    /// The per-feature counts of this buffer's steps, shared with the scrape (registered in
    /// [`Runtime::locals`] when the buffer is made).
    local: Arc<Mutex<Locals>>,
}

/// A step buffer's per-feature counts: by dictionary, then feature, local histograms and active
/// counts (for the state of `generation`), added to the registry's at most every
/// [`crate::metrics::FLUSH_EVERY`] and at each scrape. Behind their own lock, which only the
/// buffer's step (once per hook) and a scrape take, so that a scrape also reaches the counts of a
/// buffer in use: the steps that ended before it and left their counts in a buffer that another
/// step has since taken.
#[derive(Default)]
struct Locals {
    features: Vec<Vec<crate::metrics::LocalFeature>>,
    generation: u64,
    /// When `features` were last flushed (`None`: never).
    flushed_at: Option<Instant>,
}

impl Locals {
    /// Adds the per-feature counts held here to the registry's.
    fn flush(&mut self) {
        for f in self.features.iter_mut().flatten() {
            f.flush();
        }
    }
}

/// Tokens sampled for a dictionary's FVU whose target is read at later hooks of the step.
#[derive(Default)]
struct FvuRows {
    /// The sampled tokens (empty: none waiting).
    rows: Vec<usize>,
    /// `[rows, input width]`.
    input: Vec<f32>,
    /// `[rows, output layers·d_out]`, filled layer by layer.
    target: Vec<f32>,
    /// Which output layers `target` holds.
    seen: Vec<bool>,
}

#[derive(Default)]
struct Pending {
    valid: bool,
    /// `[n, m]`: the features the config names.
    named: Vec<f32>,
    m: usize,
    /// Every feature, when a request's own rules needed the full dictionary.
    full: Option<Array2<f32>>,
    /// The storage of the last native full encode, kept for the next.
    spare: Vec<f32>,
    /// A crosscoder's input layers gathered so far in this step, `[n, layers·d_in]`.
    stash: Vec<f32>,
    stash_finite: Vec<bool>,
    /// `[n, input layers]`: each token's output gain ([`InputNorm::output_gain`]) at each input
    /// layer, for a dictionary that normalises its input and un-normalises its reconstruction
    /// (empty otherwise).
    gains: Vec<f32>,
    gain_layers: usize,
}

impl Pending {
    /// Token `t`'s coefficient `c` of `rule` moved into the model's space: times its output gain
    /// when the rule's direction is a raw decoder row of a normalising dictionary.
    fn in_model_space(&self, t: usize, rule: &Rule, c: f32) -> f32 {
        match rule.gain_layer {
            Some(l) => c * self.gains[t * self.gain_layers + l],
            None => c,
        }
    }

    /// Token `t`'s activation of `rule`'s feature.
    fn get(&self, t: usize, rule: &Rule) -> f32 {
        match (rule.position, &self.full) {
            (Some(p), _) => self.named[t * self.m + p],
            (None, Some(full)) => full[[t, rule.feature as usize]],
            (None, None) => 0.0,
        }
    }
}

/// The runtime: shared by all of the host's threads (`Send + Sync`).
pub struct Runtime {
    state: RwLock<Arc<State>>,
    requests: RwLock<HashMap<u64, Arc<Mutex<Request>>>>,
    metrics: Metrics,
    generation: AtomicU64,
    /// Measures the sampled tokens' reconstructions off the hot path (`None` if its thread could
    /// not start: the gauges then stay unset, and nothing else changes).
    fvu: Option<Worker>,
    /// Step buffers between steps.
    scratch: Mutex<Vec<Scratch>>,
    /// The per-feature counts of every step buffer, which a scrape flushes first.
    locals: Arc<Mutex<Vec<Weak<Mutex<Locals>>>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Waits until the worker has measured every token sampled for the FVU and L0 gauges so far
    /// (the hook never waits for it): for tests, and for a host that reads the gauges at a
    /// point it chooses.
    pub fn wait_for_fvu(&self) {
        if let Some(w) = &self.fvu {
            w.flush();
        }
    }

    /// Builds a runtime from a config file.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(Config::from_file(path)?)
    }

    /// Builds a runtime from a parsed config.
    pub fn new(config: Config) -> Result<Self> {
        let metrics = Metrics::new(
            &config.runtime.metrics_prefix,
            &config.runtime.metrics_labels,
        )?;
        let state = State::build(config, 1, &metrics)?;
        let locals: Arc<Mutex<Vec<Weak<Mutex<Locals>>>>> = Arc::default();
        // A scrape first adds what every step buffer holds to the registry.
        let all = Arc::downgrade(&locals);
        metrics.on_collect(move || {
            if let Some(all) = all.upgrade() {
                let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
                all.retain(|l| match l.upgrade() {
                    Some(l) => {
                        l.lock().unwrap_or_else(|p| p.into_inner()).flush();
                        true
                    }
                    None => false,
                });
            }
        });
        Ok(Self {
            state: RwLock::new(Arc::new(state)),
            requests: RwLock::new(HashMap::new()),
            metrics,
            generation: AtomicU64::new(1),
            fvu: Worker::start().ok(),
            scratch: Mutex::default(),
            locals,
        })
    }

    fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.state().config.clone()
    }

    /// How the dictionary `name` computes all its features (the TopK dictionaries, requests
    /// whose rules name features outside the config's, crosscoders): natively where the
    /// dictionary allows, else through ONNX Runtime. `None` for an unknown name.
    pub fn backend(&self, name: &str) -> Option<Backend> {
        let state = self.state();
        let di = *state.dict_index.get(name)?;
        Some(state.dicts[di].dict.backend())
    }

    /// The hooks the config attaches to, with their widths.
    pub fn hooks(&self) -> Vec<(String, usize)> {
        let mut h: Vec<(String, usize)> = self
            .state()
            .hooks
            .iter()
            .map(|(k, p)| (k.clone(), p.width))
            .collect();
        h.sort();
        h
    }

    /// Reloads the config file the runtime was built from (or `path`): the new state is built aside
    /// and swapped in atomically; on error the running state is untouched and the error returned.
    pub fn reload(&self, path: Option<&Path>) -> Result<()> {
        let path: Option<PathBuf> = path
            .map(Path::to_path_buf)
            .or_else(|| self.state().config.source.clone());
        let Some(path) = path else {
            return Err(Error::invalid(
                "reload",
                "the runtime was not built from a file; pass one",
            ));
        };
        self.reload_config(Config::from_file(&path))
    }

    /// Swaps in a new config (see [`Runtime::reload`]).
    pub fn reload_config(&self, config: Result<Config>) -> Result<()> {
        let source = config.as_ref().ok().and_then(|c| c.source.clone());
        let built = config.and_then(|c| {
            let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            State::build(c, g, &self.metrics)
        });
        match built {
            Ok(s) => {
                let generation = s.generation;
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
                self.metrics.reloads.with_label_values(&["accepted"]).inc();
                crate::logging::reload_accepted(source.as_deref(), generation);
                Ok(())
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["rejected"]).inc();
                crate::logging::reload_rejected(source.as_deref(), &e);
                Err(e)
            }
        }
    }

    /// Begins request `id` with a profile (or none) and optional JSON overrides.
    pub fn begin_request(
        &self,
        id: u64,
        profile: Option<&str>,
        overrides: Option<&str>,
    ) -> Result<()> {
        // Every refusal is logged here, by kind and field only: see `logging`.
        self.begin_request_checked(id, profile, overrides)
            .inspect_err(crate::logging::request_refused)
    }

    fn begin_request_checked(
        &self,
        id: u64,
        profile: Option<&str>,
        overrides: Option<&str>,
    ) -> Result<()> {
        let state = self.state();
        if let Some(p) = profile
            && !state.profiles.contains_key(p)
        {
            self.metrics.error("profile");
            return Err(Error::Unknown {
                what: "profile",
                name: p.to_string(),
                message: "no such profile in the config".into(),
            });
        }
        // Checked whole here, against the operator's `[requests]`: a refused request leaves nothing.
        let overrides = match overrides {
            Some(o) if !o.trim().is_empty() => {
                let dicts: HashSet<&str> = state.dict_index.keys().map(String::as_str).collect();
                let monitors: HashSet<&str> =
                    state.monitor_index.keys().map(String::as_str).collect();
                state
                    .requests
                    .parse(o, &dicts, &monitors, |d, f| {
                        let d = &state.dicts[*state.dict_index.get(d)?];
                        column(&d.meta, &d.name, f).err()
                    })
                    .inspect_err(|_| self.metrics.error("override"))?
            }
            _ => Overrides::default(),
        };
        let mut req = Request::new(id, profile.map(str::to_string), overrides);
        req.sync(&state, &self.metrics).inspect_err(|e| {
            if matches!(e, Error::Override { .. }) {
                self.metrics.error("override");
            }
        })?;
        let req = Arc::new(Mutex::new(req));
        {
            let mut map = self.requests.write().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&id) {
                return Err(Error::Unknown {
                    what: "request",
                    name: id.to_string(),
                    message: "is already running".into(),
                });
            }
            map.insert(id, req.clone());
        }
        let profile = profile.unwrap_or("");
        for policy in &state.policies {
            let outcome = policy.request_begin(id, profile);
            apply_policy(
                &self.metrics,
                &state,
                policy,
                outcome,
                &mut lock(&req),
                0,
                None,
            );
        }
        Ok(())
    }

    /// Ends request `id` and returns its summary.
    pub fn end_request(&self, id: u64) -> Result<RequestSummary> {
        let req = self
            .requests
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or_else(|| self.unknown_request(id))?;
        let state = self.state();
        let mut r = lock(&req);
        let last = r.tokens.saturating_sub(1);
        for policy in &state.policies {
            let outcome = policy.request_end(id);
            apply_policy(&self.metrics, &state, policy, outcome, &mut r, last, None);
        }
        Ok(r.summary())
    }

    /// The error for a request id that is not running, counted.
    fn unknown_request(&self, id: u64) -> Error {
        self.metrics.error("unknown_request");
        crate::logging::unknown_request(id);
        Error::Unknown {
            what: "request",
            name: id.to_string(),
            message: "was never begun or has ended".into(),
        }
    }

    /// The summary so far of a running request.
    pub fn request_summary(&self, id: u64) -> Result<RequestSummary> {
        let map = self.requests.read().unwrap_or_else(|p| p.into_inner());
        let req = map.get(&id).ok_or_else(|| self.unknown_request(id))?;
        Ok(req.lock().unwrap_or_else(|p| p.into_inner()).summary())
    }

    /// Opens a forward step over `tokens` (the batch's token → request map and phases).
    pub fn step(&self, tokens: &[Token]) -> Result<Step<'_>> {
        self.open_step(RuntimeRef::Borrowed(self), tokens)
    }

    /// [`Runtime::step`] for a shared runtime: the step keeps the runtime alive itself, so it can
    /// outlive the caller's borrow (for the C ABI and other owners of handles).
    pub fn step_shared(self: &Arc<Self>, tokens: &[Token]) -> Result<Step<'static>> {
        self.open_step(RuntimeRef::Shared(self.clone()), tokens)
    }

    fn open_step<'r>(&self, rt: RuntimeRef<'r>, tokens: &[Token]) -> Result<Step<'r>> {
        let state = self.state();
        let mut sc = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| {
                let sc = Scratch::default();
                self.locals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Arc::downgrade(&sc.local));
                sc
            });
        sc.tokens.clear();
        sc.tokens.extend_from_slice(tokens);
        sc.token_req.clear();
        sc.token_index.clear();
        sc.ids.clear();
        sc.reqs.clear();
        sc.rules.clear();
        let mut step = Step {
            rt,
            state,
            sc: Some(sc),
            result: StepResult::default(),
        };
        step.open(tokens)?;
        Ok(step)
    }

    /// The Prometheus text exposition of the runtime's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.text()
    }

    /// The metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// One forward step. Call [`Step::hook`] at each hook, in the model's order, then [`Step::finish`].
pub struct Step<'r> {
    rt: RuntimeRef<'r>,
    state: Arc<State>,
    /// Always `Some` until the step is dropped, when it goes back to the runtime's pool.
    sc: Option<Scratch>,
    result: StepResult,
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("tokens", &self.sc.as_ref().map_or(0, |s| s.tokens.len()))
            .finish_non_exhaustive()
    }
}

/// How a step holds its runtime: borrowed, or shared (for handles that outlive a borrow).
enum RuntimeRef<'r> {
    Borrowed(&'r Runtime),
    Shared(Arc<Runtime>),
}

impl std::ops::Deref for RuntimeRef<'_> {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        match self {
            Self::Borrowed(r) => r,
            Self::Shared(r) => r,
        }
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if let Some(mut sc) = self.sc.take() {
            // Release the requests and rules now: a pooled buffer must not keep them alive.
            sc.reqs.clear();
            sc.rules.clear();
            self.rt
                .scratch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sc);
        }
    }
}

fn lock(r: &Mutex<Request>) -> std::sync::MutexGuard<'_, Request> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

impl Step<'_> {
    fn open(&mut self, tokens: &[Token]) -> Result<()> {
        let rt: &Runtime = &self.rt;
        let state = self.state.clone();
        let Some(sc) = self.sc.as_mut() else {
            return Ok(());
        };
        {
            let map = rt.requests.read().unwrap_or_else(|p| p.into_inner());
            for t in tokens {
                let slot = match sc.ids.iter().position(|&i| i == t.request) {
                    Some(s) => s,
                    None => {
                        let r = map
                            .get(&t.request)
                            .ok_or_else(|| rt.unknown_request(t.request))?;
                        sc.ids.push(t.request);
                        sc.reqs.push(r.clone());
                        sc.ids.len() - 1
                    }
                };
                sc.token_req.push(slot);
            }
        }
        for r in &sc.reqs {
            sc.rules.push(lock(r).sync(&state, &rt.metrics)?);
        }
        for &slot in &sc.token_req {
            let mut r = lock(&sc.reqs[slot]);
            sc.token_index.push(r.tokens);
            r.tokens += 1;
        }
        sc.pending.resize_with(state.dicts.len(), Pending::default);
        // Rows sampled in an earlier step whose targets never came are dropped.
        sc.fvu.resize_with(state.dicts.len(), FvuRows::default);
        for f in &mut sc.fvu {
            f.rows.clear();
        }
        for p in &mut sc.pending {
            p.valid = false;
        }
        Ok(())
    }

    /// Processes the activations at hook `name` in place: `[n_tokens, width]`.
    pub fn hook(&mut self, name: &str, mut acts: ActivationsMut<'_>) -> Result<()> {
        // Debug builds only: lets the C ABI tests check that a panic inside the runtime reaches a
        // C caller as a status (release builds never read this).
        #[cfg(debug_assertions)]
        if std::env::var_os("TILLER_TEST_PANIC_AT_HOOK").is_some_and(|h| h == name) {
            panic!("injected panic at hook `{name}` (TILLER_TEST_PANIC_AT_HOOK)");
        }
        let started = Instant::now();
        let rt: &Runtime = &self.rt;
        let state = self.state.clone();
        let Some(plan) = state.hooks.get(name) else {
            rt.metrics.error("unknown_hook");
            let e = Error::Unknown {
                what: "hook",
                name: name.to_string(),
                message: "no dictionary or rule is attached to it".into(),
            };
            crate::logging::hook_error("unknown_hook", name, &e);
            return Err(e);
        };
        let Some(sc) = self.sc.as_mut() else {
            return Ok(());
        };
        let n = sc.tokens.len();
        let width = plan.width;
        if acts.len() != n * width {
            rt.metrics.error("shape");
            let e = Error::tensor(
                name,
                format!(
                    "holds {} values; {n} tokens × width {width} = {} expected",
                    acts.len(),
                    n * width
                ),
            );
            crate::logging::hook_error("shape", name, &e);
            return Err(e);
        }
        // f32 host memory is read and edited where it lies; f16/bf16 go through an f32 buffer.
        let mut buf = std::mem::take(&mut sc.x);
        let outcome = match &mut acts {
            ActivationsMut::F32(host) => {
                process(rt, &state, plan, sc, name, width, host, &mut self.result)
            }
            other => {
                buf.resize(n * width, 0.0);
                other.read_into(&mut buf);
                let r = process(
                    rt,
                    &state,
                    plan,
                    sc,
                    name,
                    width,
                    &mut buf,
                    &mut self.result,
                );
                for t in (0..n).filter(|&t| sc.edited[t]) {
                    other.write_row(t * width, &buf[t * width..(t + 1) * width]);
                }
                r
            }
        };
        sc.x = buf;
        plan.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Closes the step: the requests to stop and the events that fired.
    pub fn finish(mut self) -> StepResult {
        std::mem::take(&mut self.result)
    }
}

/// One hook call on f32 activations `x` (`[n, width]`), edited in place.
#[allow(clippy::too_many_arguments)]
fn process(
    rt: &Runtime,
    state: &Arc<State>,
    plan: &HookPlan,
    sc: &mut Scratch,
    name: &str,
    width: usize,
    x: &mut [f32],
    result: &mut StepResult,
) -> Result<()> {
    let n = sc.tokens.len();
    sc.finite.clear();
    sc.bound.clear();
    sc.edited.clear();
    sc.edited.resize(n, false);
    collect_targets(rt, state, plan, sc, name, x);
    for &(di, layer) in &plan.reads {
        let d = &state.dicts[di];
        let layers = d.hooks_in.len();
        if layers == 1 {
            let full = needs_full(sc, di);
            // The sliced encoder reads the activations as they are, so their statistics can wait
            // until after the encode: activations just copied from a GPU come from memory, and
            // that first read then overlaps the encode's arithmetic instead of preceding it; the
            // statistics then find them in cache.
            let as_is = !full && d.sliced.as_ref().is_some_and(|s| s.reads_input_as_is());
            if !as_is {
                input_stats(plan, sc, width, x);
            }
            let r = encode(rt, state, sc, di, width, x, full);
            input_stats(plan, sc, width, x);
            r?;
            sample(rt, state, sc, di, width, x);
        } else {
            input_stats(plan, sc, width, x);
            // A crosscoder: keep each layer's rows until the last layer arrives, then encode all.
            let p = &mut sc.pending[di];
            let row = layers * width;
            if layer == 0 {
                p.stash.clear();
                p.stash.resize(n * row, 0.0);
                p.stash_finite.clear();
                p.stash_finite.resize(n, true);
            }
            if p.stash.len() != n * row {
                // An earlier layer was not called in this step: nothing to encode.
                continue;
            }
            for t in 0..n {
                p.stash[t * row + layer * width..t * row + (layer + 1) * width]
                    .copy_from_slice(&x[t * width..(t + 1) * width]);
                p.stash_finite[t] &= sc.finite[t];
            }
            if layer + 1 < layers {
                continue;
            }
            let stash = std::mem::take(&mut p.stash);
            for t in 0..n {
                sc.finite[t] &= sc.pending[di].stash_finite[t];
            }
            let full = needs_full(sc, di);
            let r = encode(rt, state, sc, di, row, &stash, full);
            if r.is_ok() {
                sample(rt, state, sc, di, row, &stash);
            }
            sc.pending[di].stash = stash;
            sc.pending[di].stash.clear();
            r?;
        }
        observe(state, sc, di, result);
        if state.policies.iter().any(|p| p.dictionary == di) {
            run_policies(rt, state, sc, di, result);
        }
    }
    // A hook whose rules only write.
    input_stats(plan, sc, width, x);
    for &di in &plan.writes {
        if !sc.pending[di].valid {
            continue;
        }
        edit(sc, name, width, Some(di), x);
    }
    if plan.vector_rules {
        edit(sc, name, width, None, x);
    }
    Ok(())
}

/// Each token's largest magnitude and whether all its values are finite, with the hook's token
/// counts: taken once per hook call, by the first call of this function in it.
fn input_stats(plan: &HookPlan, sc: &mut Scratch, width: usize, x: &[f32]) {
    let n = sc.tokens.len();
    if sc.finite.len() == n {
        return;
    }
    for r in x.chunks_exact(width.max(1)).take(n) {
        let (m, finite) = crate::kernels::row_stats(r);
        sc.finite.push(finite);
        sc.bound.push(m);
    }
    let bad = sc.finite.iter().filter(|f| !**f).count();
    if bad > 0 {
        plan.metrics.nonfinite.inc_by(bad as u64);
    }
    plan.metrics.tokens.inc_by(n as u64);
}

/// Picks the tokens of this call that dictionary `di`'s FVU and L0 gauges sample and copies
/// their rows of `xs` (`[n, width]`, the input as the dictionary read it) out: to the worker at
/// once when the reconstruction's target is the input, else into the step's buffer until the
/// dictionary's `hooks_out` have been read ([`collect_targets`]).
fn sample(rt: &Runtime, state: &Arc<State>, sc: &mut Scratch, di: usize, width: usize, xs: &[f32]) {
    let d = &state.dicts[di];
    let n = sc.tokens.len();
    let (Some(_), Some(worker)) = (&d.meter, &rt.fvu) else {
        return;
    };
    let Some((first, every)) = d.sampler.pick(n) else {
        return;
    };
    let rows: Vec<usize> = (first..n)
        .step_by(every)
        .filter(|&t| sc.finite[t])
        .collect();
    if rows.is_empty() {
        return;
    }
    let mut input = Vec::with_capacity(rows.len() * width);
    for &t in &rows {
        input.extend_from_slice(&xs[t * width..(t + 1) * width]);
    }
    if d.target_is_input {
        submit(rt, worker, state, di, rows.len(), input, None);
    } else {
        let outs = d.hooks_out.len();
        let f = &mut sc.fvu[di];
        f.target.clear();
        f.target.resize(rows.len() * outs * d.meta.d_out, 0.0);
        f.seen = vec![false; outs];
        f.rows = rows;
        f.input = input;
    }
}

/// At hook `name`, before any edit: copies the rows sampled at the input of each dictionary that
/// writes here and reconstructs this hook's activations (a transcoder's or CLT's `hook_out`), and
/// hands them to the worker once every output layer has been read.
fn collect_targets(
    rt: &Runtime,
    state: &Arc<State>,
    plan: &HookPlan,
    sc: &mut Scratch,
    name: &str,
    x: &[f32],
) {
    let Some(worker) = &rt.fvu else {
        return;
    };
    for &di in &plan.writes {
        let d = &state.dicts[di];
        let f = &mut sc.fvu[di];
        if f.rows.is_empty() || d.target_is_input || d.meter.is_none() {
            continue;
        }
        let (outs, w) = (d.hooks_out.len(), d.meta.d_out);
        for (l, _) in d.hooks_out.iter().enumerate().filter(|(_, h)| *h == name) {
            for (k, &t) in f.rows.iter().enumerate() {
                let at = (k * outs + l) * w;
                f.target[at..at + w].copy_from_slice(&x[t * w..(t + 1) * w]);
            }
            f.seen[l] = true;
        }
        if f.seen.iter().all(|s| *s) {
            let n = f.rows.len();
            f.rows.clear();
            let (input, target) = (std::mem::take(&mut f.input), std::mem::take(&mut f.target));
            submit(rt, worker, state, di, n, input, Some(target));
        }
    }
}

/// Queues the measurement of `n` sampled tokens of dictionary `di` (`input` `[n, input width]`;
/// `target` `[n, output width]`, or `None` when the target is the input); the worker counts
/// them dropped when its queue is full.
fn submit(
    rt: &Runtime,
    worker: &Worker,
    state: &Arc<State>,
    di: usize,
    n: usize,
    input: Vec<f32>,
    target: Option<Vec<f32>>,
) {
    worker.submit(Sample {
        key: (Arc::as_ptr(state) as usize, di),
        source: Arc::new(Sampled {
            state: state.clone(),
            di,
            errors: rt.metrics.errors.with_label_values(&["encode"]),
        }),
        input,
        target,
        n,
    });
}

/// A dictionary of a state, as the FVU worker measures it.
struct Sampled {
    state: Arc<State>,
    di: usize,
    errors: prometheus::IntCounter,
}

impl Reconstruct for Sampled {
    fn reconstruct(&self, x: ArrayView2<'_, f32>) -> Option<(Array2<f32>, Array2<f32>)> {
        let r = self.state.dicts[self.di].dict.encode_decode(x);
        if r.is_err() {
            self.errors.inc();
        }
        r.ok()
    }

    fn meter(&self) -> &Meter {
        // Only dictionaries with a meter are sampled.
        self.state.dicts[self.di]
            .meter
            .as_ref()
            .unwrap_or_else(|| unreachable!("a sampled dictionary has a meter"))
    }
}

/// Whether a request of this step has a rule on a feature of dictionary `di` outside its slice,
/// which makes the full dictionary run.
fn needs_full(sc: &Scratch, di: usize) -> bool {
    sc.rules
        .iter()
        .flat_map(|rs| rs.iter())
        .any(|r| r.dictionary == Some(di) && r.position.is_none())
}

/// Applies the rules that write hook `name` through dictionary `di` (or, with `None`, the raw
/// direction rules) to every token.
fn edit(sc: &mut Scratch, name: &str, width: usize, di: Option<usize>, x: &mut [f32]) {
    let n = sc.tokens.len();
    for t in 0..n {
        if !sc.finite[t] {
            continue;
        }
        let slot = sc.token_req[t];
        let phase = sc.tokens[t].phase;
        let rules = &sc.rules[slot];
        let row = &mut x[t * width..(t + 1) * width];
        // The request's lock, taken at the first rule that applies and held for the token's rules.
        let mut held = None;
        // Edits whose result is known finite wait here and go into `row` together, in one pass,
        // in rule order (the same values as one pass per edit).
        let mut waiting = Waiting::default();
        for (ri, rule) in rules.iter().enumerate() {
            if rule.dictionary != di || rule.hook != name || !covers(rule.apply_to, phase) {
                continue;
            }
            let req = held.get_or_insert_with(|| lock(&sc.reqs[slot]));
            if let Some(mi) = rule.when
                && !req
                    .monitors
                    .get(mi)
                    .is_some_and(|r| r.fired && sc.token_index[t] >= r.fired_at)
            {
                continue;
            }
            let f = match di {
                Some(di) => sc.pending[di].get(t, rule),
                None => 0.0,
            };
            if rule.op == Op::ProjectCap {
                // Its coefficient reads `row`, which must hold the edits before it.
                waiting.apply(row);
            }
            let Some(c) = rule.coefficient(f, row) else {
                continue;
            };
            let c = match di {
                Some(di) if rule.gain_layer.is_some() => {
                    let c = sc.pending[di].in_model_space(t, rule, c);
                    if c == 0.0 || !c.is_finite() {
                        continue;
                    }
                    c
                }
                _ => c,
            };
            let applied = match rule.fast_bound(c, sc.bound[t]) {
                Some(bound) => {
                    sc.bound[t] = bound;
                    waiting.push(c, &rule.direction, row);
                    true
                }
                None => {
                    waiting.apply(row);
                    rule.apply(c, row, &mut sc.bound[t])
                }
            };
            if applied {
                sc.edited[t] = true;
                if rule.counts {
                    rule.counter.inc();
                    if let Some(count) = req.steering.get_mut(ri) {
                        *count += 1;
                    }
                }
            }
        }
        waiting.apply(row);
    }
}

/// Edits `x += c·d` of one token waiting to be applied in one pass.
#[derive(Default)]
struct Waiting<'a> {
    c: [f32; crate::kernels::AXPY_MANY],
    d: [&'a [f32]; crate::kernels::AXPY_MANY],
    len: usize,
}

impl<'a> Waiting<'a> {
    fn push(&mut self, c: f32, d: &'a [f32], row: &mut [f32]) {
        if self.len == self.c.len() {
            self.apply(row);
        }
        self.c[self.len] = c;
        self.d[self.len] = d;
        self.len += 1;
    }

    fn apply(&mut self, row: &mut [f32]) {
        if self.len > 0 {
            crate::kernels::axpy_many(&self.c[..self.len], &self.d[..self.len], row);
            self.len = 0;
        }
    }
}

/// Computes dictionary `di`'s features for every token into `sc.pending[di]` (unspecified for
/// non-finite tokens, which every reader skips); `needs_full` from [`needs_full`] (a request's own rules
/// name features outside the slice: then the full dictionary runs).
#[allow(clippy::too_many_arguments)]
fn encode(
    rt: &Runtime,
    state: &State,
    sc: &mut Scratch,
    di: usize,
    width: usize,
    xs: &[f32],
    needs_full: bool,
) -> Result<()> {
    let d = &state.dicts[di];
    let n = sc.tokens.len();
    let m = d.features.len();
    let native = d.sliced.as_ref().filter(|_| !needs_full);
    let full_native = d.dict.native();
    let ort = native.is_none() && (m > 0 || needs_full) && full_native.is_none();
    if ort {
        // The input with non-finite tokens zeroed, for ONNX Runtime.
        sc.enc_in.clear();
        sc.enc_in.extend_from_slice(xs);
        for (t, ok) in sc.finite.iter().enumerate() {
            if !ok {
                sc.enc_in[t * width..(t + 1) * width].fill(0.0);
            }
        }
    }
    let p = &mut sc.pending[di];
    p.valid = true;
    p.m = m;
    p.gains.clear();
    if d.meta.denormalizes_output() && d.meta.input_norm != InputNorm::None {
        // The gains of the input as the dictionary reads it, before this hook's edits.
        let layers = d.hooks_in.len();
        let d_in = d.meta.d_in;
        p.gain_layers = layers;
        p.gains.extend(
            xs.chunks_exact(d_in.max(1))
                .take(n * layers)
                .map(|row| d.meta.input_norm.output_gain(row)),
        );
    }
    p.named.clear();
    p.named.resize(n * m, 0.0);
    if let Some(full) = p.full.take() {
        p.spare = full.into_raw_vec_and_offset().0;
    }
    let x = || {
        ArrayView2::from_shape((n, width), &sc.enc_in)
            .map_err(|e| Error::tensor("activations", e.to_string()))
    };
    match (native, full_native) {
        (Some(s), _) => {
            // No statistics yet when it reads the input as it is (see `process`).
            let finite = (sc.finite.len() == n).then_some(&sc.finite[..]);
            s.encode(xs, n, finite, &mut sc.enc_scratch, &mut p.named);
        }
        (None, _) if m == 0 && !needs_full => {}
        (None, Some(fe)) => {
            // Every feature natively, into last time's storage (no allocation at a steady batch
            // size).
            let f = d.meta.d_sae;
            let mut buf = std::mem::take(&mut p.spare);
            buf.clear();
            buf.resize(n * f, 0.0);
            fe.encode(
                xs,
                n,
                Some(&sc.finite),
                &mut sc.full_scratch,
                &mut buf,
                None,
            );
            for t in 0..n {
                for (j, &c) in d.features.iter().enumerate() {
                    p.named[t * m + j] = buf[t * f + c as usize];
                }
            }
            if needs_full {
                let full = Array2::from_shape_vec((n, f), buf)
                    .map_err(|e| Error::tensor("activations", e.to_string()))?;
                p.full = Some(full);
            } else {
                p.spare = buf;
            }
        }
        (None, None) => {
            let enc = d.dict.encode(x()?).inspect_err(|e| {
                rt.metrics.error("encode");
                crate::logging::encode_failed(&d.name, e);
            })?;
            for t in 0..n {
                for (j, &f) in d.features.iter().enumerate() {
                    p.named[t * m + j] = enc.acts[[t, f as usize]];
                }
            }
            p.full = needs_full.then_some(enc.acts);
        }
    }
    Ok(())
}

/// The largest of `row[p]` for `p` in `positions` (NaN skipped; -inf when there is none), in
/// four independent lanes: one chain of comparisons through 64 gathered values was 0.1 µs of a
/// batch-1 hook.
fn max_at(row: &[f32], positions: &[usize]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 4];
    let chunks = positions.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &p) in lanes.iter_mut().zip(c) {
            let v = row[p];
            if v > *m {
                *m = v;
            }
        }
    }
    for &p in rest {
        if row[p] > lanes[0] {
            lanes[0] = row[p];
        }
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// Metrics, request statistics and monitors for dictionary `di`'s activations.
fn observe(state: &State, sc: &mut Scratch, di: usize, result: &mut StepResult) {
    let d = &state.dicts[di];
    // The step buffer's per-feature counts, for the state in force (rebuilt after a reload).
    let mut local = sc.local.lock().unwrap_or_else(|p| p.into_inner());
    if local.generation != state.generation {
        local.generation = state.generation;
        // The old buffers flush as they drop.
        local.features = state
            .dicts
            .iter()
            .map(|d| {
                d.feature_metrics
                    .iter()
                    .map(crate::metrics::LocalFeature::new)
                    .collect()
            })
            .collect();
    }
    let p = &sc.pending[di];
    let m = p.m;
    let local = &mut *local;
    let locals = &mut local.features[di];
    for t in 0..sc.tokens.len() {
        if !sc.finite[t] {
            continue;
        }
        let row = &p.named[t * m..(t + 1) * m];
        let mut req = lock(&sc.reqs[sc.token_req[t]]);
        for (j, &v) in row.iter().enumerate() {
            if v > d.active_above {
                locals[j].observe(f64::from(v));
                if let Some(s) = req.features.get_mut(di).and_then(|f| f.get_mut(j)) {
                    s.max = if s.count == 0 { v } else { s.max.max(v) };
                    s.count += 1;
                }
            }
        }
        let phase = sc.tokens[t].phase;
        let token_index = sc.token_index[t];
        for (mi, mon) in state
            .monitors
            .iter()
            .enumerate()
            .filter(|(_, m)| m.dictionary == di)
        {
            if !covers(mon.apply_to, phase) {
                continue;
            }
            let value = max_at(row, &mon.positions);
            let Some(run) = req.monitors.get_mut(mi) else {
                continue;
            };
            let fire = match mon.window {
                Window::Token => value > mon.threshold,
                Window::Request => {
                    if run.fired {
                        false
                    } else {
                        run.n += 1;
                        run.sum += f64::from(value);
                        run.max = if run.n == 1 {
                            value
                        } else {
                            run.max.max(value)
                        };
                        if value > mon.threshold {
                            run.count += 1;
                        }
                        match mon.aggregate {
                            Aggregate::Any => value > mon.threshold,
                            Aggregate::Count => run.count >= mon.count,
                            Aggregate::Max => run.max > mon.threshold,
                            Aggregate::Mean => (run.sum / run.n as f64) as f32 > mon.threshold,
                        }
                    }
                }
            };
            if !fire {
                continue;
            }
            if !run.fired {
                run.fired_at = token_index;
            }
            run.fired = true;
            let reported = match (mon.window, mon.aggregate) {
                (Window::Request, Aggregate::Count) => run.count as f32,
                (Window::Request, Aggregate::Max) => run.max,
                (Window::Request, Aggregate::Mean) => (run.sum / run.n as f64) as f32,
                _ => value,
            };
            mon.events.inc();
            let event = Event {
                monitor: mon.name.clone(),
                action: action_name(mon.action),
                request: req.id,
                token: token_index,
                value: reported,
                reason: String::new(),
            };
            match mon.action {
                Action::Flag => req.flagged = true,
                Action::SwitchProfile => {
                    req.profile = mon.profile.clone();
                    req.switched = true;
                }
                Action::Stop => {
                    req.stopped = true;
                    if !result.stop.contains(&req.id) {
                        result.stop.push(req.id);
                    }
                }
            }
            req.events.push(event.clone());
            result.events.push(event);
        }
    }
    // Flushing costs a few atomic operations per active feature: at batch 1 about as much as
    // the monitor itself, so it is done at most every FLUSH_EVERY (and at each scrape).
    if crate::metrics::flush_due(&mut local.flushed_at) {
        local.flush();
    }
}

/// Loads the `[[policy]]` entries of the state's config.
fn load_policies(state: &State, metrics: &Metrics) -> Result<Vec<crate::policy::Policy>> {
    if state.config.policies.is_empty() {
        return Ok(Vec::new());
    }
    let engine = crate::policy::engine()?;
    let mut out = Vec::new();
    for pc in &state.config.policies {
        let di = state.dict_index[&pc.dictionary];
        let d = &state.dicts[di];
        let mut columns = Vec::with_capacity(pc.features.len());
        for &id in &pc.features {
            let c = column(&d.meta, &d.name, id)
                .map_err(|m| Error::invalid(format!("policy `{}`", pc.name), m))?;
            columns.push((c as usize, id));
        }
        let path = state.config.resolve(&pc.module);
        out.push(crate::policy::Policy::load(
            &engine, pc, &path, di, columns, &d.meta, metrics,
        )?);
    }
    Ok(out)
}

/// Calls the policies that read dictionary `di` for every finite token of the step.
fn run_policies(rt: &Runtime, state: &State, sc: &mut Scratch, di: usize, result: &mut StepResult) {
    let d = &state.dicts[di];
    let full = sc.pending[di].full.take();
    for policy in state.policies.iter().filter(|p| p.dictionary == di) {
        for t in 0..sc.tokens.len() {
            if !sc.finite[t] {
                continue;
            }
            sc.pairs.clear();
            for &(c, id) in &policy.columns {
                let v = match (d.position.get(&(c as u32)), &full) {
                    (Some(&p), _) => sc.pending[di].named[t * sc.pending[di].m + p],
                    (None, Some(f)) => f[[t, c]],
                    (None, None) => 0.0,
                };
                if v > d.active_above {
                    sc.pairs.push((id, v));
                }
            }
            let generated = sc.tokens[t].phase == Phase::Generated;
            let token = sc.token_index[t];
            let request = sc.tokens[t].request;
            let outcome = policy.features(request, token, generated, &sc.pairs);
            let mut req = lock(&sc.reqs[sc.token_req[t]]);
            apply_policy(
                &rt.metrics,
                state,
                policy,
                outcome,
                &mut req,
                token,
                Some(result),
            );
        }
    }
    sc.pending[di].full = full;
}

/// Applies what a policy call answered to its request: actions on success; on failure, nothing
/// (or a stop when the policy fails closed), and an event when the failure disabled the policy.
fn apply_policy(
    metrics: &Metrics,
    state: &State,
    policy: &crate::policy::Policy,
    outcome: crate::policy::Outcome,
    req: &mut Request,
    token: u64,
    mut result: Option<&mut StepResult>,
) {
    use crate::policy::{Outcome, PolicyAction};
    let event = |req: &mut Request,
                 action: &'static str,
                 reason: String,
                 result: &mut Option<&mut StepResult>| {
        let e = Event {
            monitor: policy.name.clone(),
            action,
            request: req.id,
            token,
            value: 0.0,
            reason,
        };
        if let Some(r) = result.as_deref_mut() {
            r.events.push(e.clone());
        }
        req.events.push(e);
    };
    let stop = |req: &mut Request, result: &mut Option<&mut StepResult>| {
        req.stopped = true;
        if let Some(r) = result.as_deref_mut()
            && !r.stop.contains(&req.id)
        {
            r.stop.push(req.id);
        }
    };
    match outcome {
        Outcome::Disabled => {}
        Outcome::Failed { why, disabled_now } => {
            if disabled_now {
                metrics.error("policy");
                event(
                    req,
                    "disable",
                    format!("disabled after repeated failures (last: {})", why.as_str()),
                    &mut result,
                );
            }
            if policy.fail_closed {
                event(
                    req,
                    "stop",
                    format!("the policy failed ({}) and fails closed", why.as_str()),
                    &mut result,
                );
                stop(req, &mut result);
            }
        }
        Outcome::Actions(actions) => {
            for a in actions {
                match a {
                    PolicyAction::Flag(reason) => {
                        req.flagged = true;
                        event(req, "flag", reason, &mut result);
                    }
                    PolicyAction::SwitchProfile(p) if state.profiles.contains_key(&p) => {
                        req.profile = Some(p.clone());
                        req.switched = true;
                        event(req, "switch_profile", p, &mut result);
                    }
                    PolicyAction::SwitchProfile(p) => {
                        event(
                            req,
                            "ignored",
                            format!("asked for the unknown profile `{p}`"),
                            &mut result,
                        );
                    }
                    PolicyAction::Stop => {
                        event(req, "stop", String::new(), &mut result);
                        stop(req, &mut result);
                    }
                    PolicyAction::Clamp(..) | PolicyAction::Ablate(_) | PolicyAction::Add(..)
                        if state
                            .dicts
                            .get(policy.dictionary)
                            .is_some_and(|d| !d.meta.has_decoder()) =>
                    {
                        event(
                            req,
                            "ignored",
                            "asked to steer through a probe, which has no decoder rows".into(),
                            &mut result,
                        );
                    }
                    PolicyAction::Clamp(f, v) => add_rule(req, policy, Op::Clamp, f, Some(v)),
                    PolicyAction::Ablate(f) => add_rule(req, policy, Op::Ablate, f, None),
                    PolicyAction::Add(f, v) => add_rule(req, policy, Op::Add, f, Some(v)),
                    PolicyAction::Clear => {
                        let before = req.policy_rules.len();
                        req.policy_rules
                            .retain(|s| s.name.as_deref() != Some(policy.name.as_str()));
                        req.dirty |= req.policy_rules.len() != before;
                    }
                }
            }
        }
    }
}

/// A steering rule a policy asked for: one of the request's rules from its next step.
fn add_rule(
    req: &mut Request,
    policy: &crate::policy::Policy,
    op: Op,
    feature: u32,
    value: Option<f32>,
) {
    // Bounded: a policy cannot grow a request's rules without limit.
    if req.policy_rules.len() >= 64 {
        return;
    }
    let dictionary = Some(policy_dictionary_name(policy, &req.names));
    req.policy_rules.push(SteerConfig {
        // Tagged with the policy's name, so that `clear` finds them.
        name: Some(policy.name.clone()),
        op,
        dictionary,
        feature: Some(feature),
        value: if op == Op::Clamp { value } else { None },
        strength: if op == Op::Add { value } else { None },
        factor: None,
        normalize: false,
        apply_to: ApplyTo::All,
        only_active: false,
        when: None,
        vector: None,
        index: None,
        hook: None,
    });
    req.dirty = true;
}

fn policy_dictionary_name(policy: &crate::policy::Policy, names: &Names) -> String {
    names
        .dicts
        .get(policy.dictionary)
        .map(|(n, _)| n.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::max_at;

    #[test]
    fn max_at_matches_a_plain_fold_at_every_length() {
        let row: Vec<f32> = (0..23)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.75)
            .collect();
        for len in 0..=row.len() {
            // Positions out of order, so that each lane sees its own values.
            let positions: Vec<usize> = (0..len).map(|i| (i * 5) % row.len()).collect();
            let want = positions
                .iter()
                .map(|&p| row[p])
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_at(&row, &positions), want, "{len} positions");
            // A NaN at any position is skipped, as `f32::max` skips it.
            for k in 0..len {
                let mut r = row.clone();
                r[positions[k]] = f32::NAN;
                let want = positions
                    .iter()
                    .map(|&p| r[p])
                    .fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max_at(&r, &positions), want, "{len} positions, NaN at {k}");
            }
        }
        assert_eq!(max_at(&row, &[]), f32::NEG_INFINITY);
        assert_eq!(max_at(&[f32::NAN, f32::NAN], &[0, 1]), f32::NEG_INFINITY);
    }
}
