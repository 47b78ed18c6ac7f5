//! Gradient checks of every training loss against central finite differences, in float64, on the
//! trainer's own code (`model::step` is generic over the float type): ReLU with the norm-weighted
//! L1 term, TopK and BatchTopK with the AuxK loss, JumpReLU (every parameter but the thresholds
//! exactly; the thresholds' straight-through estimator against the finite difference whose step
//! is the kernel's bandwidth, which is what it estimates), for SAEs, transcoders, skip transcoders
//! and crosscoders, through both the sparse and the dense backward pass.
#![allow(clippy::unwrap_used)]

use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use tiller_export::train::model::{
    self, Arch, Batch, Coeffs, DecoderNorm, PARAM_NAMES, Params, StepOptions, Workspace,
};
use tiller_runtime::{Activation, Kind};

fn arch(kind: Kind, activation: Activation, decoder_norm: DecoderNorm) -> Arch {
    let layered = kind == Kind::Crosscoder;
    let transcoder = matches!(kind, Kind::Transcoder | Kind::SkipTranscoder);
    Arch {
        kind,
        activation,
        d_in: 6,
        d_out: if transcoder { 5 } else { 6 },
        n_layers: if layered { 3 } else { 1 },
        d_sae: 12,
        k: 3,
        k_aux: 2,
        decoder_norm,
        apply_b_dec_to_input: !transcoder,
    }
}

fn normal(rng: &mut StdRng, shape: (usize, usize), scale: f64) -> Array2<f64> {
    Array2::from_shape_simple_fn(shape, || {
        scale * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng)
    })
}

fn params(a: &Arch, rng: &mut StdRng) -> Params<f64> {
    let mut p = Params::<f64>::zeros(a);
    p.w_enc_t = normal(rng, p.w_enc_t.dim(), 0.5);
    p.w_dec = normal(rng, p.w_dec.dim(), 0.5);
    p.b_enc = normal(rng, (1, a.d_sae), 0.3).row(0).to_owned();
    p.b_dec = normal(rng, (1, a.width_out()), 0.3).row(0).to_owned();
    if a.activation == Activation::JumpRelu {
        p.log_threshold = p
            .log_threshold
            .mapv(|_| rng.random_range(0.05f64..0.6).ln());
    }
    if a.has_skip() {
        p.w_skip = normal(rng, p.w_skip.dim(), 0.3);
    }
    p
}

struct Case {
    arch: Arch,
    p: Params<f64>,
    x: Array2<f64>,
    y: Option<Array2<f64>>,
    dead: Vec<bool>,
    coeffs: Coeffs,
}

impl Case {
    fn new(kind: Kind, activation: Activation, norm: DecoderNorm, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let arch = arch(kind, activation, norm);
        let p = params(&arch, &mut rng);
        let x = normal(&mut rng, (24, arch.width_in()), 1.0);
        let y = matches!(kind, Kind::Transcoder | Kind::SkipTranscoder)
            .then(|| normal(&mut rng, (24, arch.width_out()), 1.0));
        let dead = (0..arch.d_sae).map(|j| j % 2 == 0).collect();
        Self {
            arch,
            p,
            x,
            y,
            dead,
            coeffs: Coeffs {
                sparsity: 0.7,
                aux: 0.25,
                bandwidth: 0.01,
            },
        }
    }

    /// The residual `y - ŷ` at the current parameters, computed here from `encode`.
    fn residual(&self) -> Array2<f64> {
        let f = model::encode(&self.arch, &self.p, self.x.view(), None);
        let mut yhat = f.dot(&self.p.w_dec) + &self.p.b_dec;
        if self.arch.has_skip() {
            yhat = yhat + self.x.dot(&self.p.w_skip.t());
        }
        let y = self.y.clone().unwrap_or_else(|| self.x.clone());
        y - yhat
    }

    fn run(
        &self,
        p: &Params<f64>,
        aux_target: &Array2<f64>,
        dense: bool,
        grads: Option<&mut Params<f64>>,
    ) -> f64 {
        let mut ws = Workspace::new(&self.arch);
        ws.sparse_below = if dense { 0.0 } else { 1.0 };
        let stats = model::step(
            &self.arch,
            p,
            &mut ws,
            Batch {
                x: self.x.view(),
                y: self.y.as_ref().map(|y| y.view()),
            },
            &self.coeffs,
            StepOptions {
                dead: Some(&self.dead),
                aux_target: Some(aux_target.view()),
                project: false,
                infer_threshold: None,
            },
            grads,
        );
        assert_eq!(stats.dense, dense && stats.l0 > 0.0);
        stats.loss
    }

    /// Checks every parameter (thresholds excepted) against central differences; returns the
    /// gradients.
    fn check(&self, dense: bool) -> Params<f64> {
        let target = self.residual();
        let mut g = Params::<f64>::zeros(&self.arch);
        let base = self.run(&self.p, &target, dense, Some(&mut g));
        assert!(base.is_finite());
        let h = 1e-6;
        let mut rng = StdRng::seed_from_u64(99);
        let mut checked = 0;
        for (t, name) in PARAM_NAMES.iter().enumerate() {
            if *name == "log_threshold" {
                continue;
            }
            let n = self.p.tensors()[t].len();
            for _ in 0..n.min(25) {
                let i = rng.random_range(0..n);
                let mut plus = self.p.clone();
                plus.tensors_mut()[t][i] += h;
                let mut minus = self.p.clone();
                minus.tensors_mut()[t][i] -= h;
                let fd = (self.run(&plus, &target, dense, None)
                    - self.run(&minus, &target, dense, None))
                    / (2.0 * h);
                let an = g.tensors()[t][i];
                let tol = 1e-6 * (1.0 + fd.abs());
                assert!(
                    (an - fd).abs() <= tol,
                    "{} {} {:?} dense={dense}: d/d{name}[{i}] analytic {an:.9e} vs finite difference {fd:.9e}",
                    self.arch.kind,
                    self.arch.activation,
                    self.arch.decoder_norm
                );
                checked += 1;
            }
        }
        assert!(checked > 50);
        g
    }
}

fn close(a: &Params<f64>, b: &Params<f64>, what: &str) {
    for ((ta, tb), name) in a.tensors().iter().zip(b.tensors()).zip(PARAM_NAMES) {
        for (i, (x, y)) in ta.iter().zip(tb.iter()).enumerate() {
            assert!(
                (x - y).abs() <= 1e-10 * (1.0 + y.abs()),
                "{what}: {name}[{i}] sparse {x:e} vs dense {y:e}"
            );
        }
    }
}

fn both_paths(kind: Kind, activation: Activation, norm: DecoderNorm, seed: u64) {
    let case = Case::new(kind, activation, norm, seed);
    let sparse = case.check(false);
    let dense = case.check(true);
    close(&sparse, &dense, &format!("{kind} {activation}"));
}

#[test]
fn relu_l1_weighted_by_decoder_norms() {
    both_paths(Kind::Sae, Activation::Relu, DecoderNorm::Penalty, 1);
    both_paths(Kind::Sae, Activation::Relu, DecoderNorm::Unit, 2);
}

#[test]
fn topk_with_auxk() {
    both_paths(Kind::Sae, Activation::TopK, DecoderNorm::Unit, 3);
}

#[test]
fn batchtopk_with_auxk() {
    both_paths(Kind::Sae, Activation::BatchTopK, DecoderNorm::Unit, 4);
}

#[test]
fn jumprelu_everything_but_the_thresholds() {
    both_paths(Kind::Sae, Activation::JumpRelu, DecoderNorm::Unit, 5);
}

#[test]
fn transcoders_and_skip_transcoders() {
    both_paths(Kind::Transcoder, Activation::Relu, DecoderNorm::Penalty, 6);
    both_paths(Kind::Transcoder, Activation::TopK, DecoderNorm::Unit, 7);
    both_paths(
        Kind::SkipTranscoder,
        Activation::Relu,
        DecoderNorm::Penalty,
        8,
    );
    both_paths(
        Kind::SkipTranscoder,
        Activation::JumpRelu,
        DecoderNorm::Unit,
        9,
    );
}

#[test]
fn crosscoders_weight_l1_by_the_sum_of_layer_norms() {
    both_paths(Kind::Crosscoder, Activation::Relu, DecoderNorm::Penalty, 10);
    both_paths(Kind::Crosscoder, Activation::TopK, DecoderNorm::Unit, 11);
    both_paths(
        Kind::Crosscoder,
        Activation::JumpRelu,
        DecoderNorm::Unit,
        12,
    );
}

/// JumpReLU's threshold gradient is a straight-through estimate: with the rectangle kernel it is
/// the finite difference `(L(θ + ε/2) - L(θ - ε/2)) / ε` of the loss, to first order in the jump
/// (the estimator uses `θ` for the jumping value `pre ≈ θ`). Checked on a batch large enough that
/// many pre-activations fall inside the window, with small thresholds so the second-order terms
/// are small.
#[test]
fn jumprelu_threshold_straight_through_estimator() {
    let mut rng = StdRng::seed_from_u64(13);
    let mut a = arch(Kind::Sae, Activation::JumpRelu, DecoderNorm::Unit);
    a.d_sae = 4;
    let mut p = params(&a, &mut rng);
    p.log_threshold = p.log_threshold.mapv(|_| 0.05f64.ln());
    p.b_enc.fill(0.05);
    let x = normal(&mut rng, (20000, a.width_in()), 4.0);
    let eps = 0.004;
    let coeffs = Coeffs {
        sparsity: 3.0,
        aux: 0.0,
        bandwidth: eps,
    };
    let loss = |p: &Params<f64>, g: Option<&mut Params<f64>>| {
        let mut ws = Workspace::new(&a);
        model::step(
            &a,
            p,
            &mut ws,
            Batch {
                x: x.view(),
                y: None,
            },
            &coeffs,
            StepOptions::default(),
            g,
        )
        .loss
    };
    let mut g = Params::<f64>::zeros(&a);
    loss(&p, Some(&mut g));
    for j in 0..a.d_sae {
        let theta = p.log_threshold[j].exp();
        let ste = g.log_threshold[j] / theta; // ∂L/∂θ
        let mut plus = p.clone();
        plus.log_threshold[j] = (theta + eps / 2.0).ln();
        let mut minus = p.clone();
        minus.log_threshold[j] = (theta - eps / 2.0).ln();
        let fd = (loss(&plus, None) - loss(&minus, None)) / eps;
        assert!(
            fd.abs() > 1e-3,
            "feature {j}: no pre-activation near the threshold"
        );
        assert!(
            (ste - fd).abs() <= 0.15 * fd.abs(),
            "feature {j}: straight-through ∂L/∂θ {ste:.6e} vs finite difference over the bandwidth {fd:.6e}"
        );
    }
}

/// With unit-norm decoder rows the radial part of each row's gradient is removed.
#[test]
fn unit_norm_projection_removes_the_radial_part() {
    let case = Case::new(Kind::Sae, Activation::TopK, DecoderNorm::Unit, 14);
    let mut p = case.p.clone();
    p.normalize_decoder();
    let mut ws = Workspace::new(&case.arch);
    let mut g = Params::<f64>::zeros(&case.arch);
    model::step(
        &case.arch,
        &p,
        &mut ws,
        Batch {
            x: case.x.view(),
            y: None,
        },
        &case.coeffs,
        StepOptions {
            dead: Some(&case.dead),
            project: true,
            ..StepOptions::default()
        },
        Some(&mut g),
    );
    let mut nonzero = 0;
    for (gr, wr) in g.w_dec.rows().into_iter().zip(p.w_dec.rows()) {
        assert!(gr.dot(&wr).abs() < 1e-12, "radial part {}", gr.dot(&wr));
        if gr.dot(&gr) > 0.0 {
            nonzero += 1;
        }
    }
    assert!(nonzero > 0);
}
