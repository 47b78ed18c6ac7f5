//! The whole configuration and its `[runtime]`, `[[dictionary]]` and `[[vector]]` tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::defaults::one;
use super::monitor::MonitorConfig;
use super::policy::PolicyConfig;
use super::requests::RequestsConfig;
use super::steer::ProfileConfig;

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

impl Config {
    /// The features (original ids) requests may steer in dictionary `name`: `None` for any, an
    /// empty set for none (see
    /// [`RequestDictionary::features`](super::requests::RequestDictionary::features)).
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

impl Config {
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
}
