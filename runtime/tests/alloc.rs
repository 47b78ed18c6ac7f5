//! A steady-state step on the CPU path allocates nothing: after warm-up, opening a step, calling the
//! hook (sliced native encode, monitors, four steering rules, metrics) and closing it makes no heap
//! allocation on the calling thread. Counted with a global allocator wrapper.
#![allow(clippy::unwrap_used)]

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::counted;
use tiller_test_support::write_dictionary;

#[test]
fn steady_state_steps_allocate_nothing() {
    let (d, f) = (256, 4096);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let n = Normal::new(0.0f32, 0.1).unwrap();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, d, f, d);
    meta.hook_in = "h".into();
    meta.hook_out = "h".into();
    let w = Weights {
        apply_b_dec_to_input: true,
        ..Weights::new(
            Array2::from_shape_simple_fn((d, f), || n.sample(&mut rng)),
            Array1::zeros(f),
            Array2::from_shape_simple_fn((f, d), || n.sample(&mut rng)),
            Array1::zeros(d),
        )
    };
    write_dictionary(&dir.path().join("d.onnx"), &meta, &w);
    let features: Vec<String> = (0..64).map(|i| (i * 61).to_string()).collect();
    std::fs::write(
        dir.path().join("t.toml"),
        format!(
            r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "d.onnx"
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
feature = 61
value = 1.0
[[profile.steer]]
dictionary = "res"
op = "add"
feature = 122
strength = 0.5
[[profile.steer]]
dictionary = "res"
op = "scale"
feature = 183
factor = 0.5
[[profile.steer]]
dictionary = "res"
op = "cap"
feature = 244
value = 0.1
"#,
            features.join(", ")
        ),
    )
    .unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    rt.begin_request(1, Some("p"), None).unwrap();
    rt.begin_request(2, None, None).unwrap();
    let xs: Vec<Vec<f32>> = (0..8)
        .map(|s| {
            (0..8 * d)
                .map(|i| ((i * 7 + s * 13) % 17) as f32 / 17.0 - 0.5)
                .collect()
        })
        .collect();
    let tokens = |batch: usize| -> Vec<Token> {
        let two = [
            Token {
                request: 1,
                phase: Phase::Generated,
            },
            Token {
                request: 2,
                phase: Phase::Generated,
            },
        ];
        two.iter().cycle().take(batch).copied().collect()
    };
    let (tokens8, tokens1) = (tokens(8), tokens(1));
    // Warm-up at the largest batch, so that every buffer has its capacity.
    for x in xs.iter().take(3) {
        let mut x = x.clone();
        let mut step = rt.step(&tokens8).unwrap();
        step.hook("h", ActivationsMut::F32(&mut x)).unwrap();
        step.finish();
    }
    let mut bufs: Vec<Vec<f32>> = xs.clone();
    let mut events = 0;
    let ((), allocations) = counted(|| {
        for buf in bufs.iter_mut() {
            for tokens in [&tokens8[..], &tokens1[..]] {
                let mut step = rt.step(tokens).unwrap();
                step.hook("h", ActivationsMut::F32(&mut buf[..tokens.len() * d]))
                    .unwrap();
                events += step.finish().events.len();
            }
        }
    });
    assert_eq!(
        allocations, 0,
        "steady-state steps allocated {allocations} times"
    );
    assert_eq!(events, 0);
    // The steps did real work: request 1's activations were steered.
    assert_ne!(bufs[0], xs[0]);
    let s = rt.end_request(1).unwrap();
    assert!(s.steering.values().sum::<u64>() > 0);
}
