//! The Rust side's measurements: timing loops (warm and cold), the machine's limits, the hook
//! and the full encode, written out as JSON lines.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use ndarray::{Array2, s};
use serde_json::json;
use tiller_benches::{dicts, machine};
use tiller_runtime::dictionary::WeightDtype;
use tiller_runtime::{ActivationsMut, Backend, Dictionary, Phase, Runtime, SessionOptions, Token};

use super::prepare::{BATCHES, CACHE_BYTES, D, F, GEMM_N, N_FEATURES};
use super::prepare::{dict_path, work_dir};

/// Median and minimum over `rounds` rounds of the µs per call of `call(state, i)`, `i` in
/// `0..calls`, with `before(state)` run ahead of each round outside the timed part; one warm-up
/// round first.
fn time_rounds<S>(
    state: &mut S,
    rounds: usize,
    calls: usize,
    mut before: impl FnMut(&mut S),
    mut call: impl FnMut(&mut S, usize) -> Result<()>,
) -> Result<(f64, f64)> {
    let mut per = Vec::with_capacity(rounds);
    for r in 0..=rounds {
        before(state);
        let t = Instant::now();
        for i in 0..calls {
            call(state, i)?;
        }
        if r > 0 {
            per.push(t.elapsed().as_secs_f64() * 1e6 / calls as f64);
        }
    }
    per.sort_by(f64::total_cmp);
    Ok((per[per.len() / 2], per[0]))
}

/// Bytes written between two cold calls: twice a 32 MiB last-level cache.
const EVICT_BYTES: usize = 64 << 20;

/// Median and minimum over `rounds` rounds of the µs per call of `call(state)`, `calls` calls a
/// round, each timed alone after `evict` has been rewritten and `before(state)` has run (both outside
/// the timed part), so that no call finds the previous one's weights in cache, as in a server where
/// the model's own weights pass through the caches between two hook calls. One warm-up round first.
fn time_cold<S>(
    state: &mut S,
    rounds: usize,
    calls: usize,
    evict: &mut [u8],
    mut before: impl FnMut(&mut S),
    mut call: impl FnMut(&mut S) -> Result<()>,
) -> Result<(f64, f64)> {
    let mut per = Vec::with_capacity(rounds);
    for r in 0..=rounds {
        let mut total = 0.0;
        for _ in 0..calls {
            rewrite(evict);
            before(state);
            let t = Instant::now();
            call(state)?;
            total += t.elapsed().as_secs_f64();
        }
        if r > 0 {
            per.push(total * 1e6 / calls as f64);
        }
    }
    per.sort_by(f64::total_cmp);
    Ok((per[per.len() / 2], per[0]))
}

/// Rewrites `buf` (`EVICT_BYTES`), pushing what the caches held out of them.
pub(crate) fn rewrite(buf: &mut [u8]) {
    buf.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    std::hint::black_box(buf);
}

/// One measurement as a JSON line.
fn emit(workload: &str, imp: &str, batch: usize, (us, min): (f64, f64), rounds: usize) {
    println!(
        "{}",
        json!({"kind": "time", "workload": workload, "impl": imp, "batch": batch,
               "us": us, "min_us": min, "rounds": rounds})
    );
}

pub(crate) fn limit(name: &str, value: f64, by: &str) {
    println!(
        "{}",
        json!({"kind": "limit", "name": name, "value": value, "by": by})
    );
}

/// Hook calls at `batch` on fresh copies of the inputs (made before each round, outside the
/// timed part; the edits would otherwise accumulate), each a whole step: open, hook, close.
fn time_hook(
    rt: &Runtime,
    x: &Array2<f32>,
    batch: usize,
    rounds: usize,
    calls: usize,
    with_hook: bool,
) -> Result<(f64, f64)> {
    let n = batch * D;
    let src = x
        .slice(s![..batch, ..])
        .as_standard_layout()
        .iter()
        .copied()
        .collect::<Vec<f32>>();
    let tokens = vec![
        Token {
            request: 1,
            phase: Phase::Generated
        };
        batch
    ];
    let mut bufs = vec![0f32; calls * n];
    time_rounds(
        &mut bufs,
        rounds,
        calls,
        |b| {
            for c in b.chunks_exact_mut(n) {
                c.copy_from_slice(&src);
            }
        },
        |b, i| {
            let mut step = rt.step(&tokens)?;
            if with_hook {
                step.hook("h", ActivationsMut::F32(&mut b[i * n..(i + 1) * n]))?;
            }
            std::hint::black_box(step.finish());
            Ok(())
        },
    )
}

/// The Rust side: the machine's limits, the hook through the Rust API (and its parts), the full
/// encode.
pub(crate) fn rust(quick: bool) -> Result<()> {
    let dir = work_dir();
    let x: Array2<f32> = ndarray_npy::read_npy(dir.join("x.npy"))
        .with_context(|| format!("reading {}: run `compare prepare` first", dir.display()))?;
    let r = |normal: usize, q: usize| if quick { q } else { normal };

    eprintln!("machine: STREAM copy, read, dense product (one thread)");
    limit(
        "copy_gbps",
        machine::stream_copy_gbps(r(10, 4)),
        "Rust, copy_from_slice, 2 x 256 MiB",
    );
    let (read_gbps, streams) = machine::stream_read_best(r(10, 4));
    limit(
        "read_gbps",
        read_gbps,
        "Rust, sums over 256 MiB, 1 to 8 streams",
    );
    limit(
        "cache_read_gbps",
        machine::cache_read_gbps(CACHE_BYTES, r(10, 4)),
        "Rust, sums over 512 KiB",
    );
    // The cache the report judges the sliced weights against is this machine's, recorded with
    // its figures so that a report made elsewhere judges them by the machine that measured.
    if let Some(l2) = cache_size(2) {
        limit("l2_bytes", l2, "sysfs, cpu0, level-2 data cache");
    }
    limit(
        "dense_gflops",
        machine::dense_gflops(GEMM_N, r(6, 3)),
        "Rust, matrixmultiply sgemm 1024^3",
    );

    let rounds = r(41, 7);
    for (config, imp) in [
        ("tiller.toml", "tiller_rust"),
        ("tiller-norules.toml", "part_norules"),
    ] {
        eprintln!("hook through the Rust API: {config}");
        let rt = Runtime::from_config_file(dir.join(config))?;
        rt.begin_request(1, Some("p"), None)?;
        for batch in BATCHES {
            let calls = if batch == 1 { r(2000, 300) } else { r(50, 20) };
            let t = time_hook(&rt, &x, batch, rounds, calls, true)?;
            emit(&format!("sliced_b{batch}"), imp, batch, t, rounds);
            if imp == "tiller_rust" {
                let t = time_hook(&rt, &x, batch, rounds, calls, false)?;
                emit(&format!("sliced_b{batch}"), "part_step", batch, t, rounds);
                // The same calls with the caches flushed before each, as between two decode steps
                // of a real model: the 0.6 MB of sliced weights then come from memory.
                let tokens = vec![
                    Token {
                        request: 1,
                        phase: Phase::Generated
                    };
                    batch
                ];
                let src = x
                    .slice(s![..batch, ..])
                    .iter()
                    .copied()
                    .collect::<Vec<f32>>();
                let mut evict = vec![0u8; EVICT_BYTES];
                let cold_rounds = r(11, 3);
                let t = time_cold(
                    &mut src.clone(),
                    cold_rounds,
                    r(40, 10),
                    &mut evict,
                    |buf| buf.copy_from_slice(&src),
                    |buf| {
                        let mut step = rt.step(&tokens)?;
                        step.hook("h", ActivationsMut::F32(buf))?;
                        std::hint::black_box(step.finish());
                        Ok(())
                    },
                )?;
                emit(
                    &format!("sliced_b{batch}"),
                    "part_cold",
                    batch,
                    t,
                    cold_rounds,
                );
            }
        }
        rt.end_request(1)?;
    }

    // The metrics' share (`MetricsLoad`: as the runtime updates them, every feature counted
    // active, an upper bound; with these weights about half are).
    let metrics = tiller_runtime::metrics::Metrics::new("tiller", &Default::default())?;
    let mut load =
        tiller_benches::MetricsLoad::new(&metrics, &dicts::monitored_features(F, N_FEATURES));
    for batch in BATCHES {
        let calls = if batch == 1 { r(2000, 300) } else { r(200, 50) };
        let t = time_rounds(
            &mut load,
            rounds,
            calls,
            |_| {},
            |load, _| {
                load.call(batch);
                Ok(())
            },
        )?;
        emit(
            &format!("sliced_b{batch}"),
            "part_metrics",
            batch,
            t,
            rounds,
        );
    }

    eprintln!("ONNX Runtime through the Rust API on the 64-feature graph (encode only)");
    let sliced = Dictionary::load(
        dir.join("sliced-dictionary.onnx"),
        &SessionOptions::default(),
    )?;
    for batch in BATCHES {
        let xb = x.slice(s![..batch, ..]);
        let calls = if batch == 1 { r(2000, 300) } else { r(50, 20) };
        let t = time_rounds(
            &mut (),
            rounds,
            calls,
            |_| {},
            |_, _| {
                std::hint::black_box(sliced.encode(xb)?);
                Ok(())
            },
        )?;
        emit(
            &format!("sliced_b{batch}"),
            "part_ort_rust",
            batch,
            t,
            rounds,
        );
    }
    drop(sliced);

    // The full encode as the runtime's hooks run it: natively, `W_enc` read at its stored width.
    let native = SessionOptions {
        native: true,
        ..SessionOptions::default()
    };
    let x1 = x.slice(s![..1, ..]);
    let mut acts = Array2::<f32>::zeros((1, F));
    let mut evict = vec![0u8; EVICT_BYTES];
    let rounds = r(21, 5);
    let calls = r(8, 3);
    for dtype in [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16] {
        eprintln!("full encode through the Rust API ({dtype} weights)");
        let dict = Dictionary::load(dict_path(dtype)?, &native)?;
        if dict.backend() != Backend::Native(dtype) {
            bail!(
                "the {dtype} dictionary runs on {:?}, not natively",
                dict.backend()
            );
        }
        let t = time_cold(
            &mut acts,
            rounds,
            calls,
            &mut evict,
            |_| {},
            |acts| {
                dict.encode_into(x1, acts.view_mut())?;
                Ok(())
            },
        )?;
        emit(&format!("full_{dtype}_b1"), "tiller_rust", 1, t, rounds);
        if dtype == WeightDtype::F32 {
            // The memory's read speed measured as the f32 encode was, right after it: as many
            // bytes as its weights, read with the streams that read fastest above, each pass after
            // the same rewrite of the caches (whose write-back shares the memory with the reads),
            // the median round. The bandwidth target compares the two medians, taken moments
            // apart under the same load from the machine's neighbours. (A pass before each encode
            // call instead slowed the encode by 15%.)
            let same_bytes = vec![1f32; D * F];
            let (us, _) = time_cold(
                &mut (),
                rounds,
                calls,
                &mut evict,
                |_| {},
                |_| {
                    machine::read_pass(&same_bytes, streams);
                    Ok(())
                },
            )?;
            let bytes = size_of_val(same_bytes.as_slice()) as f64;
            limit(
                "paired_read_gbps",
                bytes / (us * 1e-6) / 1e9,
                &format!(
                    "Rust, a {streams}-stream sum over {:.0} MB timed as the f32 full encode is, right after it, median",
                    bytes / 1e6
                ),
            );
        }
    }
    eprintln!("full encode through ONNX Runtime (Rust API, f32 weights)");
    let dict = Dictionary::load(dict_path(WeightDtype::F32)?, &SessionOptions::default())?;
    let t = time_cold(
        &mut acts,
        rounds,
        calls,
        &mut evict,
        |_| {},
        |acts| {
            dict.encode_into(x1, acts.view_mut())?;
            Ok(())
        },
    )?;
    emit("full_f32_b1", "part_ort_rust", 1, t, rounds);
    Ok(())
}

/// The size in bytes of this machine's level-`level` data cache (per core), from sysfs.
pub(crate) fn cache_size(level: u32) -> Option<f64> {
    (0..8).find_map(|i| {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        if read("level")?.trim() != level.to_string() || read("type")?.trim() == "Instruction" {
            return None;
        }
        let size = read("size")?;
        let size = size.trim();
        let (num, mult) = match size.strip_suffix('K') {
            Some(n) => (n, 1024.0),
            None => match size.strip_suffix('M') {
                Some(n) => (n, 1024.0 * 1024.0),
                None => (size, 1.0),
            },
        };
        num.parse::<f64>().ok().map(|n| n * mult)
    })
}

pub(crate) fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
