//! `tiller-export verify`: compare a dictionary, run by the runtime, with the reference maths on
//! its source checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use tiller_export::import::{self, Format};
use tiller_export::npy;

/// The arguments of `tiller-export verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The dictionary.
    dict: PathBuf,
    /// The checkpoint it was imported from.
    #[arg(long)]
    source: PathBuf,
    /// The checkpoint's format.
    #[arg(long, default_value = "auto")]
    format: Format,
    /// Which hookpoint of a multi-hookpoint checkpoint.
    #[arg(long)]
    hookpoint: Option<String>,
    /// Which layer of a per-layer checkpoint.
    #[arg(long)]
    layer: Option<usize>,
    /// Activations to encode (`[n, d_in]`); random ones (seeded) when absent.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Rows of random activations.
    #[arg(long, default_value_t = 256)]
    rows: usize,
    /// Largest accepted normwise relative error.
    #[arg(long, default_value_t = 1e-5)]
    tolerance: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl VerifyArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self {
            dict,
            source,
            format,
            hookpoint,
            layer,
            input,
            rows,
            tolerance,
            json,
        } = self;
        let opts = import::ImportOptions {
            hookpoint,
            layer,
            ..Default::default()
        };
        let all = import::read_all(&source, format, &opts)?;
        if all.len() != 1 {
            let names: Vec<String> = all.iter().filter_map(|i| i.name.clone()).collect();
            anyhow::bail!(
                "{} holds {} dictionaries ({}): choose one with --hookpoint or --layer",
                source.display(),
                all.len(),
                names.join(", ")
            );
        }
        let one = &all[0];
        let width = one.meta.input_layers() * one.meta.d_in;
        let x = match &input {
            Some(p) => npy::read_activations(p, width)?,
            None => random_rows(rows, width),
        };
        let r = tiller_export::verify::verify(&dict, &one.meta, &one.weights, &x, tolerance)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!(
                "{} against {} ({} rows)",
                dict.display(),
                source.display(),
                r.rows
            );
            println!(
                "  acts   max abs {:.3e}  rel {:.3e}",
                r.acts_max_abs, r.acts_rel
            );
            println!(
                "  recon  max abs {:.3e}  rel {:.3e}",
                r.recon_max_abs, r.recon_rel
            );
            if let Some(a) = r.topk_agreement {
                println!("  TopK sets identical on {:.2}% of rows", a * 100.0);
            }
            println!(
                "  {} (tolerance {:e})",
                if r.pass { "PASS" } else { "FAIL" },
                r.tolerance
            );
        }
        if !r.pass {
            anyhow::bail!("verification failed");
        }
        Ok(())
    }
}

/// Seeded standard-normal rows, for `verify` without an input file.
fn random_rows(rows: usize, width: usize) -> ndarray::Array2<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7111e5);
    ndarray::Array2::from_shape_simple_fn((rows, width), || {
        rand_distr::StandardNormal.sample(&mut rng)
    })
}
