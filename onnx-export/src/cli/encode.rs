//! `tiller-export encode`: encode activations from a .npy file through the runtime.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tiller_export::npy;
use tiller_runtime::{Dictionary, SessionOptions};

/// The arguments of `tiller-export encode`.
#[derive(clap::Args)]
pub struct EncodeArgs {
    /// The dictionary.
    dict: PathBuf,
    /// `[n, d_in]` activations (float32, float16 or float64).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the `[n, d_sae]` feature activations.
    #[arg(long)]
    output: PathBuf,
    /// Where to write the `[n, d_out]` reconstruction.
    #[arg(long)]
    recon: Option<PathBuf>,
    /// Rows per call.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
}

impl EncodeArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self {
            dict,
            input,
            output,
            recon,
            batch,
        } = self;
        encode(&dict, &input, &output, recon.as_deref(), batch)
    }
}

fn encode(
    dict: &Path,
    input: &Path,
    output: &Path,
    recon: Option<&Path>,
    batch: usize,
) -> Result<()> {
    let d = Dictionary::load(dict, &SessionOptions::default())?;
    let m = d.meta().clone();
    let x = npy::read_activations(input, m.n_layers * m.d_in)?;
    let n = x.nrows();
    let mut acts = ndarray::Array2::<f32>::zeros((n, m.d_sae));
    let mut rec = recon.map(|_| ndarray::Array2::<f32>::zeros((n, m.n_layers * m.d_out)));
    let batch = batch.max(1);
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let xs = x.slice(ndarray::s![start..end, ..]);
        match rec.as_mut() {
            Some(r) => {
                let (a, y) = d.encode_decode(xs)?;
                acts.slice_mut(ndarray::s![start..end, ..]).assign(&a);
                r.slice_mut(ndarray::s![start..end, ..]).assign(&y);
            }
            None => {
                let e = d.encode(xs)?;
                acts.slice_mut(ndarray::s![start..end, ..]).assign(&e.acts);
            }
        }
    }
    npy::write(output, &acts)?;
    if let (Some(p), Some(r)) = (recon, rec) {
        npy::write(p, &r)?;
    }
    let l0 = acts.iter().filter(|v| **v != 0.0).count() as f64 / n.max(1) as f64;
    println!("encoded {n} rows with {}: mean L0 {l0:.2}", dict.display());
    Ok(())
}
