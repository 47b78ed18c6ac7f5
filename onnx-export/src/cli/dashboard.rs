//! `tiller-export dashboard`: write a static HTML page (and JSON beside it) showing what features
//! fire on, from a folder of activation shards with their tokens.

use std::path::PathBuf;

use anyhow::Result;

/// The arguments of `tiller-export dashboard`.
#[derive(clap::Args)]
pub struct DashboardArgs {
    /// The dictionary.
    #[arg(long)]
    dictionary: PathBuf,
    /// The folder of `shard-NNNNN.npy` activations with `shard-NNNNN.jsonl` tokens.
    #[arg(long)]
    activations: PathBuf,
    /// The HTML page to write; its data goes beside it as `.json`.
    #[arg(short, long)]
    output: PathBuf,
    /// The features to show, comma separated [default: the --top-features densest].
    #[arg(long, value_delimiter = ',', conflicts_with = "top_features")]
    features: Option<Vec<u32>>,
    /// How many of the densest features that fired to show.
    #[arg(long, default_value_t = 64)]
    top_features: usize,
    /// Top contexts per feature.
    #[arg(long, default_value_t = 12)]
    contexts: usize,
    /// Tokens shown either side of the top token.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Read at most this many rows.
    #[arg(long)]
    max_rows: Option<u64>,
    /// Rows per encode call.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
}

impl DashboardArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self {
            dictionary,
            activations,
            output,
            features,
            top_features,
            contexts,
            window,
            max_rows,
            batch,
        } = self;
        let opts = tiller_export::dashboard::Options {
            features,
            top_features,
            contexts,
            window,
            max_rows,
            batch,
            progress: true,
            ..tiller_export::dashboard::Options::new(dictionary, activations, output)
        };
        let d = tiller_export::dashboard::write(&opts)?;
        println!(
            "wrote {} and {}: {} features of {} over {} rows (dead {:.2}%, mean L0 {:.2})",
            opts.output.display(),
            tiller_export::dashboard::json_path(&opts.output).display(),
            d.features.len(),
            d.d_sae,
            d.rows,
            100.0 * d.dead_fraction,
            d.mean_l0
        );
        Ok(())
    }
}
