//! Shared helpers for the benchmarks: random dictionaries and activations with fixed seeds.

pub mod dicts;
pub mod machine;

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tiller_runtime::{Activation, Kind, Meta, Weights};

fn randn(rng: &mut StdRng, shape: (usize, usize), scale: f32) -> Array2<f32> {
    let n = Normal::new(0.0f32, scale).unwrap_or_else(|_| unreachable!("valid parameters"));
    Array2::from_shape_simple_fn(shape, || n.sample(rng))
}

/// Writes a random SAE of `d_in × d_sae` with `activation` (k = 32 for TopK) into `dir`.
pub fn write_random_sae(
    dir: &Path,
    activation: Activation,
    d_in: usize,
    d_sae: usize,
    seed: u64,
) -> tiller_runtime::Result<PathBuf> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut meta = Meta::new(Kind::Sae, activation, d_in, d_sae, d_in);
    if activation == Activation::TopK {
        meta.k = Some(32);
    }
    let scale = 1.0 / (d_in as f32).sqrt();
    let weights = Weights {
        w_enc: randn(&mut rng, (d_in, d_sae), scale),
        b_enc: Array1::from_elem(d_sae, -0.1),
        w_dec: randn(&mut rng, (d_sae, d_in), scale),
        b_dec: Array1::zeros(d_in),
        threshold: match activation {
            Activation::JumpRelu => Some(Array1::from_elem(d_sae, 0.1)),
            Activation::BatchTopK => Some(Array1::from_elem(1, 0.1)),
            _ => None,
        },
        gated: None,
        w_skip: None,
        b_skip: None,
        apply_b_dec_to_input: true,
    };
    let path = dir.join(format!("{activation}-{d_in}x{d_sae}.onnx"));
    tiller_runtime::graph::write_model(
        tiller_runtime::dictionary::build_model(&meta, &weights)?,
        &path,
        tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD,
    )?;
    Ok(path)
}

/// Random `[batch, d]` activations.
pub fn random_activations(batch: usize, d: usize, seed: u64) -> Array2<f32> {
    randn(&mut StdRng::seed_from_u64(seed), (batch, d), 1.0)
}

/// Writes the ReLU dictionary made of `features` of `file` (their encoder columns and decoder
/// rows), as a plain ONNX graph: what running ONNX Runtime on a sliced dictionary costs.
pub fn slice_relu(
    file: &tiller_runtime::DictionaryFile,
    features: &[u32],
    out: &Path,
) -> tiller_runtime::Result<PathBuf> {
    let m = file.meta();
    let (_, w_enc) = file.tensor_f32("W_enc")?;
    let w_enc = Array2::from_shape_vec((m.d_in, m.d_sae), w_enc)
        .map_err(|e| tiller_runtime::Error::invalid("W_enc", e.to_string()))?;
    let b_enc = Array1::from_vec(file.tensor_f32("b_enc")?.1);
    let cols: Vec<usize> = features.iter().map(|&f| f as usize).collect();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, m.d_in, cols.len(), m.d_out);
    meta.feature_ids = Some(features.to_vec());
    let weights = Weights {
        apply_b_dec_to_input: true,
        ..Weights::new(
            w_enc.select(ndarray::Axis(1), &cols),
            b_enc.select(ndarray::Axis(0), &cols),
            file.w_dec()?.select(ndarray::Axis(0), &cols),
            file.b_dec()?,
        )
    };
    tiller_runtime::graph::write_model(
        tiller_runtime::dictionary::build_model(&meta, &weights)?,
        out,
        tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD,
    )?;
    Ok(out.to_path_buf())
}

/// The runtime's metrics work in one hook call, alone: every named feature's activation histogram
/// and active counter updated for each token through the runtime's own step-buffer type
/// (`tiller_runtime::metrics::LocalFeature`, kept from call to call) and flushed when
/// `tiller_runtime::metrics::flush_due` says so, as the runtime does. Every feature counts as active: an
/// upper bound.
#[derive(Debug)]
pub struct MetricsLoad {
    local: Vec<tiller_runtime::metrics::LocalFeature>,
    values: Vec<f64>,
    flushed_at: Option<std::time::Instant>,
}

impl MetricsLoad {
    /// The series of dictionary `res` for each of `features`, on `metrics`.
    pub fn new(metrics: &tiller_runtime::metrics::Metrics, features: &[u32]) -> Self {
        let local = features
            .iter()
            .map(|f| {
                let l = ["res", &f.to_string()];
                tiller_runtime::metrics::LocalFeature::new(
                    &tiller_runtime::metrics::FeatureMetrics {
                        activation: metrics.feature_activation.with_label_values(&l),
                        active: metrics.feature_active.with_label_values(&l),
                    },
                )
            })
            .collect();
        Self {
            local,
            values: (0..features.len()).map(|i| 0.05 * i as f64).collect(),
            flushed_at: None,
        }
    }

    /// One call's updates for `batch` tokens.
    pub fn call(&mut self, batch: usize) {
        for _ in 0..batch {
            for (f, &v) in self.local.iter_mut().zip(&self.values) {
                f.observe(v);
            }
        }
        if tiller_runtime::metrics::flush_due(&mut self.flushed_at) {
            for f in &mut self.local {
                f.flush();
            }
        }
    }
}
