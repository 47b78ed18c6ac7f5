//! The hook over a grid of shapes, one thread: batch 1/8/64/256 × d_in 768/2304/4096 ×
//! 16384/65536 features, each sliced and full.
//!
//! - `sliced`: 64 monitored features and 4 rules (clamp, add, scale, ablate), as in
//!   `benches/hook.rs`: only the 64 encoder columns are computed, natively.
//! - `full`: the same config, for a request whose override names a feature outside the slice, so
//!   that every feature is encoded (ONNX Runtime on the whole dictionary).
//!
//! The dictionaries are ReLU SAEs cached in `target/bench-dicts` (4.4 GiB of weights in all,
//! written once, in about 30 s; `benches/compare` shares the 2304 × 16384 one). A shape is
//! loaded only when one of its benchmarks runs, and dropped before the next shape. The grid takes
//! about 2 minutes on this 2-core machine; `TILLER_BENCH_GRID=small` keeps the 16384-feature shapes, and
//! criterion's filter picks cells: `cargo bench -p tiller-benches --bench grid -- 'sliced/2304x16k'`.

use std::cell::OnceCell;
use std::time::Duration;

use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use tiller_benches::dicts;
use tiller_runtime::{ActivationsMut, Phase, Runtime, Token};

fn bench_grid(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let small = std::env::var("TILLER_BENCH_GRID").is_ok_and(|v| v == "small");
    let widths: &[usize] = if small { &[16384] } else { &[16384, 65536] };
    let mut group = c.benchmark_group("hook_grid");
    for d_in in [768usize, 2304, 4096] {
        for &d_sae in widths {
            let rt = OnceCell::new();
            let rt = || {
                rt.get_or_init(|| {
                    let path = dicts::relu_sae(d_in, d_sae).expect("dictionary");
                    let features = dicts::monitored_features(d_sae, 64);
                    // Requests may steer any feature: request 2's rule makes its hook encode
                    // the whole dictionary.
                    let config =
                        dicts::hook_config(&path, &features, &dicts::four_rules(&features), None)
                            + "\n[[requests.dictionary]]\nname = \"res\"\nany_feature = true\n";
                    let cfg = dir.path().join(format!("{d_in}x{d_sae}.toml"));
                    std::fs::write(&cfg, config).expect("config");
                    let rt = Runtime::from_config_file(&cfg).expect("runtime");
                    rt.begin_request(1, Some("p"), None).expect("request");
                    // A rule on the last feature, which no monitor names: every feature is encoded.
                    let full = format!(
                        r#"{{"steer": [{{"dictionary": "res", "op": "clamp", "feature": {}, "value": 0.0}}]}}"#,
                        d_sae - 1
                    );
                    rt.begin_request(2, Some("p"), Some(&full))
                        .expect("request");
                    rt
                })
            };
            let shape = format!("{d_in}x{}k", d_sae / 1024);
            for batch in [1usize, 8, 64, 256] {
                let x = tiller_benches::random_activations(batch, d_in, 5);
                group.throughput(Throughput::Elements(batch as u64));
                for (mode, request) in [("sliced", 1u64), ("full", 2)] {
                    // A full encode of 65536 × 4096 at batch 256 is 137 GFLOP: ten calls, no more,
                    // in the time ten calls take (a rough guess from 20 GB/s and 100 GFLOP/s).
                    if mode == "full" {
                        let weights = (d_in * d_sae) as f64;
                        let guess =
                            (4.0 * weights / 20e9).max(2.0 * batch as f64 * weights / 100e9);
                        group
                            .sampling_mode(SamplingMode::Flat)
                            .sample_size(10)
                            .warm_up_time(Duration::from_millis(100))
                            .measurement_time(Duration::from_secs_f64((12.0 * guess).max(1.0)));
                    } else {
                        group
                            .sampling_mode(SamplingMode::Auto)
                            .sample_size(20)
                            .warm_up_time(Duration::from_millis(300))
                            .measurement_time(Duration::from_secs(1));
                    }
                    let tokens = vec![
                        Token {
                            request,
                            phase: Phase::Generated
                        };
                        batch
                    ];
                    let id = BenchmarkId::new(format!("{mode}/{shape}"), batch);
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
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_grid);
criterion_main!(benches);
