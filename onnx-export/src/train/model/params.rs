//! The trained parameters, their names in checkpoints, and their norms.

use ndarray::{Array1, Array2};
use rayon::prelude::*;
use tiller_runtime::Activation;

use super::arch::Arch;
use super::real::{Real, dot};

/// The trainable tensors. Absent ones (`log_threshold` without JumpReLU, `w_skip` without a skip
/// connection) are empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Params<T> {
    /// `W_encᵀ`, `[d_sae, width_in]`: row `i` is feature `i`'s encoder direction (kept transposed
    /// so the sparse backward pass writes whole rows).
    pub w_enc_t: Array2<T>,
    /// `[d_sae]`.
    pub b_enc: Array1<T>,
    /// `[d_sae, width_out]`.
    pub w_dec: Array2<T>,
    /// `[width_out]`.
    pub b_dec: Array1<T>,
    /// JumpReLU: `log θ`, `[d_sae]`.
    pub log_threshold: Array1<T>,
    /// Skip transcoders: `[d_out, d_in]`.
    pub w_skip: Array2<T>,
}

/// The names of [`Params`]' tensors, in the order of [`Params::tensors`].
pub const PARAM_NAMES: [&str; 6] = [
    "W_enc_t",
    "b_enc",
    "W_dec",
    "b_dec",
    "log_threshold",
    "W_skip",
];

impl<T: Real> Params<T> {
    /// All-zero parameters of `arch`'s shapes.
    pub fn zeros(arch: &Arch) -> Self {
        let (m, wi, wo) = (arch.d_sae, arch.width_in(), arch.width_out());
        Self {
            w_enc_t: Array2::zeros((m, wi)),
            b_enc: Array1::zeros(m),
            w_dec: Array2::zeros((m, wo)),
            b_dec: Array1::zeros(wo),
            log_threshold: Array1::zeros(if arch.activation == Activation::JumpRelu {
                m
            } else {
                0
            }),
            w_skip: if arch.has_skip() {
                Array2::zeros((arch.d_out, arch.d_in))
            } else {
                Array2::zeros((0, 0))
            },
        }
    }

    /// Every tensor as a flat slice, in [`PARAM_NAMES`] order.
    pub fn tensors(&self) -> [&[T]; 6] {
        [
            self.w_enc_t.as_slice().unwrap_or(&[]),
            self.b_enc.as_slice().unwrap_or(&[]),
            self.w_dec.as_slice().unwrap_or(&[]),
            self.b_dec.as_slice().unwrap_or(&[]),
            self.log_threshold.as_slice().unwrap_or(&[]),
            self.w_skip.as_slice().unwrap_or(&[]),
        ]
    }

    /// Every tensor as a flat mutable slice, in [`PARAM_NAMES`] order.
    pub fn tensors_mut(&mut self) -> [&mut [T]; 6] {
        [
            self.w_enc_t.as_slice_mut().unwrap_or(&mut []),
            self.b_enc.as_slice_mut().unwrap_or(&mut []),
            self.w_dec.as_slice_mut().unwrap_or(&mut []),
            self.b_dec.as_slice_mut().unwrap_or(&mut []),
            self.log_threshold.as_slice_mut().unwrap_or(&mut []),
            self.w_skip.as_slice_mut().unwrap_or(&mut []),
        ]
    }

    /// The same parameters in another float type.
    pub fn cast<U: Real>(&self) -> Params<U> {
        let c2 = |a: &Array2<T>| a.mapv(|v| U::of(v.f64()));
        let c1 = |a: &Array1<T>| a.mapv(|v| U::of(v.f64()));
        Params {
            w_enc_t: c2(&self.w_enc_t),
            b_enc: c1(&self.b_enc),
            w_dec: c2(&self.w_dec),
            b_dec: c1(&self.b_dec),
            log_threshold: c1(&self.log_threshold),
            w_skip: c2(&self.w_skip),
        }
    }

    /// Decoder row norms as the sparsity term reads them: `‖W_dec,i‖`, or for crosscoders
    /// `Σ_l ‖W_dec,l,i‖`.
    pub fn decoder_norms(&self, arch: &Arch) -> Vec<T> {
        let blocks = arch.out_blocks();
        self.w_dec
            .rows()
            .into_iter()
            .map(|r| {
                let r = r.to_slice().unwrap_or(&[]);
                r.chunks(arch.d_out.max(1))
                    .take(blocks)
                    .map(|b| dot(b, b).sqrt())
                    .fold(T::zero(), |a, b| a + b)
            })
            .collect()
    }

    /// Scales every decoder row to unit norm (zero rows are left alone).
    pub fn normalize_decoder(&mut self) {
        let w = self.w_dec.ncols().max(1);
        if let Some(s) = self.w_dec.as_slice_mut() {
            s.par_chunks_mut(w).for_each(|row| {
                let n = dot(row, row).sqrt();
                if n > T::zero() {
                    let inv = T::one() / n;
                    row.iter_mut().for_each(|v| *v *= inv);
                }
            });
        }
    }
}

/// The sum of `grads`' squares, in a fixed order.
pub fn sum_squares<T: Real>(g: &Params<T>) -> f64 {
    g.tensors()
        .iter()
        .map(|t| {
            let parts: Vec<f64> = t
                .par_chunks(1 << 14)
                .map(|c| c.iter().map(|v| v.f64() * v.f64()).sum::<f64>())
                .collect();
            parts.iter().sum::<f64>()
        })
        .sum()
}
