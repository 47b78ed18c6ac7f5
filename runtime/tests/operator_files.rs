//! The operator files in `examples/operators` (the Grafana dashboard and the Prometheus alerting
//! rules) only query metrics that a real runtime exports, and the dashboard shows every metric
//! family the runtime has.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ndarray::Array1;
use serde_json::Value;
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};
use tiller_test_support::{randn_seeded, write_dictionary};

const D: usize = 16;
const F: usize = 48;
const PREFIX: &str = "tiller_";

/// One dictionary, one monitor and one profile with one rule: every family gets children.
const CONFIG: &str = r#"
[runtime]
fvu_sample_rate = 1.0
[[dictionary]]
name = "res"
path = "d.onnx"
[[monitor]]
name = "watch"
dictionary = "res"
features = [1, 2]
threshold = 0.5
window = "token"
[[profile]]
name = "steady"
[[profile.steer]]
name = "clamp3"
dictionary = "res"
op = "clamp"
feature = 3
value = 2.0
"#;

fn operators_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/operators")
}

fn write_dict(dir: &Path) {
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = "blocks.1".into();
    meta.hook_out = "blocks.1".into();
    let w = Weights {
        apply_b_dec_to_input: true,
        ..Weights::new(
            randn_seeded(1, (D, F)) * 0.3,
            Array1::from_elem(F, 0.02),
            randn_seeded(2, (F, D)) * 0.3,
            Array1::zeros(D),
        )
    };
    write_dictionary(&dir.join("d.onnx"), &meta, &w);
}

/// The text exposition of a runtime built from [`CONFIG`] that has run one step.
fn exposition() -> String {
    let dir = tempfile::tempdir().unwrap();
    write_dict(dir.path());
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let rt = Runtime::from_config_file(&cfg).unwrap();
    rt.begin_request(1, Some("steady"), None).unwrap();
    let tokens = [Token {
        request: 1,
        phase: Phase::Prompt,
    }; 40];
    let mut x = randn_seeded(3, (tokens.len(), D));
    let mut step = rt.step(&tokens).unwrap();
    step.hook("blocks.1", ActivationsMut::F32(x.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    rt.end_request(1).unwrap();
    // The config has no `[[policy]]` section, so no policy can trap: create the child a trap would,
    // through the runtime's own registry, so that the family is exported.
    rt.metrics()
        .policy_traps
        .with_label_values(&["example", "trap"])
        .inc();
    rt.metrics()
        .policy_counters
        .with_label_values(&["example", "flags"])
        .inc();
    rt.metrics_text()
}

/// The families of an exposition: name to type, and every sample name.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (name, ty) = (parts.next().unwrap(), parts.next().unwrap());
                types.insert(name.to_string(), ty.to_string());
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        Self { types, samples }
    }

    /// Whether a query may name `name`: a non-histogram family with samples, or `X_bucket`,
    /// `X_sum`, `X_count` of a histogram `X` whose `X_bucket` lines appear.
    fn has(&self, name: &str) -> bool {
        if let Some(ty) = self.types.get(name) {
            return ty != "histogram" && self.samples.contains(name);
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix).is_some_and(|base| {
                self.types.get(base).is_some_and(|t| t == "histogram")
                    && self.samples.contains(&format!("{base}_bucket"))
            })
        })
    }
}

/// Every `tiller_[a-z0-9_]+` identifier in a query.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = expr[i..].find(PREFIX) {
        let start = i + pos;
        let mut end = start + PREFIX.len();
        if start > 0 && ident(bytes[start - 1]) {
            i = end;
            continue;
        }
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if end > start + PREFIX.len() {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every panel of a dashboard, nested rows included.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// The `expr` of each panel target, as `(panel title, expr)`.
fn panel_exprs(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((title.clone(), e.to_string()));
            }
        }
    }
    out
}

/// The `expr:` values of a YAML rule file, read as text: inline values, plain scalars continued
/// on more-indented lines, and `|` / `>` block scalars.
fn yaml_exprs(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_start();
        let body_indent = line.len() - body.len();
        let (key_indent, rest) = match body.strip_prefix("- ") {
            Some(after) => {
                let after_trim = after.trim_start();
                (body_indent + 2 + after.len() - after_trim.len(), after_trim)
            }
            None => (body_indent, body),
        };
        let Some(value) = rest.strip_prefix("expr:") else {
            i += 1;
            continue;
        };
        let first_line = i + 1;
        let value = value.trim();
        let block = value.starts_with('|') || value.starts_with('>');
        let mut expr = if block {
            String::new()
        } else {
            value.trim_matches(|c| c == '"' || c == '\'').to_string()
        };
        i += 1;
        while i < lines.len() {
            let next = lines[i];
            let trimmed = next.trim_start();
            if !trimmed.is_empty() && next.len() - trimmed.len() <= key_indent {
                break;
            }
            expr.push('\n');
            expr.push_str(trimmed);
            i += 1;
        }
        out.push((first_line, expr.trim().to_string()));
    }
    out
}

fn check_names(
    exp: &Exposition,
    file: &str,
    exprs: &[(String, String)],
    missing: &mut Vec<String>,
) {
    for (place, expr) in exprs {
        for name in metric_names(expr) {
            if !exp.has(&name) {
                missing.push(format!(
                    "{file}: {place} queries `{name}`, which the runtime does not export"
                ));
            }
        }
    }
}

#[test]
fn operator_files_query_only_exported_metrics_and_cover_every_family() {
    let text = exposition();
    let exp = Exposition::parse(&text);

    // The exposition itself has every family, with the type METRICS gives it.
    for (name, ty) in tiller_runtime::metrics::METRICS {
        let full = format!("{PREFIX}{name}");
        assert_eq!(
            exp.types.get(&full).map(String::as_str),
            Some(*ty),
            "family `{full}` is missing from the exposition or has the wrong type:\n{text}"
        );
    }

    let dash_path = operators_dir().join("grafana-dashboard.json");
    let dash_file = "examples/operators/grafana-dashboard.json";
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&dash_path).unwrap())
        .unwrap_or_else(|e| {
            panic!("{dash_file}: not valid JSON: {e}");
        });
    assert_eq!(dash["schemaVersion"], 39, "{dash_file}: schemaVersion");
    assert!(
        dash["__inputs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{dash_file}: no DS_PROMETHEUS datasource input"
    );
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["hook", "dictionary"] {
        assert!(
            vars.contains(v),
            "{dash_file}: no templating variable `{v}`"
        );
    }
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{dash_file}: panel `{title}` reuses id {}",
            p["id"]
        );
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{dash_file}: panel `{title}` does not use the DS_PROMETHEUS input"
            );
        }
    }

    let panel_queries: Vec<(String, String)> = panel_exprs(&dash)
        .into_iter()
        .map(|(title, e)| (format!("panel `{title}`"), e))
        .collect();
    assert!(
        panel_queries.len() >= 13,
        "{dash_file}: only {} panel queries found",
        panel_queries.len()
    );
    let var_queries: Vec<(String, String)> = dash["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let q = v["definition"].as_str()?;
            Some((format!("variable `{}`", v["name"]), q.to_string()))
        })
        .collect();

    let alerts_path = operators_dir().join("tiller-alerts.yml");
    let alerts_file = "examples/operators/tiller-alerts.yml";
    let alerts_text = std::fs::read_to_string(&alerts_path).unwrap();
    let alert_queries: Vec<(String, String)> = yaml_exprs(&alerts_text)
        .into_iter()
        .map(|(line, e)| (format!("the `expr` at line {line}"), e))
        .collect();
    let alert_count = alerts_text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert!(alert_count > 0, "{alerts_file}: no alerts");
    assert_eq!(
        alert_queries.len(),
        alert_count,
        "{alerts_file}: every alert needs one `expr`"
    );
    for (place, e) in &alert_queries {
        assert!(
            !metric_names(e).is_empty(),
            "{alerts_file}: {place} names no tiller metric: {e:?}"
        );
    }

    // And every family the exposition has is one METRICS names, so that the list cannot fall
    // behind the registry (the operator files and the docs are checked against the list).
    for full in exp.types.keys() {
        let name = full.strip_prefix(PREFIX).unwrap_or(full);
        assert!(
            tiller_runtime::metrics::METRICS
                .iter()
                .any(|(n, _)| *n == name),
            "family `{full}` is exported but missing from metrics::METRICS"
        );
    }
    let mut missing = Vec::new();
    check_names(&exp, dash_file, &panel_queries, &mut missing);
    check_names(&exp, dash_file, &var_queries, &mut missing);
    check_names(&exp, alerts_file, &alert_queries, &mut missing);

    // Every family is on at least one panel (a histogram through its `_bucket`, `_sum` or `_count`).
    let on_panels: BTreeSet<String> = panel_queries
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    for (name, ty) in tiller_runtime::metrics::METRICS {
        let full = format!("{PREFIX}{name}");
        let used = if *ty == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| on_panels.contains(&format!("{full}{s}")))
        } else {
            on_panels.contains(&full)
        };
        if !used {
            missing.push(format!("{dash_file}: no panel shows `{full}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "{}\n\nexposition:\n{text}",
        missing.join("\n")
    );
}

#[test]
fn yaml_exprs_reads_inline_and_block_values() {
    let text = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: tiller_a_total > 0\n        for: 5m\n      - alert: B\n        expr: |\n          sum(rate(tiller_b_bucket[5m]))\n\n          > tiller_c\n        for: 1m\n      - expr: \"tiller_d\"\n        alert: D\n      - alert: E\n        expr: >-\n          tiller_e\n          + tiller_f\n";
    let got: Vec<String> = yaml_exprs(text).into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        got,
        [
            "tiller_a_total > 0",
            "sum(rate(tiller_b_bucket[5m]))\n\n> tiller_c",
            "tiller_d",
            "tiller_e\n+ tiller_f"
        ]
    );
    assert_eq!(
        metric_names("x_tiller_no + tiller_yes_total{a=\"b\"} / tiller_h_bucket[5m]"),
        ["tiller_h_bucket", "tiller_yes_total"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}
