//! WASM policies: a well-behaved guest's actions take effect; hostile guests (an endless loop,
//! unbounded memory growth, a trap, an out-of-range answer, a feature the dictionary lacks, a
//! module exporting nothing expected) are contained: the host survives, counts each failure,
//! disables the policy after repeated failures, and the other work of the batch is done exactly.
//! The guests are WAT text compiled by wasmtime, so no wasm toolchain is needed.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};
use tiller_test_support::write_dictionary;

const D: usize = 16;
const F: usize = 32;

fn setup(dir: &Path) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(7);
    let n = Normal::new(0.0f32, 0.5).unwrap();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = "h".into();
    meta.hook_out = "h".into();
    let w = Weights::new(
        Array2::from_shape_simple_fn((D, F), || n.sample(&mut rng)),
        Array1::from_elem(F, 0.05),
        Array2::from_shape_simple_fn((F, D), || n.sample(&mut rng)),
        Array1::zeros(D),
    );
    write_dictionary(&dir.join("d.onnx"), &meta, &w);
    (meta, w)
}

/// A guest whose `on_features` body is `body` (it has the params `$req $tok $gen $ptr $n`).
fn guest(body: &str) -> String {
    format!(
        r#"(module
  (import "tiller" "log" (func $log (param i32 i32 i32)))
  (import "tiller" "counter_add" (func $count (param i32 i64)))
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
  (func (export "tiller_on_features") (param $req i64) (param $tok i64) (param $gen i32) (param $ptr i32) (param $n i32) (result i64)
    {body})
  ;; An action record at 512: code, feature, value (f32 bits), string ptr, string len.
  (data (i32.const 600) "two or more"))"#
    )
}

/// Flags a token with two or more active features (and counts them).
const FLAG_TWO: &str = r#"
    (if (result i64) (i32.ge_u (local.get $n) (i32.const 2))
      (then
        (call $count (i32.const 0) (i64.const 1))
        (i32.store (i32.const 512) (i32.const 1))
        (i32.store (i32.const 516) (i32.const 0))
        (i32.store (i32.const 520) (i32.const 0))
        (i32.store (i32.const 524) (i32.const 600))
        (i32.store (i32.const 528) (i32.const 11))
        (i64.or (i64.shl (i64.const 512) (i64.const 32)) (i64.const 1)))
      (else (i64.const 0)))"#;

fn config(policy_file: &str, on_failure: &str) -> String {
    format!(
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "d.onnx"
[[profile]]
name = "p"
[[profile.steer]]
dictionary = "res"
op = "clamp"
feature = 3
value = 1.5
[[policy]]
name = "guest"
module = "{policy_file}"
dictionary = "res"
features = [1, 2, 3, 4, 5, 6, 7, 8]
fuel = 20000
memory_mb = 1
max_failures = 3
on_failure = "{on_failure}"
counters = ["flags"]
"#
    )
}

fn x(seed: u64, n: usize) -> Array2<f32> {
    let nd = Normal::new(0.0f32, 1.0).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((n, D), || nd.sample(&mut rng))
}

/// The profile's clamp, in float64: what every token of request 1 must get whatever the policy does.
fn steered(meta: &Meta, w: &Weights, x: &Array2<f32>, rows: &[usize]) -> Array2<f64> {
    let f = reference::encode(meta, w, x.view());
    let mut out = x.mapv(f64::from);
    for &t in rows {
        let c = 1.5 - f[[t, 3]];
        for j in 0..D {
            out[[t, j]] += c * f64::from(w.w_dec[[3, j]]);
        }
    }
    out
}

fn close(a: &Array2<f32>, b: &Array2<f64>) -> bool {
    a.iter()
        .zip(b)
        .all(|(p, q)| (f64::from(*p) - q).abs() < 1e-5)
}

#[test]
fn a_well_behaved_policy_flags_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, w) = setup(dir.path());
    std::fs::write(dir.path().join("flag.wat"), guest(FLAG_TWO)).unwrap();
    std::fs::write(dir.path().join("t.toml"), config("flag.wat", "open")).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    rt.begin_request(1, Some("p"), None).unwrap();
    let xs = x(1, 10);
    let mut y = xs.clone();
    let mut step = rt
        .step(
            &[Token {
                request: 1,
                phase: Phase::Generated,
            }; 10],
        )
        .unwrap();
    step.hook("h", ActivationsMut::F32(y.as_slice_mut().unwrap()))
        .unwrap();
    let r = step.finish();
    let f = reference::encode(&meta, &w, xs.view());
    let want: Vec<u64> = (0..10)
        .filter(|&t| (1..=8).filter(|&c| f[[t, c]] > 0.0).count() >= 2)
        .map(|t| t as u64)
        .collect();
    assert!(!want.is_empty());
    let got: Vec<u64> = r
        .events
        .iter()
        .filter(|e| e.action == "flag")
        .map(|e| e.token)
        .collect();
    assert_eq!(got, want);
    assert!(
        r.events
            .iter()
            .all(|e| e.reason == "two or more" && e.monitor == "guest")
    );
    assert!(close(
        &y,
        &steered(&meta, &w, &xs, &(0..10).collect::<Vec<_>>())
    ));
    let s = rt.end_request(1).unwrap();
    assert!(s.flagged);
    let text = rt.metrics_text();
    assert!(
        text.contains(&format!(
            "tiller_policy_counter_total{{counter=\"flags\",policy=\"guest\"}} {}",
            want.len()
        )),
        "{text}"
    );
}

#[test]
fn hostile_guests_are_contained() {
    let cases: [(&str, &str, &str); 5] = [
        ("loop", "(loop $l (br $l)) (i64.const 0)", "fuel"),
        (
            "grow",
            "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) unreachable",
            "memory",
        ),
        ("trap", "unreachable", "trap"),
        (
            "pointer",
            "(i64.or (i64.shl (i64.const 0xffffff00) (i64.const 32)) (i64.const 1))",
            "bad_answer",
        ),
        (
            "feature",
            r#"(i32.store (i32.const 512) (i32.const 4))
               (i32.store (i32.const 516) (i32.const 99999))
               (f32.store (i32.const 520) (f32.const 1))
               (i64.or (i64.shl (i64.const 512) (i64.const 32)) (i64.const 1))"#,
            "bad_answer",
        ),
    ];
    for (name, body, reason) in cases {
        for on_failure in ["open", "closed"] {
            let dir = tempfile::tempdir().unwrap();
            let (meta, w) = setup(dir.path());
            std::fs::write(dir.path().join("g.wat"), guest(body)).unwrap();
            std::fs::write(dir.path().join("t.toml"), config("g.wat", on_failure)).unwrap();
            let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
            rt.begin_request(1, Some("p"), None).unwrap();
            rt.begin_request(2, None, None).unwrap();
            // Two steps of 3 tokens: request 1 (profile p) and request 2 (none) interleaved.
            let tokens = [
                Token {
                    request: 1,
                    phase: Phase::Prompt,
                },
                Token {
                    request: 2,
                    phase: Phase::Prompt,
                },
                Token {
                    request: 1,
                    phase: Phase::Prompt,
                },
            ];
            let mut events = Vec::new();
            for s in 0..2 {
                let xs = x(10 + s, 3);
                let mut y = xs.clone();
                let mut step = rt.step(&tokens).unwrap();
                step.hook("h", ActivationsMut::F32(y.as_slice_mut().unwrap()))
                    .unwrap();
                let r = step.finish();
                // The batch was processed exactly, the policy's failures notwithstanding.
                assert!(
                    close(&y, &steered(&meta, &w, &xs, &[0, 2])),
                    "{name}/{on_failure}: steering was disturbed"
                );
                if on_failure == "closed" && s == 0 {
                    assert_eq!(
                        r.stop,
                        vec![1, 2],
                        "{name}: a closed policy stops the requests whose calls failed"
                    );
                }
                events.extend(r.events);
            }
            let text = rt.metrics_text();
            // Three consecutive failures disable the policy: later tokens are not sent to it.
            let line =
                format!("tiller_policy_traps_total{{policy=\"guest\",reason=\"{reason}\"}} 3");
            assert!(
                text.contains(&line),
                "{name}/{on_failure}: expected `{line}` in\n{text}"
            );
            assert!(
                text.contains("tiller_errors_total{kind=\"policy\"} 1"),
                "{name}: disabling is an error event"
            );
            assert_eq!(
                events.iter().filter(|e| e.action == "disable").count(),
                1,
                "{name}"
            );
            // The runtime keeps serving.
            rt.end_request(1).unwrap();
            rt.end_request(2).unwrap();
            rt.begin_request(3, Some("p"), None).unwrap();
            let xs = x(99, 2);
            let mut y = xs.clone();
            let mut step = rt
                .step(
                    &[Token {
                        request: 3,
                        phase: Phase::Generated,
                    }; 2],
                )
                .unwrap();
            step.hook("h", ActivationsMut::F32(y.as_slice_mut().unwrap()))
                .unwrap();
            step.finish();
            assert!(close(&y, &steered(&meta, &w, &xs, &[0, 1])));
        }
    }
}

#[test]
fn modules_that_are_not_policies_are_refused_and_reloads_keep_the_old_state() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    std::fs::write(dir.path().join("good.wat"), guest(FLAG_TWO)).unwrap();
    std::fs::write(dir.path().join("t.toml"), config("good.wat", "open")).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    let cases = [
        (
            "empty.wat",
            "(module (memory (export \"memory\") 1))",
            "tiller_policy_abi_v1",
        ),
        (
            "nocb.wat",
            "(module (memory (export \"memory\") 1) (func (export \"tiller_policy_abi_v1\")))",
            "does not export `tiller_alloc`",
        ),
        (
            "garbage.wasm",
            "\0asm garbage",
            "not a valid WebAssembly module",
        ),
    ];
    for (file, text, expect) in cases {
        std::fs::write(dir.path().join(file), text).unwrap();
        std::fs::write(dir.path().join("bad.toml"), config(file, "open")).unwrap();
        let e = Runtime::from_config_file(dir.path().join("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(expect) && e.contains("policy `guest`"),
            "{file}: {e}"
        );
        assert!(rt.reload(Some(&dir.path().join("bad.toml"))).is_err());
    }
    // Still the good policy.
    rt.begin_request(1, None, None).unwrap();
    let mut y = x(5, 8);
    let mut step = rt
        .step(
            &[Token {
                request: 1,
                phase: Phase::Prompt,
            }; 8],
        )
        .unwrap();
    step.hook("h", ActivationsMut::F32(y.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    assert!(
        rt.metrics_text()
            .contains("tiller_config_reloads_total{result=\"rejected\"} 3")
    );
}
