//! Encode cost through ONNX Runtime on the CPU execution provider, one intra-op thread:
//! a ReLU and a TopK SAE of 768 × 8192 at batch 1, 8 and 64.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tiller_runtime::{Activation, Dictionary, SessionOptions};

fn bench_encode(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("encode");
    for activation in [Activation::Relu, Activation::TopK] {
        let path = tiller_benches::write_random_sae(dir.path(), activation, 768, 8192, 7)
            .expect("dictionary");
        let dict = Dictionary::load(&path, &SessionOptions::default()).expect("load");
        for batch in [1usize, 8, 64] {
            let x = tiller_benches::random_activations(batch, 768, 1);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new(activation.as_str(), batch), &x, |b, x| {
                b.iter(|| dict.encode(x.view()).expect("encode"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
