//! The native path for sliced hooks: when a hook needs only some features of a ReLU, JumpReLU or
//! Gated dictionary (for which slicing is exact), their encoder columns are computed here with a
//! cache-friendly matrix product, without ONNX Runtime's per-call overhead.

use ndarray::{Array1, Array2, Axis};

use crate::dictionary::{Activation, DictionaryFile, InputNorm, Kind, LAYER_NORM_EPS};
use crate::{Error, Result};

/// The encoder columns of some features of one dictionary.
#[derive(Debug, Clone)]
pub struct SlicedEncoder {
    activation: Activation,
    norm: InputNorm,
    d_in: usize,
    /// The selected encoder columns: `[d_in, m]`, row-major.
    w: Vec<f32>,
    m: usize,
    b: Array1<f32>,
    b_dec_in: Option<Array1<f32>>,
    threshold: Option<Array1<f32>>,
    gated: Option<(Array1<f32>, Array1<f32>)>,
}

fn vector(file: &DictionaryFile, name: &str) -> Result<Array1<f32>> {
    Ok(Array1::from_vec(file.tensor_f32(name)?.1))
}

/// Whether slicing `activation` keeps the activations exact.
pub fn slicing_is_exact(activation: Activation) -> bool {
    matches!(
        activation,
        Activation::Relu
            | Activation::JumpRelu
            | Activation::BatchTopK
            | Activation::Gated
            | Activation::Linear
            | Activation::Sigmoid
    )
}

impl SlicedEncoder {
    /// Slices the encoder of `file` to `features`; `None` where slicing would not be exact or the
    /// graph is not one of Tiller's own.
    pub fn new(file: &DictionaryFile, features: &[u32]) -> Result<Option<Self>> {
        let m = file.meta();
        if !slicing_is_exact(m.activation) || m.kind == Kind::Crosscoder {
            return Ok(None);
        }
        let (dims, w_enc) = file.tensor_f32("W_enc")?;
        if dims != [m.d_in, m.d_sae] {
            return Ok(None);
        }
        let w_enc = Array2::from_shape_vec((m.d_in, m.d_sae), w_enc)
            .map_err(|e| Error::dictionary(file.path(), format!("`W_enc`: {e}")))?;
        let cols: Vec<usize> = features.iter().map(|&f| f as usize).collect();
        if let Some(bad) = cols.iter().find(|&&c| c >= m.d_sae) {
            return Err(Error::dictionary(
                file.path(),
                format!("feature {bad} is out of range (d_sae = {})", m.d_sae),
            ));
        }
        let w: Vec<f32> = w_enc.select(Axis(1), &cols).iter().copied().collect();
        let n_cols = cols.len();
        let gated = m.activation == Activation::Gated;
        let b = vector(file, if gated { "b_gate" } else { "b_enc" })?.select(Axis(0), &cols);
        let b_dec_in = if file.b_dec_on_input() {
            Some(file.b_dec()?)
        } else {
            None
        };
        let threshold = match m.activation {
            Activation::JumpRelu => Some(vector(file, "threshold")?.select(Axis(0), &cols)),
            Activation::BatchTopK => Some(Array1::from_elem(
                cols.len(),
                vector(file, "threshold")?.first().copied().unwrap_or(0.0),
            )),
            _ => None,
        };
        let gated = if gated {
            let r = vector(file, "r_mag")?.select(Axis(0), &cols).mapv(f32::exp);
            Some((r, vector(file, "b_mag")?.select(Axis(0), &cols)))
        } else {
            None
        };
        // Without input normalisation, `(x - b_dec)·W = x·W - b_dec·W`: fold the constant into the
        // biases (computed in f64) so that the kernel reads the host's activations directly.
        let mut b = b;
        let mut gated = gated;
        let mut b_dec_in = b_dec_in;
        if m.input_norm == InputNorm::None
            && let Some(bd) = b_dec_in.take()
        {
            for (j, bj) in b.iter_mut().enumerate() {
                let bdw: f64 = (0..m.d_in)
                    .map(|k| f64::from(bd[k]) * f64::from(w[k * n_cols + j]))
                    .sum();
                *bj = (f64::from(*bj) - bdw) as f32;
                if let Some((r, bm)) = gated.as_mut() {
                    bm[j] = (f64::from(bm[j]) - bdw * f64::from(r[j])) as f32;
                }
            }
        }
        Ok(Some(Self {
            activation: m.activation,
            norm: m.input_norm,
            d_in: m.d_in,
            w,
            m: cols.len(),
            b,
            b_dec_in,
            threshold,
            gated,
        }))
    }

    /// Encodes `x` (`[n, d_in]` row-major) into `out` (`[n, width]`, row-major), using `scratch`.
    /// Rows where `finite` is false give unspecified values: the caller skips them.
    pub fn encode(&self, x: &[f32], finite: &[bool], scratch: &mut Vec<f32>, out: &mut [f32]) {
        let n = finite.len();
        let m = self.m;
        if self.norm == InputNorm::None && self.b_dec_in.is_none() {
            crate::kernels::matmul(x, n, self.d_in, &self.w, m, out);
            self.activate(out);
            return;
        }
        scratch.clear();
        for (row, ok) in x.chunks_exact(self.d_in.max(1)).zip(finite) {
            if *ok {
                scratch.extend_from_slice(row);
            } else {
                scratch.resize(scratch.len() + self.d_in, 0.0);
            }
        }
        let d = self.d_in as f32;
        for row in scratch.chunks_exact_mut(self.d_in.max(1)) {
            match self.norm {
                InputNorm::None => {}
                InputNorm::Scale(s) => row.iter_mut().for_each(|v| *v *= s),
                InputNorm::NormRescale => {
                    let c = d.sqrt() / row.iter().map(|v| v * v).sum::<f32>().sqrt();
                    row.iter_mut().for_each(|v| *v *= c);
                }
                InputNorm::LayerNorm => {
                    let mu = row.iter().sum::<f32>() / d;
                    row.iter_mut().for_each(|v| *v -= mu);
                    let std = (row.iter().map(|v| v * v).sum::<f32>() / (d - 1.0).max(1.0)).sqrt();
                    let denom = std + LAYER_NORM_EPS as f32;
                    row.iter_mut().for_each(|v| *v /= denom);
                }
            }
            if let Some(b) = &self.b_dec_in {
                row.iter_mut().zip(b.iter()).for_each(|(v, b)| *v -= b);
            }
        }
        crate::kernels::matmul(scratch, n, self.d_in, &self.w, m, out);
        self.activate(out);
    }

    /// Applies the activation to `out`, which holds `x·W` (without the bias).
    fn activate(&self, out: &mut [f32]) {
        let m = self.m;
        for row in out.chunks_exact_mut(m.max(1)) {
            for (j, v) in row.iter_mut().enumerate() {
                let xw = *v;
                let pre = xw + self.b[j];
                *v = match self.activation {
                    Activation::Relu => pre.max(0.0),
                    Activation::Linear => pre,
                    Activation::Sigmoid => sigmoid(pre),
                    Activation::JumpRelu | Activation::BatchTopK => {
                        let t = self.threshold.as_ref().map_or(0.0, |t| t[j]);
                        if pre > t { pre.max(0.0) } else { 0.0 }
                    }
                    Activation::Gated => match &self.gated {
                        Some((r, bm)) if pre > 0.0 => (xw * r[j] + bm[j]).max(0.0),
                        _ => 0.0,
                    },
                    Activation::TopK => 0.0,
                };
            }
        }
    }
}

/// `1 / (1 + exp(-v))`, written so that neither branch overflows (ONNX Runtime's `Sigmoid`
/// does the same).
pub(crate) fn sigmoid(v: f32) -> f32 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}
