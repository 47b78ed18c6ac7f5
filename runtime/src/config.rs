//! The TOML configuration (design.md section 8): `[runtime]`, `[[dictionary]]`, `[[monitor]]`,
//! `[[profile]]` with `[[profile.steer]]` rules. Errors name the file, the line and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[runtime]`.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `[[dictionary]]`.
    #[serde(default, rename = "dictionary")]
    pub dictionaries: Vec<DictionaryConfig>,
    /// `[[monitor]]`.
    #[serde(default, rename = "monitor")]
    pub monitors: Vec<MonitorConfig>,
    /// `[[profile]]`.
    #[serde(default, rename = "profile")]
    pub profiles: Vec<ProfileConfig>,
    /// `[[policy]]`.
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyConfig>,
    /// `[[vector]]`: directions named for rules, so that a request names a direction, never a file.
    #[serde(default, rename = "vector")]
    pub vectors: Vec<VectorConfig>,
    /// `[requests]`: what a request's overrides may change.
    #[serde(default)]
    pub requests: RequestsConfig,
    /// The file it was read from; relative paths in it resolve against its folder.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[runtime]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The ONNX Runtime library (default: `ORT_DYLIB_PATH`, then the cached copy).
    pub onnxruntime: Option<PathBuf>,
    /// `cpu` (or `cuda` in CUDA builds).
    #[serde(default = "default_ep")]
    pub execution_provider: String,
    /// Intra-op threads per session.
    #[serde(default = "one")]
    pub threads: usize,
    /// Sessions per graph.
    #[serde(default = "one")]
    pub pool_size: usize,
    /// Metric name prefix.
    #[serde(default = "default_prefix")]
    pub metrics_prefix: String,
    /// Constant labels added to every metric.
    #[serde(default)]
    pub metrics_labels: BTreeMap<String, String>,
    /// Address of the built-in `/metrics` listener (off when absent).
    pub metrics_listen: Option<String>,
    /// Fraction of tokens whose reconstruction error and L0 are measured.
    #[serde(default = "default_sample")]
    pub fvu_sample_rate: f64,
    /// Watch the config file and reload it when it changes (see `Runtime::start_services`).
    #[serde(default)]
    pub watch: bool,
    /// How often the watcher looks at the file, in milliseconds.
    #[serde(default = "default_watch_interval")]
    pub watch_interval_ms: u64,
}

fn default_ep() -> String {
    "cpu".into()
}
fn one() -> usize {
    1
}
fn default_prefix() -> String {
    "tiller".into()
}
fn default_sample() -> f64 {
    0.01
}
fn default_watch_interval() -> u64 {
    500
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            onnxruntime: None,
            execution_provider: default_ep(),
            threads: 1,
            pool_size: 1,
            metrics_prefix: default_prefix(),
            metrics_labels: BTreeMap::new(),
            metrics_listen: None,
            fvu_sample_rate: default_sample(),
            watch: false,
            watch_interval_ms: default_watch_interval(),
        }
    }
}

/// `[[dictionary]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DictionaryConfig {
    /// The name monitors and rules use.
    pub name: String,
    /// The `.onnx` file, relative to the config's folder.
    pub path: PathBuf,
    /// The hook it reads, overriding the file's `tiller.hook_in`.
    pub hook: Option<String>,
    /// The hook it writes, overriding the file's `tiller.hook_out`.
    pub hook_out: Option<String>,
}

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

/// `[[policy]]`: a WASM policy plugin (see `plugin-abi/POLICY_ABI.md`).
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

/// A steering op (design.md section 4).
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
/// may change is the operator's `[requests]` ([`RequestsConfig`]), enforced when the request begins.
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

/// `[[vector]]`: a direction read once at load time and named for steering rules, so that a rule
/// (and a request above all) names a direction, never a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorConfig {
    /// The name rules give as `vector`.
    pub name: String,
    /// The file (`.npy`, or a GGUF control vector), relative to the config's folder.
    pub path: PathBuf,
    /// Which row of a `.npy`, or which layer of a GGUF file.
    #[serde(default)]
    pub index: usize,
    /// The hook its rules edit when they name none; needed for a vector that requests may use.
    pub hook: Option<String>,
}

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

impl Config {
    /// The features (original ids) requests may steer in dictionary `name`: `None` for any, an
    /// empty set for none (see [`RequestDictionary::features`]).
    pub fn request_features(&self, name: &str) -> Option<std::collections::BTreeSet<u32>> {
        let listed = self.requests.dictionaries.iter().find(|d| d.name == name);
        if self.requests.dictionaries.is_empty() || listed.is_some_and(|d| d.features.is_none()) {
            if listed.is_some_and(|d| d.any_feature) {
                return None;
            }
            let steered: std::collections::BTreeSet<u32> = self
                .profiles
                .iter()
                .flat_map(|p| &p.steer)
                .filter(|s| s.dictionary.as_deref() == Some(name))
                .filter_map(|s| s.feature)
                .collect();
            let named = self
                .monitors
                .iter()
                .filter(|m| m.dictionary == name)
                .flat_map(|m| m.features.iter().copied())
                .chain(
                    self.policies
                        .iter()
                        .filter(|p| p.dictionary == name)
                        .flat_map(|p| p.features.iter().copied()),
                );
            return Some(named.filter(|f| !steered.contains(f)).collect());
        }
        match listed {
            Some(d) if d.any_feature => None,
            Some(d) => Some(d.features.iter().flatten().copied().collect()),
            None => Some(std::collections::BTreeSet::new()),
        }
    }

    /// The named direction `vector` of a rule names, if it names one (else it is a file path,
    /// which only profile rules may give).
    pub fn named_vector(&self, vector: Option<&Path>) -> Option<&VectorConfig> {
        let v = vector?.to_str()?;
        self.vectors.iter().find(|e| e.name == v)
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The line of `key` in the `index`-th `[[table]]` of `text` (or of the table header).
fn locate(text: &str, table: &str, index: usize, key: &str) -> usize {
    let header = format!("[[{table}]]");
    let mut seen = 0;
    let mut in_table = false;
    let mut header_line = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if t == header {
                in_table = seen == index;
                if in_table {
                    header_line = i + 1;
                }
                seen += 1;
                continue;
            }
            if in_table && !t.starts_with(&format!("[[{table}.")) {
                in_table = false;
            }
        }
        if in_table {
            let k = t.split('=').next().unwrap_or("").trim();
            if k == key {
                return i + 1;
            }
        }
    }
    header_line.max(1)
}

/// The line of `key` in the `index`-th `[[table]]` of `text`, or with `rule`, in that table's
/// `rule`-th `[[table.steer]]`; the header's line when the key is not written there.
pub(crate) fn locate_key(
    text: &str,
    table: &str,
    index: usize,
    rule: Option<usize>,
    key: &str,
) -> usize {
    let Some(rule) = rule else {
        return locate(text, table, index, key);
    };
    let (header, sub) = (format!("[[{table}]]"), format!("[[{table}.steer]]"));
    let (mut tables, mut rules) = (0usize, 0usize);
    let (mut in_table, mut in_rule) = (false, false);
    let mut found = locate(text, table, index, "name");
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_rule = false;
            if t == header {
                in_table = tables == index;
                tables += 1;
                rules = 0;
            } else if t == sub && in_table {
                in_rule = rules == rule;
                rules += 1;
                if in_rule {
                    found = i + 1;
                }
            } else if !t.starts_with(&format!("[[{table}.")) {
                in_table = false;
            }
            continue;
        }
        if in_rule && t.split('=').next().unwrap_or("").trim() == key {
            return i + 1;
        }
    }
    found
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, Some(path))
    }

    /// Parses a config held in a string; `path` (if any) names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Self> {
        let name = path.map_or_else(|| "<config>".to_string(), |p| p.display().to_string());
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            // Name the key written on that line, when there is one.
            let key = text
                .lines()
                .nth(line.saturating_sub(1))
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            let message = match key {
                Some(k) => format!("`{k}`: {}", e.message()),
                None => e.message().to_string(),
            };
            Error::Config {
                file: name.clone(),
                line,
                message,
            }
        })?;
        cfg.source = path.map(Path::to_path_buf);
        cfg.name_vectors(text, &name)?;
        cfg.check(text, &name)?;
        cfg.check_requests(text, &name)?;
        Ok(cfg)
    }

    /// The folder relative paths resolve against.
    pub fn base_dir(&self) -> PathBuf {
        self.source
            .as_ref()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default()
    }

    /// Resolves a path from the config against its folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir().join(p)
        }
    }

    /// Checks `[[vector]]` and gives each profile rule that names one its hook (when the rule
    /// names none), so that rules are checked and compiled as if they had written it.
    fn name_vectors(&mut self, text: &str, file: &str) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for (i, v) in self.vectors.iter().enumerate() {
            if !seen.insert(v.name.as_str()) {
                return Err(Error::Config {
                    file: file.to_string(),
                    line: locate(text, "vector", i, "name"),
                    message: format!("`name`: `{}` is used twice", v.name),
                });
            }
        }
        let vectors = self.vectors.clone();
        for (pi, p) in self.profiles.iter_mut().enumerate() {
            for (ri, s) in p.steer.iter_mut().enumerate() {
                let Some(v) = s
                    .vector
                    .as_deref()
                    .and_then(Path::to_str)
                    .and_then(|n| vectors.iter().find(|v| v.name == n))
                else {
                    continue;
                };
                let err = |key: &str, message: String| Error::Config {
                    file: file.to_string(),
                    line: locate_key(text, "profile", pi, Some(ri), key),
                    message: format!("`{key}`: in profile `{}`: {message}", p.name),
                };
                if s.index.is_some() {
                    return Err(err(
                        "index",
                        format!("is set by the `[[vector]]` entry `{}`", v.name),
                    ));
                }
                match (&s.hook, &v.hook) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(err(
                            "hook",
                            format!("`{a}` is not the hook of vector `{}` (`{b}`)", v.name),
                        ));
                    }
                    (None, Some(b)) => s.hook = Some(b.clone()),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Checks `[requests]`.
    fn check_requests(&self, text: &str, file: &str) -> Result<()> {
        let r = &self.requests;
        // The line of `key` in `[requests]` (0 when it is not written there).
        let line = |key: &str| {
            let mut inside = false;
            for (i, l) in text.lines().enumerate() {
                let t = l.trim();
                if t.starts_with('[') {
                    inside = t == "[requests]";
                } else if inside && t.split('=').next().unwrap_or("").trim() == key {
                    return i + 1;
                }
            }
            0
        };
        let err = |key: &str, message: String| Error::Config {
            file: file.to_string(),
            line: line(key),
            message: format!("`requests.{key}`: {message}"),
        };
        for (key, v) in [
            ("max_abs_strength", r.max_abs_strength),
            ("max_abs_value", r.max_abs_value),
            ("max_abs_factor", r.max_abs_factor),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(err(key, format!("{v} is not a finite bound >= 0")));
            }
        }
        for n in &r.vectors {
            match self.vectors.iter().find(|v| &v.name == n) {
                None => return Err(err("vectors", format!("no `[[vector]]` is named `{n}`"))),
                Some(v) if v.hook.is_none() => {
                    return Err(err(
                        "vectors",
                        format!("`[[vector]]` `{n}` sets no `hook`, which a request's rule needs"),
                    ));
                }
                Some(_) => {}
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in r.dictionaries.iter().enumerate() {
            let err = |key: &str, message: String| Error::Config {
                file: file.to_string(),
                line: locate(text, "requests.dictionary", i, key),
                message: format!("`{key}`: {message}"),
            };
            if !self.dictionaries.iter().any(|c| c.name == d.name) {
                return Err(err("name", format!("no dictionary is named `{}`", d.name)));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(err("name", format!("`{}` is listed twice", d.name)));
            }
            if d.any_feature && d.features.is_some() {
                return Err(err(
                    "any_feature",
                    "give `features` or `any_feature = true`, not both".into(),
                ));
            }
        }
        Ok(())
    }

    fn check(&self, text: &str, file: &str) -> Result<()> {
        let err = |table: &str, i: usize, key: &str, message: String| Error::Config {
            file: file.to_string(),
            line: locate(text, table, i, key),
            message: format!("`{key}`: {message}"),
        };
        if self.runtime.execution_provider != "cpu" && self.runtime.execution_provider != "cuda" {
            return Err(Error::Config {
                file: file.to_string(),
                line: text
                    .lines()
                    .position(|l| l.trim_start().starts_with("execution_provider"))
                    .map_or(0, |i| i + 1),
                message: format!(
                    "`execution_provider`: `{}` is not cpu or cuda",
                    self.runtime.execution_provider
                ),
            });
        }
        if self.runtime.execution_provider == "cuda" {
            return Err(Error::Config {
                file: file.to_string(),
                line: text.lines().position(|l| l.trim_start().starts_with("execution_provider")).map_or(0, |i| i + 1),
                message: "`execution_provider`: this build of Tiller has no CUDA support (build with `--features cuda`)".into(),
            });
        }
        if !(0.0..=1.0).contains(&self.runtime.fvu_sample_rate) {
            return Err(Error::Config {
                file: file.to_string(),
                line: 0,
                message: "`fvu_sample_rate` must lie in [0, 1]".into(),
            });
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.dictionaries.iter().enumerate() {
            if !names.insert(d.name.as_str()) {
                return Err(err(
                    "dictionary",
                    i,
                    "name",
                    format!("`{}` is used twice", d.name),
                ));
            }
        }
        let profile_names: std::collections::HashSet<&str> =
            self.profiles.iter().map(|p| p.name.as_str()).collect();
        let monitor_names: std::collections::HashSet<&str> =
            self.monitors.iter().map(|m| m.name.as_str()).collect();
        for (i, m) in self.monitors.iter().enumerate() {
            if !names.contains(m.dictionary.as_str()) {
                return Err(err(
                    "monitor",
                    i,
                    "dictionary",
                    format!("no dictionary is named `{}`", m.dictionary),
                ));
            }
            if m.features.is_empty() {
                return Err(err("monitor", i, "features", "lists no feature".into()));
            }
            if !m.threshold.is_finite() {
                return Err(err(
                    "monitor",
                    i,
                    "threshold",
                    "is not a finite number".into(),
                ));
            }
            if m.action == Action::SwitchProfile {
                match &m.profile {
                    Some(p) if profile_names.contains(p.as_str()) => {}
                    Some(p) => {
                        return Err(err(
                            "monitor",
                            i,
                            "profile",
                            format!("no profile is named `{p}`"),
                        ));
                    }
                    None => {
                        return Err(err(
                            "monitor",
                            i,
                            "action",
                            "switch_profile needs `profile`".into(),
                        ));
                    }
                }
            }
        }
        let mut policy_names = std::collections::HashSet::new();
        for (i, pc) in self.policies.iter().enumerate() {
            if !policy_names.insert(pc.name.as_str()) {
                return Err(err(
                    "policy",
                    i,
                    "name",
                    format!("`{}` is used twice", pc.name),
                ));
            }
            if !names.contains(pc.dictionary.as_str()) {
                return Err(err(
                    "policy",
                    i,
                    "dictionary",
                    format!("no dictionary is named `{}`", pc.dictionary),
                ));
            }
            if pc.fuel == 0 {
                return Err(err("policy", i, "fuel", "must be positive".into()));
            }
            if pc.counters.len() > 64 {
                return Err(err("policy", i, "counters", "at most 64 counters".into()));
            }
        }
        let mut seen_profiles = std::collections::HashSet::new();
        for (i, p) in self.profiles.iter().enumerate() {
            if !seen_profiles.insert(p.name.as_str()) {
                return Err(err(
                    "profile",
                    i,
                    "name",
                    format!("`{}` is used twice", p.name),
                ));
            }
            for s in &p.steer {
                s.check(&names, &monitor_names).map_err(|(key, m)| {
                    err("profile", i, key, format!("in profile `{}`: {m}", p.name))
                })?;
            }
        }
        Ok(())
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
