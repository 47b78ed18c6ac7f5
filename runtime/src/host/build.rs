//! Config to state: loads the dictionaries, resolves the features and hooks every table names,
//! and plans each hook, so that a bad config is a load error, never a request error.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::backend::Encoder;
use super::policies::load_policies;
use super::rules::{load_direction, probe_steer_message};
use super::state::{
    DictState, HookPlan, MonitorState, Names, State, action_name, column, original_id,
};
use crate::config::{Config, Op, SteerConfig};
use crate::dictionary::{Activation, DictionaryFile, Kind, split_hooks};
use crate::encode::native::SlicedEncoder;
use crate::encode::session::{Dictionary, SessionOptions};
use crate::fvu::{Meter, Sampler};
use crate::metrics::{DictionaryMetrics, FeatureMetrics, HookMetrics, Metrics};
use crate::{Error, Result};

impl State {
    pub(super) fn build(config: Config, generation: u64, metrics: &Metrics) -> Result<Self> {
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
            let encoder = Encoder::new(&dict, sliced, features.len());
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
                encoder,
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
}

/// A [`Error::Config`] at `key` of the `index`-th `[[table]]` (and its `rule`-th
/// `[[profile.steer]]`) of the file the config came from; the line is 0 when unknown.
pub(super) fn config_error(
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
