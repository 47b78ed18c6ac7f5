//! Steering and monitors through the host API, compared with a float64 reference of
//! docs/design.md#4-steering-edits-that-keep-the-dictionarys-error-term: for each token,
//! `x' = x + c·d` with `c` from the reference feature activation.
//! Tolerance: normwise relative error of the edited activations under 1e-5 (f32 host memory);
//! f16/bf16 host memory within their own rounding.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};
use tiller_test_support::{randn, write_dictionary, write_gguf};

const TOL: f64 = 1e-5;
const D: usize = 24;
const F: usize = 64;

fn write_dict(
    dir: &Path,
    name: &str,
    kind: Kind,
    activation: Activation,
    d_out: usize,
    seed: u64,
) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut meta = Meta::new(kind, activation, D, F, d_out);
    meta.hook_in = if kind == Kind::Sae {
        "layer.3".into()
    } else {
        "mlp.3.in".into()
    };
    meta.hook_out = if kind == Kind::Sae {
        "layer.3".into()
    } else {
        "mlp.3.out".into()
    };
    if activation == Activation::TopK {
        meta.k = Some(12);
    }
    let w = Weights {
        w_enc: randn(&mut rng, (D, F), 0.4),
        b_enc: Array1::from_elem(F, 0.05),
        w_dec: randn(&mut rng, (F, d_out), 0.3),
        b_dec: randn(&mut rng, (1, d_out), 0.1).row(0).to_owned(),
        threshold: (activation == Activation::JumpRelu).then(|| Array1::from_elem(F, 0.1)),
        gated: None,
        w_skip: None,
        b_skip: None,
        apply_b_dec_to_input: kind == Kind::Sae,
    };
    write_dictionary(&dir.join(name), &meta, &w);
    (meta, w)
}

/// The reference edit of one rule on one token.
fn edit(x: &mut [f64], f: f64, d: &[f32], op: &str, p: f64) {
    let c = match op {
        "add" => p,
        "clamp" => p - f,
        "ablate" => -f,
        "scale" => (p - 1.0) * f,
        "cap" => f.min(p) - f,
        _ => unreachable!(),
    };
    for (a, b) in x.iter_mut().zip(d) {
        *a += c * f64::from(*b);
    }
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()))
        / scale
}

fn setup(dir: &Path, activation: Activation) -> ((Meta, Weights), (Meta, Weights)) {
    let sae = write_dict(dir, "sae.onnx", Kind::Sae, activation, D, 1);
    let tc = write_dict(dir, "tc.onnx", Kind::Transcoder, Activation::Relu, 20, 2);
    (sae, tc)
}

const CONFIG: &str = r#"
[runtime]
fvu_sample_rate = 0.0

[[dictionary]]
name = "res"
path = "sae.onnx"

[[dictionary]]
name = "tc"
path = "tc.onnx"

[[monitor]]
name = "watch"
dictionary = "res"
features = [5, 6]
threshold = 1000.0

[[profile]]
name = "a"
[[profile.steer]]
dictionary = "res"
op = "clamp"
feature = 3
value = 2.5
[[profile.steer]]
dictionary = "res"
op = "add"
feature = 10
strength = 1.5
apply_to = "generated"
[[profile.steer]]
dictionary = "tc"
op = "ablate"
feature = 7

[[profile]]
name = "b"
[[profile.steer]]
dictionary = "res"
op = "scale"
feature = 3
factor = 0.5
[[profile.steer]]
dictionary = "res"
op = "cap"
feature = 11
value = 0.2
[[profile.steer]]
dictionary = "res"
op = "ablate"
feature = 12
only_active = true
apply_to = "prompt"
"#;

#[test]
fn two_profiles_in_one_batch_match_the_reference() {
    for activation in [Activation::Relu, Activation::JumpRelu, Activation::TopK] {
        let dir = tempfile::tempdir().unwrap();
        let ((sm, sw), (tm, tw)) = setup(dir.path(), activation);
        let cfg_path = dir.path().join("tiller.toml");
        std::fs::write(&cfg_path, CONFIG).unwrap();
        let rt = Runtime::from_config_file(&cfg_path).unwrap();
        rt.begin_request(1, Some("a"), None).unwrap();
        rt.begin_request(2, Some("b"), None).unwrap();
        rt.begin_request(3, None, None).unwrap();

        let tokens = [
            Token {
                request: 1,
                phase: Phase::Prompt,
            },
            Token {
                request: 2,
                phase: Phase::Prompt,
            },
            Token {
                request: 1,
                phase: Phase::Generated,
            },
            Token {
                request: 3,
                phase: Phase::Generated,
            },
            Token {
                request: 2,
                phase: Phase::Generated,
            },
            Token {
                request: 2,
                phase: Phase::Prompt,
            },
        ];
        let mut rng = StdRng::seed_from_u64(activation as u64 + 10);
        let x = randn(&mut rng, (tokens.len(), D), 1.0);
        let xm = randn(&mut rng, (tokens.len(), D), 1.0);
        let ym = randn(&mut rng, (tokens.len(), 20), 1.0);

        // The reference.
        let fa = reference::encode(&sm, &sw, x.view());
        let ft = reference::encode(&tm, &tw, xm.view());
        let mut want = x.mapv(f64::from);
        let mut want_y = ym.mapv(f64::from);
        for (t, tok) in tokens.iter().enumerate() {
            let row = want.row_mut(t);
            let row = row.into_slice().unwrap();
            let dec = |i: usize| sw.w_dec.row(i).to_vec();
            match tok.request {
                1 => {
                    edit(row, fa[[t, 3]], &dec(3), "clamp", 2.5);
                    if tok.phase == Phase::Generated {
                        edit(row, fa[[t, 10]], &dec(10), "add", 1.5);
                    }
                    let yr = want_y.row_mut(t).into_slice().unwrap();
                    edit(yr, ft[[t, 7]], &tw.w_dec.row(7).to_vec(), "ablate", 0.0);
                }
                2 => {
                    edit(row, fa[[t, 3]], &dec(3), "scale", 0.5);
                    edit(row, fa[[t, 11]], &dec(11), "cap", 0.2);
                    if tok.phase == Phase::Prompt && fa[[t, 12]] > 0.0 {
                        edit(row, fa[[t, 12]], &dec(12), "ablate", 0.0);
                    }
                }
                _ => {}
            }
        }

        let mut got = x.clone();
        let mut got_m = xm.clone();
        let mut got_y = ym.clone();
        let mut step = rt.step(&tokens).unwrap();
        step.hook("layer.3", ActivationsMut::F32(got.as_slice_mut().unwrap()))
            .unwrap();
        step.hook(
            "mlp.3.in",
            ActivationsMut::F32(got_m.as_slice_mut().unwrap()),
        )
        .unwrap();
        step.hook(
            "mlp.3.out",
            ActivationsMut::F32(got_y.as_slice_mut().unwrap()),
        )
        .unwrap();
        let result = step.finish();
        assert!(result.stop.is_empty() && result.events.is_empty());

        let e = rel(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(e < TOL, "{activation}: residual edits, rel err {e:e}");
        assert_eq!(
            got_m, xm,
            "the transcoder's input hook is read, not written"
        );
        let e = rel(got_y.as_slice().unwrap(), want_y.as_slice().unwrap());
        assert!(
            e < TOL,
            "{activation}: transcoder edits at hook_out, rel err {e:e}"
        );
        // Request 3 has no profile: untouched, bit for bit.
        assert_eq!(got.row(3), x.row(3));
        assert_ne!(got.row(0), x.row(0));

        let s1 = rt.end_request(1).unwrap();
        assert_eq!(s1.tokens, 2);
        assert_eq!(s1.steering.get("a.0"), Some(&2));
        assert_eq!(
            s1.steering.get("a.1"),
            Some(&1),
            "add applies to generated tokens only"
        );
        let s2 = rt.end_request(2).unwrap();
        let prompt_active = tokens
            .iter()
            .enumerate()
            .filter(|(t, k)| k.request == 2 && k.phase == Phase::Prompt && fa[[*t, 12]] > 0.0)
            .count() as u64;
        assert_eq!(s2.steering.get("b.2").copied().unwrap_or(0), prompt_active);
        // Feature statistics of the named features.
        let res = &s2.features["res"];
        for (f, stats) in res {
            let vals: Vec<f64> = tokens
                .iter()
                .enumerate()
                .filter(|(_, k)| k.request == 2)
                .map(|(t, _)| fa[[t, *f as usize]])
                .collect();
            let count = vals.iter().filter(|v| **v > 0.0).count() as u64;
            let max = vals.iter().cloned().fold(0.0, f64::max);
            assert_eq!(stats.count, count, "feature {f}");
            assert!(
                (f64::from(stats.max) - max).abs() < 1e-4 * max.max(1.0),
                "feature {f}"
            );
        }
        assert!(rt.end_request(1).is_err(), "ending twice is an error");
    }
}

#[test]
fn half_precision_host_memory() {
    let dir = tempfile::tempdir().unwrap();
    let ((sm, sw), _) = setup(dir.path(), Activation::Relu);
    let cfg_path = dir.path().join("tiller.toml");
    std::fs::write(&cfg_path, CONFIG).unwrap();
    let rt = Runtime::from_config_file(&cfg_path).unwrap();
    rt.begin_request(1, Some("a"), None).unwrap();
    let tokens = [Token {
        request: 1,
        phase: Phase::Prompt,
    }; 4];
    let x = randn(&mut StdRng::seed_from_u64(5), (4, D), 1.0);
    let x16: Vec<half::f16> = x.iter().map(|v| half::f16::from_f32(*v)).collect();
    let xb: Vec<half::bf16> = x.iter().map(|v| half::bf16::from_f32(*v)).collect();
    for bf in [false, true] {
        let xin = if bf {
            Array2::from_shape_vec((4, D), xb.iter().map(|v| v.to_f32()).collect()).unwrap()
        } else {
            Array2::from_shape_vec((4, D), x16.iter().map(|v| v.to_f32()).collect()).unwrap()
        };
        let fa = reference::encode(&sm, &sw, xin.view());
        let mut want = xin.mapv(f64::from);
        for t in 0..4 {
            edit(
                want.row_mut(t).into_slice().unwrap(),
                fa[[t, 3]],
                &sw.w_dec.row(3).to_vec(),
                "clamp",
                2.5,
            );
        }
        let mut step = rt.step(&tokens).unwrap();
        let got: Vec<f32> = if bf {
            let mut buf = xb.clone();
            step.hook("layer.3", ActivationsMut::Bf16(&mut buf))
                .unwrap();
            buf.iter().map(|v| v.to_f32()).collect()
        } else {
            let mut buf = x16.clone();
            step.hook("layer.3", ActivationsMut::F16(&mut buf)).unwrap();
            buf.iter().map(|v| v.to_f32()).collect()
        };
        step.finish();
        let tol = if bf { 8e-3 } else { 1e-3 };
        let e = rel(&got, want.as_slice().unwrap());
        assert!(e < tol, "bf16={bf}: rel err {e:e}");
    }
}

#[test]
fn monitors_flag_switch_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let ((sm, sw), _) = setup(dir.path(), Activation::Relu);
    let x = randn(&mut StdRng::seed_from_u64(9), (8, D), 1.0);
    let fa = reference::encode(&sm, &sw, x.view());
    // Pick thresholds from the data so that the events are known in advance.
    let f = 5usize;
    let col: Vec<f64> = fa.column(f).to_vec();
    let mut sorted = col.clone();
    sorted.sort_by(f64::total_cmp);
    let th = (sorted[5] + sorted[6]) / 2.0; // exactly two tokens above
    let config = format!(
        r#"
[runtime]
fvu_sample_rate = 1.0
[[dictionary]]
name = "res"
path = "sae.onnx"
[[monitor]]
name = "tok"
dictionary = "res"
features = [{f}]
threshold = {th}
window = "token"
action = "flag"
[[monitor]]
name = "two"
dictionary = "res"
features = [{f}]
threshold = {th}
window = "request"
aggregate = "count"
count = 2
action = "stop"
[[monitor]]
name = "switch"
dictionary = "res"
features = [{f}]
threshold = {th}
window = "request"
aggregate = "any"
action = "switch_profile"
profile = "calm"
[[profile]]
name = "calm"
[[profile.steer]]
dictionary = "res"
op = "ablate"
feature = {f}
when = "tok"
"#
    );
    let cfg_path = dir.path().join("tiller.toml");
    std::fs::write(&cfg_path, config).unwrap();
    let rt = Runtime::from_config_file(&cfg_path).unwrap();
    rt.begin_request(7, None, None).unwrap();
    let mut events = Vec::new();
    let mut stops = Vec::new();
    // One token per step, as in decoding.
    for t in 0..8 {
        let mut row = x.row(t).to_owned();
        let mut step = rt
            .step(&[Token {
                request: 7,
                phase: Phase::Generated,
            }])
            .unwrap();
        step.hook("layer.3", ActivationsMut::F32(row.as_slice_mut().unwrap()))
            .unwrap();
        let r = step.finish();
        events.extend(r.events);
        stops.extend(r.stop);
    }
    let above: Vec<u64> = (0..8).filter(|&t| col[t] > th).map(|t| t as u64).collect();
    assert_eq!(above.len(), 2);
    let tok: Vec<u64> = events
        .iter()
        .filter(|e| e.monitor == "tok")
        .map(|e| e.token)
        .collect();
    assert_eq!(
        tok, above,
        "a token monitor fires on every token over the threshold"
    );
    let two: Vec<u64> = events
        .iter()
        .filter(|e| e.monitor == "two")
        .map(|e| e.token)
        .collect();
    assert_eq!(
        two,
        vec![above[1]],
        "count=2 fires once, at the second token"
    );
    assert_eq!(stops, vec![7]);
    let s = rt.end_request(7).unwrap();
    assert!(s.flagged && s.stopped);
    assert_eq!(s.profile.as_deref(), Some("calm"));
    // The switched-to profile ablates the feature on tokens after the switch where `tok` had fired.
    let ablated = s.steering.get("calm.0").copied().unwrap_or(0);
    let after: u64 = (above[0] as usize + 1..8).filter(|&t| col[t] > 0.0).count() as u64;
    assert_eq!(ablated, after);
    let text = rt.metrics_text();
    assert!(
        text.contains(r#"tiller_monitor_events_total{action="flag",monitor="tok"} 2"#),
        "{text}"
    );
    assert!(text.contains(r#"tiller_monitor_events_total{action="stop",monitor="two"} 1"#));
    assert!(text.contains(r#"tiller_tokens_total{hook="layer.3"} 8"#));
    let active = col.iter().filter(|v| **v > 0.0).count();
    assert!(text.contains(&format!(
        r#"tiller_feature_active_total{{dictionary="res",feature="{f}"}} {active}"#
    )));
    assert!(text.contains("tiller_dictionary_fvu{dictionary=\"res\"}"));
}

#[test]
fn vector_and_project_cap_rules() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), Activation::Relu);
    let mut rng = StdRng::seed_from_u64(21);
    let u: Vec<f32> = {
        let v = randn(&mut rng, (1, D), 1.0).row(0).to_vec();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    let other = randn(&mut rng, (1, D), 1.0).row(0).to_vec();
    let npy = dir.path().join("dirs.npy");
    {
        use ndarray_npy::WriteNpyExt;
        let a = Array2::from_shape_vec((2, D), other.iter().chain(u.iter()).copied().collect())
            .unwrap();
        a.write_npy(std::fs::File::create(&npy).unwrap()).unwrap();
    }
    let gguf = dir.path().join("cv.gguf");
    write_gguf(&gguf, None, &[(2, other.clone()), (3, u.clone())]);
    let config = r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "sae.onnx"
[[profile]]
name = "push"
[[profile.steer]]
op = "vector"
vector = "dirs.npy"
index = 1
hook = "layer.3"
strength = 2.0
[[profile]]
name = "push-gguf"
[[profile.steer]]
op = "vector"
vector = "cv.gguf"
index = 3
hook = "layer.3"
strength = -1.5
[[profile]]
name = "cap"
[[profile.steer]]
op = "project_cap"
vector = "dirs.npy"
index = 1
hook = "layer.3"
value = 0.25
"#;
    std::fs::write(dir.path().join("tiller.toml"), config).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("tiller.toml")).unwrap();
    let x = randn(&mut rng, (16, D), 1.0);
    let proj = |a: &Array2<f32>| -> Vec<f64> {
        a.rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .zip(&u)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            })
            .collect()
    };
    let before = proj(&x);
    for (i, (profile, shift)) in [("push", 2.0), ("push-gguf", -1.5)].into_iter().enumerate() {
        rt.begin_request(i as u64, Some(profile), None).unwrap();
        let mut y = x.clone();
        let mut step = rt
            .step(
                &[Token {
                    request: i as u64,
                    phase: Phase::Prompt,
                }; 16],
            )
            .unwrap();
        step.hook("layer.3", ActivationsMut::F32(y.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
        for (t, (a, b)) in proj(&y).iter().zip(&before).enumerate() {
            assert!(
                (a - b - shift).abs() < 1e-5,
                "{profile}: token {t} projection moved by {} not {shift}",
                a - b
            );
        }
        // Only the direction moved: the orthogonal part is untouched.
        for t in 0..16 {
            for j in 0..D {
                let want = f64::from(x[[t, j]]) + shift * f64::from(u[j]);
                assert!((f64::from(y[[t, j]]) - want).abs() < 1e-5);
            }
        }
    }
    rt.begin_request(9, Some("cap"), None).unwrap();
    let mut y = x.clone();
    let mut step = rt
        .step(
            &[Token {
                request: 9,
                phase: Phase::Generated,
            }; 16],
        )
        .unwrap();
    step.hook("layer.3", ActivationsMut::F32(y.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    let after = proj(&y);
    let mut capped = 0;
    for t in 0..16 {
        assert!(
            after[t] <= 0.25 + 1e-5,
            "token {t}: projection {} over the cap",
            after[t]
        );
        if before[t] <= 0.25 {
            assert_eq!(y.row(t), x.row(t), "token {t} under the cap is untouched");
        } else {
            capped += 1;
            assert!((after[t] - 0.25).abs() < 1e-5);
        }
    }
    assert!(capped > 0 && capped < 16);
    assert_eq!(rt.end_request(9).unwrap().steering["cap.0"], capped);
}

/// Writes a random dictionary of `kind` with three decoder layers.
fn layered(
    dir: &Path,
    name: &str,
    kind: Kind,
    hooks_in: &str,
    hooks_out: &str,
    seed: u64,
) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut meta = Meta::new(kind, Activation::Relu, D, F, D);
    meta.n_layers = 3;
    meta.hook_in = hooks_in.into();
    meta.hook_out = hooks_out.into();
    let li = meta.input_layers();
    let w = Weights::new(
        randn(&mut rng, (li * D, F), 0.3),
        Array1::from_elem(F, 0.02),
        randn(&mut rng, (F, 3 * D), 0.3),
        randn(&mut rng, (1, 3 * D), 0.1).row(0).to_owned(),
    );
    write_dictionary(&dir.join(name), &meta, &w);
    (meta, w)
}

#[test]
fn clt_edits_are_scheduled_across_hooks_and_crosscoders_read_several() {
    let dir = tempfile::tempdir().unwrap();
    let (cm, cw) = layered(
        dir.path(),
        "clt.onnx",
        Kind::Clt,
        "mlp.1.in",
        "mlp.1.out, mlp.2.out, mlp.3.out",
        31,
    );
    let (xm, xw) = layered(
        dir.path(),
        "xc.onnx",
        Kind::Crosscoder,
        "res.1, res.2, res.3",
        "res.1, res.2, res.3",
        32,
    );
    let base = r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "clt"
path = "clt.onnx"
[[dictionary]]
name = "xc"
path = "xc.onnx"
[[monitor]]
name = "xc-watch"
dictionary = "xc"
features = [4]
threshold = 0.0
window = "token"
[[profile]]
name = "p"
[[profile.steer]]
name = "clamp-clt"
dictionary = "clt"
op = "clamp"
feature = 9
value = 2.0
"#;
    // A crosscoder rule must name a hook at or after the last layer it reads.
    let bad =
        format!("{base}[[profile.steer]]\ndictionary = \"xc\"\nop = \"ablate\"\nfeature = 4\n");
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let e = Runtime::from_config_file(dir.path().join("bad.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("knows its features only at `res.3`"), "{e}");
    let bad = format!(
        "{base}[[profile.steer]]\ndictionary = \"xc\"\nop = \"ablate\"\nfeature = 4\nhook = \"res.1\"\n"
    );
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    assert!(Runtime::from_config_file(dir.path().join("bad.toml")).is_err());

    let good = format!(
        "{base}[[profile.steer]]\nname = \"ablate-xc\"\ndictionary = \"xc\"\nop = \"ablate\"\nfeature = 4\nhook = \"res.3\"\n"
    );
    std::fs::write(dir.path().join("t.toml"), good).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    rt.begin_request(1, Some("p"), None).unwrap();
    let n = 5;
    let mut rng = StdRng::seed_from_u64(33);
    let mlp_in = randn(&mut rng, (n, D), 1.0);
    let outs: Vec<Array2<f32>> = (0..3).map(|_| randn(&mut rng, (n, D), 1.0)).collect();
    let res: Vec<Array2<f32>> = (0..3).map(|_| randn(&mut rng, (n, D), 1.0)).collect();

    // References.
    let f_clt = reference::encode(&cm, &cw, mlp_in.view());
    let xcat = ndarray::concatenate(
        ndarray::Axis(1),
        &[res[0].view(), res[1].view(), res[2].view()],
    )
    .unwrap();
    let f_xc = reference::encode(&xm, &xw, xcat.view());

    let tokens = vec![
        Token {
            request: 1,
            phase: Phase::Prompt
        };
        n
    ];
    let mut step = rt.step(&tokens).unwrap();
    let mut got_in = mlp_in.clone();
    step.hook(
        "mlp.1.in",
        ActivationsMut::F32(got_in.as_slice_mut().unwrap()),
    )
    .unwrap();
    let mut got_out = outs.clone();
    let mut got_res = res.clone();
    for l in 0..3 {
        step.hook(
            &format!("res.{}", l + 1),
            ActivationsMut::F32(got_res[l].as_slice_mut().unwrap()),
        )
        .unwrap();
        step.hook(
            &format!("mlp.{}.out", l + 1),
            ActivationsMut::F32(got_out[l].as_slice_mut().unwrap()),
        )
        .unwrap();
    }
    let result = step.finish();
    assert_eq!(got_in, mlp_in, "the CLT's input hook is read only");
    for l in 0..3 {
        let mut want = outs[l].mapv(f64::from);
        for t in 0..n {
            let c = 2.0 - f_clt[[t, 9]];
            for j in 0..D {
                want[[t, j]] += c * f64::from(cw.w_dec[[9, l * D + j]]);
            }
        }
        let e = rel(got_out[l].as_slice().unwrap(), want.as_slice().unwrap());
        assert!(e < TOL, "CLT layer {l}: rel err {e:e}");
    }
    // The crosscoder edits only its last layer, with that layer's decoder row.
    assert_eq!(got_res[0], res[0]);
    assert_eq!(got_res[1], res[1]);
    let mut want = res[2].mapv(f64::from);
    for t in 0..n {
        let c = -f_xc[[t, 4]];
        for j in 0..D {
            want[[t, j]] += c * f64::from(xw.w_dec[[4, 2 * D + j]]);
        }
    }
    let e = rel(got_res[2].as_slice().unwrap(), want.as_slice().unwrap());
    assert!(e < TOL, "crosscoder last layer: rel err {e:e}");
    // Its monitor fired on exactly the tokens where the feature is active.
    let fired: Vec<u64> = result
        .events
        .iter()
        .filter(|e| e.monitor == "xc-watch")
        .map(|e| e.token)
        .collect();
    let want_fired: Vec<u64> = (0..n)
        .filter(|&t| f_xc[[t, 4]] > 0.0)
        .map(|t| t as u64)
        .collect();
    assert_eq!(fired, want_fired);
    let s = rt.end_request(1).unwrap();
    let active = (0..n).filter(|&t| (2.0 - f_clt[[t, 9]]) != 0.0).count() as u64;
    assert_eq!(
        s.steering["clamp-clt"], active,
        "a CLT edit counts once per token, not once per layer"
    );
}

/// A token's edits whose results are known finite are applied together in one pass; a rule that
/// reads the activations (`project_cap`) or must check its result first still sees every edit
/// before it, in rule order.
#[test]
fn edits_keep_rule_order_around_reads_and_checked_edits() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), Activation::Relu);
    let mut rng = StdRng::seed_from_u64(61);
    let other = randn(&mut rng, (1, D), 1.0).row(0).to_vec();
    // A unit direction with max|u| = 0.8 and u[0] = 0.
    let mut u = vec![0f32; D];
    u[1] = 0.6;
    u[2] = 0.8;
    {
        use ndarray_npy::WriteNpyExt;
        let a = Array2::from_shape_vec((2, D), other.iter().chain(u.iter()).copied().collect())
            .unwrap();
        a.write_npy(std::fs::File::create(dir.path().join("dirs.npy")).unwrap())
            .unwrap();
    }
    let n = 8;
    let x = randn(&mut rng, (n, D), 1.0);
    let dot =
        |a: &[f64], b: &[f32]| -> f64 { a.iter().zip(b).map(|(a, b)| a * f64::from(*b)).sum() };
    let axpy = |a: &mut [f64], c: f64, d: &[f32]| {
        for (a, d) in a.iter_mut().zip(d) {
            *a += c * f64::from(*d);
        }
    };
    // The first edit moves the projection on `u` by 2·other·u: a cap that read the activations
    // before it would differ by that much.
    assert!(dot(&other.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), &u).abs() > 0.1);
    // The cap at the median projection after the first edit: about half the tokens are capped.
    let mut after: Vec<f64> = (0..n)
        .map(|t| {
            let mut a = x.row(t).mapv(f64::from).to_vec();
            axpy(&mut a, 2.0, &other);
            dot(&a, &u)
        })
        .collect();
    after.sort_by(f64::total_cmp);
    let cap = ((after[n / 2 - 1] + after[n / 2]) / 2.0) as f32;
    let rule = |op: &str, index: usize, key: &str, value: f32| {
        format!(
            "[[profile.steer]]\nop = \"{op}\"\nvector = \"dirs.npy\"\nindex = {index}\nhook = \"layer.3\"\n{key} = {value:e}\n"
        )
    };
    let config = format!(
        "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"res\"\npath = \"sae.onnx\"\n\
         [[profile]]\nname = \"chain\"\n{}{}{}\
         [[profile]]\nname = \"near-max\"\n{}{}{}\
         [[profile]]\nname = \"overflow\"\n{}{}{}",
        rule("vector", 0, "strength", 2.0),
        rule("project_cap", 1, "value", cap),
        rule("vector", 1, "strength", 1.0),
        // On an ordinary token the first two edits are known finite and wait; the third is past
        // the bound that shows a result finite without looking: the two go in, then it is
        // checked (finite) and applied. On token 3 (x[2] = 1e38) every edit is checked, and the
        // third, which would take x[2] past f32::MAX, is refused.
        rule("vector", 0, "strength", 2.0),
        rule("vector", 1, "strength", 1e38),
        rule("vector", 1, "strength", 2.5e38),
        // The third edit alone would be finite (x[2] + 2.64e38), but not after the second
        // (+ 0.8e38), which waits: it goes in first, and the third is refused on every token.
        rule("vector", 0, "strength", 2.0),
        rule("vector", 1, "strength", 1e38),
        rule("vector", 1, "strength", 3.3e38),
    );
    std::fs::write(dir.path().join("tiller.toml"), config).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("tiller.toml")).unwrap();
    let run = |id: u64, profile: &str, x: &Array2<f32>| -> Array2<f32> {
        rt.begin_request(id, Some(profile), None).unwrap();
        let mut y = x.clone();
        let mut step = rt
            .step(&vec![
                Token {
                    request: id,
                    phase: Phase::Prompt
                };
                n
            ])
            .unwrap();
        step.hook("layer.3", ActivationsMut::F32(y.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
        y
    };

    let y = run(1, "chain", &x);
    let mut capped = 0;
    for t in 0..n {
        let mut want = x.row(t).mapv(f64::from).to_vec();
        axpy(&mut want, 2.0, &other);
        // The cap reads the projection after the first edit.
        let p = dot(&want, &u);
        let c = -(p.max(f64::from(cap)) - f64::from(cap));
        capped += u64::from(c != 0.0);
        axpy(&mut want, c, &u);
        axpy(&mut want, 1.0, &u);
        assert!(
            rel(y.row(t).as_slice().unwrap(), &want) < TOL,
            "chain: token {t}"
        );
    }
    assert!(
        capped > 0,
        "the test needs tokens whose projection is capped"
    );
    let s = rt.end_request(1).unwrap();
    assert_eq!(s.steering["chain.0"], n as u64);
    assert_eq!(s.steering["chain.1"], capped);
    assert_eq!(s.steering["chain.2"], n as u64);

    // Element by element: the first edit must be there beside values of 1e38.
    let close = |profile: &str, t: usize, y: &Array2<f32>, want: &[f64]| {
        for (j, w) in want.iter().enumerate() {
            assert!(
                (f64::from(y[[t, j]]) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{profile}: token {t}, element {j}: {} against {w}",
                y[[t, j]]
            );
        }
    };
    let mut big = x.clone();
    big[[3, 2]] = 1e38;
    let y = run(2, "near-max", &big);
    for t in 0..n {
        let mut want = big.row(t).mapv(f64::from).to_vec();
        axpy(&mut want, 2.0, &other);
        axpy(&mut want, 1e38, &u);
        if t != 3 {
            axpy(&mut want, 2.5e38, &u);
        }
        close("near-max", t, &y, &want);
    }
    let s = rt.end_request(2).unwrap();
    assert_eq!(s.steering["near-max.0"], n as u64);
    assert_eq!(s.steering["near-max.1"], n as u64);
    assert_eq!(
        s.steering["near-max.2"],
        n as u64 - 1,
        "token 3's third edit is refused"
    );

    let y = run(3, "overflow", &x);
    assert!(
        y.iter().all(|v| v.is_finite()),
        "no edit made a value infinite"
    );
    for t in 0..n {
        let mut want = x.row(t).mapv(f64::from).to_vec();
        axpy(&mut want, 2.0, &other);
        axpy(&mut want, 1e38, &u);
        close("overflow", t, &y, &want);
    }
    let s = rt.end_request(3).unwrap();
    assert_eq!(s.steering["overflow.1"], n as u64);
    assert_eq!(s.steering.get("overflow.2").copied().unwrap_or(0), 0);
}

#[test]
fn non_finite_tokens_are_left_alone_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ((sm, sw), _) = setup(dir.path(), Activation::Relu);
    std::fs::write(dir.path().join("tiller.toml"), CONFIG).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("tiller.toml")).unwrap();
    rt.begin_request(1, Some("a"), None).unwrap();
    let mut x = randn(&mut StdRng::seed_from_u64(41), (4, D), 1.0);
    x[[1, 3]] = f32::NAN;
    x[[2, 0]] = f32::INFINITY;
    let original = x.clone();
    let tokens = [Token {
        request: 1,
        phase: Phase::Prompt,
    }; 4];
    let mut step = rt.step(&tokens).unwrap();
    step.hook("layer.3", ActivationsMut::F32(x.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    for t in [1, 2] {
        for j in 0..D {
            assert_eq!(
                x[[t, j]].to_bits(),
                original[[t, j]].to_bits(),
                "token {t} must be left as it is"
            );
        }
    }
    // The finite tokens were steered exactly as alone.
    let fa = reference::encode(&sm, &sw, original.select(ndarray::Axis(0), &[0, 3]).view());
    for (k, t) in [0usize, 3].into_iter().enumerate() {
        let mut want = original.row(t).mapv(f64::from).to_vec();
        edit(
            &mut want,
            fa[[k, 3]],
            &sw.w_dec.row(3).to_vec(),
            "clamp",
            2.5,
        );
        assert!(rel(x.row(t).as_slice().unwrap(), &want) < TOL);
    }
    assert!(
        rt.metrics_text()
            .contains("tiller_nonfinite_tokens_total{hook=\"layer.3\"} 2")
    );
    assert!(
        x.iter().filter(|v| !v.is_finite()).count() == 2,
        "no edit created a non-finite value"
    );
    // One token a step (its statistics are taken after the sliced encode has read it): the
    // non-finite one left alone, the finite one steered as in the batch.
    let mut lone = original.select(ndarray::Axis(0), &[2, 3]);
    let copy = lone.clone();
    for t in 0..2 {
        let mut step = rt.step(&tokens[..1]).unwrap();
        step.hook(
            "layer.3",
            ActivationsMut::F32(lone.row_mut(t).into_slice().unwrap()),
        )
        .unwrap();
        step.finish();
    }
    for j in 0..D {
        assert_eq!(lone[[0, j]].to_bits(), copy[[0, j]].to_bits());
    }
    let mut want = original.row(3).mapv(f64::from).to_vec();
    edit(
        &mut want,
        fa[[1, 3]],
        &sw.w_dec.row(3).to_vec(),
        "clamp",
        2.5,
    );
    assert!(rel(lone.row(1).as_slice().unwrap(), &want) < TOL);
    let text = rt.metrics_text();
    assert!(text.contains("tiller_nonfinite_tokens_total{hook=\"layer.3\"} 3"));
    assert!(
        text.contains("tiller_tokens_total{hook=\"layer.3\"} 6"),
        "each token counted once"
    );
}

#[test]
fn fvu_and_l0_gauges_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let ((sm, sw), _) = setup(dir.path(), Activation::Relu);
    std::fs::write(
        dir.path().join("tiller.toml"),
        "[runtime]\nfvu_sample_rate = 1.0\n[[dictionary]]\nname = \"res\"\npath = \"sae.onnx\"\n",
    )
    .unwrap();
    let rt = Runtime::from_config_file(dir.path().join("tiller.toml")).unwrap();
    rt.begin_request(1, None, None).unwrap();
    let x = randn(&mut StdRng::seed_from_u64(51), (40, D), 1.0);
    let mut y = x.clone();
    let mut step = rt
        .step(
            &[Token {
                request: 1,
                phase: Phase::Prompt,
            }; 40],
        )
        .unwrap();
    step.hook("layer.3", ActivationsMut::F32(y.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    let (acts, recon) = reference::encode_decode(&sm, &sw, x.view());
    let x64 = x.mapv(f64::from);
    let err: f64 = (&x64 - &recon).mapv(|v| v * v).sum();
    let mean = x64.mean_axis(ndarray::Axis(0)).unwrap();
    let var: f64 = (&x64 - &mean).mapv(|v| v * v).sum();
    let l0 = acts.iter().filter(|v| **v > 0.0).count() as f64 / 40.0;
    // The gauges are measured off the hot path.
    rt.wait_for_fvu();
    let gauge = |name: &str| -> f64 {
        let text = rt.metrics_text();
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let fvu = gauge("tiller_dictionary_fvu{dictionary=\"res\"}");
    assert!(
        (fvu - err / var).abs() < 1e-4 * (err / var),
        "fvu {fvu} vs {}",
        err / var
    );
    assert!((gauge("tiller_dictionary_l0{dictionary=\"res\"}") - l0).abs() < 1e-9);
}

#[test]
fn request_aggregates_max_and_mean() {
    let dir = tempfile::tempdir().unwrap();
    let ((sm, sw), _) = setup(dir.path(), Activation::Relu);
    let x = randn(&mut StdRng::seed_from_u64(61), (12, D), 1.0);
    let fa = reference::encode(&sm, &sw, x.view());
    // The largest of features 5 and 6, per token.
    let v: Vec<f64> = (0..12).map(|t| fa[[t, 5]].max(fa[[t, 6]])).collect();
    let (mut running_max, mut sum) = (f64::MIN, 0.0);
    let (mut max_at, mut mean_at) = (None, None);
    let max_th = v.iter().cloned().fold(f64::MIN, f64::max) * 0.9;
    let mean_th = v.iter().sum::<f64>() / 12.0 * 1.05;
    for (t, &val) in v.iter().enumerate() {
        running_max = running_max.max(val);
        sum += val;
        if max_at.is_none() && running_max > max_th {
            max_at = Some(t as u64);
        }
        if mean_at.is_none() && sum / (t as f64 + 1.0) > mean_th {
            mean_at = Some(t as u64);
        }
    }
    let config = format!(
        "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"res\"\npath = \"sae.onnx\"\n\
         [[monitor]]\nname = \"max\"\ndictionary = \"res\"\nfeatures = [5, 6]\nthreshold = {max_th}\naggregate = \"max\"\n\
         [[monitor]]\nname = \"mean\"\ndictionary = \"res\"\nfeatures = [5, 6]\nthreshold = {mean_th}\naggregate = \"mean\"\n"
    );
    std::fs::write(dir.path().join("tiller.toml"), config).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("tiller.toml")).unwrap();
    rt.begin_request(1, None, None).unwrap();
    for t in 0..12 {
        let mut row = x.row(t).to_owned();
        let mut step = rt
            .step(&[Token {
                request: 1,
                phase: Phase::Generated,
            }])
            .unwrap();
        step.hook("layer.3", ActivationsMut::F32(row.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
    }
    let s = rt.end_request(1).unwrap();
    let at = |m: &str| s.events.iter().find(|e| e.monitor == m).map(|e| e.token);
    assert_eq!(at("max"), max_at);
    assert_eq!(at("mean"), mean_at);
    assert!(max_at.is_some());
    assert_eq!(
        s.events.iter().filter(|e| e.monitor == "max").count(),
        1,
        "a request monitor fires once"
    );
}
