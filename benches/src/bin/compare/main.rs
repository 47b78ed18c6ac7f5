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

mod chart;
mod measure;
mod prepare;
mod records;
mod report;

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};

use measure::rust;
use prepare::prepare;
use report::report;

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
