//! The cost of one hook call through the host API, one thread (issue target: d_in 2304, 64
//! monitored features, 4 steering rules; per call at batch 1 and per token at batch 64), beside
//! ONNX Runtime run plainly on the same 64-feature sliced graph.

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::Axis;
use tiller::{ActivationsMut, Dictionary, DictionaryFile, Phase, Runtime, SessionOptions, Token};

const D: usize = 2304;
const F: usize = 16384;

fn bench_hook(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = tiller_benches::write_random_sae(dir.path(), tiller::Activation::Relu, D, F, 11)
        .expect("dictionary");
    let features: Vec<u32> = (0..64).map(|i| i * 251 % F as u32).collect();
    let list: Vec<String> = features.iter().map(u32::to_string).collect();
    let config = format!(
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "{}"
hook = "h"
[[monitor]]
name = "m"
dictionary = "res"
features = [{}]
threshold = 1e9
window = "request"
aggregate = "max"
[[profile]]
name = "p"
[[profile.steer]]
dictionary = "res"
op = "clamp"
feature = {}
value = 1.0
[[profile.steer]]
dictionary = "res"
op = "add"
feature = {}
strength = 0.5
[[profile.steer]]
dictionary = "res"
op = "scale"
feature = {}
factor = 0.5
[[profile.steer]]
dictionary = "res"
op = "ablate"
feature = {}
"#,
        path.display(),
        list.join(", "),
        features[0],
        features[1],
        features[2],
        features[3]
    );
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, config).expect("config");
    let rt = Runtime::from_config_file(&cfg).expect("runtime");
    rt.begin_request(1, Some("p"), None).expect("request");

    // ONNX Runtime plainly on the sliced graph: the 64 columns as their own dictionary.
    let file = DictionaryFile::open(&path).expect("open");
    let sliced = tiller_benches::slice_relu(&file, &features, &dir.path().join("sliced.onnx"))
        .expect("slice");
    let ort = Dictionary::load(&sliced, &SessionOptions::default()).expect("load sliced");

    let mut group = c.benchmark_group("hook_2304x16k_64feat_4rules");
    for batch in [1usize, 64] {
        let x = tiller_benches::random_activations(batch, D, 5);
        let tokens = vec![
            Token {
                request: 1,
                phase: Phase::Generated
            };
            batch
        ];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("tiller", batch), &batch, |b, _| {
            // A fresh copy of the activations for every call, made outside the timed part.
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
        group.bench_with_input(
            BenchmarkId::new("ort_sliced_encode", batch),
            &batch,
            |b, _| b.iter(|| ort.encode(x.view()).expect("encode").acts.sum_axis(Axis(1))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_hook);
criterion_main!(benches);
