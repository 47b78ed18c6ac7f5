//! Adam and the schedules of the learning rate and the sparsity coefficient.

use rayon::prelude::*;

use super::model::{Params, Real};

/// Adam (Kingma & Ba 2015) with PyTorch's bias correction:
/// `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
/// `p ← p - lr/(1-β1ᵗ) · m / (√v / √(1-β2ᵗ) + ε)`.
#[derive(Debug, Clone)]
pub struct Adam<T> {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Steps taken.
    pub t: u64,
    /// First moments.
    pub m: Params<T>,
    /// Second moments.
    pub v: Params<T>,
}

impl<T: Real> Adam<T> {
    /// Zero moments shaped like `like`.
    pub fn new(like: &Params<T>, beta1: f64, beta2: f64, eps: f64) -> Self {
        let mut m = like.clone();
        for t in m.tensors_mut() {
            t.iter_mut().for_each(|v| *v = T::zero());
        }
        Self {
            beta1,
            beta2,
            eps,
            t: 0,
            v: m.clone(),
            m,
        }
    }

    /// One update of `p` with the gradient `g·scale` (`scale` < 1 when clipping).
    pub fn update(&mut self, p: &mut Params<T>, g: &Params<T>, lr: f64, scale: f64) {
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2) = (T::of(self.beta1), T::of(self.beta2));
        let (c1, c2) = (T::one() - b1, T::one() - b2);
        let step = T::of(lr / (1.0 - self.beta1.powi(t)));
        let inv_sqrt_bc2 = T::of(1.0 / (1.0 - self.beta2.powi(t)).sqrt());
        let eps = T::of(self.eps);
        let scale = T::of(scale);
        let gs = g.tensors();
        for (((pt, mt), vt), gt) in p
            .tensors_mut()
            .into_iter()
            .zip(self.m.tensors_mut())
            .zip(self.v.tensors_mut())
            .zip(gs)
        {
            const CHUNK: usize = 1 << 14;
            pt.par_chunks_mut(CHUNK)
                .zip(mt.par_chunks_mut(CHUNK))
                .zip(vt.par_chunks_mut(CHUNK))
                .zip(gt.par_chunks(CHUNK))
                .for_each(|(((pc, mc), vc), gc)| {
                    for (((pv, mv), vv), &gv) in
                        pc.iter_mut().zip(mc.iter_mut()).zip(vc.iter_mut()).zip(gc)
                    {
                        let gv = gv * scale;
                        *mv = b1 * *mv + c1 * gv;
                        *vv = b2 * *vv + c2 * gv * gv;
                        *pv -= step * *mv / (vv.sqrt() * inv_sqrt_bc2 + eps);
                    }
                });
        }
    }
}

/// The learning-rate and sparsity-coefficient schedules.
///
/// The learning rate rises linearly over the first `warmup` steps, stays at `lr`, and falls
/// linearly to zero over the last `decay` steps (Anthropic, April 2024: the last 20%). The sparsity
/// coefficient rises linearly from zero over the first `sparsity_warmup` steps (Anthropic: 5%;
/// Rajamanoharan et al.: the first steps of a JumpReLU run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Steps in the run.
    pub steps: u64,
    /// The peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// Decay steps at the end.
    pub decay: u64,
    /// The final sparsity coefficient.
    pub sparsity: f64,
    /// Steps over which the sparsity coefficient rises.
    pub sparsity_warmup: u64,
}

impl Schedule {
    /// The learning rate of step `s` (0-based).
    pub fn lr(&self, s: u64) -> f64 {
        let warm = if self.warmup > 0 {
            ((s + 1) as f64 / self.warmup as f64).min(1.0)
        } else {
            1.0
        };
        let start = self.steps.saturating_sub(self.decay);
        let decay = if self.decay > 0 && s >= start {
            (self.steps - s) as f64 / self.decay as f64
        } else {
            1.0
        };
        self.lr * warm * decay
    }

    /// The sparsity coefficient of step `s`.
    pub fn sparsity(&self, s: u64) -> f64 {
        if self.sparsity_warmup == 0 {
            return self.sparsity;
        }
        self.sparsity * ((s + 1) as f64 / self.sparsity_warmup as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::{Arch, DecoderNorm};
    use tiller_runtime::{Activation, Kind};

    #[test]
    fn schedule_warms_up_and_decays() {
        let s = Schedule {
            steps: 100,
            lr: 1.0,
            warmup: 10,
            decay: 20,
            sparsity: 2.0,
            sparsity_warmup: 5,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert_eq!(s.lr(9), 1.0);
        assert_eq!(s.lr(50), 1.0);
        assert_eq!(s.lr(79), 1.0);
        assert!((s.lr(80) - 1.0).abs() < 1e-12);
        assert!((s.lr(99) - 0.05).abs() < 1e-12);
        assert!((s.sparsity(0) - 0.4).abs() < 1e-12);
        assert_eq!(s.sparsity(10), 2.0);
    }

    #[test]
    fn adam_minimises_a_quadratic() {
        let arch = Arch {
            kind: Kind::Sae,
            activation: Activation::Relu,
            d_in: 2,
            d_out: 2,
            n_layers: 1,
            d_sae: 1,
            k: 1,
            k_aux: 1,
            decoder_norm: DecoderNorm::Penalty,
            apply_b_dec_to_input: false,
        };
        let mut p = Params::<f64>::zeros(&arch);
        p.b_dec[0] = 3.0;
        p.b_dec[1] = -2.0;
        let mut adam = Adam::new(&p, 0.9, 0.999, 1e-8);
        for _ in 0..2000 {
            // L = ‖b_dec - (1, 1)‖².
            let mut g = Params::<f64>::zeros(&arch);
            g.b_dec[0] = 2.0 * (p.b_dec[0] - 1.0);
            g.b_dec[1] = 2.0 * (p.b_dec[1] - 1.0);
            adam.update(&mut p, &g, 0.01, 1.0);
        }
        assert!((p.b_dec[0] - 1.0).abs() < 1e-3, "{}", p.b_dec[0]);
        assert!((p.b_dec[1] - 1.0).abs() < 1e-3, "{}", p.b_dec[1]);
    }
}
