//! `tiller-export`: import, inspect and run Tiller dictionaries.
#![deny(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tiller-export",
    version,
    about = "Import, inspect and run sparse dictionaries for the Tiller runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: cli::Command,
}

fn main() -> ExitCode {
    let result = cli::run(Cli::parse().command);
    // For memory measurements (the large-import test): the process's peak resident set.
    if std::env::var_os("TILLER_REPORT_PEAK_RSS").is_some()
        && let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
    {
        eprintln!("peak RSS: {}", line.trim_start_matches("VmHWM:").trim());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
