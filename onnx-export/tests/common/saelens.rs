//! SAELens's own maths in float64, written from its source (sae_lens/saes/*.py), and random
//! checkpoints for it: the reference of the SAELens importer's tests.

use ndarray::{Array2, Axis};
use serde_json::json;

use super::{Rng, Tensors, m2, v1};

/// What the reference needs to know about a checkpoint, in SAELens's own terms.
#[derive(Clone, Copy)]
pub struct Sae {
    pub arch: &'static str,
    pub k: usize,
    pub apply_b_dec_to_input: bool,
    pub norm: &'static str,
    pub rescale: bool,
}

/// The per-token statistics of `run_time_activation_norm_fn_in`, which `_out` undoes.
struct Stats {
    mu: f64,
    std: f64,
    factor: f64,
}

/// `run_time_activation_norm_fn_in` on every token of `x`: the normalised input and what
/// `run_time_activation_norm_fn_out` needs to undo it.
fn norm_in(s: &Sae, x: &Array2<f32>) -> (Array2<f64>, Vec<Stats>) {
    let mut xin = x.mapv(f64::from);
    let d = xin.ncols() as f64;
    let mut stats = Vec::with_capacity(xin.nrows());
    for mut row in xin.axis_iter_mut(Axis(0)) {
        let mut st = Stats {
            mu: 0.0,
            std: 1.0,
            factor: 1.0,
        };
        match s.norm {
            "layer_norm" => {
                let mu = row.sum() / d;
                row.mapv_inplace(|v| v - mu);
                let std = (row.iter().map(|v| v * v).sum::<f64>() / (d - 1.0)).sqrt(); // torch.std: unbiased
                row.mapv_inplace(|v| v / (std + 1e-5));
                st.mu = mu;
                st.std = std;
            }
            "constant_norm_rescale" => {
                let c = d.sqrt() / row.iter().map(|v| v * v).sum::<f64>().sqrt();
                row.mapv_inplace(|v| v * c);
                st.factor = c;
            }
            _ => {}
        }
        stats.push(st);
    }
    (xin, stats)
}

/// SAELens `encode`, in f64: the feature activations of `x`.
pub fn encode(s: &Sae, t: &Tensors, x: &Array2<f32>) -> Array2<f64> {
    let transcoder = s.arch.contains("transcoder");
    let (mut xin, _) = norm_in(s, x);
    if !transcoder && s.apply_b_dec_to_input {
        xin -= &v1(t, "b_dec");
    }
    let w_enc = m2(t, "W_enc");
    let norms = decoder_norms(t);
    match s.arch {
        "gated" => {
            let gate = xin.dot(&w_enc) + v1(t, "b_gate");
            let r_mag = v1(t, "r_mag");
            let mut w_mag = w_enc.clone();
            for (j, mut col) in w_mag.axis_iter_mut(Axis(1)).enumerate() {
                col *= r_mag[j].exp();
            }
            let mag = (xin.dot(&w_mag) + v1(t, "b_mag")).mapv(|v| v.max(0.0));
            let mut f = mag;
            f.zip_mut_with(&gate, |m, g| {
                if *g <= 0.0 {
                    *m = 0.0
                }
            });
            f
        }
        _ => {
            let mut pre = xin.dot(&w_enc) + v1(t, "b_enc");
            match s.arch {
                "topk" => {
                    if s.rescale {
                        for mut row in pre.rows_mut() {
                            for (v, n) in row.iter_mut().zip(&norms) {
                                *v *= n;
                            }
                        }
                    }
                    let mut f = Array2::zeros(pre.raw_dim());
                    for (i, row) in pre.rows().into_iter().enumerate() {
                        let mut idx: Vec<usize> = (0..row.len()).collect();
                        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                        for &j in &idx[..s.k] {
                            f[[i, j]] = row[j].max(0.0);
                        }
                    }
                    f
                }
                "jumprelu" | "jumprelu_transcoder" => {
                    let th = v1(t, "threshold");
                    let mut f = pre.mapv(|v| v.max(0.0));
                    f.zip_mut_with(&(&pre - &th), |v, above| {
                        if *above <= 0.0 {
                            *v = 0.0
                        }
                    });
                    f
                }
                _ => pre.mapv(|v| v.max(0.0)),
            }
        }
    }
}

fn decoder_norms(t: &Tensors) -> Vec<f64> {
    m2(t, "W_dec")
        .rows()
        .into_iter()
        .map(|r| r.dot(&r).sqrt())
        .collect()
}

/// SAELens `decode` of the feature activations `acts` (which need not be `x`'s own), un-normalised
/// with `x`'s statistics by `run_time_activation_norm_fn_out`, plus the skip term of `forward` for
/// skip transcoders, in f64.
pub fn decode(s: &Sae, t: &Tensors, x: &Array2<f32>, acts: &Array2<f64>) -> Array2<f64> {
    let transcoder = s.arch.contains("transcoder");
    let (_, stats) = norm_in(s, x);
    let norms = decoder_norms(t);
    let mut dec_in = acts.clone();
    if s.rescale {
        for mut row in dec_in.rows_mut() {
            for (v, n) in row.iter_mut().zip(&norms) {
                *v /= n;
            }
        }
    }
    if let Some(sf) = t.get("scaling_factor") {
        let sf = sf.clone().into_dimensionality::<ndarray::Ix1>().unwrap();
        for mut row in dec_in.rows_mut() {
            row *= &sf;
        }
    }
    let mut y = dec_in.dot(&m2(t, "W_dec")) + v1(t, "b_dec");
    if !transcoder {
        for (mut row, st) in y.axis_iter_mut(Axis(0)).zip(&stats) {
            match s.norm {
                "layer_norm" => row.mapv_inplace(|v| v * st.std + st.mu),
                "constant_norm_rescale" => row.mapv_inplace(|v| v / st.factor),
                _ => {}
            }
        }
    }
    if s.arch == "skip_transcoder" {
        y += &x.mapv(f64::from).dot(&m2(t, "W_skip").t());
    }
    y
}

/// SAELens `encode` then `decode` (plus the skip term of `forward` for skip transcoders), in f64.
pub fn reference(s: &Sae, t: &Tensors, x: &Array2<f32>) -> (Array2<f64>, Array2<f64>) {
    let acts = encode(s, t, x);
    let y = decode(s, t, x, &acts);
    (acts, y)
}

/// Random tensors of a SAELens checkpoint of architecture `arch`.
pub fn tensors(rng: &mut Rng, arch: &str, d_in: usize, d_sae: usize, d_out: usize) -> Tensors {
    let mut t = Tensors::new();
    t.insert("W_enc".into(), rng.normal(&[d_in, d_sae], 0.3));
    t.insert("W_dec".into(), rng.normal(&[d_sae, d_out], 0.3));
    t.insert("b_dec".into(), rng.normal(&[d_out], 0.2));
    if arch == "gated" {
        t.insert("b_gate".into(), rng.normal(&[d_sae], 0.1));
        t.insert("r_mag".into(), rng.normal(&[d_sae], 0.2));
        t.insert("b_mag".into(), rng.normal(&[d_sae], 0.1));
    } else {
        t.insert("b_enc".into(), rng.normal(&[d_sae], 0.1));
    }
    if arch.starts_with("jumprelu") {
        t.insert("threshold".into(), rng.uniform(&[d_sae], 0.0, 0.4));
    }
    if arch == "skip_transcoder" {
        t.insert("W_skip".into(), rng.normal(&[d_out, d_in], 0.2));
    }
    t
}

/// A SAELens 6 `cfg.json` for `arch` (d_in 32, d_sae 80), with the fields of `extra` set.
pub fn v6(arch: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut cfg = json!({
        "architecture": arch, "d_in": 32, "d_sae": 80, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": !arch.contains("transcoder"), "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.18.0", "model_name": "gpt2", "hook_name": "blocks.4.hook_resid_post"}
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    cfg
}
