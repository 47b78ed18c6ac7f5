//! Dataset-wise normalisation of training activations, and the statistics it is computed from.

use ndarray::Array2;

/// Dataset-wise normalisation, as stored in the dictionary's `tiller.input_norm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    /// None.
    None,
    /// One constant factor `s` so that `E‖s·x‖ = √d_in` (Anthropic, April 2024); transcoders
    /// scale their targets alike, and the exporter folds that scale back into the decoder.
    Scale,
    /// Per-token layer norm (OpenAI's TopK SAEs); crosscoders normalise each layer.
    LayerNorm,
}

impl std::str::FromStr for Normalize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "scale" => Ok(Self::Scale),
            "layer_norm" => Ok(Self::LayerNorm),
            other => Err(format!("`{other}` is not none, scale or layer_norm")),
        }
    }
}

impl Normalize {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Scale => "scale",
            Self::LayerNorm => "layer_norm",
        }
    }
}

/// The normalisation applied to batches: the mode and the measured scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    /// The mode.
    pub mode: Normalize,
    /// Factor on the inputs ([`Normalize::Scale`]).
    pub s_in: f32,
    /// Factor on the targets (transcoders with [`Normalize::Scale`]).
    pub s_out: f32,
}

impl Norm {
    /// Normalises a block of rows in place: the first `width_in` columns are the input (in
    /// `blocks` layers of `d_in`), the rest the target.
    pub fn apply(&self, rows: &mut Array2<f32>, width_in: usize, blocks: usize) {
        let d_in = width_in / blocks.max(1);
        for mut row in rows.rows_mut() {
            let Some(r) = row.as_slice_mut() else {
                continue;
            };
            let (x, y) = r.split_at_mut(width_in.min(r.len()));
            match self.mode {
                Normalize::None => {}
                Normalize::Scale => {
                    x.iter_mut().for_each(|v| *v *= self.s_in);
                    y.iter_mut().for_each(|v| *v *= self.s_out);
                }
                Normalize::LayerNorm => {
                    for b in x.chunks_mut(d_in.max(1)) {
                        layer_norm(b);
                    }
                }
            }
        }
    }
}

/// `(x - mean) / (std + 1e-5)` with the unbiased standard deviation, as the dictionary's graph
/// computes it (`tiller_runtime::dictionary::LAYER_NORM_EPS`).
pub fn layer_norm(x: &mut [f32]) {
    let d = x.len() as f64;
    let mean = (x.iter().map(|&v| f64::from(v)).sum::<f64>() / d) as f32;
    x.iter_mut().for_each(|v| *v -= mean);
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let std = (ss / (d - 1.0).max(1.0)).sqrt() as f32;
    let denom = std + tiller_runtime::dictionary::LAYER_NORM_EPS as f32;
    x.iter_mut().for_each(|v| *v /= denom);
}

/// The mean Euclidean norm of the rows of `cols` of `rows`, per block of `d` columns.
pub fn mean_norm(rows: &Array2<f32>, cols: std::ops::Range<usize>, d: usize) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for row in rows.rows() {
        let r = row.to_slice().unwrap_or(&[]);
        for b in r[cols.clone()].chunks(d.max(1)) {
            sum += b
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt();
            n += 1;
        }
    }
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The geometric median of the rows (Weiszfeld's algorithm), the point minimising the summed
/// Euclidean distance: more robust than the mean to the few huge-norm tokens (BOS) of LM
/// activations. Bricken et al. 2023 and Gao et al. 2024 start `b_dec` there.
pub fn geometric_median(points: &Array2<f64>) -> Vec<f64> {
    let (n, d) = points.dim();
    if n == 0 {
        return vec![0.0; d];
    }
    let mut m: Vec<f64> = points
        .mean_axis(ndarray::Axis(0))
        .map(|a| a.to_vec())
        .unwrap_or_else(|| vec![0.0; d]);
    for _ in 0..200 {
        let mut num = vec![0.0; d];
        let mut den = 0.0;
        for row in points.rows() {
            let dist = row
                .iter()
                .zip(&m)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            let w = 1.0 / dist;
            for (acc, v) in num.iter_mut().zip(row.iter()) {
                *acc += w * v;
            }
            den += w;
        }
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let shift = next
            .iter()
            .zip(&m)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let scale = next.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        m = next;
        if shift < 1e-7 * scale {
            break;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_median_ignores_an_outlier() {
        let mut p = Array2::<f64>::zeros((5, 2));
        for i in 0..4 {
            p[[i, 0]] = if i % 2 == 0 { 1.0 } else { -1.0 };
            p[[i, 1]] = if i < 2 { 1.0 } else { -1.0 };
        }
        p[[4, 0]] = 1000.0;
        // The mean is (200, 0); the median balances four unit pulls against one: x ≈ 0.63.
        let m = geometric_median(&p);
        assert!((m[0] - 0.63).abs() < 0.02 && m[1].abs() < 1e-6, "{m:?}");
    }
}
