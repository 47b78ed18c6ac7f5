//! What a training run is asked to do: every setting of `tiller-export train`, checked.

use std::path::PathBuf;

use tiller_runtime::{Activation, Kind};

use super::data::Normalize;
use super::model::DecoderNorm;

/// How `b_dec` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BDecInit {
    /// The geometric median of a sample of the targets.
    Median,
    /// Their mean.
    Mean,
    /// Zero.
    Zeros,
}

impl std::str::FromStr for BDecInit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "median" => Ok(Self::Median),
            "mean" => Ok(Self::Mean),
            "zeros" => Ok(Self::Zeros),
            other => Err(format!("`{other}` is not median, mean or zeros")),
        }
    }
}

impl BDecInit {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Median => "median",
            Self::Mean => "mean",
            Self::Zeros => "zeros",
        }
    }
}

/// Everything a training run is told. [`TrainConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Input activations: one source, or one per layer for a crosscoder.
    pub inputs: Vec<PathBuf>,
    /// Transcoders: the output activations, lined up with the inputs.
    pub targets: Vec<PathBuf>,
    /// The tensor to read from safetensors shards that hold several.
    pub tensor: Option<String>,
    /// The tensor to read from the targets' safetensors shards.
    pub target_tensor: Option<String>,
    /// What to train.
    pub kind: Kind,
    /// Its activation.
    pub activation: Activation,
    /// TopK / BatchTopK: active features per token.
    pub k: Option<usize>,
    /// TopK / BatchTopK: dead latents per token in the AuxK loss (default: half the output width).
    pub k_aux: Option<usize>,
    /// Number of features.
    pub d_sae: usize,
    /// Crosscoders reading one `[n, layers, d]` source: the layers (read from the shape otherwise).
    pub n_layers: Option<usize>,
    /// Tokens to train on (default: one pass over the training rows).
    pub tokens: Option<u64>,
    /// Rows per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps (default: 5% of the run, at most 1000).
    pub warmup_steps: Option<u64>,
    /// Fraction of the run over which the learning rate decays to zero at the end.
    pub decay_fraction: f64,
    /// λ: L1 (ReLU) or L0 (JumpReLU) coefficient.
    pub sparsity_coeff: Option<f64>,
    /// Fraction of the run over which λ rises from zero.
    pub sparsity_warmup: f64,
    /// α: the AuxK coefficient.
    pub aux_coeff: f64,
    /// JumpReLU: the kernel bandwidth ε.
    pub bandwidth: Option<f64>,
    /// JumpReLU: the initial threshold.
    pub init_threshold: Option<f64>,
    /// Tokens without firing after which a latent counts as dead.
    pub dead_tokens: Option<u64>,
    /// How decoder rows are held (default: penalty for ReLU, unit for the others).
    pub decoder_norm: Option<DecoderNorm>,
    /// How `b_dec` starts.
    pub b_dec_init: BDecInit,
    /// Dataset-wise normalisation.
    pub normalize: Normalize,
    /// Gradient norm clipping (0: off).
    pub clip_grad: f64,
    /// Adam's β1.
    pub beta1: f64,
    /// Adam's β2.
    pub beta2: f64,
    /// The seed of every random choice.
    pub seed: u64,
    /// Held-out tokens for the final evaluation (default: 10% of the rows, at most 16384).
    pub eval_tokens: Option<u64>,
    /// Rows in the shuffle buffer (default: 256 MiB of rows, at least two batches).
    pub shuffle_buffer: Option<usize>,
    /// The dictionary to write.
    pub output: PathBuf,
    /// A SAELens folder to write too.
    pub export_saelens: Option<PathBuf>,
    /// Where to write the JSON report.
    pub report: Option<PathBuf>,
    /// Where checkpoints go (default: `OUT.ckpt` beside the output).
    pub checkpoint_dir: Option<PathBuf>,
    /// Steps between checkpoints (0: only on interruption).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Go on from the latest checkpoint.
    pub resume: bool,
    /// Stop (with a checkpoint) after this many steps of the run.
    pub stop_after: Option<u64>,
    /// `tiller.hook_in`.
    pub hook_in: String,
    /// `tiller.hook_out`.
    pub hook_out: String,
    /// `tiller.model`.
    pub model: String,
    /// Show a progress bar (or, off a terminal, progress lines).
    pub progress: bool,
    /// The backward pass goes dense above this fraction of active entries.
    pub sparse_below: f64,
}

impl TrainConfig {
    /// A configuration with every default.
    pub fn new(
        inputs: Vec<PathBuf>,
        kind: Kind,
        activation: Activation,
        d_sae: usize,
        output: PathBuf,
    ) -> Self {
        Self {
            inputs,
            targets: Vec::new(),
            tensor: None,
            target_tensor: None,
            kind,
            activation,
            k: None,
            k_aux: None,
            d_sae,
            n_layers: None,
            tokens: None,
            batch: 4096,
            lr: 2e-4,
            warmup_steps: None,
            decay_fraction: 0.2,
            sparsity_coeff: None,
            sparsity_warmup: 0.05,
            aux_coeff: 1.0 / 32.0,
            bandwidth: None,
            init_threshold: None,
            dead_tokens: None,
            decoder_norm: None,
            b_dec_init: BDecInit::Median,
            normalize: Normalize::Scale,
            clip_grad: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            seed: 0,
            eval_tokens: None,
            shuffle_buffer: None,
            output,
            export_saelens: None,
            report: None,
            checkpoint_dir: None,
            checkpoint_every: 1000,
            keep_checkpoints: 2,
            resume: false,
            stop_after: None,
            hook_in: String::new(),
            hook_out: String::new(),
            model: String::new(),
            progress: false,
            sparse_below: 0.1,
        }
    }

    /// The checkpoint folder.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint_dir.clone().unwrap_or_else(|| {
            let mut s = self.output.clone().into_os_string();
            s.push(".ckpt");
            PathBuf::from(s)
        })
    }
}

/// The default λ: 5 for ReLU's L1 term (Anthropic, April 2024, with `E‖x‖ = √d_in`); for
/// JumpReLU's L0 term, the MSE per token one feature must save to be worth firing, as a fraction
/// of `E‖x‖² = d_in`.
pub fn default_sparsity(activation: Activation, d_in: usize) -> f64 {
    match activation {
        Activation::Relu => 5.0,
        Activation::JumpRelu => 0.002 * d_in as f64,
        _ => 0.0,
    }
}
