//! The engine of `benches/compare`: Tiller side by side with what a server would run without it,
//! on one dictionary and one set of inputs, next to the machine's own limits.
//!
//! ```text
//! compare prepare           the dictionary (cached) and the files the C and Python runs read
//! compare rust [--quick]    Rust measurements and the machine's limits, as JSON lines on stdout
//! compare report FILE...    merges the JSON lines of every run into a table, a chart, PASS/FAIL
//! ```
//!
//! Everything runs on one thread. The workload is the hook of `benches/benches/hook.rs`: a
//! d_in 2304 × 16384-feature ReLU SAE, 64 monitored features, 4 steering rules (clamp, add, scale,
//! ablate), plus a full encode of the same dictionary. Files live in
//! `target/bench-dicts/compare-2304x16384/`; the report goes to `--out` (`target/bench-report`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array1, Array2, Axis, s};
use serde_json::{Value, json};
use tiller_benches::{dicts, machine};
use tiller_runtime::dictionary::WeightDtype;
use tiller_runtime::{
    ActivationsMut, Backend, Dictionary, DictionaryFile, Phase, Runtime, SessionOptions, Token,
};

const D: usize = 2304;
const F: usize = 16384;
const N_FEATURES: usize = 64;
const MAX_BATCH: usize = 64;
const BATCHES: [usize; 2] = [1, 64];
/// Bumped whenever `compare prepare` writes something different, so that older files are rewritten.
const PREPARED_VERSION: u32 = 1;
/// The size of the dense products that measure the machine's FLOP/s.
const GEMM_N: usize = 1024;
/// The buffer the cache bandwidth is measured on: the L2 of most cores holds it.
const CACHE_BYTES: usize = 512 << 10;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    match args.first().map(String::as_str) {
        Some("prepare") => prepare(),
        Some("rust") => rust(quick),
        Some("report") => {
            let out = args
                .windows(2)
                .find(|w| w[0] == "--out")
                .map(|w| PathBuf::from(&w[1]))
                .ok_or_else(|| anyhow!("report needs --out DIR"))?;
            let files: Vec<PathBuf> = args[1..]
                .iter()
                .filter(|a| a.ends_with(".jsonl"))
                .map(PathBuf::from)
                .collect();
            report(&files, &out)
        }
        _ => bail!(
            "usage: compare prepare | compare rust [--quick] | compare report RESULTS.jsonl... --out DIR\n\
             (run through benches/compare, which builds, prepares and runs everything)"
        ),
    }
}

/// The folder of the comparison's files.
fn work_dir() -> PathBuf {
    dicts::dir().join(format!("compare-{D}x{F}"))
}

fn npy<A, D2>(dir: &Path, name: &str, a: &ndarray::ArrayBase<A, D2>) -> Result<()>
where
    A: ndarray::Data<Elem = f32>,
    D2: ndarray::Dimension,
{
    let path = dir.join(name);
    ndarray_npy::write_npy(&path, a).with_context(|| format!("writing {}", path.display()))
}

/// The benchmark dictionary with `W_enc` and `W_dec` stored as `dtype` (f32: the cached one; f16
/// and bf16: written from it by `compare prepare`).
fn dict_path(dtype: WeightDtype) -> Result<PathBuf> {
    Ok(match dtype {
        WeightDtype::F32 => dicts::relu_sae(D, F)?,
        _ => work_dir().join(format!("sae-{dtype}.onnx")),
    })
}

/// When `path` was last written, in seconds since the epoch (0 when unknown).
fn modified(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Writes everything the three runs share: the configs, the graphs ONNX Runtime's Python API runs
/// (pruned to `acts`, as the runtime prunes its own), the weights NumPy uses, the inputs.
fn prepare() -> Result<()> {
    let t = Instant::now();
    let dict = dicts::relu_sae(D, F)?;
    let out = work_dir();
    // Written last: its presence (with this version) means every other file is there.
    let stamp = out.join("meta.json");
    let up_to_date = std::fs::read_to_string(&stamp)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|m| {
            m.get("version") == Some(&json!(PREPARED_VERSION))
                && m.get("dictionary_modified") == Some(&json!(modified(&dict)))
        });
    if up_to_date {
        eprintln!("{} is up to date", out.display());
        return Ok(());
    }
    std::fs::remove_file(&stamp).ok();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let file = DictionaryFile::open(&dict)?;
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        let path = dict_path(dtype)?;
        if !path.is_file() {
            let tmp = path.with_extension("tmp.onnx");
            tiller_runtime::dictionary::write_dictionary_as(
                file.meta(),
                &file.weights()?,
                &tmp,
                dtype,
            )?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    let features = dicts::monitored_features(F, N_FEATURES);
    let rules = dicts::four_rules(&features);
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write(
        "tiller.toml",
        dicts::hook_config(&dict, &features, &rules, None),
    )?;
    write(
        "tiller-norules.toml",
        dicts::hook_config(&dict, &features, &[], None),
    )?;

    // ONNX Runtime's graphs: the 64 features as their own dictionary (the runtime loads the
    // dictionary file, Python the graph pruned to `acts`), and the whole encoder.
    let tmp = out.join("sliced-dictionary.onnx");
    tiller_benches::slice_relu(&file, &features, &tmp)?;
    let sliced = DictionaryFile::open(&tmp)?;
    let acts_only = |m| tiller_runtime::graph::prune(m, &["acts"]);
    tiller_runtime::graph::write_model(
        acts_only(sliced.model())?,
        &out.join("sliced.onnx"),
        usize::MAX,
    )?;
    tiller_runtime::graph::write_model(
        acts_only(file.model())?,
        &out.join("encode.onnx"),
        usize::MAX,
    )?;

    // NumPy's weights, with `b_dec` folded into the bias as the runtime folds it:
    // (x - b_dec)·W + b = x·W + (b - b_dec·W).
    let (_, w) = file.tensor_f32("W_enc")?;
    let w = Array2::from_shape_vec((D, F), w)?;
    let b_enc = Array1::from_vec(file.tensor_f32("b_enc")?.1);
    let b = &b_enc - &file.b_dec()?.dot(&w);
    let cols: Vec<usize> = features.iter().map(|&f| f as usize).collect();
    npy(&out, "w_enc.npy", &w)?;
    npy(&out, "b_enc.npy", &b)?;
    npy(&out, "w_enc_sliced.npy", &w.select(Axis(1), &cols))?;
    npy(&out, "b_enc_sliced.npy", &b.select(Axis(0), &cols))?;
    let rows: Vec<usize> = rules.iter().map(|r| r.feature as usize).collect();
    npy(
        &out,
        "w_dec_rules.npy",
        &file.w_dec()?.select(Axis(0), &rows),
    )?;
    let x = tiller_benches::random_activations(MAX_BATCH, D, 5);
    npy(&out, "x.npy", &x)?;
    write_gemm(&out.join("gemm.onnx"))?;
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out.join("x.f32"), raw)?;
    let rules: Vec<Value> = rules
        .iter()
        .map(|r| {
            json!({"op": r.op, "feature": r.feature, "param": r.param,
                   "column": features.iter().position(|&f| f == r.feature)})
        })
        .collect();
    write(
        "meta.json",
        serde_json::to_string_pretty(&json!({
            "version": PREPARED_VERSION, "dictionary_modified": modified(&dict), "d": D, "f": F, "features": features, "threshold": 1e9, "rules": rules,
            "dictionary": dict,
        }))?,
    )?;
    eprintln!(
        "prepared {} in {:.1} s",
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A dense `[n, n] × [n, n]` product as an ONNX graph: the machine's FLOP/s as ONNX Runtime's own
/// GEMM (MLAS) reaches it, measured from Python.
fn write_gemm(path: &Path) -> Result<()> {
    use onnx_protobuf::tensor_proto::DataType;
    use tiller_runtime::graph::{Dim, GraphBuilder};
    const N: usize = GEMM_N;
    let mut g = GraphBuilder::new("gemm");
    let a = g.input("a", DataType::FLOAT, &[Dim::Fixed(N), Dim::Fixed(N)]);
    let b: Vec<f32> = (0..N * N)
        .map(|i| ((i * 5 + i / N) % 13) as f32 - 6.0)
        .collect();
    let b = g.weight("b", &[N, N], &b);
    let c = g.op("MatMul", &[&a, &b], vec![]);
    g.output(&c, DataType::FLOAT, &[Dim::Fixed(N), Dim::Fixed(N)]);
    tiller_runtime::graph::write_model(g.finish(&[]), path, usize::MAX)?;
    Ok(())
}

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
fn rewrite(buf: &mut [u8]) {
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

fn limit(name: &str, value: f64, by: &str) {
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
fn rust(quick: bool) -> Result<()> {
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

/// A workload of the table.
struct Workload {
    key: &'static str,
    title: &'static str,
    batch: usize,
    /// Bytes of weights a call reads.
    bytes: f64,
    /// Multiply-adds ×2 a call does.
    flops: f64,
}

fn workloads() -> Vec<Workload> {
    let (d, f, m) = (D as f64, F as f64, N_FEATURES as f64);
    let sliced = |key, title, b: f64| Workload {
        key,
        title,
        batch: b as usize,
        bytes: 4.0 * (d * m + m + 4.0 * d),
        flops: 2.0 * b * (d * m + 4.0 * d),
    };
    let full = |key, title, bytes_per_weight: f64| Workload {
        key,
        title,
        batch: 1,
        bytes: bytes_per_weight * d * f + 4.0 * f,
        flops: 2.0 * d * f,
    };
    vec![
        sliced(
            "sliced_b1",
            "sliced hook, batch 1: 64 monitored features, 4 rules",
            1.0,
        ),
        sliced(
            "sliced_b64",
            "sliced hook, batch 64: 64 monitored features, 4 rules",
            64.0,
        ),
        full(
            "full_f32_b1",
            "full encode, batch 1, f32 weights (all 16384 features)",
            4.0,
        ),
        full("full_f16_b1", "full encode, batch 1, f16 weights", 2.0),
        full("full_bf16_b1", "full encode, batch 1, bf16 weights", 2.0),
    ]
}

const IMPLS: [(&str, &str); 6] = [
    ("tiller_rust", "Tiller, Rust API"),
    ("tiller_c", "Tiller, C ABI (libtiller)"),
    ("tiller_python", "Tiller, Python binding"),
    (
        "tiller_python_run",
        "Tiller, Python binding, one call (`run_step`)",
    ),
    ("ort_python", "ONNX Runtime, Python API"),
    ("numpy", "NumPy"),
];

/// What each alternative runs, for the notes under the table.
const NOTES: &str = "\
- Sliced hook: Tiller runs a whole step (open, hook, close): the 64 encoder columns natively, the \
request monitor (max over the 64 features against a threshold), the per-feature metrics, and the \
4 edits `x += c·d_i`; from Python either as `with rt.step(...) as s: s.hook(...)` (three calls \
into the library) or as `rt.run_step(...)` (one). ONNX Runtime's Python API runs the 64-feature graph (`sliced.onnx`, the \
same columns as their own dictionary) and NumPy then does the monitor and the edits; NumPy alone \
does `relu(x @ W[:, cols] + b)`, the monitor and the edits, the way a Python server without \
Tiller would. Each call gets fresh activations (edited in place).
- Full encode: all 16384 features of one token. Tiller: `Dictionary::encode_into` on the native \
path the runtime's hooks use (`SessionOptions::native`), `W_enc` read at its stored width (f32, \
f16, bf16); ONNX Runtime's Python API on the f32 dictionary's graph pruned to `acts`; NumPy \
`relu(x @ W_enc + b)`.
- Everything on one thread: ONNX Runtime `intra_op_num_threads=1`, NumPy's BLAS pinned by \
`OMP_NUM_THREADS`, `OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS` = 1. Times are medians over rounds.
- GB/s counts the weights a call reads (the 64 encoder columns, their biases and the 4 decoder \
rows, 0.6 MB, which stay in L2 between calls; or the whole encoder, 151 MB, read from memory \
every call); GFLOP/s its multiply-adds ×2. The hardware floor is the larger of bytes ÷ bandwidth \
(L2's or memory's) and FLOP ÷ dense FLOP/s.
- The sliced hooks run warm: their 0.6 MB of weights stay in L2 from one call to the next, as in \
the criterion benchmarks. Each full-encode call (every implementation) runs after 64 MiB have been \
rewritten, so that it reads its weights from memory: otherwise part of them stays in the 32 MiB \
L3 from one call to the next. In a server the model's own weights pass through the caches between \
two calls of a hook: the last column of the breakdown below shows the sliced hook that way.";

#[derive(Debug, Clone)]
struct Time {
    workload: String,
    imp: String,
    us: f64,
}

/// The limits measured, by name: every `(value, how)` seen; the table uses the best of each.
#[derive(Debug, Default)]
struct Limits(Vec<(String, f64, String)>);

impl Limits {
    fn best(&self, name: &str) -> Option<(f64, &str)> {
        self.0
            .iter()
            .filter(|(n, v, _)| n == name && v.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(_, v, by)| (*v, by.as_str()))
    }
}

fn load(files: &[PathBuf]) -> Result<(Vec<Time>, Limits, Vec<Value>)> {
    let mut times = Vec::new();
    let mut limits = Limits::default();
    let mut all = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", f.display(), i + 1))?;
            let str_of = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let num = |k: &str| v.get(k).and_then(Value::as_f64);
            match (str_of("kind").as_str(), num("us"), num("value")) {
                ("time", Some(us), _) => times.push(Time {
                    workload: str_of("workload"),
                    imp: str_of("impl"),
                    us,
                }),
                ("limit", _, Some(value)) => limits.0.push((str_of("name"), value, str_of("by"))),
                _ => {}
            }
            all.push(v);
        }
    }
    Ok((times, limits, all))
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// A target line: `value` against `goal`, or n/a when a figure is missing.
fn target(out: &mut String, what: &str, value: Option<f64>, goal: f64, unit: &str) {
    let line = match value {
        Some(v) => format!(
            "| {what} | {v:.2}{unit} | ≥ {goal}{unit} | **{}** |",
            pass(v >= goal)
        ),
        None => format!("| {what} | n/a | ≥ {goal}{unit} | n/a |"),
    };
    let _ = writeln!(out, "{line}");
}

/// The size in bytes of this machine's level-`level` data cache (per core), from sysfs.
fn cache_size(level: u32) -> Option<f64> {
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

fn cpu_name() -> String {
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

fn report(files: &[PathBuf], out_dir: &Path) -> Result<()> {
    let (times, limits, all) = load(files)?;
    let get = |w: &str, i: &str| {
        times
            .iter()
            .find(|t| t.workload == w && t.imp == i)
            .map(|t| t.us)
    };
    let nan = (f64::NAN, "not measured");
    let (copy, _) = limits.best("copy_gbps").unwrap_or(nan);
    // A read-only call (an encode) is bounded by the better of the two memory figures.
    let memory = copy.max(limits.best("read_gbps").map_or(f64::NAN, |r| r.0));
    let (cache, _) = limits.best("cache_read_gbps").unwrap_or(nan);
    let (gflops, gflops_by) = limits.best("dense_gflops").unwrap_or(nan);
    // The L2 of the machine that measured (recorded by `compare rust`); this machine's for
    // results from before it was recorded.
    let l2 = limits
        .best("l2_bytes")
        .map(|(v, _)| v)
        .or_else(|| cache_size(2))
        .unwrap_or(1024.0 * 1024.0);
    let cpu = cpu_name();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Tiller side by side\n\nOne thread everywhere; {cpu}, {cores} cores. d_in {D}, a {F}-feature \
         ReLU SAE; the sliced hook monitors {N_FEATURES} features and applies 4 rules.\n"
    );
    let _ = writeln!(
        md,
        "## The machine's limits (measured in this run, one thread)\n\n| limit | value | how |\n| --- | --- | --- |"
    );
    for (name, label, unit) in [
        ("copy_gbps", "memory bandwidth, STREAM copy", "GB/s"),
        ("read_gbps", "memory bandwidth, read", "GB/s"),
        (
            "paired_read_gbps",
            "memory bandwidth, read, timed as the f32 full encode",
            "GB/s",
        ),
        ("cache_read_gbps", "cache bandwidth, read (512 KiB)", "GB/s"),
        ("dense_gflops", "dense f32 matrix product", "GFLOP/s"),
    ] {
        for (n, v, by) in &limits.0 {
            if n == name {
                let _ = writeln!(md, "| {label} | {v:.1} {unit} | {by} |");
            }
        }
    }
    let _ = writeln!(
        md,
        "\nThe table judges each call against the best of these: {memory:.1} GB/s from memory (the \
         better of the copy and the read), {cache:.1} GB/s from cache for weights that fit in L2 \
         ({:.0} KiB), {gflops:.1} GFLOP/s ({gflops_by}).\n",
        l2 / 1024.0
    );
    let _ = writeln!(md, "## Time per call\n");
    let _ = writeln!(
        md,
        "| workload | implementation | per call | per token | ÷ Tiller (Rust) | weights GB/s | % of bandwidth | GFLOP/s | % of dense FLOP/s |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut panels = Vec::new();
    for w in workloads() {
        let base = get(w.key, "tiller_rust");
        // Weights that fit in L2 stay there from one call to the next: cache bandwidth bounds them.
        let (bw, bw_name) = if w.bytes <= l2 {
            (cache, "L2")
        } else {
            (memory, "memory")
        };
        let floor = (w.bytes / (bw * 1e9)).max(w.flops / (gflops * 1e9)) * 1e6;
        let mut bars = Vec::new();
        for (imp, label) in IMPLS {
            let Some(us) = get(w.key, imp) else {
                if imp == "tiller_rust" {
                    let _ = writeln!(md, "| {} | {label} | n/a | | | | | | |", w.title);
                }
                continue;
            };
            let gbs = w.bytes / (us * 1e-6) / 1e9;
            let gf = w.flops / (us * 1e-6) / 1e9;
            let ratio = base.map_or(String::new(), |b| format!("{:.2}×", us / b));
            // In the sliced step, NumPy does ONNX Runtime's monitor and edits.
            let label = if imp == "ort_python" && w.key.starts_with("sliced") {
                format!("{label} + NumPy edits")
            } else {
                label.to_string()
            };
            let _ = writeln!(
                md,
                "| {} | {label} | {} | {} | {ratio} | {gbs:.1} | {:.0}% of {bw_name} | {gf:.1} | {:.0}% |",
                w.title,
                fmt_us(us),
                fmt_us(us / w.batch as f64),
                100.0 * gbs / bw,
                100.0 * gf / gflops
            );
            bars.push((label, us));
        }
        if !bars.is_empty() && floor.is_finite() {
            let bound = if w.bytes / bw > w.flops / gflops {
                format!("{bw_name} bandwidth")
            } else {
                "FLOP/s".to_string()
            };
            let _ = writeln!(
                md,
                "| {} | *hardware floor ({bound})* | {} | {} | | | | | |",
                w.title,
                fmt_us(floor),
                fmt_us(floor / w.batch as f64)
            );
            panels.push(Panel {
                title: w.title,
                bars,
                floor,
            });
        }
    }
    let _ = writeln!(md, "\n{NOTES}\n");

    // Where a Tiller hook call goes (Rust API): the step alone, encode + monitor + metrics, edits.
    let _ = writeln!(md, "## Where the sliced hook's time goes (Rust API)\n");
    let _ = writeln!(
        md,
        "| batch | whole call | step open + close | encode + monitor + metrics | of which metrics (at most) | 4 edits | ONNX Runtime on the 64-feature graph, encode only | whole call, caches flushed before it |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for b in BATCHES {
        let w = format!("sliced_b{b}");
        let (Some(all_us), Some(step), Some(norules)) = (
            get(&w, "tiller_rust"),
            get(&w, "part_step"),
            get(&w, "part_norules"),
        ) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {b} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_us(all_us),
            fmt_us(step),
            fmt_us(norules - step),
            get(&w, "part_metrics").map_or("n/a".into(), fmt_us),
            fmt_us(all_us - norules),
            get(&w, "part_ort_rust").map_or("n/a".into(), fmt_us),
            get(&w, "part_cold").map_or("n/a".into(), fmt_us)
        );
    }
    if let (Some(native), Some(ort)) = (
        get("full_f32_b1", "tiller_rust"),
        get("full_f32_b1", "part_ort_rust"),
    ) {
        let _ = writeln!(
            md,
            "\nFull encode, batch 1, f32: the runtime's native encoder {} per call, ONNX Runtime on \
             the same dictionary through the Rust API {}.",
            fmt_us(native),
            fmt_us(ort)
        );
    }

    let _ = writeln!(
        md,
        "\n## Targets\n\n| target | measured | goal | result |\n| --- | --- | --- | --- |"
    );
    let full = workloads()
        .into_iter()
        .find(|w| w.key == "full_f32_b1")
        .map_or(0.0, |w| w.bytes);
    // Against the read bandwidth timed as the encode is, right after it (both medians, both after
    // the same rewrite of the caches), so that a neighbour's load long before the encode does not
    // decide the result.
    let paired = limits.best("paired_read_gbps").map_or(f64::NAN, |r| r.0);
    target(
        &mut md,
        "full encode f32, batch 1: weights read at this % of the memory's read bandwidth, timed alike",
        get("full_f32_b1", "tiller_rust").map(|us| 100.0 * full / (us * 1e-6) / 1e9 / paired),
        90.0,
        "%",
    );
    for b in BATCHES {
        let w = format!("sliced_b{b}");
        target(
            &mut md,
            &format!(
                "sliced hook, batch {b}: ONNX Runtime's Python API time ÷ Tiller's (Rust API)"
            ),
            get(&w, "ort_python")
                .zip(get(&w, "tiller_rust"))
                .map(|(o, t)| o / t),
            4.0,
            "×",
        );
    }
    for b in BATCHES {
        let w = format!("sliced_b{b}");
        target(
            &mut md,
            &format!(
                "sliced hook, batch {b}: NumPy time ÷ Tiller's Python binding (its faster call)"
            ),
            get(&w, "numpy")
                .zip(
                    [get(&w, "tiller_python"), get(&w, "tiller_python_run")]
                        .into_iter()
                        .flatten()
                        .reduce(f64::min),
                )
                .map(|(n, t)| n / t),
            3.0,
            "×",
        );
    }
    for half in ["f16", "bf16"] {
        target(
            &mut md,
            &format!("full encode, batch 1: f32 time ÷ {half} time"),
            get("full_f32_b1", "tiller_rust")
                .zip(get(&format!("full_{half}_b1"), "tiller_rust"))
                .map(|(a, b)| a / b),
            1.7,
            "×",
        );
    }

    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let md_path = out_dir.join("compare.md");
    std::fs::write(&md_path, &md)?;
    let raw: Vec<String> = all.iter().map(Value::to_string).collect();
    std::fs::write(out_dir.join("results.jsonl"), raw.join("\n") + "\n")?;
    let png = out_dir.join("compare.png");
    chart(&png, &panels, &cpu).context("drawing the chart")?;
    println!("{md}");
    println!("wrote {} and {}", md_path.display(), png.display());
    Ok(())
}

/// One workload in the chart: its title, a bar per implementation (label, µs per call), the
/// hardware floor (µs).
struct Panel {
    title: &'static str,
    bars: Vec<(String, f64)>,
    floor: f64,
}

/// One panel per workload: a bar per implementation (µs per call) and the hardware floor.
fn chart(path: &Path, panels: &[Panel], cpu: &str) -> Result<()> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the compiled-in DejaVu Sans font did not load"))?;
    let err = |e: String| anyhow!("plotters: {e}");
    let (w, bar_h, gap, head) = (1280i32, 30i32, 10i32, 56i32);
    let panel_h = |n: usize| head + n as i32 * (bar_h + gap) + 24;
    let total: i32 = 50 + panels.iter().map(|p| panel_h(p.bars.len())).sum::<i32>();
    let root = BitMapBackend::new(path, (w as u32, total as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let font = |size: i32| ("sans-serif", size).into_font();
    let draw_text = |s: &str, at: (i32, i32), size: i32, color: &RGBColor| {
        root.draw(&Text::new(s.to_string(), at, font(size).color(color)))
            .map_err(|e| err(e.to_string()))
    };
    draw_text(
        &format!("Tiller side by side: µs per call, one thread ({cpu})"),
        (16, 14),
        24,
        &BLACK,
    )?;
    let (left, right) = (330, w - 170);
    let mut top = 50;
    for Panel { title, bars, floor } in panels {
        draw_text(title, (16, top + 10), 20, &BLACK)?;
        let max = bars.iter().map(|b| b.1).fold(*floor, f64::max) * 1.02;
        let x_of = |us: f64| left + ((us / max) * f64::from(right - left)) as i32;
        let y0 = top + head - 12;
        for (i, (label, us)) in bars.iter().enumerate() {
            let y = y0 + i as i32 * (bar_h + gap);
            let color = if label.starts_with("Tiller") {
                RGBColor(31, 119, 180)
            } else if label.starts_with("ONNX") {
                RGBColor(255, 127, 14)
            } else {
                RGBColor(44, 160, 44)
            };
            draw_text(label, (16, y + 6), 17, &BLACK)?;
            root.draw(&Rectangle::new(
                [(left, y), (x_of(*us).max(left + 1), y + bar_h)],
                color.filled(),
            ))
            .map_err(|e| err(e.to_string()))?;
            // Past the floor's line when the bar ends next to it.
            let end = x_of(*us);
            let xf = x_of(*floor);
            let lx = if (xf - end).abs() < 12 {
                xf.max(end)
            } else {
                end
            };
            draw_text(&fmt_us(*us), (lx + 8, y + 6), 17, &BLACK)?;
        }
        // The floor: a dashed line across the bars.
        let x = x_of(*floor);
        let y_end = y0 + bars.len() as i32 * (bar_h + gap);
        let mut y = y0 - 6;
        while y < y_end {
            root.draw(&PathElement::new(
                vec![(x, y), (x, (y + 6).min(y_end))],
                RGBColor(200, 0, 0).stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?;
            y += 10;
        }
        draw_text(
            &format!("hardware floor {}", fmt_us(*floor)),
            (x + 6, y0 - 22),
            15,
            &RGBColor(200, 0, 0),
        )?;
        top += panel_h(bars.len());
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: Value) -> String {
        v.to_string() + "\n"
    }

    /// Writes made-up figures, with the L2 size of the machine that "measured" them, and returns
    /// the Markdown report and its folder.
    fn made_up_report(dir: &Path, l2_bytes: f64) -> (String, PathBuf) {
        let mut text = String::new();
        for (name, value) in [
            // The target uses the read timed like the encode, not the best copy.
            ("copy_gbps", 40.0),
            ("paired_read_gbps", 30.0),
            ("cache_read_gbps", 140.0),
            ("dense_gflops", 100.0),
            ("dense_gflops", 150.0),
            ("l2_bytes", l2_bytes),
        ] {
            text += &line(json!({"kind": "limit", "name": name, "value": value, "by": "test"}));
        }
        for (w, i, us) in [
            ("sliced_b1", "tiller_rust", 5.0),
            ("sliced_b1", "tiller_python", 10.0),
            ("sliced_b1", "tiller_python_run", 8.0),
            ("sliced_b1", "ort_python", 25.0),
            ("sliced_b1", "numpy", 20.0),
            ("sliced_b64", "tiller_rust", 200.0),
            ("sliced_b64", "ort_python", 150.0),
            // 151 MB in 5.5 ms: 27.5 GB/s, 91.6% of 30 GB/s.
            ("full_f32_b1", "tiller_rust", 5500.0),
            ("full_f16_b1", "tiller_rust", 3000.0),
        ] {
            text += &line(json!({"kind": "time", "workload": w, "impl": i, "us": us}));
        }
        let results = dir.join(format!("r-{l2_bytes}.jsonl"));
        std::fs::write(&results, text).expect("results");
        let out = dir.join(format!("report-{l2_bytes}"));
        report(&[results], &out).expect("report");
        let md = std::fs::read_to_string(out.join("compare.md")).expect("markdown");
        (md, out)
    }

    /// The report from made-up figures: ratios, PASS/FAIL, n/a for what is missing, the chart.
    /// The cache size comes from the records, never from the machine running the test.
    #[test]
    fn report_from_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (md, out) = made_up_report(dir.path(), 1024.0 * 1024.0);
        let row = |start: &str| {
            md.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no row `{start}` in\n{md}"))
                .to_string()
        };
        assert!(
            row("| full encode f32, batch 1").contains("91.")
                && row("| full encode f32").contains("PASS")
        );
        assert!(row("| sliced hook, batch 1: ONNX").contains("5.00×"));
        assert!(row("| sliced hook, batch 1: ONNX").contains("PASS"));
        assert!(row("| sliced hook, batch 64: ONNX").contains("0.75×"));
        assert!(row("| sliced hook, batch 64: ONNX").contains("FAIL"));
        // The binding's faster call: 20 ÷ 8.
        assert!(row("| sliced hook, batch 1: NumPy").contains("2.50×"));
        assert!(row("| sliced hook, batch 1: NumPy").contains("FAIL"));
        assert!(row("| sliced hook, batch 64: NumPy").contains("n/a"));
        assert!(row("| full encode, batch 1: f32 time ÷ f16").contains("1.83×"));
        assert!(row("| full encode, batch 1: f32 time ÷ bf16").contains("n/a"));
        // The sliced weights (0.6 MB) are judged against a 1 MiB L2, the full encoder against memory.
        assert!(md.contains("% of L2") && md.contains("% of memory"));
        assert!(md.contains("(1024 KiB)"));
        // With a 512 KiB L2 (a Zen 3 core), the same weights do not fit: memory bounds them too.
        let (small, _) = made_up_report(dir.path(), 512.0 * 1024.0);
        assert!(!small.contains("% of L2") && small.contains("% of memory"));
        assert!(small.contains("(512 KiB)"));
        assert!(md.contains("150.0 GFLOP/s (test)"));
        let png = std::fs::read(out.join("compare.png")).expect("chart");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
