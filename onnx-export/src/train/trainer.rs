//! One training step on batches already in memory, with its hyperparameters, and the
//! parameters a run starts from.

use ndarray::{Array2, ArrayView2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use tiller_runtime::Activation;

use super::data;
use super::model::{
    self, Arch, Batch, Coeffs, DecoderNorm, Params, StepOptions, StepStats, Workspace,
};
use super::optim::{Adam, Schedule};
use crate::{Error, Result};

/// The schedule and loss settings of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// Learning rate and λ over the run.
    pub schedule: Schedule,
    /// α, the AuxK coefficient.
    pub aux: f64,
    /// ε, JumpReLU's bandwidth.
    pub bandwidth: f64,
    /// Tokens without firing after which a latent is dead.
    pub dead_tokens: u64,
    /// Gradient norm clipping (0: off).
    pub clip: f64,
    /// BatchTopK: the threshold's running-average factor.
    pub threshold_beta: f64,
    /// BatchTopK: the step from which the threshold is averaged.
    pub threshold_start: u64,
}

/// A dictionary being trained, on batches given to it: parameters, optimiser, buffers, and the
/// per-feature activity that decides which latents are dead.
#[derive(Debug)]
pub struct Trainer {
    /// The model's shape.
    pub arch: Arch,
    /// The settings.
    pub hyper: Hyper,
    /// The parameters.
    pub params: Params<f32>,
    /// The last step's gradients.
    pub grads: Params<f32>,
    /// The optimiser.
    pub adam: Adam<f32>,
    /// Reused buffers.
    pub ws: Workspace<f32>,
    /// Per feature: tokens seen when it last fired.
    pub last_active: Vec<u64>,
    /// Tokens trained on.
    pub tokens: u64,
    /// Steps done.
    pub step: u64,
    /// BatchTopK: the running average of the batch thresholds and its number of samples.
    pub threshold_ema: (f64, u64),
}

impl Trainer {
    /// A trainer starting from `params`.
    pub fn new(arch: Arch, hyper: Hyper, params: Params<f32>, beta1: f64, beta2: f64) -> Self {
        let adam = Adam::new(&params, beta1, beta2, 1e-8);
        Self {
            ws: Workspace::new(&arch),
            grads: Params::zeros(&arch),
            last_active: vec![0; arch.d_sae],
            tokens: 0,
            step: 0,
            threshold_ema: (0.0, 0),
            arch,
            hyper,
            params,
            adam,
        }
    }

    /// Which latents have not fired in the last `dead_tokens` tokens.
    pub fn dead_mask(&self) -> Vec<bool> {
        self.last_active
            .iter()
            .map(|&t| self.tokens.saturating_sub(t) >= self.hyper.dead_tokens)
            .collect()
    }

    /// BatchTopK: the threshold learned so far (the bias-corrected running average of the
    /// smallest activation each batch kept, Bussmann et al. 2024).
    pub fn batch_threshold(&self) -> Option<f32> {
        let (ema, n) = self.threshold_ema;
        (self.arch.activation == Activation::BatchTopK && n > 0)
            .then(|| (ema / (1.0 - self.hyper.threshold_beta.powf(n as f64))) as f32)
    }

    /// One step on a batch: forward, backward, clipping, Adam, the decoder-norm constraint, the
    /// dead-latent bookkeeping. `y` is `None` for SAEs and crosscoders (they reconstruct `x`).
    pub fn train_step(
        &mut self,
        x: ArrayView2<'_, f32>,
        y: Option<ArrayView2<'_, f32>>,
    ) -> Result<StepStats> {
        let s = self.step;
        let sched = &self.hyper.schedule;
        let coeffs = Coeffs {
            sparsity: sched.sparsity(s),
            aux: self.hyper.aux,
            bandwidth: self.hyper.bandwidth,
        };
        let dead = self.arch.is_topk().then(|| self.dead_mask());
        let unit = self.arch.decoder_norm == DecoderNorm::Unit;
        let stats = model::step(
            &self.arch,
            &self.params,
            &mut self.ws,
            Batch { x, y },
            &coeffs,
            StepOptions {
                dead: dead.as_deref(),
                project: unit,
                ..StepOptions::default()
            },
            Some(&mut self.grads),
        );
        if !stats.loss.is_finite() {
            return Err(Error::format(
                "--lr",
                format!(
                    "training diverged at step {s}: the loss is {}; try a lower learning rate",
                    stats.loss
                ),
            ));
        }
        let scale = if self.hyper.clip > 0.0 {
            let n = model::sum_squares(&self.grads).sqrt();
            if n > self.hyper.clip {
                self.hyper.clip / n
            } else {
                1.0
            }
        } else {
            1.0
        };
        self.adam
            .update(&mut self.params, &self.grads, sched.lr(s), scale);
        if unit {
            self.params.normalize_decoder();
        }
        self.tokens += x.nrows() as u64;
        for (t, &f) in self.last_active.iter_mut().zip(&self.ws.fired) {
            if f {
                *t = self.tokens;
            }
        }
        if let Some(t) = stats.batch_threshold
            && s >= self.hyper.threshold_start
        {
            let b = self.hyper.threshold_beta;
            self.threshold_ema = (
                b * self.threshold_ema.0 + (1.0 - b) * t,
                self.threshold_ema.1 + 1,
            );
        }
        self.step += 1;
        Ok(stats)
    }
}

/// Initial parameters: encoder rows in random directions (norm 0.1 with the norm-weighted
/// penalty, as Anthropic's April 2024 update; unit norm otherwise), the decoder their transpose
/// where the shapes allow it (a transcoder's decoder gets its own random directions), `b_enc` zero,
/// JumpReLU thresholds at `theta0`, the skip connection zero.
pub fn init_params(arch: &Arch, seed: u64, b_dec: &[f32], theta0: f64) -> Params<f32> {
    let mut rng = StdRng::seed_from_u64(data::mix(seed, 0x1417, 0));
    let norm0 = match arch.decoder_norm {
        DecoderNorm::Penalty => 0.1f32,
        DecoderNorm::Unit => 1.0,
    };
    let mut p = Params::<f32>::zeros(arch);
    let mut random_rows = |a: &mut Array2<f32>| {
        for mut row in a.rows_mut() {
            row.mapv_inplace(|_| StandardNormal.sample(&mut rng));
            let n = row.dot(&row).sqrt().max(1e-12);
            row.mapv_inplace(|v| v * norm0 / n);
        }
    };
    random_rows(&mut p.w_enc_t);
    if arch.width_in() == arch.width_out() {
        p.w_dec.assign(&p.w_enc_t);
    } else {
        random_rows(&mut p.w_dec);
    }
    if b_dec.len() == p.b_dec.len() {
        p.b_dec.iter_mut().zip(b_dec).for_each(|(a, b)| *a = *b);
    }
    p.log_threshold.fill(theta0.max(1e-12).ln() as f32);
    p
}
