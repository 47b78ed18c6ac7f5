//! The report: the table of times and ratios, the targets with PASS/FAIL, the notes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::chart::{Panel, chart};
use super::measure::{cache_size, cpu_name};
use super::prepare::{BATCHES, D, F, N_FEATURES};
use super::records::{IMPLS, NOTES, fmt_us, load, workloads};

pub(crate) fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// A target line: `value` against `goal`, or n/a when a figure is missing.
pub(crate) fn target(out: &mut String, what: &str, value: Option<f64>, goal: f64, unit: &str) {
    let line = match value {
        Some(v) => format!(
            "| {what} | {v:.2}{unit} | ≥ {goal}{unit} | **{}** |",
            pass(v >= goal)
        ),
        None => format!("| {what} | n/a | ≥ {goal}{unit} | n/a |"),
    };
    let _ = writeln!(out, "{line}");
}

pub(crate) fn report(files: &[PathBuf], out_dir: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
