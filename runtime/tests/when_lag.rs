//! How soon a conditional rule (`when = "<monitor>"`) takes effect: the lag in tokens between the
//! token at which its monitor fires and the first token the rule edits, for a token-window and a
//! request-window monitor, with the rule at the monitor's hook and at a later one, with one token
//! per step (decoding), one step for all tokens (a prompt) and steps of three. Target: 0, and the
//! edited activations equal a float64 reference that edits exactly the tokens from the firing
//! one on (normwise relative error under 1e-5; the tokens before are untouched, bit for bit).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};
use tiller_test_support::{randn, write_dictionary};

const TOL: f64 = 1e-5;
const D: usize = 24;
const F: usize = 64;
const D_OUT: usize = 20;
const N: usize = 10;
/// The token at which the monitored feature first crosses the threshold.
const FIRE: usize = 4;
/// The feature the monitors read and the one the rules clamp, to `VALUE`.
const EDITED: usize = 9;
const VALUE: f64 = 2.0;

/// A ReLU dictionary reading `hook_in` and writing `hook_out`, written to `dir/name`.
fn write_dict(
    dir: &Path,
    name: &str,
    kind: Kind,
    (hook_in, hook_out): (&str, &str),
    d_out: usize,
    seed: u64,
) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut meta = Meta::new(kind, Activation::Relu, D, F, d_out);
    meta.hook_in = hook_in.into();
    meta.hook_out = hook_out.into();
    let w = Weights {
        w_enc: randn(&mut rng, (D, F), 0.4),
        b_enc: Array1::from_elem(F, 0.05),
        w_dec: randn(&mut rng, (F, d_out), 0.3),
        b_dec: randn(&mut rng, (1, d_out), 0.1).row(0).to_owned(),
        threshold: None,
        gated: None,
        w_skip: None,
        b_skip: None,
        apply_b_dec_to_input: kind == Kind::Sae,
    };
    write_dictionary(&dir.join(name), &meta, &w);
    (meta, w)
}

/// `x[t] += (VALUE - f[t]) · d` for every token from `from` on: the clamp, in float64.
fn reference_clamp(x: &Array2<f32>, f: &Array2<f64>, d: &[f32], from: usize) -> Array2<f64> {
    let mut want = x.mapv(f64::from);
    for t in from..x.nrows() {
        let c = VALUE - f[[t, EDITED]];
        for (a, b) in want.row_mut(t).iter_mut().zip(d) {
            *a += c * f64::from(*b);
        }
    }
    want
}

fn rel(a: &Array2<f32>, b: &Array2<f64>) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()))
        / scale
}

/// The first token whose row differs from the input's, if any.
fn first_edited(got: &Array2<f32>, x: &Array2<f32>) -> Option<usize> {
    (0..x.nrows()).find(|&t| got.row(t) != x.row(t))
}

#[test]
fn conditional_rules_edit_from_the_token_their_monitor_fires_at() {
    let dir = tempfile::tempdir().unwrap();
    let (sm, sw) = write_dict(
        dir.path(),
        "res.onnx",
        Kind::Sae,
        ("layer.3", "layer.3"),
        D,
        1,
    );
    let (tm, tw) = write_dict(
        dir.path(),
        "tc.onnx",
        Kind::Transcoder,
        ("mlp.5.in", "mlp.5.out"),
        D_OUT,
        2,
    );
    let mut rng = StdRng::seed_from_u64(21);
    let x = randn(&mut rng, (N, D), 1.0);
    let xm = randn(&mut rng, (N, D), 1.0);
    let ym = randn(&mut rng, (N, D_OUT), 1.0);
    let fa = reference::encode(&sm, &sw, x.view());
    let ft = reference::encode(&tm, &tw, xm.view());

    // A monitored feature whose first crossing is token FIRE, with a margin float32 keeps.
    let margin = 1e-3;
    let (monitored, threshold) = (0..F)
        .find_map(|f| {
            let before = (0..FIRE).map(|t| fa[[t, f]]).fold(0.0f64, f64::max);
            (fa[[FIRE, f]] - before > 2.0 * margin).then(|| (f, (fa[[FIRE, f]] + before) / 2.0))
        })
        .expect("a feature that first crosses at token FIRE");
    assert!(fa[[FIRE, monitored]] > threshold + margin);
    assert!((0..FIRE).all(|t| fa[[t, monitored]] < threshold - margin));

    let mut config = format!(
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "res.onnx"
[[dictionary]]
name = "tc"
path = "tc.onnx"
[[monitor]]
name = "token"
dictionary = "res"
features = [{monitored}]
threshold = {threshold:?}
window = "token"
action = "flag"
[[monitor]]
name = "request"
dictionary = "res"
features = [{monitored}]
threshold = {threshold:?}
window = "request"
aggregate = "any"
action = "flag"
"#
    );
    for monitor in ["token", "request"] {
        for (at, dict) in [("same", "res"), ("later", "tc")] {
            config.push_str(&format!(
                "[[profile]]\nname = \"{monitor}-{at}\"\n[[profile.steer]]\ndictionary = \"{dict}\"\n\
                 op = \"clamp\"\nfeature = {EDITED}\nvalue = {VALUE:?}\nwhen = \"{monitor}\"\n"
            ));
        }
    }
    let cfg_path = dir.path().join("tiller.toml");
    std::fs::write(&cfg_path, config).unwrap();
    let rt = Runtime::from_config_file(&cfg_path).unwrap();

    let want_same = reference_clamp(&x, &fa, &sw.w_dec.row(EDITED).to_vec(), FIRE);
    let want_later = reference_clamp(&ym, &ft, &tw.w_dec.row(EDITED).to_vec(), FIRE);
    let mut id = 0u64;
    let mut lags = Vec::new();
    // Every case runs before the verdict, so that a failure reports every lag.
    let mut failures = Vec::new();
    for monitor in ["token", "request"] {
        for at in ["same", "later"] {
            // Tokens per step: decoding, a whole prompt, and chunks of a prompt.
            for (per_step, phase) in [
                (1, Phase::Generated),
                (N, Phase::Prompt),
                (3, Phase::Prompt),
            ] {
                id += 1;
                let profile = format!("{monitor}-{at}");
                rt.begin_request(id, Some(&profile), None).unwrap();
                let (mut got, mut got_m, mut got_y) = (x.clone(), xm.clone(), ym.clone());
                let mut fired = Vec::new();
                let mut start = 0;
                while start < N {
                    let end = (start + per_step).min(N);
                    let tokens = vec![Token { request: id, phase }; end - start];
                    let mut step = rt.step(&tokens).unwrap();
                    let rows = |a: &Array2<f32>| a.slice(ndarray::s![start..end, ..]).to_owned();
                    let (mut a, mut m, mut y) = (rows(&got), rows(&got_m), rows(&got_y));
                    step.hook("layer.3", ActivationsMut::F32(a.as_slice_mut().unwrap()))
                        .unwrap();
                    step.hook("mlp.5.in", ActivationsMut::F32(m.as_slice_mut().unwrap()))
                        .unwrap();
                    step.hook("mlp.5.out", ActivationsMut::F32(y.as_slice_mut().unwrap()))
                        .unwrap();
                    let result = step.finish();
                    fired.extend(
                        result
                            .events
                            .iter()
                            .filter(|e| e.monitor == monitor)
                            .map(|e| e.token as usize),
                    );
                    got.slice_mut(ndarray::s![start..end, ..]).assign(&a);
                    got_m.slice_mut(ndarray::s![start..end, ..]).assign(&m);
                    got_y.slice_mut(ndarray::s![start..end, ..]).assign(&y);
                    start = end;
                }
                rt.end_request(id).unwrap();
                let what =
                    format!("{monitor} monitor, rule at the {at} hook, {per_step} token(s) a step");
                assert_eq!(
                    fired.first(),
                    Some(&FIRE),
                    "{what}: where the monitor fired"
                );
                let (edited, input, want) = match at {
                    "same" => (&got, &x, &want_same),
                    _ => (&got_y, &ym, &want_later),
                };
                let first = first_edited(edited, input).expect("the rule edited no token");
                let lag = first as i64 - FIRE as i64;
                println!("{what}: fired at token {FIRE}, first edit at token {first}: lag {lag}");
                lags.push((what.clone(), lag));
                let e = rel(edited, want);
                if e >= TOL {
                    failures.push(format!(
                        "{what}: relative error {e:e} against the reference"
                    ));
                }
                assert_eq!(
                    got_m, xm,
                    "{what}: the transcoder's input is read, not written"
                );
                if at == "later" {
                    assert_eq!(got, x, "{what}: the residual is not edited");
                } else {
                    assert_eq!(got_y, ym, "{what}: the transcoder's output is not edited");
                }
            }
        }
    }
    let late: Vec<_> = lags.iter().filter(|(_, l)| *l != 0).collect();
    assert!(
        late.is_empty() && failures.is_empty(),
        "lags other than 0: {late:?}; {failures:?}"
    );
}
