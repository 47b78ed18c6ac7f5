//! Probe dictionaries (linear read-outs, no decoder) through the file format, ONNX Runtime and the
//! host API, compared with the float64 reference `sigmoid(x·w + b)` (or the logit `x·w + b`):
//! monitors over probe outputs, rules conditional on them, metrics and summaries; and every way of
//! steering through a probe refused with an error naming the rule.
//! Tolerance: normwise relative error under 1e-5 (float32 against float64).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiller_runtime::dictionary::{probe_dictionary, reference, write_dictionary};
use tiller_runtime::{
    Activation, ActivationsMut, Dictionary, DictionaryFile, Kind, Meta, Phase, Runtime,
    SessionOptions, Token, Weights,
};

#[path = "support/exposition.rs"]
mod exposition;
use exposition::sample;
use tiller_test_support::randn;

const TOL: f64 = 1e-5;
const D: usize = 24;
const OUT: usize = 3;
const HOOK: &str = "model.layers.5";

/// Three read-outs `[OUT, D]` and their biases, scaled so the scores spread over (0, 1).
fn readouts(seed: u64) -> (Array2<f32>, Array1<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = randn(&mut rng, (OUT, D), 0.35);
    let b = Array1::from(vec![0.3, -0.4, 0.1]);
    (w, b)
}

fn write_probe(dir: &Path, file: &str, activation: Activation, seed: u64) -> (Meta, Weights) {
    let (w, b) = readouts(seed);
    let (mut meta, weights) = probe_dictionary(w, b, activation).unwrap();
    meta.hook_in = HOOK.into();
    meta.model = "test-model".into();
    meta.source = "test".into();
    for (i, l) in ["toxic", "deceptive", "french"].iter().enumerate() {
        meta.labels.insert(i as u32, l.to_string());
    }
    write_dictionary(&meta, &weights, &dir.join(file)).unwrap();
    (meta, weights)
}

/// `max |a - b| / max |b|`.
fn rel(a: impl IntoIterator<Item = f64>, b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.into_iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn probe_files_round_trip_and_encode_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let x = randn(&mut rng, (64, D), 1.5);
    for (file, activation) in [
        ("p.onnx", Activation::Sigmoid),
        ("l.onnx", Activation::Linear),
    ] {
        let (meta, w) = write_probe(dir.path(), file, activation, 1);
        let f = DictionaryFile::open(dir.path().join(file)).unwrap();
        assert_eq!(f.meta(), &meta);
        assert_eq!(f.meta().kind, Kind::Probe);
        assert_eq!(f.meta().output_layers(), 0);
        assert!(!f.meta().has_decoder());
        // No decoder in the file: no W_dec, b_dec or recon.
        let g = f.model().graph.as_ref().unwrap();
        assert!(
            g.initializer
                .iter()
                .all(|t| t.name != "W_dec" && t.name != "b_dec")
        );
        assert_eq!(
            g.output.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
            ["acts"]
        );
        let back = f.weights().unwrap();
        assert_eq!(back.w_enc, w.w_enc);
        assert_eq!(back.b_enc, w.b_enc);
        assert_eq!(f.w_dec().unwrap().dim(), (OUT, 0));

        let want = reference::encode(&meta, &w, x.view());
        if activation == Activation::Sigmoid {
            // The reference is sigmoid(x·w + b), written out here once more.
            for t in 0..4 {
                for j in 0..OUT {
                    let z: f64 = (0..D)
                        .map(|k| f64::from(x[[t, k]]) * f64::from(w.w_enc[[k, j]]))
                        .sum::<f64>()
                        + f64::from(w.b_enc[j]);
                    assert!((want[[t, j]] - 1.0 / (1.0 + (-z).exp())).abs() < 1e-15);
                }
            }
        }
        let d = Dictionary::load(dir.path().join(file), &SessionOptions::default()).unwrap();
        let got = d.encode(x.view()).unwrap().acts;
        let e = rel(got.iter().map(|v| f64::from(*v)), want.as_slice().unwrap());
        assert!(e < TOL, "{activation}: ONNX Runtime vs float64: {e:e}");
        let err = d.encode_decode(x.view()).unwrap_err().to_string();
        assert!(err.contains("no decoder"), "{err}");
    }
}

#[test]
fn probes_take_only_their_activations_and_have_no_decoder() {
    let (w, b) = readouts(1);
    let err = probe_dictionary(w.clone(), b.clone(), Activation::Relu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sigmoid") && err.contains("relu"), "{err}");
    let err = probe_dictionary(w.clone(), Array1::zeros(2), Activation::Sigmoid)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bias") && err.contains("3 read-outs"), "{err}");
    // Only probes output sigmoid.
    let meta = Meta::new(Kind::Sae, Activation::Sigmoid, D, OUT, D);
    let sae = Weights::new(
        w.t().to_owned(),
        b.clone(),
        Array2::zeros((OUT, D)),
        Array1::zeros(D),
    );
    assert!(sae.check(&meta).unwrap_err().to_string().contains("probes"));
    // A probe file claiming another activation is refused when read.
    let (mut pm, pw) = probe_dictionary(w, b, Activation::Sigmoid).unwrap();
    pm.activation = Activation::Relu;
    let mut props: std::collections::BTreeMap<String, String> = pm.to_props().into_iter().collect();
    let path = Path::new("bad.onnx");
    let err = Meta::from_props(path, &props).unwrap_err().to_string();
    assert!(err.contains("probe") && err.contains("relu"), "{err}");
    props.insert("tiller.kind".into(), "sae".into());
    props.insert("tiller.activation".into(), "sigmoid".into());
    let err = Meta::from_props(path, &props).unwrap_err().to_string();
    assert!(err.contains("sigmoid") && err.contains("probes"), "{err}");
    // Weights with a b_dec to subtract are not a probe's.
    let mut bad = pw.clone();
    bad.apply_b_dec_to_input = true;
    pm.activation = Activation::Sigmoid;
    assert!(bad.check(&pm).is_err());
}

#[test]
fn monitors_read_probe_outputs_and_rules_wait_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let (pm, pw) = write_probe(dir.path(), "probe.onnx", Activation::Sigmoid, 1);
    let (lm, lw) = write_probe(dir.path(), "logit.onnx", Activation::Linear, 2);
    const T: usize = 48;
    let mut rng = StdRng::seed_from_u64(11);
    let x = randn(&mut rng, (T, D), 1.5);
    let push = randn(&mut rng, (1, D), 1.0);
    ndarray_npy::write_npy(dir.path().join("push.npy"), &push).unwrap();
    let scores = reference::encode(&pm, &pw, x.view());
    let logits = reference::encode(&lm, &lw, x.view());

    // A threshold with exactly five tokens above it, far from every score.
    let col: Vec<f64> = scores.column(1).to_vec();
    let mut sorted = col.clone();
    sorted.sort_by(f64::total_cmp);
    let th = (sorted[T - 6] + sorted[T - 5]) / 2.0;
    assert!(sorted[T - 5] - sorted[T - 6] > 1e-4);
    let above: Vec<usize> = (0..T).filter(|&t| col[t] > th).collect();
    assert_eq!(above.len(), 5);
    let count = 3;

    let mut config = String::from(
        r#"
[runtime]
fvu_sample_rate = 1.0   # a probe has no reconstruction: sampling must leave it alone

[[dictionary]]
name = "probe"
path = "probe.onnx"

[[dictionary]]
name = "logit"
path = "logit.onnx"
"#,
    );
    // Every score, through the runtime: a token monitor that fires on every token.
    for j in 0..OUT {
        config += &format!(
            "\n[[monitor]]\nname = \"score{j}\"\ndictionary = \"probe\"\nfeatures = [{j}]\nthreshold = -1.0\nwindow = \"token\"\n"
        );
    }
    config += &format!(
        r#"
[[monitor]]
name = "high"
dictionary = "probe"
features = [1]
threshold = {th}
window = "token"

[[monitor]]
name = "three"
dictionary = "probe"
features = [1]
threshold = {th}
window = "request"
aggregate = "count"
count = {count}
action = "stop"

[[monitor]]
name = "gate"
dictionary = "probe"
features = [1]
threshold = {th}
window = "request"
aggregate = "any"

[[monitor]]
name = "positive-logit"
dictionary = "logit"
features = [0]
threshold = 0.0
window = "token"

[[profile]]
name = "guarded"
[[profile.steer]]
name = "push-when-deceptive"
op = "vector"
vector = "push.npy"
hook = "{HOOK}"
strength = 0.5
when = "gate"
"#
    );
    let path = dir.path().join("tiller.toml");
    std::fs::write(&path, &config).unwrap();
    let rt = Runtime::from_config_file(&path).unwrap();
    rt.begin_request(1, Some("guarded"), None).unwrap();
    let mut events = Vec::new();
    let mut stops = Vec::new();
    let mut steered = x.clone();
    // One token per step, as in decoding.
    for t in 0..T {
        let mut step = rt
            .step(&[Token {
                request: 1,
                phase: Phase::Generated,
            }])
            .unwrap();
        let row = steered.row_mut(t).into_slice().unwrap();
        step.hook(HOOK, ActivationsMut::F32(row)).unwrap();
        let r = step.finish();
        events.extend(r.events);
        stops.extend(r.stop);
    }
    let of = |m: &str| -> Vec<&tiller_runtime::Event> {
        events.iter().filter(|e| e.monitor == m).collect()
    };

    // The scores the runtime read equal the float64 reference.
    for j in 0..OUT {
        let got: Vec<f64> = of(&format!("score{j}"))
            .iter()
            .map(|e| f64::from(e.value))
            .collect();
        assert_eq!(got.len(), T);
        let want = scores.column(j).to_vec();
        let e = rel(got, &want);
        assert!(e < TOL, "read-out {j}: runtime vs float64: {e:e}");
    }
    // Token monitor: exactly the tokens over the threshold.
    let high: Vec<usize> = of("high").iter().map(|e| e.token as usize).collect();
    assert_eq!(high, above);
    // Request monitor counting: stops at the third token over the threshold.
    let three = of("three");
    assert_eq!(three.len(), 1);
    assert_eq!(three[0].token as usize, above[count - 1]);
    assert_eq!(three[0].value, count as f32);
    assert_eq!(stops, [1]);
    // A logit read-out: positive where the probability is over one half.
    let pos: Vec<usize> = of("positive-logit")
        .iter()
        .map(|e| e.token as usize)
        .collect();
    let want: Vec<usize> = (0..T).filter(|&t| logits[[t, 0]] > 0.0).collect();
    assert_eq!(pos, want);
    // The rule waits for the probe's monitor, then pushes every token from there on.
    for t in 0..T {
        for k in 0..D {
            let want = if t >= above[0] {
                x[[t, k]] + 0.5 * push[[0, k]]
            } else {
                x[[t, k]]
            };
            assert!(
                (steered[[t, k]] - want).abs() <= 1e-6 * want.abs().max(1.0),
                "token {t}"
            );
        }
    }

    // Summary and metrics: a sigmoid read-out is active where it says yes (p > 0.5), a logit
    // read-out where it is positive.
    let s = rt.end_request(1).unwrap();
    let yes = |j: usize| (0..T).filter(|&t| scores[[t, j]] > 0.5).count() as u64;
    for j in 0..OUT as u32 {
        let stats = s.features["probe"].get(&j);
        assert_eq!(
            stats.map_or(0, |s| s.count),
            yes(j as usize),
            "read-out {j}"
        );
    }
    let max1 = col.iter().cloned().fold(0.0, f64::max);
    assert!((f64::from(s.features["probe"][&1].max) - max1).abs() < 1e-6);
    let positive = (0..T).filter(|&t| logits[[t, 0]] > 0.0).count() as u64;
    assert_eq!(s.features["logit"][&0].count, positive);
    assert_eq!(s.steering["push-when-deceptive"], (T - above[0]) as u64);
    let text = rt.metrics_text();
    for j in 0..OUT {
        let f = format!("feature=\"{j}\"");
        let labels = ["dictionary=\"probe\"", f.as_str()];
        assert_eq!(
            sample(&text, "tiller_feature_active_total", &labels),
            Some(yes(j) as f64),
            "{text}"
        );
        assert_eq!(
            sample(&text, "tiller_feature_activation_count", &labels),
            Some(yes(j) as f64)
        );
    }
    assert_eq!(
        sample(
            &text,
            "tiller_monitor_events_total",
            &["monitor=\"high\"", "action=\"flag\""]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(&text, "tiller_dictionary_fvu", &["dictionary=\"probe\""]),
        None,
        "a probe has no reconstruction error"
    );
}

#[test]
fn steering_through_a_probe_is_refused_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    write_probe(dir.path(), "probe.onnx", Activation::Sigmoid, 1);
    let head = r#"[runtime]
fvu_sample_rate = 0.0

[[dictionary]]
name = "probe"
path = "probe.onnx"

[[monitor]]
name = "toxic"
dictionary = "probe"
features = [0]
threshold = 0.9
"#;
    let cases = [
        ("clamp", "value = 0.0", None, "careful.1"),
        ("ablate", "", Some("mute-toxic"), "mute-toxic"),
        ("add", "strength = 2.0", None, "careful.1"),
        ("vector", "strength = 2.0", None, "careful.1"),
        ("project_cap", "value = 0.0", None, "careful.1"),
    ];
    for (op, param, name, rule) in cases {
        let name_line = name
            .map(|n| format!("name = \"{n}\"\n"))
            .unwrap_or_default();
        let config = format!(
            r#"{head}
[[profile]]
name = "careful"
[[profile.steer]]
op = "vector"
vector = "unused.npy"
hook = "{HOOK}"
strength = 1.0
when = "toxic"
[[profile.steer]]
{name_line}op = "{op}"
dictionary = "probe"
feature = 0
{param}
"#
        );
        let path = dir.path().join("tiller.toml");
        std::fs::write(&path, &config).unwrap();
        let err = Runtime::from_config_file(&path).unwrap_err().to_string();
        // The rule's own `dictionary` line (the monitor's comes first).
        let lines: Vec<&str> = config.lines().collect();
        let line = lines
            .iter()
            .rposition(|l| *l == "dictionary = \"probe\"")
            .unwrap()
            + 1;
        let at = format!("{}:{line}:", path.display());
        for part in [at.as_str(), rule, "`probe`, a probe", "no decoder", op] {
            assert!(err.contains(part), "{op}: expected `{part}` in: {err}");
        }
    }

    // A request's own rules: refused when the request begins (even where the operator lets
    // requests name any of the probe's outputs).
    let path = dir.path().join("tiller.toml");
    std::fs::write(
        &path,
        format!("{head}[[requests.dictionary]]\nname = \"probe\"\nany_feature = true\n"),
    )
    .unwrap();
    let rt = Runtime::from_config_file(&path).unwrap();
    let err = rt
        .begin_request(
            4,
            None,
            Some(r#"{"steer": [{"dictionary": "probe", "op": "ablate", "feature": 2}]}"#),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("request-4.0") && err.contains("a probe"),
        "{err}"
    );
    // Monitoring it is fine.
    rt.begin_request(5, None, None).unwrap();

    // A probe writes no hook.
    let config = head.replace(
        "path = \"probe.onnx\"",
        "path = \"probe.onnx\"\nhook_out = \"model.layers.6\"",
    );
    std::fs::write(&path, &config).unwrap();
    let err = Runtime::from_config_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("hook_out") && err.contains("probe") && err.contains(":7:"),
        "{err}"
    );
}

/// A policy over a probe sees its positive read-outs and may flag; a steering answer (here, clamp
/// read-out 0 on every call) is ignored and reported, and the request goes on.
#[test]
fn policies_over_a_probe_cannot_steer_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let (pm, pw) = write_probe(dir.path(), "probe.onnx", Activation::Sigmoid, 1);
    let guest = r#"(module
  (import "tiller" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "tiller_policy_abi_v1"))
  (func (export "tiller_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "tiller_on_request_begin") (param i64 i32 i32) (result i64) (i64.const 0))
  (func (export "tiller_on_request_end") (param i64) (result i64) (i64.const 0))
  (func (export "tiller_on_features") (param i64 i64 i32 i32 i32) (result i64)
    ;; One action record at 512: clamp (4) feature 0 to 0.0.
    (i32.store (i32.const 512) (i32.const 4))
    (i32.store (i32.const 516) (i32.const 0))
    (i32.store (i32.const 520) (i32.const 0))
    (i32.store (i32.const 524) (i32.const 0))
    (i32.store (i32.const 528) (i32.const 0))
    (i64.or (i64.shl (i64.const 512) (i64.const 32)) (i64.const 1))))"#;
    std::fs::write(dir.path().join("clamp.wat"), guest).unwrap();
    let config = r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "probe"
path = "probe.onnx"
[[policy]]
name = "clamper"
module = "clamp.wat"
dictionary = "probe"
features = [0, 1, 2]
"#;
    let path = dir.path().join("tiller.toml");
    std::fs::write(&path, config).unwrap();
    let rt = Runtime::from_config_file(&path).unwrap();
    rt.begin_request(1, None, None).unwrap();
    let x = randn(&mut StdRng::seed_from_u64(5), (6, D), 1.5);
    let scores = reference::encode(&pm, &pw, x.view());
    let mut ignored = 0;
    for t in 0..6 {
        let mut row = x.row(t).to_owned();
        let mut step = rt
            .step(&[Token {
                request: 1,
                phase: Phase::Generated,
            }])
            .unwrap();
        step.hook(HOOK, ActivationsMut::F32(row.as_slice_mut().unwrap()))
            .unwrap();
        let r = step.finish();
        assert_eq!(row, x.row(t), "token {t} was edited");
        ignored += r.events.iter().filter(|e| e.action == "ignored").count();
    }
    assert_eq!(ignored, 6, "one ignored answer per call");
    let s = rt.end_request(1).unwrap();
    assert!(s.steering.is_empty());
    assert!(s.events.iter().all(|e| e.reason.contains("probe")));
    let yes = (0..6).filter(|&t| scores[[t, 0]] > 0.5).count() as u64;
    assert_eq!(s.features["probe"].get(&0).map_or(0, |f| f.count), yes);
}
