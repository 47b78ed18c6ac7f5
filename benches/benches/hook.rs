//! The cost of one hook call through the host API, one thread.
//!
//! - `hook_2304x16k_64feat_4rules`: the target (d_in 2304, 64 monitored features, 4 steering
//!   rules; per call at batch 1 and per token at batch 64), beside ONNX Runtime run plainly on the
//!   same 64-feature sliced graph.
//! - `steering_op`: each op alone (one rule, no monitor) at batch 1 and 64.
//! - `metrics`: the per-call update of 64 features' metrics, and the text exposition.
//!
//! The grid of shapes and batch sizes, sliced and full, is `benches/grid.rs`. Every call is a whole
//! step (open, hook, close) on a fresh copy of the activations, made outside
//! the timed part.

use std::cell::OnceCell;
use std::time::Duration;

use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use ndarray::Axis;
use tiller_benches::dicts;
use tiller_runtime::{
    ActivationsMut, Dictionary, DictionaryFile, Phase, Runtime, SessionOptions, Token,
};

const D: usize = 2304;
const F: usize = 16384;

fn runtime(config: &str, dir: &std::path::Path, name: &str) -> Runtime {
    let cfg = dir.join(name);
    std::fs::write(&cfg, config).expect("config");
    Runtime::from_config_file(&cfg).expect("runtime")
}

fn tokens(request: u64, batch: usize) -> Vec<Token> {
    vec![
        Token {
            request,
            phase: Phase::Generated
        };
        batch
    ]
}

/// Benches whole steps of `request` at `batch` through hook `h`, on fresh copies of `x`. `rt`
/// gives the runtime: a lazily built one is only built when a benchmark that needs it runs (not
/// when criterion's filter leaves it out).
fn bench_steps<'a>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    rt: impl Fn() -> &'a Runtime,
    request: u64,
    x: &ndarray::Array2<f32>,
) {
    let batch = x.nrows();
    let tokens = tokens(request, batch);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(id, |b| {
        let rt = rt();
        b.iter_batched_ref(
            || x.clone().into_raw_vec_and_offset().0,
            |buf| {
                let mut step = rt.step(&tokens).expect("step");
                step.hook("h", ActivationsMut::F32(buf)).expect("hook");
                step.finish()
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_hook(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dicts::relu_sae(D, F).expect("dictionary");
    let features = dicts::monitored_features(F, 64);
    let config = dicts::hook_config(&path, &features, &dicts::four_rules(&features), None);
    let rt = runtime(&config, dir.path(), "t.toml");
    rt.begin_request(1, Some("p"), None).expect("request");

    // ONNX Runtime plainly on the sliced graph: the 64 columns as their own dictionary.
    let file = DictionaryFile::open(&path).expect("open");
    let sliced = tiller_benches::slice_relu(&file, &features, &dir.path().join("sliced.onnx"))
        .expect("slice");
    let ort = Dictionary::load(&sliced, &SessionOptions::default()).expect("load sliced");

    let mut group = c.benchmark_group("hook_2304x16k_64feat_4rules");
    for batch in [1usize, 64] {
        let x = tiller_benches::random_activations(batch, D, 5);
        bench_steps(&mut group, BenchmarkId::new("tiller", batch), || &rt, 1, &x);
        group.bench_with_input(
            BenchmarkId::new("ort_sliced_encode", batch),
            &batch,
            |b, _| b.iter(|| ort.encode(x.view()).expect("encode").acts.sum_axis(Axis(1))),
        );
    }
    group.finish();
}

/// Each steering op alone: one rule, no monitor, on the 2304 × 16384 dictionary.
fn bench_ops(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dicts::relu_sae(D, F).expect("dictionary");
    let direction = dir.path().join("direction.npy");
    let u = tiller_benches::random_activations(1, D, 9);
    let u = &u / u.iter().map(|v| v * v).sum::<f32>().sqrt();
    ndarray_npy::write_npy(&direction, &u).expect("direction");
    let mut group = c.benchmark_group("steering_op");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (op, param) in [
        ("add", 0.5),
        ("clamp", 1.0),
        ("ablate", 0.0),
        ("scale", 0.5),
        ("cap", 0.1),
        ("vector", 0.5),
        ("project_cap", 0.1),
    ] {
        let rule = dicts::Rule {
            op,
            feature: 251,
            param,
        };
        let config = dicts::hook_config(&path, &[], &[rule], Some(&direction));
        let rt = OnceCell::new();
        let rt = || {
            rt.get_or_init(|| {
                let rt = runtime(&config, dir.path(), &format!("{op}.toml"));
                rt.begin_request(1, Some("p"), None).expect("request");
                rt
            })
        };
        for batch in [1usize, 64] {
            let x = tiller_benches::random_activations(batch, D, 5);
            bench_steps(&mut group, BenchmarkId::new(op, batch), rt, 1, &x);
        }
    }
    group.finish();
}

/// The metrics of one call (`tiller_benches::MetricsLoad`: 64 features' histograms and active
/// counters, as the runtime updates them), and the text exposition a scrape reads.
fn bench_metrics(c: &mut Criterion) {
    let metrics =
        tiller_runtime::metrics::Metrics::new("tiller", &Default::default()).expect("metrics");
    let mut load = tiller_benches::MetricsLoad::new(&metrics, &dicts::monitored_features(F, 64));
    let mut group = c.benchmark_group("metrics");
    for batch in [1usize, 64] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("update_64_features", batch),
            &batch,
            |b, &batch| b.iter(|| load.call(batch)),
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dicts::relu_sae(D, F).expect("dictionary");
    let features = dicts::monitored_features(F, 64);
    let config = dicts::hook_config(&path, &features, &dicts::four_rules(&features), None);
    group.bench_function("text_exposition", |b| {
        let rt = runtime(&config, dir.path(), "t.toml");
        b.iter(|| rt.metrics_text().len())
    });
    group.finish();
}

criterion_group!(benches, bench_hook, bench_ops, bench_metrics);
criterion_main!(benches);
