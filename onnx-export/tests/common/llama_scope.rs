//! Llama Scope checkpoints as the October 2024 `lm_saes` saved and released them, and a float64
//! implementation of what `lm_saes`' own loader does with them (`SparseAutoEncoder.from_config`,
//! `standardize_parameters_of_dataset_activation_scaling`, `transform_to_unit_decoder_norm`,
//! `encode`, `decode`, in `src/lm_saes/sae.py`).

use std::path::Path;

use ndarray::{Array1, Array2, Axis};
use safetensors::Dtype;
use serde_json::{Value, json};

use super::{Rng, Tensors, m2, stored, v1, write_safetensors};

/// `d_model` of the checkpoints written here.
pub const D: usize = 32;
/// `d_sae` of the checkpoints written here.
pub const D_SAE: usize = 96;

/// A released Llama Scope `hyperparams.json`, with the fields `edit` overrides.
pub fn hyperparams(edit: Value) -> Value {
    let mut h = json!({
        "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
        "use_decoder_bias": true, "apply_decoder_bias_to_pre_encoder": false, "expansion_factor": 3,
        "d_model": D, "d_sae": D_SAE, "bias_init_method": "all_zero", "act_fn": "jumprelu",
        "jump_relu_threshold": 0.35, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 2.5, "out": 2.5},
        "decoder_exactly_fixed_norm": false, "sparsity_include_decoder_norm": true,
        "use_glu_encoder": false, "init_decoder_norm": 0.5, "init_encoder_norm": null,
        "init_encoder_with_decoder_transpose": true, "lp": 1, "l1_coefficient": 8e-05,
        "l1_coefficient_warmup_steps": 39062, "top_k": 50, "k_warmup_steps": 39062,
        "use_batch_norm_mse": true, "use_ghost_grads": false, "tp_size": 1, "ddp_size": 1,
        "device": "cuda", "seed": 42, "dtype": "torch.bfloat16"
    });
    for (k, v) in edit.as_object().unwrap() {
        h[k] = v.clone();
    }
    h
}

/// Random weights in `lm_saes`' layout; decoder columns of norm `unit_decoder ? 1 : ≤ 1` (training
/// clamps them to at most 1).
pub fn tensors(rng: &mut Rng, unit_decoder: bool) -> Tensors {
    let mut t = Tensors::new();
    t.insert("encoder.weight".into(), rng.normal(&[D_SAE, D], 0.3));
    t.insert("encoder.bias".into(), rng.normal(&[D_SAE], 0.1));
    let mut dec: Array2<f64> = rng.normal(&[D, D_SAE], 1.0).into_dimensionality().unwrap();
    let scale = rng.uniform(&[D_SAE], 0.3, 1.0);
    for (i, mut col) in dec.axis_iter_mut(Axis(1)).enumerate() {
        let n = col.dot(&col).sqrt();
        let s = if unit_decoder { 1.0 } else { scale[[i]] };
        col.mapv_inplace(|v| v / n * s);
    }
    t.insert("decoder.weight".into(), dec.into_dyn());
    t.insert("decoder.bias".into(), rng.normal(&[D], 0.2));
    t
}

/// Writes a checkpoint folder as `lm_saes` uploads it. Returns the stored tensors.
pub fn write_checkpoint(dir: &Path, h: &Value, t: &Tensors, dtype: Dtype) -> Tensors {
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    std::fs::write(dir.join("hyperparams.json"), h.to_string()).unwrap();
    std::fs::write(
        dir.join("lm_config.json"),
        json!({"model_name": "meta-llama/Llama-3.1-8B", "d_model": D, "use_flash_attn": false})
            .to_string(),
    )
    .unwrap();
    write_safetensors(&dir.join("checkpoints/final.safetensors"), t, dtype);
    t.iter()
        .map(|(k, v)| (k.clone(), stored(v, dtype)))
        .collect()
}

/// The input scale `sqrt(d_model) / dataset_average_activation_norm.in` (1 unless dataset-wise).
pub fn s_in(h: &Value) -> f64 {
    if h["norm_activation"] == "dataset-wise" {
        (D as f64).sqrt() / h["dataset_average_activation_norm"]["in"].as_f64().unwrap()
    } else {
        1.0
    }
}

/// An `lm_saes` `SparseAutoEncoder` after `from_config`: its parameters as the loader leaves
/// them, and its settings.
pub struct LmSaes {
    enc: Array2<f64>,
    enc_b: Array1<f64>,
    dec: Array2<f64>,
    dec_b: Array1<f64>,
    norm: String,
    act_fn: String,
    threshold: f64,
    top_k: usize,
    b_dec_on_input: bool,
}

impl LmSaes {
    /// `from_config`: `standardize_parameters_of_dataset_activation_scaling` and
    /// `transform_to_unit_decoder_norm` applied to the stored tensors.
    pub fn load(h: &Value, t: &Tensors) -> Self {
        let d = D as f64;
        let mut enc = m2(t, "encoder.weight");
        let mut enc_b = v1(t, "encoder.bias");
        let mut dec = m2(t, "decoder.weight");
        let mut dec_b = v1(t, "decoder.bias");
        let mut norm = h["norm_activation"].as_str().unwrap().to_string();
        // standardize_parameters_of_dataset_activation_scaling
        if norm == "dataset-wise" {
            let avg = &h["dataset_average_activation_norm"];
            let f_in = d.sqrt() / avg["in"].as_f64().unwrap();
            let f_out = d.sqrt() / avg["out"].as_f64().unwrap();
            enc_b /= f_in;
            dec_b /= f_out;
            dec *= f_in / f_out;
            norm = "inference".into();
        }
        // transform_to_unit_decoder_norm
        if h["sparsity_include_decoder_norm"] == true {
            let n: Array1<f64> = dec.map_axis(Axis(0), |c| c.dot(&c).sqrt());
            dec /= &n;
            for (mut row, n) in enc.axis_iter_mut(Axis(0)).zip(&n) {
                row *= *n;
            }
            enc_b *= &n;
        }
        let mut act_fn = h["act_fn"].as_str().unwrap().to_string();
        let threshold = h["jump_relu_threshold"].as_f64().unwrap();
        if act_fn == "topk" && threshold > 0.0 {
            act_fn = "jumprelu".into();
        }
        Self {
            enc,
            enc_b,
            dec,
            dec_b,
            norm,
            act_fn,
            threshold,
            top_k: h["top_k"].as_u64().unwrap() as usize,
            b_dec_on_input: h["use_decoder_bias"] == true
                && h["apply_decoder_bias_to_pre_encoder"] == true,
        }
    }

    /// `compute_norm_factor`: token-wise is the only runtime scaling left after loading.
    fn factors(&self, x: &Array2<f64>) -> Vec<f64> {
        let d = D as f64;
        x.rows()
            .into_iter()
            .map(|r| {
                if self.norm == "token-wise" {
                    d.sqrt() / r.dot(&r).sqrt()
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// `encode`: the feature activations of `x`, in `lm_saes`' units.
    pub fn encode(&self, x: &Array2<f64>) -> Array2<f64> {
        let mut xin = x.clone();
        for (mut row, f) in xin.rows_mut().into_iter().zip(&self.factors(x)) {
            row *= *f;
        }
        if self.b_dec_on_input {
            xin -= &self.dec_b;
        }
        let pre = xin.dot(&self.enc.t()) + &self.enc_b;
        match self.act_fn.as_str() {
            "jumprelu" => pre.mapv(|v| if v > self.threshold { v } else { 0.0 }),
            "topk" => {
                let relu = pre.mapv(|v| v.max(0.0));
                let mut f = Array2::zeros(relu.raw_dim());
                for (i, row) in relu.rows().into_iter().enumerate() {
                    let mut idx: Vec<usize> = (0..row.len()).collect();
                    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                    for &j in &idx[..self.top_k] {
                        f[[i, j]] = row[j];
                    }
                }
                f
            }
            _ => pre.mapv(|v| v.max(0.0)),
        }
    }

    /// `decode` of `acts` (which need not be `x`'s own), and `compute_loss`'s division by the
    /// label's norm factor: the reconstruction in the model's units.
    pub fn decode(&self, x: &Array2<f64>, acts: &Array2<f64>) -> Array2<f64> {
        let mut recon = acts.dot(&self.dec.t()) + &self.dec_b;
        for (mut row, f) in recon.rows_mut().into_iter().zip(&self.factors(x)) {
            row /= *f;
        }
        recon
    }
}

/// `lm_saes`' `from_config` then `encode` and `decode` (and `compute_loss`'s division by the
/// label's norm factor), in float64. Returns its feature activations and the reconstruction in the
/// model's units.
pub fn lm_saes(h: &Value, t: &Tensors, x: &Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    let sae = LmSaes::load(h, t);
    let acts = sae.encode(x);
    let recon = sae.decode(x, &acts);
    (acts, recon)
}
