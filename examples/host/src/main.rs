//! A minimal host that drives the runtime the way an inference server does: requests arrive and
//! leave at different times (continuous batching), each step carries prompt tokens of new requests
//! and one generated token of the others, and each request has its own steering profile.

use std::path::PathBuf;

use anyhow::Result;
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};

const D: usize = 64;
const F: usize = 1024;

fn write_dictionary(dir: &std::path::Path) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    let n = Normal::new(0.0f32, 1.0 / (D as f32).sqrt())?;
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = "model.layers.12".into();
    meta.hook_out = "model.layers.12".into();
    let w_dec = Array2::from_shape_simple_fn((F, D), || n.sample(&mut rng));
    let weights = Weights {
        apply_b_dec_to_input: true,
        ..Weights::new(
            w_dec.t().to_owned() * 1.5,
            Array1::from_elem(F, -0.05),
            w_dec,
            Array1::zeros(D),
        )
    };
    let model = tiller_runtime::dictionary::build_model(&meta, &weights)?;
    tiller_runtime::graph::write_model(
        model,
        &dir.join("res12.onnx"),
        tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD,
    )?;
    Ok(())
}

const CONFIG: &str = r#"
[runtime]
fvu_sample_rate = 0.25

[[dictionary]]
name = "res12"
path = "res12.onnx"

[[monitor]]
name = "feature-7"
dictionary = "res12"
features = [7]
threshold = 0.3
window = "request"
aggregate = "count"
count = 3
action = "flag"

[[profile]]
name = "suppress-7"
[[profile.steer]]
name = "ablate-7"
dictionary = "res12"
op = "ablate"
feature = 7

[[profile]]
name = "boost-100"
[[profile.steer]]
name = "add-100"
dictionary = "res12"
op = "add"
feature = 100
strength = 4.0
normalize = true
apply_to = "generated"
"#;

fn main() -> Result<()> {
    // Logs on stderr, filtered by RUST_LOG (default info).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let dir = PathBuf::from(
        std::env::var("TILLER_DEMO_DIR").unwrap_or_else(|_| "target/host-example".into()),
    );
    std::fs::create_dir_all(&dir)?;
    write_dictionary(&dir)?;
    std::fs::write(dir.join("tiller.toml"), CONFIG)?;
    let rt = Runtime::from_config_file(dir.join("tiller.toml"))?;

    // (request id, profile, arrival step, prompt length, tokens to generate)
    let plan: [(u64, Option<&str>, usize, usize, usize); 3] = [
        (1, Some("suppress-7"), 0, 6, 5),
        (2, Some("boost-100"), 2, 4, 4),
        (3, None, 3, 3, 3),
    ];
    let noise = Normal::new(0.0f32, 1.0)?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut generated = [0usize; 3];
    for step_no in 0.. {
        let mut tokens = Vec::new();
        for (i, &(id, profile, arrive, prompt, gen_len)) in plan.iter().enumerate() {
            if step_no == arrive {
                rt.begin_request(id, profile, None)?;
                tokens.extend(std::iter::repeat_n(
                    Token {
                        request: id,
                        phase: Phase::Prompt,
                    },
                    prompt,
                ));
            } else if step_no > arrive && generated[i] < gen_len {
                generated[i] += 1;
                tokens.push(Token {
                    request: id,
                    phase: Phase::Generated,
                });
            }
        }
        if tokens.is_empty() {
            break;
        }
        let mut hidden = Array2::from_shape_simple_fn((tokens.len(), D), || noise.sample(&mut rng));
        let before = hidden.clone();
        let mut step = rt.step(&tokens)?;
        let data = hidden
            .as_slice_mut()
            .ok_or_else(|| anyhow::anyhow!("contiguous"))?;
        step.hook("model.layers.12", ActivationsMut::F32(data))?;
        let result = step.finish();
        let moved: Vec<String> = tokens
            .iter()
            .enumerate()
            .map(|(t, k)| {
                let d = (&hidden.row(t) - &before.row(t))
                    .mapv(|v| v * v)
                    .sum()
                    .sqrt();
                format!(
                    "r{}{}:{d:.2}",
                    k.request,
                    if k.phase == Phase::Prompt { "p" } else { "g" }
                )
            })
            .collect();
        println!(
            "step {step_no:>2}: {:>2} tokens, edit norms [{}]{}",
            tokens.len(),
            moved.join(" "),
            if result.events.is_empty() {
                String::new()
            } else {
                format!(
                    ", events {:?}",
                    result.events.iter().map(|e| &e.monitor).collect::<Vec<_>>()
                )
            }
        );
        for (i, &(id, _, arrive, _, gen_len)) in plan.iter().enumerate() {
            if step_no > arrive && generated[i] == gen_len {
                generated[i] += 1;
                let s = rt.end_request(id)?;
                println!(
                    "  request {id} done: profile {:?}, {} tokens, steering {:?}, flagged {}",
                    s.profile, s.tokens, s.steering, s.flagged
                );
            }
        }
    }
    println!("\nmetrics:");
    for line in rt.metrics_text().lines().filter(|l| {
        !l.starts_with('#')
            && (l.contains("tokens_total")
                || l.contains("monitor_events")
                || l.contains("steering_tokens"))
    }) {
        println!("  {line}");
    }
    Ok(())
}
