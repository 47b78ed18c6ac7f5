//! The host-facing runtime (design.md section 5): requests, forward steps, hooks, monitors,
//! steering, metrics, reloads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use ndarray::{Array2, ArrayView2, Axis};
use serde::Serialize;

use crate::config::{Action, Aggregate, ApplyTo, Config, Op, Overrides, SteerConfig, Window};
use crate::dictionary::{DictionaryFile, Kind, Meta};
use crate::metrics::{DictionaryMetrics, FeatureMetrics, HookMetrics, Metrics};
use crate::native::SlicedEncoder;
use crate::session::{Dictionary, SessionOptions};
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
    hook_in: String,
    hook_out: String,
    dict: Dictionary,
    w_dec: Arc<Array2<f32>>,
    /// The features the config names (monitored or steered), sorted.
    features: Vec<u32>,
    position: HashMap<u32, usize>,
    sliced: Option<SlicedEncoder>,
    feature_metrics: Vec<FeatureMetrics>,
    gauges: DictionaryMetrics,
    fvu: Mutex<FvuWindow>,
}

#[derive(Default)]
struct FvuWindow {
    n: usize,
    err: f64,
    sum_sq: f64,
    sum: Vec<f64>,
    l0: f64,
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
    reads: Vec<usize>,
    writes: Vec<usize>,
    vector_rules: bool,
    metrics: HookMetrics,
}

struct State {
    config: Config,
    generation: u64,
    dicts: Vec<DictState>,
    dict_index: HashMap<String, usize>,
    monitors: Vec<MonitorState>,
    monitor_index: HashMap<String, usize>,
    profiles: HashMap<String, Vec<SteerConfig>>,
    hooks: HashMap<String, HookPlan>,
    sample_every: u64,
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
        let mut dicts = Vec::new();
        let mut dict_index = HashMap::new();
        for dc in &config.dictionaries {
            let path = config.resolve(&dc.path);
            let file = DictionaryFile::open(&path)?;
            let meta = file.meta().clone();
            if matches!(
                meta.kind,
                Kind::Crosscoder | Kind::Clt | Kind::Probe | Kind::Vector
            ) {
                return Err(Error::dictionary(
                    &path,
                    format!("{} dictionaries cannot be attached to hooks yet", meta.kind),
                ));
            }
            let hook_in = dc.hook.clone().unwrap_or_else(|| meta.hook_in.clone());
            let hook_out = dc
                .hook_out
                .clone()
                .or_else(|| dc.hook.clone())
                .unwrap_or_else(|| meta.hook_out.clone());
            let hook_out = if hook_out.is_empty() {
                hook_in.clone()
            } else {
                hook_out
            };
            if hook_in.is_empty() {
                return Err(Error::dictionary(
                    &path,
                    format!(
                        "dictionary `{}` names no hook: set `hook` in the config",
                        dc.name
                    ),
                ));
            }
            let mut features: Vec<u32> = needed
                .get(dc.name.as_str())
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            features.sort_unstable();
            if let Some(bad) = features.iter().find(|&&f| f as usize >= meta.d_sae) {
                return Err(Error::dictionary(
                    &path,
                    format!(
                        "the config names feature {bad}, but `{}` has {} features",
                        dc.name, meta.d_sae
                    ),
                ));
            }
            let position = features.iter().enumerate().map(|(i, &f)| (f, i)).collect();
            let sliced = if features.is_empty() {
                None
            } else {
                SlicedEncoder::new(&file, &features)?
            };
            let w_dec = Arc::new(file.w_dec()?);
            let feature_metrics = features
                .iter()
                .map(|f| {
                    let l = [dc.name.as_str(), &f.to_string()];
                    FeatureMetrics {
                        activation: metrics.feature_activation.with_label_values(&l),
                        active: metrics.feature_active.with_label_values(&l),
                    }
                })
                .collect();
            let gauges = DictionaryMetrics {
                l0: metrics.l0.with_label_values(&[dc.name.as_str()]),
                fvu: metrics.fvu.with_label_values(&[dc.name.as_str()]),
            };
            let dict = Dictionary::from_file(file, &opts)?;
            dict_index.insert(dc.name.clone(), dicts.len());
            dicts.push(DictState {
                name: dc.name.clone(),
                meta,
                hook_in,
                hook_out,
                dict,
                w_dec,
                features,
                position,
                sliced,
                feature_metrics,
                gauges,
                fvu: Mutex::new(FvuWindow::default()),
            });
        }
        let mut monitors = Vec::new();
        let mut monitor_index = HashMap::new();
        for m in &config.monitors {
            let di = dict_index[&m.dictionary];
            let positions = m.features.iter().map(|f| dicts[di].position[f]).collect();
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
            plan(&mut hooks, &d.hook_in, d.meta.d_in)?;
            if let Some(p) = hooks.get_mut(&d.hook_in) {
                p.reads.push(i);
            }
            plan(&mut hooks, &d.hook_out, d.meta.d_out)?;
            if let Some(p) = hooks.get_mut(&d.hook_out) {
                p.writes.push(i);
            }
        }
        let mut state = Self {
            sample_every: if config.runtime.fvu_sample_rate > 0.0 {
                (1.0 / config.runtime.fvu_sample_rate).round().max(1.0) as u64
            } else {
                0
            },
            config,
            generation,
            dicts,
            dict_index,
            monitors,
            monitor_index,
            profiles,
            hooks,
        };
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
            let (dictionary, direction, hook, param) = match s.op {
                Op::Vector | Op::ProjectCap => {
                    let path = self
                        .config
                        .resolve(s.vector.as_deref().unwrap_or(Path::new("")));
                    let mut u = load_direction(&path, s.index.unwrap_or(0))?;
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
                        Arc::new(u),
                        s.hook.clone().unwrap_or_default(),
                        param.unwrap_or(0.0),
                    )
                }
                _ => {
                    let di = self.dict_index[s.dictionary.as_deref().unwrap_or("")];
                    let d = &self.dicts[di];
                    let f = s.feature.unwrap_or(0);
                    if f as usize >= d.meta.d_sae {
                        return Err(Error::invalid(
                            format!("rule `{name}`"),
                            format!(
                                "feature {f} is out of range: `{}` has {} features",
                                d.name, d.meta.d_sae
                            ),
                        ));
                    }
                    let mut row = d.w_dec.row(f as usize).to_vec();
                    if s.op == Op::Add && s.normalize {
                        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                        if n > 0.0 {
                            row.iter_mut().for_each(|v| *v /= n);
                        }
                    }
                    let param = match s.op {
                        Op::Add => s.strength,
                        Op::Clamp | Op::Cap => s.value,
                        Op::Scale => s.factor,
                        _ => Some(0.0),
                    };
                    (
                        Some(di),
                        Arc::new(row),
                        d.hook_out.clone(),
                        param.unwrap_or(0.0),
                    )
                }
            };
            // Per-request rules share one label value: a request id must never become a label.
            let label = if profile.starts_with(OVERRIDE_PREFIX) {
                "request_override"
            } else {
                name.as_str()
            };
            out.push(Rule {
                counter: metrics.steering_tokens.with_label_values(&[label]),
                name,
                op: s.op,
                dictionary,
                feature: s.feature.unwrap_or(0),
                param,
                direction,
                hook,
                apply_to: s.apply_to,
                only_active: s.only_active,
                when,
            });
        }
        Ok(out)
    }
}

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
}

struct Request {
    id: u64,
    profile: Option<String>,
    overrides: Overrides,
    compiled: Option<(u64, Option<String>, Arc<Vec<Rule>>)>,
    monitors: HashMap<String, MonitorRun>,
    features: BTreeMap<String, BTreeMap<u32, FeatureStats>>,
    events: Vec<Event>,
    steering: BTreeMap<String, u64>,
    tokens: u64,
    flagged: bool,
    stopped: bool,
}

impl Request {
    fn rules(&mut self, state: &State, metrics: &Metrics) -> Result<Arc<Vec<Rule>>> {
        if let Some((g, p, r)) = &self.compiled
            && *g == state.generation
            && *p == self.profile
        {
            return Ok(r.clone());
        }
        let mut rules = Vec::new();
        if !self.overrides.replace
            && let Some(p) = &self.profile
        {
            match state.profiles.get(p) {
                Some(r) => rules.extend(state.compile(p, r, metrics)?),
                None => {
                    metrics.error("profile");
                    return Err(Error::Unknown {
                        what: "profile",
                        name: p.clone(),
                        message: "not in the current config".into(),
                    });
                }
            }
        }
        rules.extend(state.compile(
            &format!("{OVERRIDE_PREFIX}{}", self.id),
            &self.overrides.steer,
            metrics,
        )?);
        let rules = Arc::new(rules);
        self.compiled = Some((state.generation, self.profile.clone(), rules.clone()));
        Ok(rules)
    }

    fn summary(&self) -> RequestSummary {
        RequestSummary {
            request: self.id,
            profile: self.profile.clone(),
            tokens: self.tokens,
            features: self.features.clone(),
            events: self.events.clone(),
            steering: self.steering.clone(),
            flagged: self.flagged,
            stopped: self.stopped,
        }
    }
}

/// The runtime: shared by all of the host's threads (`Send + Sync`).
pub struct Runtime {
    state: RwLock<Arc<State>>,
    requests: RwLock<HashMap<u64, Arc<Mutex<Request>>>>,
    metrics: Metrics,
    generation: AtomicU64,
    sampled: AtomicU64,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
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
        Ok(Self {
            state: RwLock::new(Arc::new(state)),
            requests: RwLock::new(HashMap::new()),
            metrics,
            generation: AtomicU64::new(1),
            sampled: AtomicU64::new(0),
        })
    }

    fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.state().config.clone()
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
        let built = config.and_then(|c| {
            let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            State::build(c, g, &self.metrics)
        });
        match built {
            Ok(s) => {
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
                self.metrics.reloads.with_label_values(&["accepted"]).inc();
                Ok(())
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["rejected"]).inc();
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
        let overrides = match overrides {
            Some(o) if !o.trim().is_empty() => Overrides::from_json(o)?,
            _ => Overrides::default(),
        };
        let mut req = Request {
            id,
            profile: profile.map(str::to_string),
            overrides,
            compiled: None,
            monitors: HashMap::new(),
            features: BTreeMap::new(),
            events: Vec::new(),
            steering: BTreeMap::new(),
            tokens: 0,
            flagged: false,
            stopped: false,
        };
        req.rules(&state, &self.metrics)?;
        let mut map = self.requests.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&id) {
            return Err(Error::Unknown {
                what: "request",
                name: id.to_string(),
                message: "is already running".into(),
            });
        }
        map.insert(id, Arc::new(Mutex::new(req)));
        Ok(())
    }

    /// Ends request `id` and returns its summary.
    pub fn end_request(&self, id: u64) -> Result<RequestSummary> {
        let req = self
            .requests
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or_else(|| {
                self.metrics.error("unknown_request");
                Error::Unknown {
                    what: "request",
                    name: id.to_string(),
                    message: "was never begun or has ended".into(),
                }
            })?;
        Ok(req.lock().unwrap_or_else(|p| p.into_inner()).summary())
    }

    /// The summary so far of a running request.
    pub fn request_summary(&self, id: u64) -> Result<RequestSummary> {
        let map = self.requests.read().unwrap_or_else(|p| p.into_inner());
        let req = map.get(&id).ok_or_else(|| Error::Unknown {
            what: "request",
            name: id.to_string(),
            message: "was never begun or has ended".into(),
        })?;
        Ok(req.lock().unwrap_or_else(|p| p.into_inner()).summary())
    }

    /// Opens a forward step over `tokens` (the batch's token → request map and phases).
    pub fn step(&self, tokens: &[Token]) -> Result<Step<'_>> {
        let state = self.state();
        let map = self.requests.read().unwrap_or_else(|p| p.into_inner());
        let mut reqs: Vec<Arc<Mutex<Request>>> = Vec::new();
        let mut ids: Vec<u64> = Vec::new();
        let mut token_req = Vec::with_capacity(tokens.len());
        for t in tokens {
            let slot = match ids.iter().position(|&i| i == t.request) {
                Some(s) => s,
                None => {
                    let r = map.get(&t.request).ok_or_else(|| {
                        self.metrics.error("unknown_request");
                        Error::Unknown {
                            what: "request",
                            name: t.request.to_string(),
                            message: "was never begun or has ended".into(),
                        }
                    })?;
                    ids.push(t.request);
                    reqs.push(r.clone());
                    ids.len() - 1
                }
            };
            token_req.push(slot);
        }
        drop(map);
        let mut rules = Vec::with_capacity(reqs.len());
        for r in &reqs {
            rules.push(
                r.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .rules(&state, &self.metrics)?,
            );
        }
        let mut token_index = Vec::with_capacity(tokens.len());
        for &slot in &token_req {
            let mut r = reqs[slot].lock().unwrap_or_else(|p| p.into_inner());
            token_index.push(r.tokens);
            r.tokens += 1;
        }
        Ok(Step {
            rt: self,
            state,
            tokens: tokens.to_vec(),
            token_req,
            reqs,
            rules,
            pending: HashMap::new(),
            token_index,
            result: StepResult::default(),
            x: Vec::new(),
            scratch: Array2::zeros((0, 0)),
        })
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

/// A dictionary's activations for one hook call: the features the config names, and every feature
/// when a request's own rules needed the full dictionary.
struct Encoded {
    named: Array2<f32>,
    full: Option<Array2<f32>>,
}

impl Encoded {
    fn get(&self, d: &DictState, t: usize, feature: u32) -> f32 {
        match (d.position.get(&feature), &self.full) {
            (Some(&p), _) => self.named[[t, p]],
            (None, Some(full)) => full[[t, feature as usize]],
            (None, None) => 0.0,
        }
    }
}

/// One forward step. Call [`Step::hook`] at each hook, in the model's order, then [`Step::finish`].
pub struct Step<'r> {
    rt: &'r Runtime,
    state: Arc<State>,
    tokens: Vec<Token>,
    token_req: Vec<usize>,
    reqs: Vec<Arc<Mutex<Request>>>,
    rules: Vec<Arc<Vec<Rule>>>,
    /// Feature activations computed at a dictionary's input hook, for its edits at a later output hook.
    pending: HashMap<usize, Encoded>,
    /// Each token's index within its request.
    token_index: Vec<u64>,
    result: StepResult,
    x: Vec<f32>,
    scratch: Array2<f32>,
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Step<'_> {
    /// Processes the activations at hook `name` in place: `[n_tokens, width]`.
    pub fn hook(&mut self, name: &str, mut acts: ActivationsMut<'_>) -> Result<()> {
        let started = Instant::now();
        let state = self.state.clone();
        let Some(plan) = state.hooks.get(name) else {
            self.rt.metrics.error("unknown_hook");
            return Err(Error::Unknown {
                what: "hook",
                name: name.to_string(),
                message: "no dictionary or rule is attached to it".into(),
            });
        };
        let n = self.tokens.len();
        let width = plan.width;
        if acts.len() != n * width {
            self.rt.metrics.error("shape");
            return Err(Error::tensor(
                name,
                format!(
                    "holds {} values; {n} tokens × width {width} = {} expected",
                    acts.len(),
                    n * width
                ),
            ));
        }
        self.x.resize(n * width, 0.0);
        acts.read_into(&mut self.x);
        let finite: Vec<bool> = self
            .x
            .chunks_exact(width.max(1))
            .map(|r| r.iter().all(|v| v.is_finite()))
            .collect();
        let bad = finite.iter().filter(|f| !**f).count();
        if bad > 0 {
            plan.metrics.nonfinite.inc_by(bad as u64);
        }
        plan.metrics.tokens.inc_by(n as u64);
        // Encode every dictionary that reads this hook.
        for &di in &plan.reads {
            let encoded = self.encode(di, &finite, width)?;
            self.observe(di, &encoded.named, &finite);
            self.pending.insert(di, encoded);
        }

        // Edits written at this hook.
        let mut edited = vec![false; n];
        for &di in &plan.writes {
            let Some(encoded) = self.pending.get(&di) else {
                continue;
            };
            let d = &state.dicts[di];
            for t in 0..n {
                if !finite[t] {
                    continue;
                }
                let slot = self.token_req[t];
                let phase = self.tokens[t].phase;
                let row = &mut self.x[t * width..(t + 1) * width];
                for rule in self.rules[slot]
                    .iter()
                    .filter(|r| r.dictionary == Some(di) && r.hook == name)
                {
                    if !covers(rule.apply_to, phase) || !triggered(&self.reqs[slot], &state, rule) {
                        continue;
                    }
                    let f = encoded.get(d, t, rule.feature);
                    if let Some(c) = rule.coefficient(f, row)
                        && rule.apply(c, row)
                    {
                        edited[t] = true;
                        rule.counter.inc();
                        *self.reqs[slot]
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .steering
                            .entry(rule.name.clone())
                            .or_default() += 1;
                    }
                }
            }
        }
        if plan.vector_rules {
            for t in 0..n {
                if !finite[t] {
                    continue;
                }
                let slot = self.token_req[t];
                let phase = self.tokens[t].phase;
                let row = &mut self.x[t * width..(t + 1) * width];
                for rule in self.rules[slot]
                    .iter()
                    .filter(|r| r.dictionary.is_none() && r.hook == name)
                {
                    if !covers(rule.apply_to, phase) || !triggered(&self.reqs[slot], &state, rule) {
                        continue;
                    }
                    if let Some(c) = rule.coefficient(0.0, row)
                        && rule.apply(c, row)
                    {
                        edited[t] = true;
                        rule.counter.inc();
                        *self.reqs[slot]
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .steering
                            .entry(rule.name.clone())
                            .or_default() += 1;
                    }
                }
            }
        }
        for t in (0..n).filter(|&t| edited[t]) {
            acts.write_row(t * width, &self.x[t * width..(t + 1) * width]);
        }
        plan.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The needed features of dictionary `d` for every token (zeros for non-finite tokens).
    fn encode(&mut self, di: usize, finite: &[bool], width: usize) -> Result<Encoded> {
        let state = self.state.clone();
        let d = &state.dicts[di];
        let n = self.tokens.len();
        let mut x = ArrayView2::from_shape((n, width), &self.x)
            .map_err(|e| Error::tensor("activations", e.to_string()))?
            .to_owned();
        for (t, ok) in finite.iter().enumerate() {
            if !ok {
                x.row_mut(t).fill(0.0);
            }
        }
        let m = d.features.len();
        // A request's own rules may name features outside the slice: then the full dictionary runs.
        let needs_full = self
            .rules
            .iter()
            .flat_map(|rs| rs.iter())
            .any(|r| r.dictionary == Some(di) && !d.position.contains_key(&r.feature));
        let sample = self.state.sample_every > 0 && {
            let c = self.rt.sampled.fetch_add(n as u64, Ordering::Relaxed);
            c / self.state.sample_every != (c + n as u64) / self.state.sample_every
        };
        if sample {
            self.measure_fvu(d, &x, finite);
        }
        let mut out = Array2::zeros((n, m));
        let mut full = None;
        match (&d.sliced, needs_full) {
            (Some(s), false) => s.encode(x.view(), &mut self.scratch, &mut out.view_mut()),
            _ if m == 0 && !needs_full => {}
            _ => {
                let enc = d
                    .dict
                    .encode(x.view())
                    .inspect_err(|_| self.rt.metrics.error("encode"))?;
                for (j, &f) in d.features.iter().enumerate() {
                    out.column_mut(j).assign(&enc.acts.column(f as usize));
                }
                full = needs_full.then_some(enc.acts);
            }
        }
        Ok(Encoded { named: out, full })
    }

    fn measure_fvu(&self, d: &DictState, x: &Array2<f32>, finite: &[bool]) {
        let Ok((acts, recon)) = d.dict.encode_decode(x.view()) else {
            self.rt.metrics.error("encode");
            return;
        };
        let mut w = d.fvu.lock().unwrap_or_else(|p| p.into_inner());
        if w.sum.len() != x.ncols() {
            *w = FvuWindow {
                sum: vec![0.0; x.ncols()],
                ..FvuWindow::default()
            };
        }
        for t in (0..x.nrows()).filter(|&t| finite[t]) {
            let (xr, rr) = (x.row(t), recon.row(t));
            w.err += xr
                .iter()
                .zip(rr.iter())
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>();
            w.sum_sq += xr.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
            for (s, a) in w.sum.iter_mut().zip(xr.iter()) {
                *s += f64::from(*a);
            }
            w.l0 += acts.row(t).iter().filter(|v| **v > 0.0).count() as f64;
            w.n += 1;
        }
        if w.n >= 32 {
            let n = w.n as f64;
            let var = w.sum_sq - w.sum.iter().map(|s| s * s).sum::<f64>() / n;
            if var > 0.0 {
                d.gauges.fvu.set(w.err / var);
            }
            d.gauges.l0.set(w.l0 / n);
            *w = FvuWindow {
                sum: vec![0.0; x.ncols()],
                ..FvuWindow::default()
            };
        }
    }

    /// Metrics, request statistics and monitors for dictionary `di`'s activations.
    fn observe(&mut self, di: usize, acts: &Array2<f32>, finite: &[bool]) {
        let state = self.state.clone();
        let d = &state.dicts[di];
        for (t, row) in acts.axis_iter(Axis(0)).enumerate() {
            if !finite[t] {
                continue;
            }
            let slot = self.token_req[t];
            let mut req = self.reqs[slot].lock().unwrap_or_else(|p| p.into_inner());
            for (j, &v) in row.iter().enumerate() {
                if v > 0.0 {
                    let fm = &d.feature_metrics[j];
                    fm.activation.observe(f64::from(v));
                    fm.active.inc();
                    let s = req
                        .features
                        .entry(d.name.clone())
                        .or_default()
                        .entry(d.features[j])
                        .or_insert(FeatureStats { max: v, count: 0 });
                    s.max = s.max.max(v);
                    s.count += 1;
                }
            }
            let phase = self.tokens[t].phase;
            let token_index = self.token_index[t];
            for m in state.monitors.iter().filter(|m| m.dictionary == di) {
                if !covers(m.apply_to, phase) {
                    continue;
                }
                let value = m
                    .positions
                    .iter()
                    .map(|&p| row[p])
                    .fold(f32::NEG_INFINITY, f32::max);
                let run = req.monitors.entry(m.name.clone()).or_default();
                let fire = match m.window {
                    Window::Token => value > m.threshold,
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
                            if value > m.threshold {
                                run.count += 1;
                            }
                            match m.aggregate {
                                Aggregate::Any => value > m.threshold,
                                Aggregate::Count => run.count >= m.count,
                                Aggregate::Max => run.max > m.threshold,
                                Aggregate::Mean => (run.sum / run.n as f64) as f32 > m.threshold,
                            }
                        }
                    }
                };
                if !fire {
                    continue;
                }
                run.fired = true;
                let reported = match (m.window, m.aggregate) {
                    (Window::Request, Aggregate::Count) => run.count as f32,
                    (Window::Request, Aggregate::Max) => run.max,
                    (Window::Request, Aggregate::Mean) => (run.sum / run.n as f64) as f32,
                    _ => value,
                };
                m.events.inc();
                let event = Event {
                    monitor: m.name.clone(),
                    action: action_name(m.action),
                    request: req.id,
                    token: token_index,
                    value: reported,
                };
                match m.action {
                    Action::Flag => req.flagged = true,
                    Action::SwitchProfile => req.profile = m.profile.clone(),
                    Action::Stop => {
                        req.stopped = true;
                        if !self.result.stop.contains(&req.id) {
                            self.result.stop.push(req.id);
                        }
                    }
                }
                req.events.push(event.clone());
                self.result.events.push(event);
            }
        }
    }

    /// Closes the step.
    pub fn finish(self) -> StepResult {
        self.result
    }
}

fn triggered(req: &Arc<Mutex<Request>>, state: &State, rule: &Rule) -> bool {
    match rule.when {
        None => true,
        Some(mi) => {
            let name = &state.monitors[mi].name;
            req.lock()
                .unwrap_or_else(|p| p.into_inner())
                .monitors
                .get(name)
                .is_some_and(|r| r.fired)
        }
    }
}
