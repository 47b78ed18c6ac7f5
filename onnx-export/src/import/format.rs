//! The `formats!` table: every checkpoint format `import` reads, one line each, and recognising
//! which one a path holds.
//!
//! Every format module exposes `detect(path) -> bool` (does `path` look like one of its
//! checkpoints?) and `import(path, &ImportOptions) -> Result<Vec<Imported>>` (one dictionary per
//! hookpoint or layer read).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use tiller_runtime::{Meta, Weights};

use super::imported::{ImportOptions, Imported};
use super::saelens;
use crate::{Error, Result};

macro_rules! formats {
    ($($(#[$m:meta])* $var:ident = $s:literal => $module:path),+ $(,)?) => {
        /// A checkpoint format `import` reads.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Format {
            /// Recognise the format from the files present.
            Auto,
            $($(#[$m])* $var),+
        }

        impl Format {
            /// Every format name (`auto` first).
            pub const NAMES: &'static [&'static str] = &["auto", $($s),+];
            const ALL: &'static [Format] = &[$(Format::$var),+];

            fn detects(self, path: &Path) -> bool {
                use Format::*;
                match self {
                    Auto => false,
                    $($var => { use $module as m; m::detect(path) })+
                }
            }

            fn import(self, path: &Path, opts: &ImportOptions) -> Result<Vec<Imported>> {
                match self {
                    Self::Auto => Err(Error::format(path, "the format was not resolved")),
                    $(Self::$var => { use $module as m; m::import(path, opts) })+
                }
            }
        }

        impl FromStr for Format {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    "auto" => Ok(Self::Auto),
                    $($s => Ok(Self::$var),)+
                    other => Err(format!("`{other}` is not a known format ({})", Self::NAMES.join(", "))),
                }
            }
        }

        impl fmt::Display for Format {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    Self::Auto => "auto",
                    $(Self::$var => $s),+
                })
            }
        }
    };
}

formats! {
    /// SAELens: `cfg.json` + `sae_weights.safetensors`.
    SaeLens = "saelens" => super::saelens,
    /// Steering directions: a GGUF control vector or a `.npy` of directions.
    Vector = "vector" => super::steering_vectors,
    /// circuit-tracer: per-layer `layer_{i}.safetensors` or CLT `W_enc_{i}`/`W_dec_{i}` files.
    CircuitTracer = "circuit-tracer" => super::circuit_tracer,
    /// EleutherAI sparsify: `cfg.json` + `sae.safetensors`, one folder per hookpoint.
    Sparsify = "sparsify" => super::sparsify,
    /// Gemma Scope: `params.npz`; Gemma Scope 2: `params.safetensors`.
    GemmaScope = "gemma-scope" => super::gemma_scope,
    /// Llama Scope: `hyperparams.json` + `checkpoints/final.safetensors`.
    LlamaScope = "llama-scope" => super::llama_scope,
    /// saprmarks/dictionary_learning: a trainer folder with `ae.pt` + `config.json`.
    DictionaryLearning = "dictionary-learning" => super::dictionary_learning,
    /// openai/sparse_autoencoder: a `torch.save`d `Autoencoder` state dict (`.pt`).
    OpenAi = "openai" => super::openai,
    /// Goodfire's released SAEs: a `torch.save`d state dict (`.pth`).
    Goodfire = "goodfire" => super::goodfire,
    /// Linear probes: `weight`/`bias` or `coef_`/`intercept_` in `.safetensors`, `.npz`, `.npy`.
    Probe = "probe" => crate::probe::import,
}

/// Recognises the format of the checkpoint at `path`.
pub fn detect(path: &Path) -> Result<Format> {
    if !path.exists() {
        return Err(Error::format(path, "does not exist"));
    }
    Format::ALL.iter().copied().find(|f| f.detects(path)).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "is not a checkpoint Tiller recognises (formats: {}); for a SAELens folder, `{}` and `{}` are expected",
                Format::NAMES[1..].join(", "),
                saelens::CFG,
                saelens::WEIGHTS
            ),
        )
    })
}

/// Reads the checkpoint at `path` in `format`.
pub fn read_all(path: &Path, format: Format, opts: &ImportOptions) -> Result<Vec<Imported>> {
    let format = match format {
        // A bias only goes with a probe's weight (a `.npy` would otherwise be a direction).
        Format::Auto if opts.bias.is_some() => Format::Probe,
        Format::Auto => detect(path)?,
        f => f,
    };
    if let Some(b) = &opts.bias
        && format != Format::Probe
    {
        return Err(Error::format(
            b,
            format!("--bias is for probes (--format probe), not the {format} format"),
        ));
    }
    let mut out = format.import(path, opts)?;
    if out.is_empty() {
        return Err(Error::format(
            path,
            "holds no dictionary matching the options",
        ));
    }
    if let Some(template) = &opts.hook {
        for one in &mut out {
            if one.meta.input_layers() > 1 || one.meta.output_layers() > 1 {
                return Err(Error::format(
                    path,
                    "--hook names one hook, but this dictionary spans several layers: set them in the runtime config",
                ));
            }
            let hook = template.replace("{name}", one.name.as_deref().unwrap_or(""));
            one.meta.hook_in = hook.clone();
            one.meta.hook_out = hook;
        }
    }
    Ok(out)
}

/// Reads a checkpoint that holds exactly one dictionary.
pub fn read(path: &Path, format: Format) -> Result<(Meta, Weights)> {
    let mut all = read_all(path, format, &ImportOptions::default())?;
    if all.len() != 1 {
        let names: Vec<String> = all.iter().filter_map(|i| i.name.clone()).collect();
        return Err(Error::format(
            path,
            format!(
                "holds {} dictionaries ({}); choose one with --hookpoint or --layer",
                all.len(),
                names.join(", ")
            ),
        ));
    }
    let one = all.remove(0);
    Ok((one.meta, one.weights))
}
