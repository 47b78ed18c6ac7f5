//! What the FVU and L0 gauges cost the hook: per-call p50 and p99 of a whole step (open, hook,
//! close) at batch 1 and 512, with the default sampling (`fvu_sample_rate = 0.01`) and without,
//! on the 2304 × 16384 ReLU SAE with 64 monitored features and 4 rules (the hook benchmark's
//! dictionary). The two runtimes alternate in rounds so that the machine's drift hits both alike.
//! Prints a Markdown table and the target: p99 with sampling at most 1.1 × p99 without.
//!
//! `cargo run --release -p tiller-benches --bin fvu_cost [-- --quick]`

use std::time::Instant;

use anyhow::{Context, Result};
use tiller_benches::dicts;
use tiller_runtime::{ActivationsMut, Phase, Runtime, Token};

const D: usize = 2304;
const F: usize = 16384;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn counter(text: &str, result: &str) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with("tiller_fvu_samples_total{")
                && l.contains(&format!("result=\"{result}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = tempfile_dir()?;
    let path = dicts::relu_sae(D, F).context("dictionary")?;
    let features = dicts::monitored_features(F, 64);
    let off = dicts::hook_config(&path, &features, &dicts::four_rules(&features), None);
    assert!(off.contains("fvu_sample_rate = 0.0"));
    let on = off.replace("fvu_sample_rate = 0.0", "fvu_sample_rate = 0.01");
    let runtimes = [("off", &off), ("0.01", &on)].map(|(name, cfg)| {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, cfg).expect("config");
        let rt = Runtime::from_config_file(&file).expect("runtime");
        rt.begin_request(1, Some("p"), None).expect("request");
        (name, rt)
    });
    println!(
        "| batch | sampling | calls | p50 µs | p99 µs | tokens measured | tokens dropped |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut verdicts = Vec::new();
    for (batch, calls, rounds) in [(1usize, 4000usize, 6usize), (512, 40, 6)] {
        let (calls, rounds) = if quick {
            (calls / 4, rounds / 2)
        } else {
            (calls, rounds)
        };
        let tokens = vec![
            Token {
                request: 1,
                phase: Phase::Generated
            };
            batch
        ];
        // Fresh activations each call, copied in outside the timed part.
        let pool: Vec<Vec<f32>> = (0..8)
            .map(|s| {
                tiller_benches::random_activations(batch, D, 100 + s)
                    .into_raw_vec_and_offset()
                    .0
            })
            .collect();
        let mut buf = pool[0].clone();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
        let before: Vec<(f64, f64)> = runtimes
            .iter()
            .map(|(_, rt)| {
                rt.wait_for_fvu();
                let t = rt.metrics_text();
                (counter(&t, "measured"), counter(&t, "dropped"))
            })
            .collect();
        for round in 0..rounds {
            for (k, (_, rt)) in runtimes.iter().enumerate() {
                // Warm-up calls first in each round, untimed.
                for i in 0..calls / 10 + 1 {
                    buf.copy_from_slice(&pool[i % pool.len()]);
                    let mut step = rt.step(&tokens)?;
                    step.hook("h", ActivationsMut::F32(&mut buf))?;
                    step.finish();
                }
                for i in 0..calls {
                    buf.copy_from_slice(&pool[(i + round) % pool.len()]);
                    let t0 = Instant::now();
                    let mut step = rt.step(&tokens)?;
                    step.hook("h", ActivationsMut::F32(&mut buf))?;
                    step.finish();
                    times[k].push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        let mut p99 = [0.0; 2];
        for (k, (name, rt)) in runtimes.iter().enumerate() {
            rt.wait_for_fvu();
            let t = rt.metrics_text();
            let (m, d) = (
                counter(&t, "measured") - before[k].0,
                counter(&t, "dropped") - before[k].1,
            );
            let v = &mut times[k];
            v.sort_by(f64::total_cmp);
            p99[k] = percentile(v, 0.99);
            println!(
                "| {batch} | {name} | {} | {:.2} | {:.2} | {m} | {d} |",
                v.len(),
                percentile(v, 0.5),
                p99[k]
            );
        }
        verdicts.push((batch, p99[1] / p99[0]));
    }
    println!();
    for (batch, ratio) in verdicts {
        println!(
            "batch {batch}: p99 with sampling ÷ without = {ratio:.3} (target ≤ 1.1: {})",
            if ratio <= 1.1 { "PASS" } else { "FAIL" }
        );
    }
    Ok(())
}

/// A private folder for the two configs.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("tiller-fvu-cost-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
