//! `tiller-export train-probe`: train a linear probe (L2-penalised logistic regression) on
//! activations and 0/1 labels.

use std::path::PathBuf;

use anyhow::Result;

/// `tiller-export train-probe`: see docs/probes.md.
#[derive(clap::Args)]
pub struct TrainProbeArgs {
    /// `[n, d]` activations (.npy, float16/32/64).
    #[arg(long)]
    input: PathBuf,
    /// `[n]` labels, 0 or 1 (.npy: bool, integer or float).
    #[arg(long)]
    labels: PathBuf,
    /// λ of the penalty (λ/2)‖w‖² on the standardised inputs' weights.
    #[arg(long, default_value_t = 1e-3)]
    l2: f64,
    /// Fraction of each class held out for evaluation (0: none).
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// The seed of the held-out split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// L-BFGS iterations at most.
    #[arg(long, default_value_t = 1000)]
    max_iter: usize,
    /// The read-out's label.
    #[arg(long)]
    name: Option<String>,
    /// The host's hook it reads (tiller.hook_in).
    #[arg(long, default_value = "")]
    hook: String,
    /// The model the activations came from.
    #[arg(long, default_value = "")]
    model: String,
    /// `sigmoid` (a probability) or `logit`.
    #[arg(long, default_value = "sigmoid")]
    probe_output: tiller_export::probe::ProbeOutput,
    /// Write a JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The probe dictionary to write.
    #[arg(short, long)]
    output: PathBuf,
}

impl TrainProbeArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let a = self;
        use tiller_export::probe::{TrainProbeConfig, train_probe};
        let mut cfg = TrainProbeConfig::new(a.input, a.labels, a.output);
        cfg.l2 = a.l2;
        cfg.holdout = a.holdout;
        cfg.seed = a.seed;
        cfg.max_iter = a.max_iter;
        cfg.name = a.name;
        cfg.hook = a.hook;
        cfg.model = a.model;
        cfg.probe_output = a.probe_output;
        cfg.report = a.report;
        print!("{}", train_probe(&cfg)?);
        Ok(())
    }
}
