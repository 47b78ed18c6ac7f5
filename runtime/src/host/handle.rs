//! The [`Runtime`] handle: built from a config, reloaded in place, shared by the host's threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::buffers::{Locals, StepBuffers};
use super::request::Request;
use super::state::State;
use crate::config::Config;
use crate::encode::session::Backend;
use crate::fvu::Worker;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// The runtime: shared by all of the host's threads (`Send + Sync`).
pub struct Runtime {
    pub(super) state: RwLock<Arc<State>>,
    pub(super) requests: RwLock<HashMap<u64, Arc<Mutex<Request>>>>,
    pub(super) metrics: Metrics,
    pub(super) generation: AtomicU64,
    /// Measures the sampled tokens' reconstructions off the hot path (`None` if its thread could
    /// not start: the gauges then stay unset, and nothing else changes).
    pub(super) fvu: Option<Worker>,
    /// Step buffers between steps.
    pub(super) scratch: Mutex<Vec<StepBuffers>>,
    /// The per-feature counts of every step buffer, which a scrape flushes first.
    pub(super) locals: Arc<Mutex<Vec<Weak<Mutex<Locals>>>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
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

    /// Builds a runtime from a config file.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(Config::from_file(path)?)
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

    pub(super) fn state(&self) -> Arc<State> {
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

    /// The error for a request id that is not running, counted.
    pub(super) fn unknown_request(&self, id: u64) -> Error {
        self.metrics.error("unknown_request");
        crate::logging::unknown_request(id);
        Error::Unknown {
            what: "request",
            name: id.to_string(),
            message: "was never begun or has ended".into(),
        }
    }

    /// Waits until the worker has measured every token sampled for the FVU and L0 gauges so far
    /// (the hook never waits for it): for tests, and for a host that reads the gauges at a
    /// point it chooses.
    pub fn wait_for_fvu(&self) {
        if let Some(w) = &self.fvu {
            w.flush();
        }
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
