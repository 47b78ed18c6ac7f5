//! `tiller-export diffmeans`: write the unit difference-in-means direction of two sets of
//! activations as a `vector` dictionary (for the `vector` and `project_cap` ops and projection
//! monitors).

use std::path::PathBuf;

use anyhow::Result;

/// The arguments of `tiller-export diffmeans`.
#[derive(clap::Args)]
pub struct DiffmeansArgs {
    /// `[n, d]` activations of the positive set (.npy).
    #[arg(long)]
    positive: PathBuf,
    /// `[n, d]` activations of the negative set (.npy).
    #[arg(long)]
    negative: PathBuf,
    /// The direction's label.
    #[arg(long)]
    name: Option<String>,
    /// The host's hook it reads and steers (tiller.hook_in / hook_out).
    #[arg(long, default_value = "")]
    hook: String,
    /// The model the activations came from.
    #[arg(long, default_value = "")]
    model: String,
    /// Write a JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The dictionary to write.
    #[arg(short, long)]
    output: PathBuf,
}

impl DiffmeansArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self {
            positive,
            negative,
            name,
            hook,
            model,
            report,
            output,
        } = self;
        let cfg = tiller_export::probe::DiffmeansConfig {
            positive,
            negative,
            output,
            name,
            hook,
            model,
            report,
        };
        print!("{}", tiller_export::probe::diffmeans(&cfg)?);
        Ok(())
    }
}
