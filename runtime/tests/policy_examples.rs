//! The example policies compiled to WebAssembly, run by the runtime: each does on a real feature
//! stream exactly what its native build does under the SDK's harness. Needs the wasm builds:
//! `cargo build --release --target wasm32-unknown-unknown -p policy-cooccur -p policy-pii-stop`
//! (`.ci/run` does it when the target is installed); without them the test says so and passes.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tiller_policy_sdk::{Action, Harness};
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};
use tiller_test_support::write_dictionary;

fn wasm_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TILLER_POLICY_WASM_DIR") {
        return Some(PathBuf::from(d));
    }
    let d =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-unknown-unknown/release");
    d.join("policy_cooccur.wasm").is_file().then_some(d)
}

#[test]
fn wasm_examples_match_their_native_builds() {
    let Some(wasm) = wasm_dir() else {
        eprintln!(
            "skipped: the wasm32 builds of the example policies are not there (see this file's header)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (d, f) = (16, 24);
    let mut rng = StdRng::seed_from_u64(3);
    let n = Normal::new(0.0f32, 0.4).unwrap();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, d, f, d);
    meta.hook_in = "h".into();
    let w = Weights::new(
        Array2::from_shape_simple_fn((d, f), || n.sample(&mut rng)),
        Array1::from_elem(f, -0.3),
        Array2::from_shape_simple_fn((f, d), || n.sample(&mut rng)),
        Array1::zeros(d),
    );
    write_dictionary(&dir.path().join("d.onnx"), &meta, &w);
    let cfg = format!(
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "d.onnx"
[[policy]]
name = "cooccur"
module = "{}"
dictionary = "res"
features = [1, 2, 3, 4, 5, 6]
config = "window=4 count=3"
counters = ["flags"]
[[policy]]
name = "pii"
module = "{}"
dictionary = "res"
features = [7, 8]
config = "threshold=0.3"
"#,
        wasm.join("policy_cooccur.wasm").display(),
        wasm.join("policy_pii_stop.wasm").display()
    );
    std::fs::write(dir.path().join("t.toml"), cfg).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();

    // The same stream through the native builds.
    Harness::<policy_cooccur::Cooccur>::set_config("window=4 count=3");
    let mut co = Harness::new(policy_cooccur::Cooccur::new(), "window=4 count=3");
    Harness::<policy_pii_stop::PiiStop>::set_config("threshold=0.3");
    let mut pii = Harness::new(policy_pii_stop::PiiStop::new(), "threshold=0.3");

    let n_tok = 40;
    let x = Array2::from_shape_simple_fn((n_tok, d), || n.sample(&mut rng) * 3.0);
    let acts = reference::encode(&meta, &w, x.view());
    rt.begin_request(1, None, None).unwrap();
    let (mut wasm_events, mut native_events) = (Vec::new(), Vec::new());
    for t in 0..n_tok {
        let generated = t >= 20;
        let mut row = x.row(t).to_owned();
        let mut step = rt
            .step(&[Token {
                request: 1,
                phase: if generated {
                    Phase::Generated
                } else {
                    Phase::Prompt
                },
            }])
            .unwrap();
        step.hook("h", ActivationsMut::F32(row.as_slice_mut().unwrap()))
            .unwrap();
        let r = step.finish();
        for e in r.events {
            wasm_events.push((e.monitor, e.action, e.token));
        }
        let pairs = |ids: &[u32]| -> Vec<(u32, f32)> {
            ids.iter()
                .filter(|&&i| acts[[t, i as usize]] > 0.0)
                .map(|&i| (i, acts[[t, i as usize]] as f32))
                .collect()
        };
        for a in co.token(1, t as u64, generated, &pairs(&[1, 2, 3, 4, 5, 6])) {
            assert!(matches!(a, Action::Flag(_)));
            native_events.push(("cooccur".to_string(), "flag", t as u64));
        }
        for a in pii.token(1, t as u64, generated, &pairs(&[7, 8])) {
            native_events.push((
                "pii".to_string(),
                if a == Action::Stop { "stop" } else { "flag" },
                t as u64,
            ));
        }
    }
    assert!(
        !native_events.is_empty(),
        "the stream exercises the policies"
    );
    assert_eq!(wasm_events, native_events);
    let text = rt.metrics_text();
    let flags = native_events.iter().filter(|e| e.0 == "cooccur").count();
    assert!(
        text.contains(&format!(
            "tiller_policy_counter_total{{counter=\"flags\",policy=\"cooccur\"}} {flags}"
        )),
        "{text}"
    );
    let traps: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tiller_policy_traps_total{"))
        .collect();
    assert!(
        !traps.is_empty() && traps.iter().all(|l| l.ends_with(" 0")),
        "no policy call failed: {traps:?}"
    );
}
