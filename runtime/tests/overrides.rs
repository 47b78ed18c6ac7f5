//! Hostile per-request overrides against the operator's `[requests]`: each is refused whole when
//! the request begins, with an error that names the field and the bound, counted in
//! `tiller_errors_total{kind="override"}`; an allowed override steers exactly (bit for bit) as the
//! same rule in a profile.
#![allow(clippy::unwrap_used)]

#[path = "support/exposition.rs"]
mod exposition;

use std::path::Path;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiller_runtime::dictionary::reference;
use tiller_runtime::{
    Activation, ActivationsMut, Error, Kind, Meta, Phase, Runtime, Token, Weights,
};
use tiller_test_support::{randn, write_dictionary};

const D: usize = 24;
const F: usize = 64;
const HOOK: &str = "layer.3";

/// A ReLU SAE at `layer.3` in `dir/sae.onnx`, and two directions in `dir/dirs.npy`.
fn setup(dir: &Path) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = HOOK.into();
    meta.hook_out = HOOK.into();
    let w = Weights {
        w_enc: randn(&mut rng, (D, F), 0.4),
        b_enc: Array1::from_elem(F, 0.05),
        w_dec: randn(&mut rng, (F, D), 0.3),
        b_dec: randn(&mut rng, (1, D), 0.1).row(0).to_owned(),
        threshold: None,
        gated: None,
        w_skip: None,
        b_skip: None,
        apply_b_dec_to_input: true,
    };
    write_dictionary(&dir.join("sae.onnx"), &meta, &w);
    use ndarray_npy::WriteNpyExt;
    randn(&mut rng, (2, D), 1.0)
        .write_npy(std::fs::File::create(dir.join("dirs.npy")).unwrap())
        .unwrap();
    (meta, w)
}

/// The dictionary, a monitor on features 5, 6 and 7, a profile `safe` that ablates feature 3,
/// the direction `push` (row 1 of `dirs.npy`) at the SAE's hook, then `extra`.
fn config(extra: &str) -> String {
    format!(
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "sae.onnx"
[[monitor]]
name = "watch"
dictionary = "res"
features = [5, 6, 7]
threshold = 1000.0
[[profile]]
name = "safe"
[[profile.steer]]
dictionary = "res"
op = "ablate"
feature = 3
[[vector]]
name = "push"
path = "dirs.npy"
index = 1
hook = "{HOOK}"
{extra}
"#
    )
}

fn runtime(dir: &Path, name: &str, text: &str) -> Runtime {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    Runtime::from_config_file(&path).unwrap()
}

fn override_errors(rt: &Runtime) -> f64 {
    exposition::sample(
        &rt.metrics_text(),
        "tiller_errors_total",
        &[r#"kind="override""#],
    )
    .unwrap()
}

/// Begins a request with `overrides` and expects it refused: an [`Error::Override`] at `field`
/// whose text holds each of `parts`, counted once, and no request left behind.
fn refused(rt: &Runtime, profile: Option<&str>, overrides: &str, field: &str, parts: &[&str]) {
    let before = override_errors(rt);
    let e = rt.begin_request(77, profile, Some(overrides)).unwrap_err();
    let text = e.to_string();
    match &e {
        Error::Override { field: f, .. } => assert_eq!(f, field, "{text}"),
        other => panic!("not an override refusal: {other:?}"),
    }
    let shown = &overrides[..overrides.len().min(200)];
    assert!(
        field.is_empty() || text.contains(&format!("request overrides: {field}: ")),
        "the message names `{field}`: {text} (for {shown})"
    );
    for p in parts {
        assert!(text.contains(p), "expected `{p}` in: {text} (for {shown})");
    }
    assert_eq!(override_errors(rt), before + 1.0, "counted once: {text}");
    // Refused whole: the id is free, as if the request had never been begun.
    assert!(rt.end_request(77).is_err());
}

fn rule(body: &str) -> String {
    format!(r#"{{"steer": [{body}]}}"#)
}

/// Runs `x` through one step of request `id` at the hook, one token per step (decoding), and
/// returns the edited rows.
fn run(rt: &Runtime, id: u64, x: &Array2<f32>) -> Array2<f32> {
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let mut step = rt
            .step(&[Token {
                request: id,
                phase: Phase::Generated,
            }])
            .unwrap();
        step.hook(HOOK, ActivationsMut::F32(row.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
    }
    out
}

#[test]
fn replace_is_the_operators_and_a_switch_profile_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, w) = setup(dir.path());
    let rt = runtime(dir.path(), "default.toml", &config(""));
    refused(
        &rt,
        Some("safe"),
        r#"{"replace": true}"#,
        "replace",
        &["requests.allow_replace = false"],
    );
    // Without a profile too: replace asks to drop whatever profile a monitor switches to.
    refused(
        &rt,
        None,
        r#"{"replace": true, "steer": []}"#,
        "replace",
        &[],
    );

    // Allowed: the profile's rule is dropped until a monitor switches the request to a profile,
    // here the very profile it began with, whose rules then apply.
    let n = 16;
    let mut x = randn(&mut StdRng::seed_from_u64(9), (n, D), 1.0);
    // The token where feature 5 peaks trips the monitor: moved to the middle, so that the
    // profile's feature 3 is active on tokens before and after the switch.
    let peak = |x: &Array2<f32>| {
        let fa = reference::encode(&meta, &w, x.view());
        (0..n)
            .max_by(|&a, &b| fa[[a, 5]].total_cmp(&fa[[b, 5]]))
            .unwrap()
    };
    let (from, first) = (peak(&x), n / 2);
    for j in 0..D {
        x.swap([from, j], [first, j]);
    }
    let fa = reference::encode(&meta, &w, x.view());
    assert_eq!(peak(&x), first);
    let mut trip: Vec<f64> = fa.column(5).to_vec();
    trip.sort_by(f64::total_cmp);
    let th = (trip[n - 2] + trip[n - 1]) / 2.0;
    let ablations = |from: usize| (from..n).filter(|&t| fa[[t, 3]] > 0.0).count() as u64;
    let monitor = format!(
        "[requests]\nallow_replace = true\n[[monitor]]\nname = \"trip\"\ndictionary = \"res\"\n\
         features = [5]\nthreshold = {th}\nwindow = \"request\"\naggregate = \"any\"\n\
         action = \"switch_profile\"\nprofile = \"safe\"\n"
    );
    let rt = runtime(dir.path(), "replace.toml", &config(&monitor));
    rt.begin_request(1, Some("safe"), Some(r#"{"replace": true}"#))
        .unwrap();
    rt.begin_request(2, Some("safe"), None).unwrap();
    let replaced = run(&rt, 1, &x);
    let kept = run(&rt, 2, &x);
    let s = rt.end_request(1).unwrap();
    let after = ablations(first + 1);
    assert!(
        after > 0 && after < ablations(0),
        "a meaningful split: {after} of {} ablations after token {first}",
        ablations(0)
    );
    assert_eq!(
        s.steering.get("safe.0").copied().unwrap_or(0),
        after,
        "the profile's ablation applies from the token after the switch, not before"
    );
    assert_eq!(
        rt.end_request(2).unwrap().steering.get("safe.0").copied(),
        Some(ablations(0))
    );
    // Up to the switch the replaced request is untouched; after it, it is steered exactly as the
    // request that kept its profile.
    for t in 0..n {
        let (a, b) = (replaced.row(t), kept.row(t));
        if t <= first {
            assert_eq!(a, x.row(t), "token {t} before the switch");
        } else {
            assert!(
                a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "token {t} after the switch"
            );
        }
    }
}

#[test]
fn a_request_names_no_file() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let rt = runtime(
        dir.path(),
        "tiller.toml",
        &config("[requests]\nops = [\"vector\", \"add\"]\nvectors = [\"push\"]\n"),
    );
    // Each path names a file whose read succeeds: a profile rule naming it steers.
    let abs = dir.path().join("dirs.npy");
    let parent = format!(
        "../{}/dirs.npy",
        dir.path().file_name().unwrap().to_str().unwrap()
    );
    for path in [
        abs.to_str().unwrap(),
        parent.as_str(),
        "dirs.npy",
        "/etc/passwd",
    ] {
        let body = format!(
            r#"{{"op": "vector", "vector": {}, "hook": "{HOOK}", "strength": 1.0}}"#,
            serde_json::to_string(path).unwrap()
        );
        refused(
            &rt,
            None,
            &rule(&body),
            "steer[0].vector",
            &[
                "is not a direction the operator lets requests use",
                "push",
                "never a file",
            ],
        );
    }
    // A direction by name, but at another hook or another row than the operator's.
    refused(
        &rt,
        None,
        &rule(r#"{"op": "vector", "vector": "push", "hook": "layer.9", "strength": 1.0}"#),
        "steer[0].hook",
        &["`layer.9` is not the hook of vector `push`"],
    );
    refused(
        &rt,
        None,
        &rule(r#"{"op": "vector", "vector": "push", "index": 0, "strength": 1.0}"#),
        "steer[0].index",
        &["`[[vector]]` entry `push`"],
    );
    // A `vector` on a feature op is never read either.
    refused(
        &rt,
        None,
        &rule(
            r#"{"op": "add", "dictionary": "res", "feature": 5, "strength": 1.0, "vector": "/etc/passwd"}"#,
        ),
        "steer[0].vector",
        &["never a file"],
    );
    // A named direction the operator did not list for requests.
    let rt = runtime(
        dir.path(),
        "unlisted.toml",
        &config("[requests]\nops = [\"vector\"]\n"),
    );
    refused(
        &rt,
        None,
        &rule(r#"{"op": "vector", "vector": "push", "strength": 1.0}"#),
        "steer[0].vector",
        &["requests.vectors: none"],
    );
}

#[test]
fn unbounded_rules_text_and_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let rt = runtime(dir.path(), "tiller.toml", &config(""));
    let one = r#"{"op": "ablate", "dictionary": "res", "feature": 5}"#;
    let many = |n: usize| rule(&vec![one; n].join(", "));
    // 10,000 rules: over the default text bound before they are even parsed...
    let text = many(10_000);
    refused(
        &rt,
        None,
        &text,
        "",
        &[&format!(
            "{} bytes exceed the operator's bound 65536 (requests.max_bytes)",
            text.len()
        )],
    );
    // ...and over the rule bound when the text may be long.
    let big = runtime(
        dir.path(),
        "big.toml",
        &config("[requests]\nmax_bytes = 20000000\n"),
    );
    refused(
        &big,
        None,
        &text,
        "steer",
        &["10000 rules exceed the operator's bound 8 (requests.max_rules)"],
    );
    refused(&rt, None, &many(9), "steer", &["9 rules exceed", "bound 8"]);
    rt.begin_request(1, None, Some(&many(8))).unwrap();

    // A 10 MB overrides string, and a 10 MB rule name where the text may be that long.
    let huge = format!(r#"{{"steer": [], "pad": "{}"}}"#, "x".repeat(10 << 20));
    refused(&rt, None, &huge, "", &["exceed the operator's bound 65536"]);
    let name = rule(&format!(
        r#"{{"name": "{}", "op": "ablate", "dictionary": "res", "feature": 5}}"#,
        "n".repeat(10 << 20)
    ));
    refused(
        &big,
        None,
        &name,
        "steer[0].name",
        &["10485760 bytes exceed 128"],
    );

    // Strengths, values, factors: finite and within the operator's bounds.
    let add = |s: &str| {
        rule(&format!(
            r#"{{"op": "add", "dictionary": "res", "feature": 5, "strength": {s}}}"#
        ))
    };
    refused(
        &rt,
        None,
        &add("1e30"),
        "steer[0].strength",
        &["1e30 exceeds the operator's bound 100 (requests.max_abs_strength)"],
    );
    refused(
        &rt,
        None,
        &add("-100.5"),
        "steer[0].strength",
        &["bound 100"],
    );
    // Finite in JSON, infinite as f32.
    refused(
        &rt,
        None,
        &add("1e39"),
        "steer[0].strength",
        &["inf is not a finite number"],
    );
    // What JSON cannot carry is a parse error at the field.
    refused(
        &rt,
        None,
        &add("1e400"),
        "steer[0].strength",
        &["number out of range"],
    );
    for text in ["NaN", "nan", "Infinity", "-inf", "\"NaN\""] {
        refused(&rt, None, &add(text), "steer[0].strength", &[]);
    }
    rt.begin_request(2, None, Some(&add("-100"))).unwrap();
    refused(
        &rt,
        None,
        &rule(r#"{"op": "clamp", "dictionary": "res", "feature": 5, "value": 1e30}"#),
        "steer[0].value",
        &["(requests.max_abs_value)"],
    );
    refused(
        &rt,
        None,
        &rule(r#"{"op": "scale", "dictionary": "res", "feature": 5, "factor": -11}"#),
        "steer[0].factor",
        &["exceeds the operator's bound 10 (requests.max_abs_factor)"],
    );
    // A bound is checked on every number given, whether or not the op reads it.
    refused(
        &rt,
        None,
        &rule(r#"{"op": "ablate", "dictionary": "res", "feature": 5, "factor": 1e30}"#),
        "steer[0].factor",
        &["bound 10"],
    );
}

#[test]
fn unknown_ops_fields_and_deep_nesting_are_named() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let rt = runtime(
        dir.path(),
        "tiller.toml",
        &config("[requests]\nmax_bytes = 20000000\n"),
    );
    refused(
        &rt,
        None,
        &rule(r#"{"op": "explode", "dictionary": "res", "feature": 5}"#),
        "steer[0].op",
        &["unknown variant `explode`"],
    );
    // An op the operator does not let requests use.
    refused(
        &rt,
        None,
        &rule(r#"{"op": "project_cap", "dictionary": "res", "feature": 5, "value": 1}"#),
        "steer[0].op",
        &[
            "`project_cap` is not an op the operator lets requests use",
            "add, clamp, ablate, scale, cap",
        ],
    );
    refused(
        &rt,
        None,
        r#"{"stear": []}"#,
        "stear",
        &["unknown field `stear`"],
    );
    refused(
        &rt,
        None,
        &rule(
            r#"{"op": "ablate", "dictionary": "res", "feature": 5}, {"op": "ablate", "path": "/etc/passwd"}"#,
        ),
        "steer[1].path",
        &["unknown field `path`"],
    );
    refused(&rt, None, r#"{"steer": 3}"#, "steer", &["invalid type"]);
    refused(&rt, None, "{not json", "", &["line 1 column 2"]);
    refused(
        &rt,
        None,
        r#"{"steer": []} trailing"#,
        "",
        &["trailing characters"],
    );
    refused(
        &rt,
        None,
        &rule(r#"{"op": "ablate", "dictionary": "res", "feature": 5, "when": "nobody"}"#),
        "steer[0].when",
        &["no monitor is named `nobody`"],
    );
    // Deeply nested JSON: an error, never a stack overflow, wherever the nesting is.
    let depth = 1_000_000;
    let nested = |open: &str, close: &str| open.repeat(depth) + &close.repeat(depth);
    // (Arrays read as structs field by field, as serde reads any struct: `[0]` is `steer`.)
    for (text, field) in [
        (nested("[", "]"), "[0][0][0]"),
        (
            format!(r#"{{"steer": {}}}"#, nested("[", "]")),
            "steer[0][0]",
        ),
        (
            format!(r#"{{"steer": [{{"name": {}}}]}}"#, nested(r#"{"a": "#, "}")),
            "steer[0].name",
        ),
    ] {
        refused(&rt, None, &text, field, &["invalid type"]);
    }
    // The same through the parser alone, with serde_json's own recursion limit behind it.
    let e = tiller_runtime::config::Overrides::from_json(&nested("[", "]")).unwrap_err();
    assert!(matches!(e, Error::Override { .. }), "{e}");
}

#[test]
fn features_outside_the_allowed_set_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let ablate = |f: u32| {
        rule(&format!(
            r#"{{"op": "ablate", "dictionary": "res", "feature": {f}}}"#
        ))
    };
    // By default: the features the config names (the monitor's 5, 6, 7) less those a profile
    // steers (3), so the sliced encode serves every request and no request undoes a profile.
    let rt = runtime(dir.path(), "tiller.toml", &config(""));
    for f in [5, 6, 7] {
        rt.begin_request(u64::from(f), None, Some(&ablate(f)))
            .unwrap();
    }
    for f in [3, 50, 99_999] {
        refused(
            &rt,
            None,
            &ablate(f),
            "steer[0].feature",
            &[
                &format!("feature {f} of `res` is not one the operator lets requests steer"),
                "(requests.dictionary: 5, 6, 7)",
            ],
        );
    }
    refused(
        &rt,
        None,
        &rule(r#"{"op": "ablate", "dictionary": "other", "feature": 5}"#),
        "steer[0].dictionary",
        &["no dictionary is named `other`"],
    );
    // Listed by the operator: those features only (and they join the sliced encode).
    let rt = runtime(
        dir.path(),
        "listed.toml",
        &config("[[requests.dictionary]]\nname = \"res\"\nfeatures = [3, 40]\n"),
    );
    rt.begin_request(1, Some("safe"), Some(&ablate(40)))
        .unwrap();
    rt.begin_request(2, Some("safe"), Some(&ablate(3))).unwrap();
    refused(
        &rt,
        None,
        &ablate(5),
        "steer[0].feature",
        &["(requests.dictionary: 3, 40)"],
    );
    // Any feature: only the dictionary's own range bounds it.
    let rt = runtime(
        dir.path(),
        "any.toml",
        &config("[[requests.dictionary]]\nname = \"res\"\nany_feature = true\n"),
    );
    rt.begin_request(1, None, Some(&ablate(63))).unwrap();
    refused(
        &rt,
        None,
        &ablate(99_999),
        "steer[0].feature",
        &["feature 99999 is out of range: `res` has 64 features"],
    );
    // Overrides off: any rule or replace is refused; an empty override is no override.
    let rt = runtime(
        dir.path(),
        "off.toml",
        &config("[requests]\nallow = false\n"),
    );
    refused(&rt, None, &ablate(5), "steer", &["requests.allow = false"]);
    rt.begin_request(1, Some("safe"), Some(r#"{"steer": []}"#))
        .unwrap();
}

#[test]
fn bad_request_settings_are_config_errors_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    for (extra, at, want) in [
        (
            "[requests]\nmax_abs_strength = -1.0\n",
            "max_abs_strength = -1.0",
            "`requests.max_abs_strength`: -1 is not a finite bound >= 0",
        ),
        (
            "[requests]\nvectors = [\"nope\"]\n",
            "vectors = [\"nope\"]",
            "`requests.vectors`: no `[[vector]]` is named `nope`",
        ),
        (
            "[[requests.dictionary]]\nname = \"nope\"\n",
            "name = \"nope\"",
            "`name`: no dictionary is named `nope`",
        ),
        (
            "[[requests.dictionary]]\nname = \"res\"\nfeatures = [1]\nany_feature = true\n",
            "any_feature = true",
            "`any_feature`: give `features` or `any_feature = true`, not both",
        ),
        (
            "[requests]\nops = [\"explode\"]\n",
            "ops = [\"explode\"]",
            "unknown variant `explode`",
        ),
        (
            "[requests]\nallow_everything = true\n",
            "allow_everything = true",
            "unknown field `allow_everything`",
        ),
    ] {
        let text = config(extra);
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let e = Runtime::from_config_file(&path).unwrap_err().to_string();
        let line = text.lines().position(|l| l == at).unwrap() + 1;
        assert!(
            e.contains(want) && e.contains(&format!("bad.toml:{line}:")),
            "expected `{want}` at line {line} in: {e}"
        );
    }
}

#[test]
fn an_allowed_override_steers_as_the_same_rule_in_a_profile() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let rules = [
        r#"{"op": "add", "dictionary": "res", "feature": 5, "strength": 1.5}"#,
        r#"{"op": "clamp", "dictionary": "res", "feature": 6, "value": 0.25}"#,
        r#"{"op": "scale", "dictionary": "res", "feature": 7, "factor": 0.5, "only_active": true}"#,
        r#"{"op": "vector", "vector": "push", "strength": -2.0}"#,
    ];
    // The same rules as a profile, in TOML.
    let profile = "[[profile]]\nname = \"same\"\n[[profile.steer]]\ndictionary = \"res\"\nop = \"add\"\n\
                   feature = 5\nstrength = 1.5\n[[profile.steer]]\ndictionary = \"res\"\n\
                   op = \"clamp\"\nfeature = 6\nvalue = 0.25\n[[profile.steer]]\n\
                   dictionary = \"res\"\nop = \"scale\"\nfeature = 7\nfactor = 0.5\n\
                   only_active = true\n[[profile.steer]]\nop = \"vector\"\nvector = \"push\"\n\
                   strength = -2.0\n";
    let by_profile = runtime(dir.path(), "profile.toml", &config(profile));
    let by_request = runtime(
        dir.path(),
        "request.toml",
        &config(
            "[requests]\nops = [\"add\", \"clamp\", \"scale\", \"vector\"]\nvectors = [\"push\"]\n",
        ),
    );
    by_profile.begin_request(1, Some("same"), None).unwrap();
    by_request
        .begin_request(1, None, Some(&rule(&rules.join(", "))))
        .unwrap();
    by_request.begin_request(2, None, None).unwrap();
    let x = randn(&mut StdRng::seed_from_u64(4), (12, D), 1.0);
    let want = run(&by_profile, 1, &x);
    let got = run(&by_request, 1, &x);
    let untouched = run(&by_request, 2, &x);
    assert_eq!(untouched, x);
    assert_ne!(want, x, "the rules steer");
    for (t, (a, b)) in got.rows().into_iter().zip(want.rows()).enumerate() {
        assert!(
            a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "token {t}: {a} != {b}"
        );
    }
    let steered = |s: &tiller_runtime::RequestSummary| s.steering.values().sum::<u64>();
    assert_eq!(
        steered(&by_request.end_request(1).unwrap()),
        steered(&by_profile.end_request(1).unwrap())
    );
    assert_eq!(override_errors(&by_request), 0.0);
}

/// A reload is the operator's word for running requests too: their overrides are checked again
/// against the new `[requests]` (a tighter bound drops them, counted), and what the new config no
/// longer has (a dictionary an override steered, a request's profile) is dropped for that request
/// alone, never failing the steps of its batch.
#[test]
fn a_reload_checks_running_requests_again_and_fails_no_step() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let allow = "[requests]\nops = [\"add\", \"clamp\"]\n";
    let path = dir.path().join("t.toml");
    std::fs::write(&path, config(allow)).unwrap();
    let rt = Runtime::from_config_file(&path).unwrap();
    // The reference runtime: the profile alone, as after the override is dropped.
    let plain = runtime(dir.path(), "plain.toml", &config(allow));
    let add = rule(r#"{"op": "add", "dictionary": "res", "feature": 5, "strength": 3.0}"#);
    rt.begin_request(1, Some("safe"), Some(&add)).unwrap();
    rt.begin_request(2, Some("safe"), None).unwrap();
    plain.begin_request(1, Some("safe"), None).unwrap();
    let x = randn(&mut StdRng::seed_from_u64(9), (4, D), 1.0);
    let want = run(&plain, 1, &x);
    let before = run(&rt, 1, &x);
    assert_ne!(before, want, "the override steers before the reload");

    // A tighter bound: the running request's `add` of 3 is now beyond it.
    let tight = "[requests]\nops = [\"add\", \"clamp\"]\nmax_abs_strength = 1.0\n";
    std::fs::write(&path, config(tight)).unwrap();
    let errors = override_errors(&rt);
    rt.reload(None).unwrap();
    let after = run(&rt, 1, &x);
    assert_eq!(after, want, "after the reload only the profile applies");
    assert_eq!(override_errors(&rt), errors + 1.0, "counted once");
    let s = rt.end_request(1).unwrap();
    assert!(s.steering.contains_key("safe.0"));

    // A reload that drops the dictionary an override steers, and the profile of a request:
    // steps with those requests go on, the others' edits unchanged.
    let second = "[[dictionary]]\nname = \"res2\"\npath = \"sae.onnx\"\n\
                  [[requests.dictionary]]\nname = \"res\"\nfeatures = [5]\n\
                  [[requests.dictionary]]\nname = \"res2\"\nany_feature = true\n";
    std::fs::write(&path, config(&format!("{allow}{second}"))).unwrap();
    rt.reload(None).unwrap();
    rt.begin_request(3, None, Some(&add)).unwrap();
    rt.begin_request(
        4,
        None,
        Some(&rule(
            r#"{"op": "add", "dictionary": "res2", "feature": 5, "strength": 3.0}"#,
        )),
    )
    .unwrap();
    let without = config(allow).replace(
        "[[profile]]\nname = \"safe\"",
        "[[profile]]\nname = \"other\"",
    );
    std::fs::write(&path, without).unwrap();
    rt.reload(None).unwrap();
    let errors = override_errors(&rt);
    let tokens: Vec<Token> = [2, 3, 4]
        .iter()
        .map(|&r| Token {
            request: r,
            phase: Phase::Generated,
        })
        .collect();
    let mut y = x.slice(ndarray::s![0..3, ..]).to_owned();
    let mut step = rt.step(&tokens).unwrap();
    step.hook(HOOK, ActivationsMut::F32(y.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    // Request 2 lost its profile (gone from the config), request 4 its override (its dictionary
    // is gone); request 3's override still steers, exactly as the same rule alone.
    assert_eq!(y.row(0), x.row(0));
    assert_eq!(y.row(2), x.row(2));
    let alone = runtime(dir.path(), "alone.toml", &config(allow));
    alone.begin_request(3, None, Some(&add)).unwrap();
    let want3 = run(&alone, 3, &x.slice(ndarray::s![1..2, ..]).to_owned());
    assert_eq!(y.row(1), want3.row(0));
    assert_eq!(
        override_errors(&rt),
        errors + 1.0,
        "request 4's override, once"
    );
    let profile_errors = exposition::sample(
        &rt.metrics_text(),
        "tiller_errors_total",
        &[r#"kind="profile""#],
    )
    .unwrap();
    assert!(profile_errors >= 1.0);
}
