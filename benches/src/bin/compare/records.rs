//! The records the runs write and the table reads: the workloads, the implementations, the times
//! and the limits.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

use super::prepare::{D, F, N_FEATURES};

/// A workload of the table.
pub(crate) struct Workload {
    pub(crate) key: &'static str,
    pub(crate) title: &'static str,
    pub(crate) batch: usize,
    /// Bytes of weights a call reads.
    pub(crate) bytes: f64,
    /// Multiply-adds ×2 a call does.
    pub(crate) flops: f64,
}

pub(crate) fn workloads() -> Vec<Workload> {
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

pub(crate) const IMPLS: [(&str, &str); 6] = [
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
pub(crate) const NOTES: &str = "\
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
pub(crate) struct Time {
    pub(crate) workload: String,
    pub(crate) imp: String,
    pub(crate) us: f64,
}

/// The limits measured, by name: every `(value, how)` seen; the table uses the best of each.
#[derive(Debug, Default)]
pub(crate) struct Limits(pub(crate) Vec<(String, f64, String)>);

impl Limits {
    pub(crate) fn best(&self, name: &str) -> Option<(f64, &str)> {
        self.0
            .iter()
            .filter(|(n, v, _)| n == name && v.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(_, v, by)| (*v, by.as_str()))
    }
}

pub(crate) fn load(files: &[PathBuf]) -> Result<(Vec<Time>, Limits, Vec<Value>)> {
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

pub(crate) fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}
