//! openai/sparse_autoencoder checkpoints: one `torch.save`d `Autoencoder.state_dict()` per file
//! (`sparse_autoencoder/model.py`).
//!
//! The state dict holds `pre_bias` `[d]`, `encoder.weight` `[n, d]`, `latent_bias` `[n]`,
//! `decoder.weight` `[d, n]` (or `decoder.linear.weight`, the encoder's own weight, for a tied
//! autoencoder), the statistics buffers (`stats_last_nonzero`, `latents_activation_frequency`,
//! `latents_mean_square`, ignored), and two plain entries: `activation` (`ReLU`, `TopK`) and
//! `activation_state_dict` (`{k, postact_fn}` for TopK). `from_state_dict` enables the input
//! normalisation exactly when the activation is `TopK`.
//!
//! The maths: `x, mu, std = LN(x)` for TopK (`mu` the mean over the last axis, `std` the unbiased
//! standard deviation of `x - mu`, `x = (x - mu) / (std + 1e-5)`), then
//! `latents = activation((x - pre_bias) encoderᵀ + latent_bias)` and
//! `recons = latents decoderᵀ + pre_bias`, un-normalised as `recons · std + mu`. That is Tiller's
//! `layer_norm` input normalisation with `b_dec = pre_bias` subtracted from the input, exactly.
//! `TopK(k)` takes the k largest pre-activations and applies `postact_fn` to them: with `ReLU`
//! that is Tiller's TopK; `Identity` (negative values kept) is refused, as Tiller's TopK clamps.
//!
//! The released files live at `<location>[_v4|_v5_32k|_v5_128k]/autoencoders/<layer>.pt` for
//! GPT-2 small; when a path has that shape, the hook is the TransformerLens name the project's
//! README maps the location to (`resid_post_mlp` → `blocks.<layer>.hook_resid_post`) and the
//! model is `gpt2`. Otherwise both are left empty (set the hook with `--hook`).

use std::path::Path;

use tiller_runtime::{Activation, InputNorm, Kind, Meta, Weights};

use super::imported::{ImportOptions, Imported};
use crate::torch;
use crate::{Error, Result};

/// Whether `path` is a `torch.save` file holding an OpenAI autoencoder state dict.
pub fn detect(path: &Path) -> bool {
    path.is_file()
        && path.extension().is_some_and(|e| e == "pt" || e == "pth")
        && torch::is_archive(path)
        && torch::load(path).is_ok_and(|c| {
            ["pre_bias", "latent_bias", "encoder.weight"]
                .iter()
                .all(|k| c.has(k))
        })
}

/// The TransformerLens hook of a released autoencoder, from its path.
fn hook_from_path(path: &Path) -> Option<String> {
    let layer: usize = path.file_stem()?.to_str()?.parse().ok()?;
    let dir = path.parent()?;
    if dir.file_name()? != "autoencoders" {
        return None;
    }
    let name = dir.parent()?.file_name()?.to_str()?;
    let location = ["_v5_128k", "_v5_32k", "_v4"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    let hook = match location {
        "mlp_post_act" => "mlp.hook_post",
        "resid_delta_attn" => "hook_attn_out",
        "resid_post_attn" => "hook_resid_mid",
        "resid_delta_mlp" => "hook_mlp_out",
        "resid_post_mlp" => "hook_resid_post",
        _ => return None,
    };
    Some(format!("blocks.{layer}.{hook}"))
}

/// Imports the autoencoder at `path`.
pub fn import(path: &Path, _opts: &ImportOptions) -> Result<Vec<Imported>> {
    let mut ck = torch::load(path)?;
    let (n, d) = match ck.shape("encoder.weight") {
        Some(&[n, d]) if n > 0 && d > 0 => (n, d),
        Some(s) => {
            return Err(Error::format(
                path,
                format!("tensor `encoder.weight` has shape {s:?}, expected [n_latents, n_inputs]"),
            ));
        }
        None => {
            return Err(Error::format(
                path,
                format!(
                    "tensor `encoder.weight` is missing (the checkpoint has: {})",
                    ck.names().join(", ")
                ),
            ));
        }
    };
    let activation = match ck.value("activation") {
        None => "ReLU".to_string(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| Error::format(path, format!("`activation` = {v} is not a string")))?
            .to_string(),
    };
    let (act, k, norm) = match activation.as_str() {
        "ReLU" => (Activation::Relu, None, InputNorm::None),
        "TopK" => {
            let k = ck.int("activation_state_dict.k")?.ok_or_else(|| {
                Error::format(
                    path,
                    "`activation_state_dict.k` is missing (a TopK activation needs it)",
                )
            })?;
            let k = usize::try_from(k)
                .ok()
                .filter(|&k| k >= 1 && k <= n)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("`activation_state_dict.k` = {k} is not between 1 and {n}"),
                    )
                })?;
            match ck
                .value("activation_state_dict.postact_fn")
                .and_then(|v| v.as_str())
            {
                Some("ReLU") => {}
                Some(other) => {
                    return Err(Error::format(
                        path,
                        format!(
                            "`activation_state_dict.postact_fn` = `{other}`: Tiller's TopK applies \
                             ReLU to the kept values, so only `ReLU` is imported exactly"
                        ),
                    ));
                }
                None => {
                    return Err(Error::format(
                        path,
                        "`activation_state_dict.postact_fn` is missing (a TopK activation needs it)",
                    ));
                }
            }
            (Activation::TopK, Some(k), InputNorm::LayerNorm)
        }
        other => {
            return Err(Error::format(
                path,
                format!("`activation` = `{other}` is not imported (Tiller reads ReLU and TopK)"),
            ));
        }
    };
    let w_enc = ck.take2_transposed("encoder.weight", n, d)?;
    let w_dec = if ck.has("decoder.weight") {
        ck.take2_transposed("decoder.weight", d, n)?
    } else if ck.has("decoder.linear.weight") {
        // TiedTranspose: decoding multiplies by the encoder's own weight.
        ck.take2("decoder.linear.weight", n, d)?
    } else {
        return Err(Error::format(
            path,
            format!(
                "tensor `decoder.weight` is missing (nor is the autoencoder tied; the checkpoint has: {})",
                ck.names().join(", ")
            ),
        ));
    };
    let pre_bias = ck.take1("pre_bias", d)?;
    let latent_bias = ck.take1("latent_bias", n)?;

    let mut meta = Meta::new(Kind::Sae, act, d, n, d);
    meta.k = k;
    meta.input_norm = norm;
    if let Some(hook) = hook_from_path(path) {
        meta.hook_in = hook.clone();
        meta.hook_out = hook;
        meta.model = "gpt2".into();
    }
    meta.source = "openai".into();
    let mut weights = Weights::new(w_enc, latent_bias, w_dec, pre_bias);
    weights.apply_b_dec_to_input = true;
    weights
        .check(&meta)
        .map_err(|e| Error::format(path, e.to_string()))?;
    Ok(Imported::single(meta, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_of_released_paths() {
        let h = |p: &str| hook_from_path(Path::new(p));
        assert_eq!(
            h("x/resid_post_mlp_v5_32k/autoencoders/6.pt").as_deref(),
            Some("blocks.6.hook_resid_post")
        );
        assert_eq!(
            h("gpt2-small/mlp_post_act/autoencoders/0.pt").as_deref(),
            Some("blocks.0.mlp.hook_post")
        );
        assert_eq!(
            h("resid_delta_attn_v4/autoencoders/11.pt").as_deref(),
            Some("blocks.11.hook_attn_out")
        );
        assert_eq!(h("somewhere/6.pt"), None);
        assert_eq!(h("other_v5_32k/autoencoders/6.pt"), None);
    }
}
