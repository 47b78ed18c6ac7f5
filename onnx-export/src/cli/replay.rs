//! `tiller-export replay`: dry-run a config: run recorded activations through the runtime as one
//! request at one hook, and write the steered activations, the metrics text and the request
//! summary.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tiller_export::npy;

/// The arguments of `tiller-export replay`.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The runtime config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// The hook the activations were recorded at.
    #[arg(long)]
    hook: String,
    /// `[n, width]` activations.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the steered activations.
    #[arg(long)]
    output: PathBuf,
    /// The steering profile of the request.
    #[arg(long)]
    profile: Option<String>,
    /// The tokens' phase: `prompt` (steps of --batch tokens) or `generated` (one token per step).
    #[arg(long, default_value = "prompt")]
    phase: String,
    /// Tokens per step for the prompt phase.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Where to write the Prometheus text exposition.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Where to write the request summary (JSON).
    #[arg(long)]
    summary: Option<PathBuf>,
}

impl ReplayArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self {
            config,
            hook,
            input,
            output,
            profile,
            phase,
            batch,
            metrics,
            summary,
        } = self;
        replay(
            &config,
            &hook,
            &input,
            &output,
            profile.as_deref(),
            &phase,
            batch,
            metrics.as_deref(),
            summary.as_deref(),
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn replay(
    config: &Path,
    hook: &str,
    input: &Path,
    output: &Path,
    profile: Option<&str>,
    phase: &str,
    batch: usize,
    metrics: Option<&Path>,
    summary: Option<&Path>,
) -> Result<()> {
    let phase = match phase {
        "prompt" => tiller_runtime::Phase::Prompt,
        "generated" => tiller_runtime::Phase::Generated,
        other => anyhow::bail!("--phase `{other}` is not prompt or generated"),
    };
    let rt = tiller_runtime::Runtime::from_config_file(config)?;
    let Some(&(_, width)) = rt.hooks().iter().find(|(h, _)| h == hook) else {
        let known: Vec<String> = rt.hooks().into_iter().map(|(h, _)| h).collect();
        anyhow::bail!(
            "{}: no dictionary or rule is attached to hook `{hook}` (hooks: {})",
            config.display(),
            known.join(", ")
        );
    };
    let mut x = npy::read_activations(input, width)?;
    let n = x.nrows();
    let step_len = if phase == tiller_runtime::Phase::Generated {
        1
    } else {
        batch.max(1)
    };
    rt.begin_request(1, profile, None)?;
    let mut stops = 0;
    for start in (0..n).step_by(step_len) {
        let end = (start + step_len).min(n);
        let tokens = vec![tiller_runtime::Token { request: 1, phase }; end - start];
        let mut rows = x.slice(ndarray::s![start..end, ..]).to_owned();
        let mut step = rt.step(&tokens)?;
        let data = rows.as_slice_mut().context("rows are contiguous")?;
        step.hook(hook, tiller_runtime::ActivationsMut::F32(data))?;
        stops += step.finish().stop.len();
        x.slice_mut(ndarray::s![start..end, ..]).assign(&rows);
    }
    let s = rt.end_request(1)?;
    npy::write(output, &x)?;
    if let Some(p) = metrics {
        std::fs::write(p, rt.metrics_text()).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = summary {
        std::fs::write(p, serde_json::to_string_pretty(&s)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let edited: u64 = s.steering.values().sum();
    println!(
        "replayed {n} tokens at `{hook}`: {edited} edits, {} events{}, flagged {}",
        s.events.len(),
        if stops > 0 { ", stop requested" } else { "" },
        s.flagged
    );
    Ok(())
}
