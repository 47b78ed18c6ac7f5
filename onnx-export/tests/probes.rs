//! Linear probes and difference-in-means directions: `tiller-export train-probe`, `diffmeans` and
//! `import --format probe`, and what the runtime does with their output.
//!
//! The data are synthetic and labelled: two Gaussian classes `N(m±, Σ)` in 24 dimensions with a
//! diagonal, strongly anisotropic `Σ` (standard deviations from 0.05 to 20, large offsets), whose
//! means are `Δ = 2` apart in Mahalanobis distance. The best possible linear score (the Bayes
//! rule) then has AUROC `Φ(Δ/√2) = 0.9214`, the bound the trained probe is held to.
//!
//! Tolerances: a float32 graph against a float64 reference, normwise relative error under 1e-5;
//! the solver against an independent Newton solve, relative 1e-5 (the float32 rounding of the
//! written weights dominates); steering edits, 1e-5 relative to the token's norm (the float32
//! rounding of the edited activations).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use ndarray::{Array1, Array2, Axis, s};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;
use tiller_export::probe::{metrics, read_labels};
use tiller_runtime::{
    Activation, ActivationsMut, Dictionary, DictionaryFile, Kind, Phase, Runtime, SessionOptions,
    Token,
};

const D: usize = 24;
const DELTA: f64 = 2.0;
const HOOK: &str = "model.layers.5";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tiller-export"))
}

/// Runs the tool and expects success; returns stdout.
fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Runs the tool and expects a handled failure (exit code 1, no panic); returns stderr.
fn fails(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(o.status.code(), Some(1), "expected an error: {err}");
    err
}

fn has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "expected `{p}` in: {err}");
    }
}

/// `Φ(x)`, the standard normal CDF (Abramowitz and Stegun 7.1.26, error under 1.5e-7).
fn phi(x: f64) -> f64 {
    let z = x.abs() / 2f64.sqrt();
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-z * z).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// The two classes' distribution (see the module docs).
struct Classes {
    offset: Vec<f64>,
    scale: Vec<f64>,
    /// Unit direction, in standardised coordinates, along which the means differ.
    u: Vec<f64>,
}

impl Classes {
    fn new() -> Self {
        let mut rng = StdRng::seed_from_u64(99);
        let u: Vec<f64> = (0..D).map(|_| StandardNormal.sample(&mut rng)).collect();
        let n = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        Self {
            offset: (0..D).map(|j| 3.0 * (j as f64).sin() + 1.0).collect(),
            scale: (0..D)
                .map(|j| (0.05f64.ln() + (400f64).ln() * j as f64 / (D - 1) as f64).exp())
                .collect(),
            u: u.iter().map(|v| v / n).collect(),
        }
    }

    /// `n` rows of each class, interleaved (positive first).
    fn sample(&self, n: usize, seed: u64) -> (Array2<f32>, Vec<bool>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = Array2::<f32>::zeros((2 * n, D));
        let mut y = Vec::with_capacity(2 * n);
        for i in 0..2 * n {
            let positive = i % 2 == 0;
            let sign = if positive { 0.5 } else { -0.5 };
            for j in 0..D {
                let z: f64 = StandardNormal.sample(&mut rng);
                let v = self.offset[j] + self.scale[j] * (z + sign * DELTA * self.u[j]);
                x[[i, j]] = v as f32;
            }
            y.push(positive);
        }
        (x, y)
    }
}

fn write_x(path: &Path, x: &Array2<f32>) {
    tiller_export::npy::write(path, x).unwrap();
}

fn write_labels_i64(path: &Path, y: &[bool]) {
    let a: Array1<i64> = y.iter().map(|&b| i64::from(b)).collect();
    ndarray_npy::write_npy(path, &a).unwrap();
}

fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The probe's `(w, b)` as the file stores them.
fn probe_weights(path: &Path) -> (Vec<f32>, f32) {
    let f = DictionaryFile::open(path).unwrap();
    let w = f.weights().unwrap();
    (w.w_enc.column(0).to_vec(), w.b_enc[0])
}

fn logit(x: ndarray::ArrayView1<'_, f32>, w: &[f32], b: f32) -> f64 {
    x.iter()
        .zip(w)
        .map(|(a, c)| f64::from(*a) * f64::from(*c))
        .sum::<f64>()
        + f64::from(b)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

#[test]
fn a_trained_probe_reaches_the_bayes_auroc_and_runs_in_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let classes = Classes::new();
    let (x, y) = classes.sample(1200, 1);
    write_x(&p("x.npy"), &x);
    write_labels_i64(&p("y.npy"), &y);
    let out = ok(bin()
        .arg("train-probe")
        .args(["--input", "x.npy", "--labels", "y.npy", "--holdout", "0.25"])
        .args(["--seed", "7", "--name", "deceptive", "--hook", HOOK])
        .args(["--report", "r.json", "-o", "probe.onnx"])
        .current_dir(dir.path()));
    has(&out, &["held-out", "AUROC"]);
    let r = report(&p("r.json"));
    let bayes = phi(DELTA / 2f64.sqrt());
    assert!((bayes - 0.9214).abs() < 1e-4, "{bayes}");
    assert_eq!(r["converged"], true);
    assert!(r["grad_norm"].as_f64().unwrap() <= 1e-9, "{r}");
    // Stratified: a quarter of each class held out.
    assert_eq!(r["heldout"]["rows"], 600);
    assert_eq!(r["heldout"]["positives"], 300);
    assert_eq!(r["train"]["rows"], 1800);
    // The held-out AUROC on 300 + 300 rows has a standard error of 0.011 around the probe's
    // true AUROC (Hanley and McNeil), which itself lies within about d/n ≈ 0.01 under the Bayes
    // rule's: 0.04 is more than three standard errors from either.
    let held = r["heldout"]["auroc"].as_f64().unwrap();
    let train = r["train"]["auroc"].as_f64().unwrap();
    eprintln!("held-out AUROC {held:.4}, train {train:.4}, Bayes {bayes:.4}");
    assert!((held - bayes).abs() < 0.04, "held-out AUROC {held}");
    assert!((train - bayes).abs() < 0.04, "train AUROC {train}");
    let f = DictionaryFile::open(p("probe.onnx")).unwrap();
    let m = f.meta();
    assert_eq!(
        (m.kind, m.activation, m.d_in, m.d_sae),
        (Kind::Probe, Activation::Sigmoid, D, 1)
    );
    assert_eq!(m.hook_in, HOOK);
    assert_eq!(m.labels[&0], "deceptive");
    assert_eq!(m.source, "tiller-train-probe");

    // Fresh data: 5000 + 5000 rows scored through ONNX Runtime; the AUROC's standard error is
    // 0.003 there, so the probe must come within 0.02 of the Bayes rule.
    let (w, b) = probe_weights(&p("probe.onnx"));
    let (xt, yt) = classes.sample(5000, 2);
    let d = Dictionary::load(p("probe.onnx"), &SessionOptions::default()).unwrap();
    let got = d.encode(xt.view()).unwrap().acts;
    let want: Vec<f64> = xt
        .rows()
        .into_iter()
        .map(|r| sigmoid(logit(r, &w, b)))
        .collect();
    let e = tiller_test_support::rel_err(
        &got,
        &Array2::from_shape_vec((want.len(), 1), want.clone()).unwrap(),
    );
    assert!(e < 1e-5, "ONNX Runtime vs float64: {e:e}");
    let scores: Vec<f64> = got.iter().map(|v| f64::from(*v)).collect();
    let fresh = metrics::auroc(&scores, &yt).unwrap();
    eprintln!("fresh-data AUROC {fresh:.4}");
    assert!((fresh - bayes).abs() < 0.02, "fresh-data AUROC {fresh}");

    // In the runtime: a monitor over the probe's output, with a threshold.
    let t = 96;
    let threshold = 0.8;
    let config = format!(
        r#"
[runtime]
fvu_sample_rate = 1.0
[[dictionary]]
name = "lie"
path = "probe.onnx"
[[monitor]]
name = "score"
dictionary = "lie"
features = [0]
threshold = -1.0
window = "token"
[[monitor]]
name = "alarm"
dictionary = "lie"
features = [0]
threshold = {threshold}
window = "token"
[[monitor]]
name = "mostly"
dictionary = "lie"
features = [0]
threshold = {threshold}
window = "request"
aggregate = "mean"
"#
    );
    std::fs::write(p("tiller.toml"), config).unwrap();
    let rt = Runtime::from_config_file(p("tiller.toml")).unwrap();
    rt.begin_request(1, None, None).unwrap();
    let mut rows = xt.slice(s![..t, ..]).to_owned();
    let mut step = rt
        .step(
            &[Token {
                request: 1,
                phase: Phase::Prompt,
            }; 96],
        )
        .unwrap();
    step.hook(HOOK, ActivationsMut::F32(rows.as_slice_mut().unwrap()))
        .unwrap();
    let events = step.finish().events;
    assert_eq!(rows, xt.slice(s![..t, ..]), "a probe never edits");
    let score: Vec<f64> = events
        .iter()
        .filter(|e| e.monitor == "score")
        .map(|e| f64::from(e.value))
        .collect();
    let e = tiller_test_support::rel_err(
        &Array2::from_shape_vec((t, 1), score.iter().map(|v| *v as f32).collect()).unwrap(),
        &Array2::from_shape_vec((t, 1), want[..t].to_vec()).unwrap(),
    );
    assert!(e < 1e-5, "runtime vs float64: {e:e}");
    assert!(want[..t].iter().all(|v| (v - threshold).abs() > 1e-5));
    let alarm: Vec<usize> = events
        .iter()
        .filter(|e| e.monitor == "alarm")
        .map(|e| e.token as usize)
        .collect();
    let above: Vec<usize> = (0..t).filter(|&i| want[i] > threshold).collect();
    assert!(!above.is_empty() && above.len() < t);
    assert_eq!(alarm, above);
    // The request-mean monitor fires at the first token where the running mean passes it.
    let mut sum = 0.0;
    let first = (0..t).find(|&i| {
        sum += want[i];
        sum / (i + 1) as f64 > threshold
    });
    let mostly: Vec<usize> = events
        .iter()
        .filter(|e| e.monitor == "mostly")
        .map(|e| e.token as usize)
        .collect();
    assert_eq!(mostly, first.into_iter().collect::<Vec<_>>());
    let summary = rt.end_request(1).unwrap();
    let yes = want[..t].iter().filter(|v| **v > 0.5).count() as u64;
    assert_eq!(summary.features["lie"][&0].count, yes);
    assert!(
        rt.metrics_text().contains(&format!(
            "tiller_feature_active_total{{dictionary=\"lie\",feature=\"0\"}} {yes}"
        )),
        "{}",
        rt.metrics_text()
    );
}

/// Logistic regression by Newton's method in float64, on columns standardised as train-probe
/// standardises them, mapped back to raw coordinates: `(w, b, objective, ‖∇‖∞)`. Written with
/// indices, as the textbook writes it, to be read against it.
#[allow(clippy::needless_range_loop)]
fn newton(x: &Array2<f32>, y: &[bool], l2: f64) -> (Vec<f64>, f64, f64, f64) {
    let (n, d) = x.dim();
    let x = x.mapv(f64::from);
    let mu = x.mean_axis(Axis(0)).unwrap();
    let sd = x.map_axis(Axis(0), |c| {
        let m = c.mean().unwrap();
        (c.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n as f64).sqrt()
    });
    let mut a = Array2::<f64>::ones((n, d + 1));
    for i in 0..n {
        for j in 0..d {
            a[[i, j]] = (x[[i, j]] - mu[j]) / sd[j];
        }
    }
    let yv: Vec<f64> = y.iter().map(|&v| f64::from(u8::from(v))).collect();
    let mut th = vec![0.0; d + 1];
    let (mut f, mut gmax) = (0.0, 0.0);
    for _ in 0..100 {
        let mut g = vec![0.0; d + 1];
        let mut h = vec![vec![0.0; d + 1]; d + 1];
        f = 0.0;
        for i in 0..n {
            let z: f64 = (0..=d).map(|j| a[[i, j]] * th[j]).sum();
            let p = sigmoid(z);
            f += z.max(0.0) + (-z.abs()).exp().ln_1p() - yv[i] * z;
            for j in 0..=d {
                g[j] += (p - yv[i]) * a[[i, j]] / n as f64;
                for k in 0..=d {
                    h[j][k] += p * (1.0 - p) * a[[i, j]] * a[[i, k]] / n as f64;
                }
            }
        }
        f /= n as f64;
        for j in 0..d {
            f += 0.5 * l2 * th[j] * th[j];
            g[j] += l2 * th[j];
            h[j][j] += l2;
        }
        gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        // Solve h·step = g by Gaussian elimination with partial pivoting.
        let m = d + 1;
        let mut aug: Vec<Vec<f64>> = (0..m)
            .map(|r| {
                let mut row = h[r].clone();
                row.push(g[r]);
                row
            })
            .collect();
        for c in 0..m {
            let piv = (c..m)
                .max_by(|&p, &q| aug[p][c].abs().total_cmp(&aug[q][c].abs()))
                .unwrap();
            aug.swap(c, piv);
            for r in c + 1..m {
                let factor = aug[r][c] / aug[c][c];
                for k in c..=m {
                    aug[r][k] -= factor * aug[c][k];
                }
            }
        }
        let mut step = vec![0.0; m];
        for r in (0..m).rev() {
            let rest: f64 = (r + 1..m).map(|k| aug[r][k] * step[k]).sum();
            step[r] = (aug[r][m] - rest) / aug[r][r];
        }
        let size = step.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for j in 0..m {
            th[j] -= step[j];
        }
        if size < 1e-13 {
            break;
        }
    }
    let w: Vec<f64> = (0..d).map(|j| th[j] / sd[j]).collect();
    let b = th[d] - (0..d).map(|j| mu[j] * w[j]).sum::<f64>();
    (w, b, f, gmax)
}

#[test]
fn the_solver_finds_the_optimum_an_independent_newton_solve_finds() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (x, y) = Classes::new().sample(400, 3);
    write_x(&p("x.npy"), &x);
    // The same labels as bool, float32 and int64: the same probe, bit for bit.
    ndarray_npy::write_npy(p("yb.npy"), &Array1::from(y.clone())).unwrap();
    let yf: Array1<f32> = y.iter().map(|&v| f32::from(u8::from(v))).collect();
    ndarray_npy::write_npy(p("yf.npy"), &yf).unwrap();
    write_labels_i64(&p("yi.npy"), &y);
    let l2 = 1e-2;
    for labels in ["yb.npy", "yf.npy", "yi.npy"] {
        ok(bin()
            .arg("train-probe")
            .args(["--input", "x.npy", "--labels", labels, "--holdout", "0"])
            .args(["--l2", &l2.to_string(), "--probe-output", "logit"])
            .args(["--report", &format!("{labels}.json"), "-o"])
            .arg(format!("{labels}.onnx"))
            .current_dir(dir.path()));
    }
    let (w, b) = probe_weights(&p("yb.npy.onnx"));
    for other in ["yf.npy.onnx", "yi.npy.onnx"] {
        assert_eq!(probe_weights(&p(other)), (w.clone(), b), "{other}");
    }
    let r = report(&p("yb.npy.json"));
    assert!(r["heldout"].is_null());
    assert_eq!(
        DictionaryFile::open(p("yb.npy.onnx"))
            .unwrap()
            .meta()
            .activation,
        Activation::Linear
    );

    let (wr, br, fr, gr) = newton(&x, &y, l2);
    assert!(gr < 1e-12, "the reference did not converge: {gr:e}");
    let mut err = (f64::from(b) - br).powi(2);
    let mut norm = br * br;
    for (a, c) in w.iter().zip(&wr) {
        err += (f64::from(*a) - c).powi(2);
        norm += c * c;
    }
    let e = (err / norm).sqrt();
    eprintln!("train-probe vs Newton: relative {e:e}");
    assert!(e < 1e-5, "weights differ from the Newton solution: {e:e}");
    let objective = r["objective"].as_f64().unwrap();
    assert!((objective - fr).abs() < 1e-10, "{objective} vs {fr}");
    // The logits, through ONNX Runtime, against the Newton solution's in float64.
    let d = Dictionary::load(p("yb.npy.onnx"), &SessionOptions::default()).unwrap();
    let got = d.encode(x.view()).unwrap().acts;
    let want: Vec<f64> = x
        .rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .zip(&wr)
                .map(|(a, c)| f64::from(*a) * c)
                .sum::<f64>()
                + br
        })
        .collect();
    let e = tiller_test_support::rel_err(
        &got,
        &Array2::from_shape_vec((want.len(), 1), want).unwrap(),
    );
    assert!(e < 1e-5, "logits: {e:e}");
}

#[test]
fn a_difference_in_means_direction_steers_and_monitors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (x, y) = Classes::new().sample(500, 4);
    let rows = |want: bool| -> Array2<f32> {
        let idx: Vec<usize> = (0..y.len()).filter(|&i| y[i] == want).collect();
        x.select(Axis(0), &idx)
    };
    let (a, bneg) = (rows(true), rows(false));
    write_x(&p("a.npy"), &a);
    write_x(&p("b.npy"), &bneg);
    let out = ok(bin()
        .arg("diffmeans")
        .args([
            "--positive",
            "a.npy",
            "--negative",
            "b.npy",
            "--name",
            "truthful",
        ])
        .args(["--hook", HOOK, "--report", "dm.json", "-o", "dm.onnx"])
        .current_dir(dir.path()));
    has(&out, &["AUROC", "threshold"]);

    // The direction: (mean(A) - mean(B)) / ‖…‖ in float64.
    let mean = |m: &Array2<f32>| m.mapv(f64::from).mean_axis(Axis(0)).unwrap();
    let diff = mean(&a) - mean(&bneg);
    let norm = diff.dot(&diff).sqrt();
    let want = &diff / norm;
    let f = DictionaryFile::open(p("dm.onnx")).unwrap();
    let m = f.meta();
    assert_eq!(
        (m.kind, m.activation, m.d_sae),
        (Kind::Vector, Activation::Linear, 1)
    );
    assert_eq!((m.hook_in.as_str(), m.hook_out.as_str()), (HOOK, HOOK));
    assert_eq!(m.labels[&0], "truthful");
    let u: Vec<f32> = f.w_dec().unwrap().row(0).to_vec();
    let err = u
        .iter()
        .zip(&want)
        .fold(0.0f64, |e, (g, w)| e.max((f64::from(*g) - w).abs()));
    assert!(err < 1e-7, "direction vs float64: {err:e}");
    let r = report(&p("dm.json"));
    assert!((r["norm"].as_f64().unwrap() - norm).abs() < 1e-12 * norm);
    let proj = |row: ndarray::ArrayView1<'_, f32>| -> f64 {
        row.iter()
            .zip(&u)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum()
    };
    let pa: Vec<f64> = a.rows().into_iter().map(proj).collect();
    let pb: Vec<f64> = bneg.rows().into_iter().map(proj).collect();
    let (ma, mb) = (metrics::mean_std(&pa).0, metrics::mean_std(&pb).0);
    assert!((r["positive_mean"].as_f64().unwrap() - ma).abs() < 1e-9 * norm);
    assert!((r["negative_mean"].as_f64().unwrap() - mb).abs() < 1e-9 * norm);
    // The means' projections are `norm` apart, as they must be.
    assert!(((ma - mb) - norm).abs() < 1e-6 * norm);
    let scores: Vec<f64> = pa.iter().chain(&pb).copied().collect();
    let labels: Vec<bool> = (0..scores.len()).map(|i| i < pa.len()).collect();
    assert_eq!(r["auroc"].as_f64(), metrics::auroc(&scores, &labels));
    let threshold = r["threshold"].as_f64().unwrap();

    // In the runtime: `vector` shifts every projection by the strength, `project_cap` keeps it
    // at or under the cap, and a monitor reads it.
    let t = 64;
    let xs = x.slice(s![..t, ..]).to_owned();
    let before: Vec<f64> = xs.rows().into_iter().map(proj).collect();
    let mut sorted = before.clone();
    sorted.sort_by(f64::total_cmp);
    let cap = sorted[t / 2];
    let strength = 2.5;
    let config = format!(
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "truth"
path = "dm.onnx"
[[monitor]]
name = "truthful"
dictionary = "truth"
features = [0]
threshold = {threshold}
window = "token"
[[profile]]
name = "push"
[[profile.steer]]
dictionary = "truth"
op = "vector"
feature = 0
strength = {strength}
[[profile]]
name = "cap"
[[profile.steer]]
dictionary = "truth"
op = "project_cap"
feature = 0
value = {cap}
"#
    );
    std::fs::write(p("tiller.toml"), config).unwrap();
    let rt = Runtime::from_config_file(p("tiller.toml")).unwrap();
    let run = |req: u64, profile: &str| -> (Array2<f32>, Vec<usize>) {
        rt.begin_request(req, Some(profile), None).unwrap();
        let mut ys = xs.clone();
        let mut step = rt
            .step(
                &[Token {
                    request: req,
                    phase: Phase::Generated,
                }; 64],
            )
            .unwrap();
        step.hook(HOOK, ActivationsMut::F32(ys.as_slice_mut().unwrap()))
            .unwrap();
        let fired = step
            .finish()
            .events
            .iter()
            .map(|e| e.token as usize)
            .collect();
        rt.end_request(req).unwrap();
        (ys, fired)
    };
    let norms: Vec<f64> = xs
        .rows()
        .into_iter()
        .map(|r| r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt())
        .collect();

    let (pushed, fired) = run(1, "push");
    let want_fired: Vec<usize> = (0..t).filter(|&i| before[i] > threshold).collect();
    assert!(before.iter().all(|v| (v - threshold).abs() > 1e-4));
    assert_eq!(
        fired, want_fired,
        "the monitor reads x·u (before the edits)"
    );
    let after: Vec<f64> = pushed.rows().into_iter().map(proj).collect();
    for i in 0..t {
        let shift = after[i] - before[i];
        assert!(
            (shift - strength).abs() <= 1e-5 * (norms[i] + strength),
            "token {i}: shifted by {shift}"
        );
    }
    let mean_shift = (after.iter().sum::<f64>() - before.iter().sum::<f64>()) / t as f64;
    eprintln!("vector: mean projection shift {mean_shift:.7} (strength {strength})");
    let mean_norm = norms.iter().sum::<f64>() / t as f64;
    assert!((mean_shift - strength).abs() <= 1e-5 * (mean_norm + strength));

    let (capped, _) = run(2, "cap");
    let after: Vec<f64> = capped.rows().into_iter().map(proj).collect();
    let mut worst = f64::NEG_INFINITY;
    for i in 0..t {
        worst = worst.max(after[i] - cap);
        assert!(
            after[i] <= cap + 1e-5 * norms[i],
            "token {i}: projection {} over the cap {cap}",
            after[i]
        );
        if before[i] <= cap {
            assert_eq!(capped.row(i), xs.row(i), "token {i} was under the cap");
        } else {
            assert!((after[i] - cap).abs() <= 1e-5 * norms[i], "token {i}");
            // Only the component along u moved.
            let moved = &capped.row(i).mapv(f64::from) - &xs.row(i).mapv(f64::from);
            let along: f64 = moved.iter().zip(&u).map(|(m, q)| m * f64::from(*q)).sum();
            for (k, m) in moved.iter().enumerate() {
                assert!((m - along * f64::from(u[k])).abs() <= 1e-5 * norms[i]);
            }
        }
    }
    eprintln!(
        "project_cap: largest projection minus cap {worst:e} (tokens' mean norm {mean_norm:.1})"
    );
}

/// A safetensors file of float tensors in `dtype`.
fn safetensors_file(
    path: &Path,
    tensors: &[(&str, Vec<usize>, Vec<f64>)],
    dtype: safetensors::Dtype,
) {
    let t: common::Tensors = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.to_string(),
                ndarray::ArrayD::from_shape_vec(s.clone(), v.clone()).unwrap(),
            )
        })
        .collect();
    common::write_safetensors(path, &t, dtype);
}

fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// Imports `path` (with `args`), then checks the probe's weights and, through ONNX Runtime, its
/// outputs against `activation(x·wᵀ + b)` in float64.
fn check_import(dir: &Path, path: &str, args: &[&str], w: &[f64], b: &[f64], logits: bool) {
    let out = dir.join(format!("{}.onnx", path.replace(['/', '.'], "_")));
    ok(bin()
        .arg("import")
        .arg(path)
        .args(args)
        .arg("-o")
        .arg(&out)
        .current_dir(dir));
    let f = DictionaryFile::open(&out).unwrap();
    let n_out = b.len();
    assert_eq!(f.meta().kind, Kind::Probe, "{path}");
    assert_eq!(f.meta().d_sae, n_out, "{path}");
    assert_eq!(
        f.meta().activation,
        if logits {
            Activation::Linear
        } else {
            Activation::Sigmoid
        }
    );
    let weights = f.weights().unwrap();
    for o in 0..n_out {
        assert_eq!(weights.b_enc[o], b[o] as f32, "{path}");
        for k in 0..D {
            assert_eq!(weights.w_enc[[k, o]], w[o * D + k] as f32, "{path}");
        }
    }
    let x = Array2::from_shape_vec(
        (32, D),
        random(32 * D, 8).iter().map(|v| *v as f32).collect(),
    )
    .unwrap();
    let d = Dictionary::load(&out, &SessionOptions::default()).unwrap();
    let got = d.encode(x.view()).unwrap().acts;
    let want = Array2::from_shape_fn((32, n_out), |(t, o)| {
        let z = (0..D)
            .map(|k| f64::from(x[[t, k]]) * f64::from(w[o * D + k] as f32))
            .sum::<f64>()
            + f64::from(b[o] as f32);
        if logits { z } else { sigmoid(z) }
    });
    let e = tiller_test_support::rel_err(&got, &want);
    assert!(e < 1e-5, "{path}: {e:e}");
}

#[test]
fn probes_saved_by_python_tools_import() {
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (w2, b2) = (random(2 * D, 1), random(2, 2));
    // torch: nn.Linear(D, 2).state_dict() saved with safetensors; auto-detected.
    safetensors_file(
        &p("linear.safetensors"),
        &[
            ("weight", vec![2, D], w2.clone()),
            ("bias", vec![2], b2.clone()),
        ],
        Dtype::F32,
    );
    check_import(dir.path(), "linear.safetensors", &[], &w2, &b2, false);
    // `tiller-export verify` compares the imported probe with the source.
    let out = ok(bin()
        .args([
            "verify",
            "linear_safetensors.onnx",
            "--source",
            "linear.safetensors",
        ])
        .current_dir(dir.path()));
    has(&out, &["PASS"]);
    // A prefixed layer in bfloat16: the values as bfloat16 holds them.
    let round = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .map(|x| f64::from(half::bf16::from_f64(*x).to_f32()))
            .collect()
    };
    safetensors_file(
        &p("probe_bf16.safetensors"),
        &[
            ("probe.weight", vec![2, D], w2.clone()),
            ("probe.bias", vec![2], b2.clone()),
        ],
        Dtype::BF16,
    );
    check_import(
        dir.path(),
        "probe_bf16.safetensors",
        &[],
        &round(&w2),
        &round(&b2),
        false,
    );

    // scikit-learn: np.savez(coef_=clf.coef_, intercept_=clf.intercept_, classes_=clf.classes_),
    // float64, with an integer array beside them; read as logits.
    let (w1, b1) = (random(D, 3), random(1, 4));
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(p("sk.npz")).unwrap());
    npz.add_array(
        "coef_",
        &Array2::from_shape_vec((1, D), w1.clone()).unwrap(),
    )
    .unwrap();
    npz.add_array("intercept_", &Array1::from(b1.clone()))
        .unwrap();
    npz.add_array("classes_", &Array1::from(vec![0i64, 1]))
        .unwrap();
    npz.finish().unwrap();
    check_import(
        dir.path(),
        "sk.npz",
        &["--probe-output", "logit"],
        &w1,
        &b1,
        true,
    );

    // NumPy: a [d] weight and a 0-d bias, given with --bias (which implies --format probe).
    tiller_export::npy::write(
        &p("w.npy"),
        &Array1::from(w1.iter().map(|v| *v as f32).collect::<Vec<_>>()),
    )
    .unwrap();
    ndarray_npy::write_npy(p("b.npy"), &ndarray::arr0(b1[0])).unwrap();
    check_import(dir.path(), "w.npy", &["--bias", "b.npy"], &w1, &b1, false);
    // ... or without a bias (zero), naming the format.
    check_import(
        dir.path(),
        "w.npy",
        &["--format", "probe"],
        &w1,
        &[0.0],
        false,
    );
    // A folder of coef_.npy / intercept_.npy.
    std::fs::create_dir(p("skl")).unwrap();
    ndarray_npy::write_npy(
        p("skl/coef_.npy"),
        &Array2::from_shape_vec((2, D), w2.clone()).unwrap(),
    )
    .unwrap();
    ndarray_npy::write_npy(p("skl/intercept_.npy"), &Array1::from(b2.clone())).unwrap();
    check_import(dir.path(), "skl", &[], &w2, &b2, false);
    // Output labels name the read-outs.
    std::fs::write(p("labels.json"), r#"{"0": "toxic", "1": "french"}"#).unwrap();
    ok(bin()
        .args([
            "import",
            "skl",
            "--labels",
            "labels.json",
            "-o",
            "named.onnx",
        ])
        .current_dir(dir.path()));
    let f = DictionaryFile::open(p("named.onnx")).unwrap();
    assert_eq!(f.meta().labels[&1], "french");
}

#[test]
fn bad_probes_and_bad_training_input_are_clear_errors() {
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let import = |args: &[&str]| -> String {
        fails(
            bin()
                .arg("import")
                .args(args)
                .args(["-o", "out.onnx"])
                .current_dir(dir.path()),
        )
    };
    let npy = |name: &str, shape: &[usize], v: Vec<f64>| {
        let a = ndarray::ArrayD::from_shape_vec(shape.to_vec(), v).unwrap();
        ndarray_npy::write_npy(p(name), &a).unwrap();
    };
    npy("w3.npy", &[1, 2, D], random(2 * D, 1));
    has(
        &import(&["w3.npy", "--format", "probe"]),
        &["w3.npy", "[1, 2, 24]", "[d] or [n_out, d]"],
    );
    npy("w2.npy", &[2, D], random(2 * D, 1));
    npy("b3.npy", &[3], random(3, 1));
    has(
        &import(&["w2.npy", "--bias", "b3.npy"]),
        &["b3.npy", "[3]", "2 read-outs"],
    );
    npy("wt.npy", &[D, 2], random(2 * D, 1));
    npy("b2.npy", &[2], random(2, 1));
    has(
        &import(&["wt.npy", "--bias", "b2.npy"]),
        &["looks transposed", "[24, 2] → [2, 24]"],
    );
    let mut nan = random(D, 1);
    nan[5] = f64::NAN;
    npy("wnan.npy", &[D], nan);
    has(
        &import(&["wnan.npy", "--format", "probe"]),
        &["wnan.npy", "NaN"],
    );
    ndarray_npy::write_npy(p("wint.npy"), &Array1::from(vec![1i32; D])).unwrap();
    has(
        &import(&["wint.npy", "--format", "probe"]),
        &["wint.npy", "dtype"],
    );
    // safetensors: an integer weight, two layers, no layer.
    let ints: Vec<u8> = (0..D as i32).flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::I32, vec![D], &ints).unwrap();
    safetensors::serialize_to_file(
        vec![("weight".to_string(), view)],
        None,
        &p("int.safetensors"),
    )
    .unwrap();
    has(
        &import(&["int.safetensors"]),
        &["int.safetensors", "`weight`", "not a float type"],
    );
    safetensors_file(
        &p("two.safetensors"),
        &[
            ("a.weight", vec![1, D], random(D, 1)),
            ("b.weight", vec![1, D], random(D, 2)),
        ],
        Dtype::F32,
    );
    has(
        &import(&["two.safetensors", "--format", "probe"]),
        &["several weights", "`a.weight`"],
    );
    safetensors_file(
        &p("none.safetensors"),
        &[("foo", vec![D], random(D, 1))],
        Dtype::F32,
    );
    has(
        &import(&["none.safetensors", "--format", "probe"]),
        &["no probe weight", "foo"],
    );
    safetensors_file(
        &p("ok.safetensors"),
        &[("weight", vec![D], random(D, 1))],
        Dtype::F32,
    );
    has(
        &import(&["ok.safetensors", "--bias", "b2.npy"]),
        &["--bias goes with a .npy weight"],
    );
    has(
        &import(&["ok.safetensors", "--bias", "b2.npy", "--format", "saelens"]),
        &["--bias is for probes"],
    );

    // train-probe and diffmeans input.
    let (x, y) = Classes::new().sample(50, 5);
    write_x(&p("x.npy"), &x);
    let train = |labels: &str, extra: &[&str]| -> String {
        fails(
            bin()
                .arg("train-probe")
                .args(["--input", "x.npy", "--labels", labels])
                .args(extra)
                .args(["-o", "p.onnx"])
                .current_dir(dir.path()),
        )
    };
    let mut bad: Vec<i64> = y.iter().map(|&v| i64::from(v)).collect();
    bad[3] = 2;
    ndarray_npy::write_npy(p("y2.npy"), &Array1::from(bad)).unwrap();
    has(
        &train("y2.npy", &[]),
        &["y2.npy", "row 3 holds 2", "0 or 1"],
    );
    write_labels_i64(&p("short.npy"), &y[..99]);
    has(
        &train("short.npy", &[]),
        &["short.npy", "99 labels", "100 rows"],
    );
    write_labels_i64(&p("ones.npy"), &[true; 100]);
    has(
        &train("ones.npy", &[]),
        &["ones.npy", "no row is labelled 0"],
    );
    ndarray_npy::write_npy(p("cols.npy"), &Array2::<f32>::zeros((100, 2))).unwrap();
    has(&train("cols.npy", &[]), &["cols.npy", "one column"]);
    // Big-endian int32 labels, written by hand (ndarray-npy writes little-endian only).
    let header = "{'descr': '>i4', 'fortran_order': False, 'shape': (100,), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let pad = 64 - (10 + header.len() + 1) % 64;
    let hlen = (header.len() + pad + 1) as u16;
    bytes.extend_from_slice(&hlen.to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(b' ', pad));
    bytes.push(b'\n');
    for v in &y {
        bytes.extend_from_slice(&i32::from(*v).to_be_bytes());
    }
    std::fs::write(p("big.npy"), bytes).unwrap();
    // Read as their descriptor says, like every `.npy` in the project.
    ok(bin()
        .arg("train-probe")
        .args(["--input", "x.npy", "--labels", "big.npy", "-o", "big.onnx"])
        .current_dir(dir.path()));
    write_labels_i64(&p("y.npy"), &y);
    has(&train("y.npy", &["--holdout", "1"]), &["holdout"]);
    has(&train("y.npy", &["--l2", "0"]), &["l2", "positive"]);
    let mut xn = x.clone();
    xn[[5, 2]] = f32::NAN;
    write_x(&p("xnan.npy"), &xn);
    has(
        &fails(
            bin()
                .args([
                    "train-probe",
                    "--input",
                    "xnan.npy",
                    "--labels",
                    "y.npy",
                    "-o",
                    "p.onnx",
                ])
                .current_dir(dir.path()),
        ),
        &["xnan.npy", "row 5"],
    );
    write_x(&p("narrow.npy"), &Array2::zeros((10, D - 1)));
    has(
        &fails(
            bin()
                .args([
                    "diffmeans",
                    "--positive",
                    "x.npy",
                    "--negative",
                    "narrow.npy",
                    "-o",
                    "d.onnx",
                ])
                .current_dir(dir.path()),
        ),
        &["narrow.npy", "width 23"],
    );
    has(
        &fails(
            bin()
                .args([
                    "diffmeans",
                    "--positive",
                    "x.npy",
                    "--negative",
                    "x.npy",
                    "-o",
                    "d.onnx",
                ])
                .current_dir(dir.path()),
        ),
        &["same mean"],
    );
    // Every label dtype people save reads the same.
    let want = [false, true, true, false];
    ndarray_npy::write_npy(p("u8.npy"), &Array1::from(vec![0u8, 1, 1, 0])).unwrap();
    ndarray_npy::write_npy(
        p("i32.npy"),
        &Array2::from_shape_vec((4, 1), vec![0i32, 1, 1, 0]).unwrap(),
    )
    .unwrap();
    ndarray_npy::write_npy(p("f64.npy"), &Array1::from(vec![0.0f64, 1.0, 1.0, 0.0])).unwrap();
    ndarray_npy::write_npy(p("bool.npy"), &Array1::from(want.to_vec())).unwrap();
    for name in ["u8.npy", "i32.npy", "f64.npy", "bool.npy"] {
        assert_eq!(read_labels(&p(name)).unwrap(), want, "{name}");
    }
}
