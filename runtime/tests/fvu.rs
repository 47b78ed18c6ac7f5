//! The FVU and L0 gauges against a float64 reference, for every kind that reconstructs: the
//! target is what the dictionary reconstructs (a transcoder's `hook_out`, each layer of a CLT,
//! every read layer of a crosscoder), and tokens are sampled one by one across steps, measured off
//! the hot path. Tolerance: relative 1e-4 on the FVU (ONNX Runtime's float32 reconstruction
//! against float64), exact on L0 and on the counts.
#![allow(clippy::unwrap_used)]

#[path = "support/exposition.rs"]
mod exposition;

use std::path::Path;

use exposition::sample;
use ndarray::{Array1, Array2, Axis, concatenate};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};
use tiller_test_support::{randn, write_dictionary};

const D_IN: usize = 20;
const D_OUT: usize = 28;
const F: usize = 40;

fn write(
    dir: &Path,
    kind: Kind,
    hooks_in: &[&str],
    hooks_out: &[&str],
    seed: u64,
) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let d_out = if matches!(kind, Kind::Crosscoder | Kind::Sae) {
        D_IN
    } else {
        D_OUT
    };
    let mut meta = Meta::new(kind, Activation::Relu, D_IN, F, d_out);
    meta.n_layers = hooks_in.len().max(hooks_out.len());
    meta.hook_in = hooks_in.join(", ");
    meta.hook_out = hooks_out.join(", ");
    let (li, lo) = (meta.input_layers(), meta.output_layers());
    let w = Weights::new(
        randn(&mut rng, (li * D_IN, F), 0.4),
        Array1::from_elem(F, 0.05),
        randn(&mut rng, (F, lo * d_out), 0.3),
        randn(&mut rng, (1, lo * d_out), 0.1).row(0).to_owned(),
    );
    write_dictionary(&dir.join("d.onnx"), &meta, &w);
    (meta, w)
}

fn runtime(dir: &Path, rate: f64) -> Runtime {
    std::fs::write(
        dir.join("t.toml"),
        format!(
            "[runtime]\nfvu_sample_rate = {rate}\n[[dictionary]]\nname = \"d\"\npath = \"d.onnx\"\n"
        ),
    )
    .unwrap();
    let rt = Runtime::from_config_file(dir.join("t.toml")).unwrap();
    rt.begin_request(1, None, None).unwrap();
    rt
}

fn tokens(n: usize) -> Vec<Token> {
    vec![
        Token {
            request: 1,
            phase: Phase::Prompt,
        };
        n
    ]
}

/// The float64 FVU of `recon` against `target` (`Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`) and the mean L0.
fn reference_fvu(target: &Array2<f64>, recon: &Array2<f64>, acts: &Array2<f64>) -> (f64, f64) {
    let err: f64 = (target - recon).mapv(|v| v * v).sum();
    let mean = target.mean_axis(Axis(0)).unwrap();
    let var: f64 = (target - &mean).mapv(|v| v * v).sum();
    let l0 = acts.iter().filter(|v| **v > 0.0).count() as f64 / acts.nrows() as f64;
    (err / var, l0)
}

fn gauges(rt: &Runtime) -> (f64, f64, f64) {
    rt.wait_for_fvu();
    let text = rt.metrics_text();
    let d = ["dictionary=\"d\""];
    (
        sample(&text, "tiller_dictionary_fvu", &d).unwrap(),
        sample(&text, "tiller_dictionary_l0", &d).unwrap(),
        sample(
            &text,
            "tiller_fvu_samples_total",
            &["dictionary=\"d\"", "result=\"measured\""],
        )
        .unwrap(),
    )
}

fn assert_close(got: (f64, f64), want: (f64, f64), what: &str) {
    assert!(
        (got.0 - want.0).abs() < 1e-4 * want.0,
        "{what}: fvu {} against the reference {}",
        got.0,
        want.0
    );
    assert!(
        (got.1 - want.1).abs() < 1e-9,
        "{what}: l0 {} against {}",
        got.1,
        want.1
    );
}

/// A transcoder reconstructs the activations at its `hook_out` (here wider than its input: the
/// old measure compared the input with the reconstruction and cut both to the shorter), before
/// any edit there.
#[test]
fn a_transcoder_is_measured_against_its_hook_out() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, w) = write(dir.path(), Kind::Transcoder, &["mlp.in"], &["mlp.out"], 1);
    let rt = runtime(dir.path(), 1.0);
    let n = 40;
    let mut rng = StdRng::seed_from_u64(2);
    let x = randn(&mut rng, (n, D_IN), 1.0);
    let (acts, recon) = reference::encode_decode(&meta, &w, x.view());
    // The MLP's output: the reconstruction plus what the transcoder misses.
    let y = recon.mapv(|v| v as f32) + randn(&mut rng, (n, D_OUT), 0.3);
    let mut step = rt.step(&tokens(n)).unwrap();
    let (mut xi, mut yo) = (x.clone(), y.clone());
    step.hook("mlp.in", ActivationsMut::F32(xi.as_slice_mut().unwrap()))
        .unwrap();
    step.hook("mlp.out", ActivationsMut::F32(yo.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    let (fvu, l0, measured) = gauges(&rt);
    assert_close(
        (fvu, l0),
        reference_fvu(&y.mapv(f64::from), &recon, &acts),
        "transcoder",
    );
    assert_eq!(measured, n as f64);
}

/// A CLT reconstructs each of its output layers: the FVU is over all of them.
#[test]
fn a_clt_is_measured_against_every_layer_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let outs = ["mlp.1.out", "mlp.2.out", "mlp.3.out"];
    let (meta, w) = write(dir.path(), Kind::Clt, &["mlp.1.in"], &outs, 3);
    let rt = runtime(dir.path(), 1.0);
    let n = 36;
    let mut rng = StdRng::seed_from_u64(4);
    let x = randn(&mut rng, (n, D_IN), 1.0);
    let (acts, recon) = reference::encode_decode(&meta, &w, x.view());
    let ys: Vec<Array2<f32>> = (0..3)
        .map(|l| {
            recon
                .slice(ndarray::s![.., l * D_OUT..(l + 1) * D_OUT])
                .mapv(|v| v as f32)
                + randn(&mut rng, (n, D_OUT), 0.2 + 0.2 * l as f32)
        })
        .collect();
    let mut step = rt.step(&tokens(n)).unwrap();
    let mut xi = x.clone();
    step.hook("mlp.1.in", ActivationsMut::F32(xi.as_slice_mut().unwrap()))
        .unwrap();
    for (h, y) in outs.iter().zip(&ys) {
        let mut y = y.clone();
        step.hook(h, ActivationsMut::F32(y.as_slice_mut().unwrap()))
            .unwrap();
    }
    step.finish();
    let target = concatenate(Axis(1), &ys.iter().map(|y| y.view()).collect::<Vec<_>>()).unwrap();
    let (fvu, l0, _) = gauges(&rt);
    assert_close(
        (fvu, l0),
        reference_fvu(&target.mapv(f64::from), &recon, &acts),
        "CLT",
    );

    // A step that never reaches the last layer measures nothing (its rows wait, then are dropped).
    let mut step = rt.step(&tokens(n)).unwrap();
    let mut xi = x.clone();
    step.hook("mlp.1.in", ActivationsMut::F32(xi.as_slice_mut().unwrap()))
        .unwrap();
    let mut y = ys[0].clone();
    step.hook(outs[0], ActivationsMut::F32(y.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    assert_eq!(gauges(&rt).2, n as f64);
}

/// A crosscoder reconstructs every layer it reads.
#[test]
fn a_crosscoder_is_measured_over_its_layers() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = ["res.1", "res.2"];
    let (meta, w) = write(dir.path(), Kind::Crosscoder, &hooks, &hooks, 5);
    let rt = runtime(dir.path(), 1.0);
    let n = 33;
    let mut rng = StdRng::seed_from_u64(6);
    let xs: Vec<Array2<f32>> = (0..2).map(|_| randn(&mut rng, (n, D_IN), 1.0)).collect();
    let x = concatenate(Axis(1), &[xs[0].view(), xs[1].view()]).unwrap();
    let (acts, recon) = reference::encode_decode(&meta, &w, x.view());
    let mut step = rt.step(&tokens(n)).unwrap();
    for (h, x) in hooks.iter().zip(&xs) {
        let mut x = x.clone();
        step.hook(h, ActivationsMut::F32(x.as_slice_mut().unwrap()))
            .unwrap();
    }
    step.finish();
    let (fvu, l0, _) = gauges(&rt);
    assert_close(
        (fvu, l0),
        reference_fvu(&x.mapv(f64::from), &recon, &acts),
        "crosscoder",
    );
}

/// Sampling follows tokens, not steps: every `1/rate`-th token a dictionary reads, whatever the
/// batch sizes (the old sampler measured a whole step whenever it crossed a multiple).
#[test]
fn tokens_are_sampled_one_by_one_across_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, w) = write(dir.path(), Kind::Sae, &["res"], &["res"], 7);
    let _ = (meta, w);
    let rt = runtime(dir.path(), 0.25);
    let mut rng = StdRng::seed_from_u64(8);
    // Lone tokens, then a 130-token prefill, then 3-token steps: 200 tokens in all.
    let mut sizes = vec![1; 40];
    sizes.push(130);
    sizes.extend([3; 10]);
    let mut total = 0;
    for n in sizes {
        let mut x = randn(&mut rng, (n, D_IN), 1.0);
        let mut step = rt.step(&tokens(n)).unwrap();
        step.hook("res", ActivationsMut::F32(x.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
        total += n;
    }
    assert_eq!(total, 200);
    let (_, _, measured) = gauges(&rt);
    // Tokens 0, 4, 8, …, 196.
    assert_eq!(measured, 50.0);
}
