//! The float64 reference of docs/design.md#3-the-maths-the-reference-every-test-compares-with,
//! computed directly from [`Weights`]. Tests and `tiller-export verify` compare the ONNX graphs
//! with it.

use ndarray::{Array1, Array2, ArrayView2};

use super::build::Weights;
use super::meta::{Activation, InputNorm, LAYER_NORM_EPS, Meta};

fn to64(a: &Array2<f32>) -> Array2<f64> {
    a.mapv(f64::from)
}

/// Per-token normalisation statistics, to undo the normalisation on the output.
struct Norm {
    /// Per (token, layer): the factor the input was multiplied by, and the mean subtracted first.
    factor: Array2<f64>,
    mean: Array2<f64>,
}

fn normalize(meta: &Meta, x: &mut Array2<f64>) -> Norm {
    let (b, l, d) = (x.nrows(), meta.input_layers(), meta.d_in);
    let mut factor = Array2::ones((b, l));
    let mut mean = Array2::zeros((b, l));
    for t in 0..b {
        for layer in 0..l {
            let mut row = x.slice_mut(ndarray::s![t, layer * d..(layer + 1) * d]);
            match meta.input_norm {
                InputNorm::None => {}
                InputNorm::Scale(s) => {
                    row.mapv_inplace(|v| v * f64::from(s));
                    factor[[t, layer]] = f64::from(s);
                }
                InputNorm::NormRescale => {
                    let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                    let c = (d as f64).sqrt() / n;
                    row.mapv_inplace(|v| v * c);
                    factor[[t, layer]] = c;
                }
                InputNorm::LayerNorm => {
                    let mu = row.iter().sum::<f64>() / d as f64;
                    let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>()
                        / (d as f64 - 1.0).max(1.0);
                    let std = var.sqrt();
                    row.mapv_inplace(|v| (v - mu) / (std + LAYER_NORM_EPS));
                    // Undone as y·std + mu.
                    factor[[t, layer]] = 1.0 / std;
                    mean[[t, layer]] = mu;
                }
            }
        }
    }
    Norm { factor, mean }
}

/// Pre-activations, `[batch, d_sae]`, of `x` (`[batch, n_layers·d_in]`).
fn pre_acts(meta: &Meta, w: &Weights, x: ArrayView2<'_, f32>) -> (Array2<f64>, Array2<f64>, Norm) {
    let mut xn = x.mapv(f64::from);
    let norm = normalize(meta, &mut xn);
    if w.apply_b_dec_to_input {
        let b = w.b_dec.mapv(f64::from);
        xn -= &b;
    }
    let xw = xn.dot(&to64(&w.w_enc));
    let pre = &xw + &w.b_enc.mapv(f64::from);
    (pre, xw, norm)
}

/// Encoder pre-activations (before the activation function), `[batch, d_sae]`.
pub fn pre_activations(meta: &Meta, w: &Weights, x: ArrayView2<'_, f32>) -> Array2<f64> {
    pre_acts(meta, w, x).0
}

/// Feature activations, `[batch, d_sae]`.
pub fn encode(meta: &Meta, w: &Weights, x: ArrayView2<'_, f32>) -> Array2<f64> {
    let (pre, xw, _) = pre_acts(meta, w, x);
    activate(meta, w, &pre, &xw)
}

fn activate(meta: &Meta, w: &Weights, pre: &Array2<f64>, xw: &Array2<f64>) -> Array2<f64> {
    match meta.activation {
        Activation::Relu => pre.mapv(|v| v.max(0.0)),
        Activation::Linear => pre.clone(),
        Activation::Sigmoid => pre.mapv(sigmoid),
        Activation::JumpRelu | Activation::BatchTopK => {
            let th: Array1<f64> = w
                .threshold
                .as_ref()
                .map(|t| t.mapv(f64::from))
                .unwrap_or_default();
            let mut out = pre.clone();
            for mut row in out.rows_mut() {
                for (j, v) in row.iter_mut().enumerate() {
                    let t = if th.len() == 1 { th[0] } else { th[j] };
                    *v = if *v > t { v.max(0.0) } else { 0.0 };
                }
            }
            out
        }
        Activation::TopK => {
            let k = meta.k.unwrap_or(1);
            let mut out = Array2::zeros(pre.raw_dim());
            for (i, row) in pre.rows().into_iter().enumerate() {
                for j in topk_indices(row.as_slice().unwrap_or(&row.to_vec()), k) {
                    out[[i, j]] = row[j].max(0.0);
                }
            }
            out
        }
        Activation::Gated => {
            let Some(g) = &w.gated else {
                return Array2::zeros(pre.raw_dim());
            };
            let mut out = Array2::zeros(pre.raw_dim());
            for ((i, j), v) in out.indexed_iter_mut() {
                if pre[[i, j]] > 0.0 {
                    let mag = xw[[i, j]] * f64::from(g.r_mag[j]).exp() + f64::from(g.b_mag[j]);
                    *v = mag.max(0.0);
                }
            }
            out
        }
    }
}

/// The logistic function in float64, `1 / (1 + exp(-v))`, without overflow for either sign.
pub fn sigmoid(v: f64) -> f64 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

/// The indices of the `k` largest values, largest first; ties go to the lower index.
pub fn topk_indices(values: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Feature activations and the reconstruction (`[batch, n_layers·d_out]`).
pub fn encode_decode(
    meta: &Meta,
    w: &Weights,
    x: ArrayView2<'_, f32>,
) -> (Array2<f64>, Array2<f64>) {
    let (pre, xw, norm) = pre_acts(meta, w, x);
    let acts = activate(meta, w, &pre, &xw);
    let y = reconstruct(meta, w, x, &acts, &norm);
    (acts, y)
}

/// The reconstruction of `x` from the feature activations `acts` (`[batch, d_sae]`, which need not
/// be `x`'s own: a steering edit is `decode(x, f') − decode(x, f)`), un-normalised with `x`'s
/// statistics as [`encode_decode`] does.
pub fn decode(meta: &Meta, w: &Weights, x: ArrayView2<'_, f32>, acts: &Array2<f64>) -> Array2<f64> {
    let mut xn = x.mapv(f64::from);
    let norm = normalize(meta, &mut xn);
    reconstruct(meta, w, x, acts, &norm)
}

fn reconstruct(
    meta: &Meta,
    w: &Weights,
    x: ArrayView2<'_, f32>,
    acts: &Array2<f64>,
    norm: &Norm,
) -> Array2<f64> {
    let mut y = acts.dot(&to64(&w.w_dec)) + w.b_dec.mapv(f64::from);
    if meta.denormalizes_output() && meta.input_norm != InputNorm::None {
        let d = meta.d_out;
        for t in 0..y.nrows() {
            for layer in 0..meta.n_layers {
                let (f, m) = (norm.factor[[t, layer]], norm.mean[[t, layer]]);
                y.slice_mut(ndarray::s![t, layer * d..(layer + 1) * d])
                    .mapv_inplace(|v| v / f + m);
            }
        }
    }
    if let Some(ws) = &w.w_skip {
        let mut skip = x.mapv(f64::from).dot(&to64(ws).t());
        if let Some(b) = &w.b_skip {
            skip += &b.mapv(f64::from);
        }
        y += &skip;
    }
    y
}
