//! `tiller-export slice`: keep only some features of a dictionary (exact for ReLU, JumpReLU, Gated;
//! TopK is calibrated).

use std::path::PathBuf;

use anyhow::Result;
use tiller_export::import::{self};
use tiller_export::npy;
use tiller_runtime::DictionaryFile;

/// The arguments of `tiller-export slice`.
#[derive(clap::Args)]
pub struct SliceArgs {
    /// The dictionary.
    dict: PathBuf,
    /// The features to keep, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    features: Vec<u32>,
    /// Activations (`[n, d_in]`) to fit the thresholds of a sliced TopK dictionary on.
    #[arg(long)]
    calibrate: Option<PathBuf>,
    /// The sliced dictionary to write.
    #[arg(short, long)]
    output: PathBuf,
}

impl SliceArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self {
            dict,
            features,
            calibrate,
            output,
        } = self;
        let f = DictionaryFile::open(&dict)?;
        let x = match &calibrate {
            Some(p) => Some(npy::read_activations(
                p,
                f.meta().input_layers() * f.meta().d_in,
            )?),
            None => None,
        };
        let s = tiller_export::slice::slice(&f, &features, x.as_ref())?;
        import::write(&s.meta, &s.weights, &output)?;
        print!(
            "wrote {}: {} of {} features",
            output.display(),
            s.meta.d_sae,
            f.meta().d_sae
        );
        match s.agreement {
            Some(a) => println!(
                ", JumpReLU thresholds fitted on {} tokens agree with TopK {:.2}% (not exact)",
                x.map_or(0, |x| x.nrows()),
                a * 100.0
            ),
            None => println!(", exact"),
        }
        Ok(())
    }
}
