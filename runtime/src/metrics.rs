//! Prometheus metrics (docs/design.md#6-metrics-and-events), on a registry the runtime owns.
//!
//! Every label value comes from a bounded set: hook, dictionary, monitor and rule names from the
//! config, and the features the config names. Hot paths use children looked up once, when a config
//! is compiled.
//!
//! The per-feature families (`feature_activation`, `feature_active_total`) are updated through
//! local copies that each of the runtime's step buffers keeps and flushes at most every
//! [`FLUSH_EVERY`]; the collector that holds the two families runs the runtime's flush first, so
//! a scrape (a `gather` of [`Metrics::registry`], or [`Metrics::text`]) sees every step that has
//! ended.

use std::sync::{Arc, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{Error, Result};

/// The metric names, without the prefix, as `(name, type)`.
pub const METRICS: &[(&str, &str)] = &[
    ("tokens_total", "counter"),
    ("hook_duration_seconds", "histogram"),
    ("feature_activation", "histogram"),
    ("feature_active_total", "counter"),
    ("monitor_events_total", "counter"),
    ("steering_tokens_total", "counter"),
    ("dictionary_l0", "gauge"),
    ("dictionary_fvu", "gauge"),
    ("fvu_samples_total", "counter"),
    ("nonfinite_tokens_total", "counter"),
    ("errors_total", "counter"),
    ("policy_traps_total", "counter"),
    ("policy_counter_total", "counter"),
    ("config_reloads_total", "counter"),
    ("build_info", "gauge"),
];

/// The longest a step buffer keeps its per-feature counts before adding them to the registry's
/// (a scrape first flushes every buffer, those of running steps included, so only what a step
/// counts after the scrape waits for the next).
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Whether per-feature buffers last flushed at `flushed_at` are due again (never flushed, or
/// [`FLUSH_EVERY`] ago); when they are, records now as the time of the flush.
pub fn flush_due(flushed_at: &mut Option<std::time::Instant>) -> bool {
    let now = std::time::Instant::now();
    let due = flushed_at.is_none_or(|t| now.duration_since(t) >= FLUSH_EVERY);
    if due {
        *flushed_at = Some(now);
    }
    due
}

/// A function the collector runs before it reads the per-feature families.
type FlushHook = Arc<RwLock<Option<Box<dyn Fn() + Send + Sync>>>>;

/// The per-feature families behind one collector that first flushes what step buffers hold.
struct FlushFirst {
    activation: HistogramVec,
    active: IntCounterVec,
    hook: FlushHook,
}

impl Collector for FlushFirst {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.activation.desc();
        d.extend(self.active.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(flush) = self.hook.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            flush();
        }
        let mut out = self.activation.collect();
        out.extend(self.active.collect());
        out
    }
}

/// The runtime's metric families.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    before_collect: FlushHook,
    /// `tokens_total{hook}`.
    pub tokens: IntCounterVec,
    /// `hook_duration_seconds{hook}`.
    pub hook_duration: HistogramVec,
    /// `feature_activation{dictionary,feature}`.
    pub feature_activation: HistogramVec,
    /// `feature_active_total{dictionary,feature}`.
    pub feature_active: IntCounterVec,
    /// `monitor_events_total{monitor,action}`.
    pub monitor_events: IntCounterVec,
    /// `steering_tokens_total{rule}`.
    pub steering_tokens: IntCounterVec,
    /// `dictionary_l0{dictionary}`.
    pub l0: GaugeVec,
    /// `dictionary_fvu{dictionary}`.
    pub fvu: GaugeVec,
    /// `fvu_samples_total{dictionary,result}`: tokens sampled for the FVU and L0 gauges, by
    /// `measured` or `dropped` (the measuring worker's queue was full).
    pub fvu_samples: IntCounterVec,
    /// `nonfinite_tokens_total{hook}`.
    pub nonfinite: IntCounterVec,
    /// `errors_total{kind}`.
    pub errors: IntCounterVec,
    /// `policy_traps_total{policy,reason}`.
    pub policy_traps: IntCounterVec,
    /// `policy_counter_total{policy,counter}`: the counters policies declare.
    pub policy_counters: IntCounterVec,
    /// `config_reloads_total{result}`.
    pub reloads: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The fixed set of `errors_total{kind}` values.
pub const ERROR_KINDS: &[&str] = &[
    "shape",
    "unknown_hook",
    "unknown_request",
    "encode",
    "profile",
    "policy",
    "override",
];

impl Metrics {
    /// Registers every family on a new registry with `prefix` and constant labels.
    pub fn new(
        prefix: &str,
        const_labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self> {
        let labels: std::collections::HashMap<String, String> = const_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let registry = Registry::new_custom(Some(prefix.to_string()), Some(labels))
            .map_err(|e| Error::invalid("metrics", e.to_string()))?;
        let reg = |c: Box<dyn Collector>| {
            registry
                .register(c)
                .map_err(|e| Error::invalid("metrics", e.to_string()))
        };
        // Families made without registering them (the per-feature ones go behind `FlushFirst`),
        // and made and registered.
        let new_counter = |name: &str, help: &str, l: &[&str]| -> Result<IntCounterVec> {
            IntCounterVec::new(Opts::new(name, help), l)
                .map_err(|e| Error::invalid("metrics", e.to_string()))
        };
        let new_histogram =
            |name: &str, help: &str, l: &[&str], buckets: Vec<f64>| -> Result<HistogramVec> {
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), l)
                    .map_err(|e| Error::invalid("metrics", e.to_string()))
            };
        let counter = |name: &str, help: &str, l: &[&str]| -> Result<IntCounterVec> {
            let c = new_counter(name, help, l)?;
            reg(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str, l: &[&str]| -> Result<GaugeVec> {
            let c = GaugeVec::new(Opts::new(name, help), l)
                .map_err(|e| Error::invalid("metrics", e.to_string()))?;
            reg(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram =
            |name: &str, help: &str, l: &[&str], buckets: Vec<f64>| -> Result<HistogramVec> {
                let c = new_histogram(name, help, l, buckets)?;
                reg(Box::new(c.clone()))?;
                Ok(c)
            };
        let families = Families {
            tokens: counter("tokens_total", "Tokens processed at each hook.", &["hook"])?,
            hook_duration: histogram(
                "hook_duration_seconds",
                "Time spent in one hook call.",
                &["hook"],
                prometheus::exponential_buckets(1e-6, 2.0, 20)
                    .map_err(|e| Error::invalid("metrics", e.to_string()))?,
            )?,
            feature_activation: new_histogram(
                "feature_activation",
                "Activation of the features the config names, per token where active.",
                &["dictionary", "feature"],
                vec![0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            )?,
            feature_active: new_counter(
                "feature_active_total",
                "Tokens on which a named feature was active (above zero).",
                &["dictionary", "feature"],
            )?,
            monitor_events: counter(
                "monitor_events_total",
                "Monitor events by action.",
                &["monitor", "action"],
            )?,
            steering_tokens: counter(
                "steering_tokens_total",
                "Tokens edited by each steering rule.",
                &["rule"],
            )?,
            l0: gauge(
                "dictionary_l0",
                "Mean active features per sampled token.",
                &["dictionary"],
            )?,
            fvu: gauge(
                "dictionary_fvu",
                "Fraction of variance unexplained on sampled tokens.",
                &["dictionary"],
            )?,
            fvu_samples: counter(
                "fvu_samples_total",
                "Tokens sampled for the FVU and L0 gauges, by result: measured off the hot path, \
                 or dropped because the measuring worker's queue was full.",
                &["dictionary", "result"],
            )?,
            nonfinite: counter(
                "nonfinite_tokens_total",
                "Tokens whose activations were NaN or infinite.",
                &["hook"],
            )?,
            errors: counter("errors_total", "Errors by kind.", &["kind"])?,
            policy_traps: counter(
                "policy_traps_total",
                "Policy calls that failed, by reason.",
                &["policy", "reason"],
            )?,
            policy_counters: counter(
                "policy_counter_total",
                "Counters declared and incremented by WASM policies.",
                &["policy", "counter"],
            )?,
            reloads: counter(
                "config_reloads_total",
                "Config reloads by result.",
                &["result"],
            )?,
        };
        let info = IntGaugeVec::new(
            Opts::new("build_info", "Build information."),
            &["version", "onnxruntime"],
        )
        .map_err(|e| Error::invalid("metrics", e.to_string()))?;
        reg(Box::new(info.clone()))?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), crate::onnxruntime::ORT_VERSION])
            .set(1);
        let before_collect: FlushHook = Arc::new(RwLock::new(None));
        reg(Box::new(FlushFirst {
            activation: families.feature_activation.clone(),
            active: families.feature_active.clone(),
            hook: before_collect.clone(),
        }))?;
        let m = families.with_registry(registry, before_collect);
        for kind in ERROR_KINDS {
            m.errors.with_label_values(&[kind]);
        }
        for result in ["accepted", "rejected"] {
            m.reloads.with_label_values(&[result]);
        }
        Ok(m)
    }

    /// The text exposition of every metric.
    pub fn text(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The registry, for hosts that serve it themselves.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sets the function run before every read of the per-feature families (the runtime's flush
    /// of its step buffers). It must not gather this registry itself.
    pub fn on_collect(&self, flush: impl Fn() + Send + Sync + 'static) {
        *self
            .before_collect
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(flush));
    }

    /// Counts an error of `kind` (one of [`ERROR_KINDS`]).
    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }
}

struct Families {
    tokens: IntCounterVec,
    hook_duration: HistogramVec,
    feature_activation: HistogramVec,
    feature_active: IntCounterVec,
    monitor_events: IntCounterVec,
    steering_tokens: IntCounterVec,
    l0: GaugeVec,
    fvu: GaugeVec,
    fvu_samples: IntCounterVec,
    nonfinite: IntCounterVec,
    errors: IntCounterVec,
    policy_traps: IntCounterVec,
    policy_counters: IntCounterVec,
    reloads: IntCounterVec,
}

impl Families {
    fn with_registry(self, registry: Registry, before_collect: FlushHook) -> Metrics {
        Metrics {
            registry,
            before_collect,
            tokens: self.tokens,
            hook_duration: self.hook_duration,
            feature_activation: self.feature_activation,
            feature_active: self.feature_active,
            monitor_events: self.monitor_events,
            steering_tokens: self.steering_tokens,
            l0: self.l0,
            fvu: self.fvu,
            fvu_samples: self.fvu_samples,
            nonfinite: self.nonfinite,
            errors: self.errors,
            policy_traps: self.policy_traps,
            policy_counters: self.policy_counters,
            reloads: self.reloads,
        }
    }
}

/// Cached children for one named feature.
#[derive(Debug, Clone)]
pub struct FeatureMetrics {
    /// Its activation histogram.
    pub activation: Histogram,
    /// Its active-token counter.
    pub active: IntCounter,
}

/// One named feature's active tokens and their activations since its last flush, kept by one
/// step buffer without atomics, and the registry's series they are added to. Dropping it (a
/// buffer rebuilt after a reload, or freed) flushes it, so no count is lost.
#[derive(Debug)]
pub struct LocalFeature {
    activation: prometheus::local::LocalHistogram,
    active: u64,
    counter: IntCounter,
}

impl LocalFeature {
    /// An empty buffer for `feature`'s series.
    pub fn new(feature: &FeatureMetrics) -> Self {
        Self {
            activation: feature.activation.local(),
            active: 0,
            counter: feature.active.clone(),
        }
    }

    /// Counts one active token with activation `v`.
    pub fn observe(&mut self, v: f64) {
        self.activation.observe(v);
        self.active += 1;
    }

    /// Adds what it holds to the registry's series.
    pub fn flush(&mut self) {
        if self.active > 0 {
            self.activation.flush();
            self.counter.inc_by(self.active);
            self.active = 0;
        }
    }
}

impl Drop for LocalFeature {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Cached children for one hook.
#[derive(Debug, Clone)]
pub struct HookMetrics {
    /// Tokens.
    pub tokens: IntCounter,
    /// Duration.
    pub duration: Histogram,
    /// Non-finite tokens.
    pub nonfinite: IntCounter,
}

/// Cached children for one dictionary's gauges.
#[derive(Debug, Clone)]
pub struct DictionaryMetrics {
    /// L0.
    pub l0: Gauge,
    /// FVU.
    pub fvu: Gauge,
    /// `fvu_samples_total{result="measured"}`.
    pub measured: IntCounter,
    /// `fvu_samples_total{result="dropped"}`.
    pub dropped: IntCounter,
}
