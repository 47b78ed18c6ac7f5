//! From trained parameters to a Tiller dictionary (format v1) and to a SAELens folder.

use std::collections::HashMap;
use std::path::Path;

use ndarray::{Array1, Array2};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::json;
use tiller_runtime::{Activation, InputNorm, Kind, Meta, Weights};

use super::data::{Norm, Normalize};
use super::model::{Arch, Params};
use crate::import::saelens;
use crate::{Error, Result};

/// Where the dictionary reads and writes, and the model it was trained on.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// `tiller.hook_in` (comma separated for crosscoders).
    pub hook_in: String,
    /// `tiller.hook_out`; the input hook when empty.
    pub hook_out: String,
    /// `tiller.model`.
    pub model: String,
}

/// The dictionary's metadata and weights. A transcoder's target scale is folded into its decoder
/// (and skip connection), since the graph does not undo a normalisation on a transcoder's output;
/// BatchTopK gets its scalar threshold.
pub fn dictionary(
    arch: &Arch,
    p: &Params<f32>,
    norm: &Norm,
    batch_threshold: Option<f32>,
    hooks: &Hooks,
) -> Result<(Meta, Weights)> {
    let mut meta = Meta::new(
        arch.kind,
        arch.activation,
        arch.d_in,
        arch.d_sae,
        arch.d_out,
    );
    meta.n_layers = arch.in_blocks();
    meta.k = arch.is_topk().then_some(arch.k);
    meta.input_norm = match norm.mode {
        Normalize::None => InputNorm::None,
        Normalize::Scale => InputNorm::Scale(norm.s_in),
        Normalize::LayerNorm => InputNorm::LayerNorm,
    };
    meta.hook_in = hooks.hook_in.clone();
    meta.hook_out = if hooks.hook_out.is_empty() {
        hooks.hook_in.clone()
    } else {
        hooks.hook_out.clone()
    };
    meta.model = hooks.model.clone();
    meta.source = "tiller-train".into();
    let transcoder = matches!(arch.kind, Kind::Transcoder | Kind::SkipTranscoder);
    let out_scale = if transcoder && norm.mode == Normalize::Scale {
        norm.s_out
    } else {
        1.0
    };
    let mut w = Weights::new(
        p.w_enc_t.t().as_standard_layout().to_owned(),
        p.b_enc.clone(),
        p.w_dec.mapv(|v| v / out_scale),
        p.b_dec.mapv(|v| v / out_scale),
    );
    w.apply_b_dec_to_input = arch.apply_b_dec_to_input;
    w.threshold = match arch.activation {
        Activation::JumpRelu => Some(p.log_threshold.mapv(f32::exp)),
        Activation::BatchTopK => Some(Array1::from_elem(1, batch_threshold.unwrap_or(0.0))),
        _ => None,
    };
    if arch.has_skip() {
        // Trained on the normalised input; the graph's skip term reads the raw one.
        let in_scale = if norm.mode == Normalize::Scale {
            norm.s_in
        } else {
            1.0
        };
        w.w_skip = Some(p.w_skip.mapv(|v| v * in_scale / out_scale));
    }
    w.check(&meta)?;
    Ok((meta, w))
}

/// Why a dictionary cannot be saved for SAELens, if it cannot.
pub fn saelens_unsupported(kind: Kind, activation: Activation) -> Option<String> {
    match (kind, activation) {
        (Kind::Sae, _)
        | (Kind::Transcoder, Activation::Relu | Activation::JumpRelu | Activation::BatchTopK)
        | (Kind::SkipTranscoder, Activation::Relu) => None,
        (Kind::Crosscoder, _) => Some("SAELens has no crosscoder architecture".into()),
        (k, a) => Some(format!("SAELens has no {a} {k} architecture")),
    }
}

fn architecture(kind: Kind, activation: Activation) -> &'static str {
    match (kind, activation) {
        (Kind::Sae, Activation::Relu) => "standard",
        (Kind::Sae, Activation::TopK) => "topk",
        (Kind::Sae, _) => "jumprelu",
        (Kind::Transcoder, Activation::Relu) => "transcoder",
        (Kind::Transcoder, _) => "jumprelu_transcoder",
        _ => "skip_transcoder",
    }
}

/// Writes a SAELens (v6 layout) folder: `cfg.json` and `sae_weights.safetensors`. A dataset-wise
/// scale is folded into the weights, as SAELens does when it saves a final SAE; BatchTopK is
/// saved as JumpReLU with its threshold on every feature, as SAELens saves BatchTopK SAEs for
/// inference.
pub fn write_saelens(dir: &Path, meta: &Meta, w: &Weights) -> Result<()> {
    if let Some(why) = saelens_unsupported(meta.kind, meta.activation) {
        return Err(Error::format(dir, why));
    }
    let mut w_enc = w.w_enc.clone();
    let mut w_dec = w.w_dec.clone();
    let mut b_dec = w.b_dec.clone();
    let normalize = match meta.input_norm {
        InputNorm::None => "none",
        InputNorm::LayerNorm => "layer_norm",
        InputNorm::NormRescale => "constant_norm_rescale",
        InputNorm::Scale(s) => {
            w_enc.mapv_inplace(|v| v * s);
            if meta.denormalizes_output() {
                w_dec.mapv_inplace(|v| v / s);
                b_dec.mapv_inplace(|v| v / s);
            }
            "none"
        }
    };
    let transcoder = meta.kind != Kind::Sae;
    let mut cfg = json!({
        "architecture": architecture(meta.kind, meta.activation),
        "d_in": meta.d_in,
        "d_sae": meta.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": w.apply_b_dec_to_input,
        "normalize_activations": normalize,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1",
            "model_name": meta.model,
            "hook_name": meta.hook_in,
            "hook_head_index": null,
            "prepend_bos": true,
            "model_class_name": "HookedTransformer",
            "training_library": "tiller-export",
        },
    });
    if meta.activation == Activation::TopK {
        cfg["k"] = json!(meta.k);
        cfg["rescale_acts_by_decoder_norm"] = json!(false);
    }
    if transcoder {
        cfg["d_out"] = json!(meta.d_out);
        cfg["metadata"]["hook_name_out"] = json!(meta.hook_out);
    }
    let mut tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("W_enc", vec![meta.d_in, meta.d_sae], flat(&w_enc)),
        ("b_enc", vec![meta.d_sae], w.b_enc.to_vec()),
        ("W_dec", vec![meta.d_sae, meta.d_out], flat(&w_dec)),
        ("b_dec", vec![meta.d_out], b_dec.to_vec()),
    ];
    if let Some(t) = &w.threshold {
        let per_feature = if t.len() == 1 {
            vec![t[0]; meta.d_sae]
        } else {
            t.to_vec()
        };
        tensors.push(("threshold", vec![meta.d_sae], per_feature));
    }
    if let Some(s) = &w.w_skip {
        tensors.push(("W_skip", vec![meta.d_out, meta.d_in], flat(s)));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join(saelens::CFG);
    let text =
        serde_json::to_string_pretty(&cfg).map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
    let bytes: Vec<(&str, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let path = dir.join(saelens::WEIGHTS);
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.to_string(), v))
                .map_err(|e| Error::format(&path, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path)
        .map_err(|e| Error::format(&path, format!("cannot write: {e}")))
}

fn flat(a: &Array2<f32>) -> Vec<f32> {
    a.as_standard_layout().iter().copied().collect()
}
