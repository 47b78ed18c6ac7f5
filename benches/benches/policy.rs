//! The cost of one policy call: the co-occurrence example (compiled to wasm32) handed 8
//! `(feature, value)` pairs, as the runtime calls it per token. Build the example first:
//! `cargo build --release --target wasm32-unknown-unknown -p policy-cooccur`.

use criterion::{Criterion, criterion_group, criterion_main};
use tiller::config::PolicyConfig;

fn bench_policy(c: &mut Criterion) {
    let wasm = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-unknown-unknown/release/policy_cooccur.wasm");
    if !wasm.is_file() {
        eprintln!(
            "{} is missing: build it with `cargo build --release --target wasm32-unknown-unknown -p policy-cooccur`",
            wasm.display()
        );
        return;
    }
    let cfg: PolicyConfig = toml::from_str(&format!(
        "name = \"cooccur\"\nmodule = \"{}\"\ndictionary = \"res\"\nfeatures = [1, 2, 3, 4, 5, 6, 7, 8]\nconfig = \"window=20 count=9\"\n",
        wasm.display()
    ))
    .expect("config");
    let metrics = tiller::metrics::Metrics::new("tiller", &Default::default()).expect("metrics");
    let meta = tiller::Meta::new(tiller::Kind::Sae, tiller::Activation::Relu, 16, 64, 16);
    let columns: Vec<(usize, u32)> = (1..=8).map(|i| (i as usize, i)).collect();
    let engine = tiller::policy::engine().expect("engine");
    let policy = tiller::policy::Policy::load(&engine, &cfg, &wasm, 0, columns, &meta, &metrics)
        .expect("load");
    let pairs: Vec<(u32, f32)> = (1..=8).map(|i| (i, 0.5 + i as f32)).collect();
    let mut token = 0u64;
    c.bench_function("policy_call_cooccur_8_pairs", |b| {
        b.iter(|| {
            token += 1;
            policy.features(1, token, true, &pairs)
        })
    });
}

criterion_group!(benches, bench_policy);
criterion_main!(benches);
