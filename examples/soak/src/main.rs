//! Soak test: `--threads` threads drive continuous-batching steps (requests arriving and leaving,
//! prompt and generated tokens, a mix of steering profiles) through one shared runtime for
//! `--seconds`, while another thread reloads the config every `--reload-ms` milliseconds,
//! alternating a good file and a broken one, and a hostile policy traps on every fifth request.
//!
//! Every step is checked against a single-threaded reference: each worker replays the same step
//! on its own runtime (built from the same good config, never reloaded, used by that worker alone)
//! and compares the edited activations and the monitor events. Resident memory is sampled four
//! times a second. At the end it prints a table and exits non-zero on a mismatch, a failed step, or
//! resident memory that still grows with the work after warm-up (see [`rss`]: the slope of a line
//! fitted over the second half of the run, over `--rss-limit` bytes per step); a run too short to
//! tell says so and is not judged. `--leak-bytes-per-step` makes every step leak that much, to
//! show that the check catches a leak.
//!
//! ```text
//! cargo run --release -p soak -- --seconds 1800          # the long run
//! cargo run -p soak -- --seconds 10                      # what CI runs
//! cargo run -p soak -- --seconds 10 --leak-bytes-per-step 2048   # must fail
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ndarray::{Array1, Array2};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};

mod rss;

const HOOK: &str = "model.layers.12";
const PROFILES: [Option<&str>; 4] = [None, Some("ablate"), Some("clamp"), Some("boost")];

#[derive(Parser)]
#[command(about = "Soak the runtime: concurrent steps, config reloads, a trapping policy")]
struct Cli {
    /// How long to run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Milliseconds between reloads.
    #[arg(long, default_value_t = 300)]
    reload_ms: u64,
    /// Residual-stream width.
    #[arg(long, default_value_t = 256)]
    d: usize,
    /// Dictionary features.
    #[arg(long, default_value_t = 2048)]
    features: usize,
    /// Where the dictionary and configs are written.
    #[arg(long, default_value = "target/soak")]
    dir: PathBuf,
    /// Most resident bytes per step that memory may grow by after warm-up.
    #[arg(long, default_value_t = 256.0)]
    rss_limit: f64,
    /// Fitted growth after warm-up, in MiB, that the allocator's swings alone may draw.
    #[arg(long, default_value_t = rss::ALLOWANCE / 1048576.0)]
    rss_allowance_mib: f64,
    /// Leak this many bytes on every step (a check of the memory check: the run must fail).
    #[arg(long, default_value_t = 0)]
    leak_bytes_per_step: usize,
    /// Write the resident-memory samples here (CSV: seconds, steps, KiB).
    #[arg(long)]
    rss_csv: Option<PathBuf>,
}

fn write_dictionary(path: &Path, d: usize, f: usize) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let n = Normal::new(0.0f32, 1.0 / (d as f32).sqrt())?;
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, d, f, d);
    meta.hook_in = HOOK.into();
    meta.hook_out = HOOK.into();
    let w_dec = Array2::from_shape_simple_fn((f, d), || n.sample(&mut rng));
    let weights = Weights::new(
        w_dec.t().to_owned(),
        Array1::from_elem(f, -0.2),
        w_dec,
        Array1::zeros(d),
    );
    let model = tiller_runtime::dictionary::build_model(&meta, &weights)?;
    tiller_runtime::graph::write_model(
        model,
        path,
        tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD,
    )?;
    Ok(())
}

/// Traps in `tiller_on_features` for every request whose id is a multiple of 5; otherwise no action.
const HOSTILE_POLICY: &str = r#"(module
  (memory (export "memory") 1)
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
    (if (i64.eqz (i64.rem_u (local.get $req) (i64.const 5))) (then unreachable))
    (i64.const 0)))"#;

const GOOD: &str = r#"
[runtime]
fvu_sample_rate = 0.1

[[dictionary]]
name = "res12"
path = "res12.onnx"

[[monitor]]
name = "hot-7"
dictionary = "res12"
features = [7, 8, 9]
threshold = 0.4
window = "token"
action = "flag"

[[monitor]]
name = "busy-request"
dictionary = "res12"
features = [3]
threshold = 0.2
window = "request"
aggregate = "count"
count = 4
action = "flag"

[[profile]]
name = "ablate"
[[profile.steer]]
name = "ablate-3"
dictionary = "res12"
op = "ablate"
feature = 3

[[profile]]
name = "clamp"
[[profile.steer]]
name = "clamp-5"
dictionary = "res12"
op = "clamp"
feature = 5
value = 1.0

[[profile]]
name = "boost"
[[profile.steer]]
name = "add-11"
dictionary = "res12"
op = "add"
feature = 11
strength = 2.0
normalize = true
apply_to = "generated"

[[policy]]
name = "hostile"
module = "hostile.wat"
dictionary = "res12"
features = [3, 5, 7, 11]
fuel = 100000
on_failure = "open"
max_failures = 1000000000
"#;

const BROKEN: &str = "[[dictionary]]\nname = \"res12\"\npath = \"missing.onnx\"\n";

/// The activations of one token: a function of the request and the token's index only.
fn token_row(request: u64, index: u64, d: usize, out: &mut [f32]) {
    let mut rng = StdRng::seed_from_u64(request.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
    for v in out.iter_mut().take(d) {
        *v = rng.random::<f32>() * 2.0 - 1.0;
    }
}

#[derive(Default)]
struct Counts {
    steps: AtomicU64,
    tokens: AtomicU64,
    requests: AtomicU64,
    mismatches: AtomicU64,
    failed: AtomicU64,
}

struct Live {
    id: u64,
    prompt: usize,
    generate: usize,
    done: usize,
}

fn monitor_events(r: &tiller_runtime::StepResult) -> BTreeSet<(String, u64, u64)> {
    r.events
        .iter()
        .filter(|e| e.monitor != "hostile")
        .map(|e| (e.monitor.clone(), e.request, e.token))
        .collect()
}

fn worker(
    t: usize,
    shared: &Runtime,
    reference: &Runtime,
    d: usize,
    leak: usize,
    stop: &AtomicBool,
    counts: &Counts,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1000 + t as u64);
    let mut live: Vec<Live> = Vec::new();
    let mut next = 1u64;
    let mut a: Vec<f32> = Vec::new();
    let mut b: Vec<f32> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // Arrivals: keep 1..6 requests in flight.
        while live.len() < 1 + rng.random_range(0..6usize) {
            let id = (t as u64 + 1) * 1_000_000_000 + next;
            next += 1;
            let profile = PROFILES[rng.random_range(0..PROFILES.len())];
            shared.begin_request(id, profile, None)?;
            reference.begin_request(id, profile, None)?;
            live.push(Live {
                id,
                prompt: rng.random_range(1..12),
                generate: rng.random_range(1..12),
                done: 0,
            });
            counts.requests.fetch_add(1, Ordering::Relaxed);
        }
        // One step: the whole prompt of new requests, one token of the others.
        let mut tokens = Vec::new();
        let mut index = Vec::new();
        for r in &mut live {
            let n = if r.done == 0 { r.prompt } else { 1 };
            let phase = if r.done == 0 {
                Phase::Prompt
            } else {
                Phase::Generated
            };
            for i in 0..n {
                tokens.push(Token {
                    request: r.id,
                    phase,
                });
                index.push((r.id, (r.done + i) as u64));
            }
            r.done += n;
        }
        a.resize(tokens.len() * d, 0.0);
        for (row, &(req, i)) in a.chunks_mut(d).zip(&index) {
            token_row(req, i, d, row);
        }
        b.clone_from(&a);
        let got = shared.step(&tokens).and_then(|mut s| {
            s.hook(HOOK, ActivationsMut::F32(&mut a))?;
            Ok(s.finish())
        });
        let want = reference.step(&tokens).and_then(|mut s| {
            s.hook(HOOK, ActivationsMut::F32(&mut b))?;
            Ok(s.finish())
        });
        match (got, want) {
            (Ok(g), Ok(w)) => {
                let (mut num, mut den) = (0f64, 0f64);
                for (x, y) in a.iter().zip(&b) {
                    num += f64::from(x - y).powi(2);
                    den += f64::from(*y).powi(2);
                }
                if num.sqrt() > 1e-6 * den.sqrt().max(1e-30)
                    || monitor_events(&g) != monitor_events(&w)
                {
                    counts.mismatches.fetch_add(1, Ordering::Relaxed);
                }
            }
            (g, w) => {
                eprintln!("thread {t}: failed step: {:?} / {:?}", g.err(), w.err());
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if leak > 0 {
            // Filled with a non-zero byte so that every page is touched and counts as resident.
            std::hint::black_box(Box::leak(vec![0xA5u8; leak].into_boxed_slice()));
        }
        counts.steps.fetch_add(1, Ordering::Relaxed);
        counts
            .tokens
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        // Departures.
        live.retain(|r| {
            if r.done >= r.prompt + r.generate {
                let _ = shared.end_request(r.id);
                let _ = reference.end_request(r.id);
                false
            } else {
                true
            }
        });
    }
    for r in live {
        shared.end_request(r.id)?;
        reference.end_request(r.id)?;
    }
    Ok(())
}

fn metric_sum(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn main() -> Result<()> {
    // Logs on stderr, filtered by RUST_LOG (default info).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    write_dictionary(&cli.dir.join("res12.onnx"), cli.d, cli.features)?;
    std::fs::write(cli.dir.join("hostile.wat"), HOSTILE_POLICY)?;
    let good = cli.dir.join("good.toml");
    std::fs::write(&good, GOOD)?;
    let live_config = cli.dir.join("tiller.toml");
    std::fs::write(&live_config, GOOD)?;
    let shared = Arc::new(Runtime::from_config_file(&live_config)?);
    let references: Vec<Runtime> = (0..cli.threads)
        .map(|_| Runtime::from_config_file(&good))
        .collect::<tiller_runtime::Result<_>>()?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let (mut accepted, mut rejected) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(cli.seconds);
    let mut samples: Vec<rss::Sample> = Vec::new();
    let mut sample = |counts: &Counts| -> Result<()> {
        let kib = rss::rss_kib().context("reading resident memory from /proc/self/statm")?;
        samples.push(rss::Sample {
            secs: start.elapsed().as_secs_f64(),
            steps: counts.steps.load(Ordering::Relaxed),
            kib,
        });
        Ok(())
    };
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for (t, reference) in references.iter().enumerate() {
            let (shared, stop, counts) = (&shared, &stop, &counts);
            let (d, leak) = (cli.d, cli.leak_bytes_per_step);
            handles.push(s.spawn(move || worker(t, shared, reference, d, leak, stop, counts)));
        }
        let mut broken_next = true;
        let mut last_reload = Instant::now();
        let mut last_sample = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            if last_reload.elapsed() >= Duration::from_millis(cli.reload_ms) {
                last_reload = Instant::now();
                std::fs::write(&live_config, if broken_next { BROKEN } else { GOOD })?;
                match shared.reload(None) {
                    Ok(()) => accepted += 1,
                    Err(_) => rejected += 1,
                }
                broken_next = !broken_next;
            }
            if last_sample.elapsed() >= Duration::from_millis(250) {
                last_sample = Instant::now();
                sample(&counts)?;
            }
        }
        // The last sample while the workers still run, so that the judged window is all work.
        sample(&counts)?;
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        Ok(())
    })?;
    if let Some(path) = &cli.rss_csv {
        let mut csv = String::from("seconds,steps,rss_kib\n");
        for s in &samples {
            csv.push_str(&format!("{:.3},{},{}\n", s.secs, s.steps, s.kib));
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    let judgement = rss::judge(&samples, cli.rss_limit, cli.rss_allowance_mib * 1048576.0);
    let kib_at = |secs: f64| samples.iter().find(|s| s.secs >= secs).map_or(0, |s| s.kib);
    let rss_first = samples.first().map_or(0, |s| s.kib);
    let rss_warm = kib_at(judgement.from_secs);
    let rss_end = samples.last().map_or(0, |s| s.kib);
    let rss_peak = samples.iter().map(|s| s.kib).max().unwrap_or(0);
    let metrics = shared.metrics_text();
    let traps = metric_sum(&metrics, "tiller_policy_traps_total", "policy=\"hostile\"");
    let secs = start.elapsed().as_secs_f64();
    let c = &counts;
    println!(
        "| seconds | threads | steps | tokens | requests | reloads accepted | reloads rejected | policy traps | mismatches | failed steps | RSS first | RSS at half | RSS end | RSS peak | growth after half |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    println!(
        "| {secs:.0} | {} | {} | {} | {} | {accepted} | {rejected} | {traps} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:+.1} B/step |",
        cli.threads,
        c.steps.load(Ordering::Relaxed),
        c.tokens.load(Ordering::Relaxed),
        c.requests.load(Ordering::Relaxed),
        c.mismatches.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
        rss_first as f64 / 1024.0,
        rss_warm as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        judgement.bytes_per_step,
    );
    let j = &judgement;
    match &j.verdict {
        rss::Verdict::TooShort(why) => {
            println!("resident memory NOT JUDGED: {why}; a longer run is judged")
        }
        v => println!(
            "resident memory after warm-up ({:.1} s on, {} samples, {} steps): {:+.1} bytes per step fitted; \
             this run catches leaks of {:.0} bytes per step or more: {}",
            j.from_secs,
            j.samples,
            j.steps,
            j.bytes_per_step,
            j.smallest_caught,
            if *v == rss::Verdict::Grows {
                "GROWS"
            } else {
                "holds"
            }
        ),
    }
    if c.mismatches.load(Ordering::Relaxed) > 0 || c.failed.load(Ordering::Relaxed) > 0 {
        bail!("mismatches or failed steps");
    }
    if accepted == 0 || rejected == 0 || traps == 0 {
        bail!(
            "the run did not exercise reloads and traps (accepted {accepted}, rejected {rejected}, traps {traps})"
        );
    }
    if judgement.verdict == rss::Verdict::Grows {
        bail!(
            "resident memory grows with the work after warm-up: {:+.1} bytes per step (limit {:.0}, allowance {} MiB)",
            judgement.bytes_per_step,
            cli.rss_limit,
            cli.rss_allowance_mib
        );
    }
    Ok(())
}
