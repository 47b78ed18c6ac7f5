//! The cost of one policy call, handed 8 `(feature, value)` pairs as the runtime calls it per token:
//! the co-occurrence example compiled to wasm32 (build it first: `cargo build --release --target
//! wasm32-unknown-unknown -p policy-cooccur`), and a WAT guest that answers "no action", which
//! needs no wasm toolchain: the host's own cost (fuel, copying the pairs in, the call).

use criterion::{Criterion, criterion_group, criterion_main};
use tiller_runtime::config::PolicyConfig;

/// A guest whose `on_features` answers "no action".
const NOOP_GUEST: &str = r#"(module
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "tiller_policy_abi_v1"))
  (func (export "tiller_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "tiller_on_request_begin") (param i64 i32 i32) (result i64) (i64.const 0))
  (func (export "tiller_on_request_end") (param i64) (result i64) (i64.const 0))
  (func (export "tiller_on_features") (param i64 i64 i32 i32 i32) (result i64) (i64.const 0)))"#;

fn load(module: &std::path::Path, config: &str) -> tiller_runtime::policy::Policy {
    let cfg: PolicyConfig = toml::from_str(&format!(
        "name = \"p\"\nmodule = \"{}\"\ndictionary = \"res\"\nfeatures = [1, 2, 3, 4, 5, 6, 7, 8]\nconfig = \"{config}\"\n",
        module.display()
    ))
    .expect("config");
    let metrics =
        tiller_runtime::metrics::Metrics::new("tiller", &Default::default()).expect("metrics");
    let meta = tiller_runtime::Meta::new(
        tiller_runtime::Kind::Sae,
        tiller_runtime::Activation::Relu,
        16,
        64,
        16,
    );
    let columns: Vec<(usize, u32)> = (1..=8).map(|i| (i as usize, i)).collect();
    let engine = tiller_runtime::policy::engine().expect("engine");
    tiller_runtime::policy::Policy::load(&engine, &cfg, module, 0, columns, &meta, &metrics)
        .expect("load")
}

fn bench_policy(c: &mut Criterion) {
    let pairs: Vec<(u32, f32)> = (1..=8).map(|i| (i, 0.5 + i as f32)).collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let wat = dir.path().join("noop.wat");
    std::fs::write(&wat, NOOP_GUEST).expect("guest");
    let noop = load(&wat, "");
    let mut token = 0u64;
    c.bench_function("policy_call_wat_noop_8_pairs", |b| {
        b.iter(|| {
            token += 1;
            noop.features(1, token, true, &pairs)
        })
    });

    let wasm = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-unknown-unknown/release/policy_cooccur.wasm");
    if !wasm.is_file() {
        eprintln!(
            "{} is missing: build it with `cargo build --release --target wasm32-unknown-unknown -p policy-cooccur`",
            wasm.display()
        );
        return;
    }
    let policy = load(&wasm, "window=20 count=9");
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
