//! `tiller-export import`: convert a checkpoint (SAELens, sparsify, Gemma Scope, …) into a Tiller
//! dictionary (.onnx).

use std::path::PathBuf;

use anyhow::{Context, Result};
use tiller_export::import::{self, Format};

/// The arguments of `tiller-export import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The checkpoint: a folder or a file.
    path: PathBuf,
    /// The checkpoint's format.
    #[arg(long, default_value = "auto")]
    format: Format,
    /// A folder of several hookpoints (sparsify): the one to import (default: all).
    #[arg(long)]
    hookpoint: Option<String>,
    /// A per-layer checkpoint (circuit-tracer): the layer to import, or `all` (default).
    #[arg(long)]
    layer: Option<String>,
    /// The host's hook name to store (`{name}` is replaced by the hookpoint or layer).
    #[arg(long)]
    hook: Option<String>,
    /// Feature labels: a JSON object {feature_id: label}.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Probes: the .npy bias of a .npy weight (implies --format probe).
    #[arg(long)]
    bias: Option<PathBuf>,
    /// Probes: what each read-out outputs, `sigmoid` (a probability) or `logit`.
    #[arg(long, default_value = "sigmoid")]
    probe_output: tiller_export::probe::ProbeOutput,
    /// How to store `W_enc` and `W_dec`: `f32`, `f16` or `bf16` (rounded to nearest; the
    /// runtime's native encoder reads half-width weights at their width, moving half the bytes).
    #[arg(long, default_value = "f32")]
    dtype: tiller_runtime::dictionary::WeightDtype,
    /// The dictionary to write; several dictionaries go to `OUT.<name>.onnx`.
    #[arg(short, long)]
    output: PathBuf,
}

impl ImportArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self {
            path,
            format,
            hookpoint,
            layer,
            hook,
            labels,
            bias,
            probe_output,
            dtype,
            output,
        } = self;
        let layer = match layer.as_deref() {
            None | Some("all") => None,
            Some(l) => Some(
                l.parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--layer `{l}` is not a number or `all`"))?,
            ),
        };
        let opts = import::ImportOptions {
            hookpoint,
            layer,
            hook,
            bias,
            probe_output,
        };
        let labels = match labels {
            Some(l) => {
                let text = std::fs::read_to_string(&l)
                    .with_context(|| format!("reading {}", l.display()))?;
                Some((
                    l.clone(),
                    tiller_runtime::dictionary::parse_labels(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", l.display()))?,
                ))
            }
            None => None,
        };
        let all = import::read_all(&path, format, &opts)?;
        let several = all.len() > 1;
        for mut one in all {
            if let Some((l, map)) = &labels {
                if let Some(bad) = map.keys().find(|&&k| k as usize >= one.meta.d_sae) {
                    anyhow::bail!(
                        "{}: feature {bad} is out of range (d_sae = {})",
                        l.display(),
                        one.meta.d_sae
                    );
                }
                one.meta.labels = map.clone();
            }
            let out =
                import::output_path(&output, if several { one.name.as_deref() } else { None });
            import::write_as(&one.meta, &one.weights, &out, dtype)?;
            let m = &one.meta;
            println!(
                "wrote {}: {} {} {}x{} from {}",
                out.display(),
                m.kind,
                m.activation,
                m.d_in,
                m.d_sae,
                m.source
            );
        }
        Ok(())
    }
}
