//! Goodfire's released SAEs (`Goodfire/Llama-3.1-8B-Instruct-SAE-l19`,
//! `Goodfire/Llama-3.3-70B-Instruct-SAE-l50`): one `torch.save`d state dict per `.pth` file with
//! `encoder_linear.weight` `[F, d]`, `encoder_linear.bias` `[F]`, `decoder_linear.weight` `[d, F]`,
//! `decoder_linear.bias` `[d]`.
//!
//! The maths of Goodfire's reference loader: `f = relu(encoder_linear(x))`,
//! `x̂ = decoder_linear(f)`. The decoder bias is not subtracted from the input and there is no
//! input normalisation.
//!
//! A file named as released, `<Model>-SAE-l<layer>.pth`, gives the model
//! (`meta-llama/<Model>`) and the hook: the output of decoder layer `<layer>`, `model.layers.<layer>`
//! in Hugging Face naming. Otherwise both are left empty (set the hook with `--hook`).

use std::path::Path;

use tiller_runtime::{Activation, Kind, Meta, Weights};

use super::imported::{ImportOptions, Imported};
use crate::torch;
use crate::{Error, Result};

/// Whether `path` is a `torch.save` file holding a Goodfire SAE state dict.
pub fn detect(path: &Path) -> bool {
    path.is_file()
        && path.extension().is_some_and(|e| e == "pth" || e == "pt")
        && torch::is_archive(path)
        && torch::load(path)
            .is_ok_and(|c| c.has("encoder_linear.weight") && c.has("decoder_linear.weight"))
}

/// `(model, hook)` from a released file name, `Llama-3.1-8B-Instruct-SAE-l19.pth`.
fn names_from_path(path: &Path) -> Option<(String, String)> {
    let stem = path.file_stem()?.to_str()?;
    let (model, layer) = stem.rsplit_once("-SAE-l")?;
    let layer: usize = layer.parse().ok()?;
    if model.is_empty() || !model.starts_with("Llama-") {
        return None;
    }
    Some((
        format!("meta-llama/{model}"),
        format!("model.layers.{layer}"),
    ))
}

/// Imports the SAE at `path`.
pub fn import(path: &Path, _opts: &ImportOptions) -> Result<Vec<Imported>> {
    let mut ck = torch::load(path)?;
    let (f, d) = match ck.shape("encoder_linear.weight") {
        Some(&[f, d]) if f > 0 && d > 0 => (f, d),
        Some(s) => {
            return Err(Error::format(
                path,
                format!(
                    "tensor `encoder_linear.weight` has shape {s:?}, expected [d_sae, d_model]"
                ),
            ));
        }
        None => {
            return Err(Error::format(
                path,
                format!(
                    "tensor `encoder_linear.weight` is missing (the checkpoint has: {})",
                    ck.names().join(", ")
                ),
            ));
        }
    };
    let w_enc = ck.take2_transposed("encoder_linear.weight", f, d)?;
    let b_enc = ck.take1("encoder_linear.bias", f)?;
    let w_dec = ck.take2_transposed("decoder_linear.weight", d, f)?;
    let b_dec = ck.take1("decoder_linear.bias", d)?;

    let mut meta = Meta::new(Kind::Sae, Activation::Relu, d, f, d);
    if let Some((model, hook)) = names_from_path(path) {
        meta.model = model;
        meta.hook_in = hook.clone();
        meta.hook_out = hook;
    }
    meta.source = "goodfire".into();
    let weights = Weights::new(w_enc, b_enc, w_dec, b_dec);
    weights
        .check(&meta)
        .map_err(|e| Error::format(path, e.to_string()))?;
    Ok(Imported::single(meta, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_released_files() {
        assert_eq!(
            names_from_path(Path::new("a/Llama-3.3-70B-Instruct-SAE-l50.pth")),
            Some((
                "meta-llama/Llama-3.3-70B-Instruct".into(),
                "model.layers.50".into()
            ))
        );
        assert_eq!(names_from_path(Path::new("sae.pth")), None);
        assert_eq!(names_from_path(Path::new("Llama-3-SAE-lx.pth")), None);
    }
}
