//! `tiller-export train`: sparse autoencoders, transcoders, skip transcoders and crosscoders with
//! ReLU, TopK, BatchTopK or JumpReLU activations, trained on the CPU from streamed activations.
//!
//! The pieces: [`data`] streams shards through a shuffle buffer; [`model`] holds the forward and
//! backward passes of every kind and activation; [`optim`] is Adam with its schedules;
//! [`checkpoint`] saves and restores a run bit for bit; [`export`] writes the ONNX dictionary and a
//! SAELens folder; [`report`] is the JSON report. [`train`] runs the whole thing; [`Trainer`] is
//! one step of it on batches already in memory (the benchmark uses it).
//!
//! Every random choice derives from `--seed` and a counter, every parallel sum runs in a fixed
//! order, and the checkpoint holds the whole state: the same seed gives the same weights, bit for
//! bit, whether or not the run was interrupted and resumed.

pub mod checkpoint;
pub mod data;
pub mod export;
pub mod model;
pub mod norm;
pub mod optim;
pub mod report;
pub mod shard;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ndarray::{Array2, ArrayView2, s};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use tiller_runtime::{Activation, Kind};

use crate::{Error, Result};
use data::{Dataset, Norm, Normalize, Stream, StreamState};
use model::{Arch, Batch, Coeffs, DecoderNorm, Params, StepOptions, StepStats, Workspace};
use optim::{Adam, Schedule};
use report::{Eval, Point, Report};

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
    fn as_str(self) -> &'static str {
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

/// What a run may be told from outside while it runs.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Set (by a Ctrl-C handler) to stop at the end of the current step, with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

/// A finished run: its report and what it trained.
#[derive(Debug)]
pub struct Finished {
    /// The report (also written to `--report`).
    pub report: Report,
    /// The model's shape.
    pub arch: Arch,
    /// The trained parameters, in the trainer's (normalised) space.
    pub params: Params<f32>,
    /// The normalisation.
    pub norm: Norm,
    /// BatchTopK: the threshold exported.
    pub threshold: Option<f32>,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Trained to the end; the dictionary (and SAELens folder, report) written.
    Finished(Box<Finished>),
    /// Stopped early (Ctrl-C or `stop_after`), with a checkpoint to resume from.
    Stopped {
        /// Steps done.
        step: u64,
        /// The checkpoint written.
        checkpoint: PathBuf,
    },
}

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

/// Everything [`train`] settles before the first step.
#[derive(Debug)]
struct Plan {
    arch: Arch,
    hyper: Hyper,
    steps: u64,
    sparsity: f64,
    theta0: f64,
    eval_rows: u64,
    capacity: usize,
    fingerprint: BTreeMap<String, String>,
}

fn bad(flag: &str, m: impl Into<String>) -> Error {
    Error::format(flag, m)
}

fn plan(cfg: &TrainConfig, ds: &Dataset) -> Result<Plan> {
    if !matches!(
        cfg.kind,
        Kind::Sae | Kind::Transcoder | Kind::SkipTranscoder | Kind::Crosscoder
    ) {
        return Err(bad(
            "--kind",
            format!(
                "{} cannot be trained (sae, transcoder, skip_transcoder, crosscoder)",
                cfg.kind
            ),
        ));
    }
    if !matches!(
        cfg.activation,
        Activation::Relu | Activation::TopK | Activation::BatchTopK | Activation::JumpRelu
    ) {
        return Err(bad(
            "--activation",
            format!(
                "{} cannot be trained (relu, topk, batchtopk, jumprelu)",
                cfg.activation
            ),
        ));
    }
    let transcoder = matches!(cfg.kind, Kind::Transcoder | Kind::SkipTranscoder);
    if transcoder && cfg.targets.len() != 1 {
        return Err(bad(
            "--target",
            "a transcoder needs its output activations: one --target",
        ));
    }
    if !transcoder && !cfg.targets.is_empty() {
        return Err(bad(
            "--target",
            format!(
                "a {} reconstructs its input; --target is for transcoders",
                cfg.kind
            ),
        ));
    }
    let first = &ds.sources[0];
    let (d_in, n_layers) = if cfg.kind == Kind::Crosscoder {
        if cfg.inputs.len() > 1 {
            if let Some(s) = ds.sources[..ds.inputs]
                .iter()
                .find(|s| s.width != first.width || s.layers != 1)
            {
                return Err(Error::format(
                    &s.path,
                    format!(
                        "rows of {} values, but {} has {}: a crosscoder's layers must have one width",
                        s.width,
                        first.path.display(),
                        first.width
                    ),
                ));
            }
            (first.width, cfg.inputs.len())
        } else {
            let l = cfg.n_layers.unwrap_or(first.layers);
            if l < 2 || !first.width.is_multiple_of(l) {
                return Err(Error::format(
                    &first.path,
                    format!(
                        "rows of {} values cannot be split into {l} layers: give one --input per layer, \
                         a [tokens, layers, d] array, or --n-layers",
                        first.width
                    ),
                ));
            }
            (first.width / l, l)
        }
    } else {
        if cfg.inputs.len() != 1 || first.layers != 1 {
            return Err(Error::format(
                &first.path,
                format!(
                    "a {} reads one layer: give one --input of [tokens, d] activations",
                    cfg.kind
                ),
            ));
        }
        (first.width, 1)
    };
    let d_out = if transcoder {
        ds.sources[ds.inputs].width
    } else {
        d_in
    };
    if transcoder && ds.sources[ds.inputs].layers != 1 {
        return Err(Error::format(
            &ds.sources[ds.inputs].path,
            "a transcoder writes one layer: --target must be [tokens, d]",
        ));
    }
    if cfg.d_sae == 0 {
        return Err(bad("--d-sae", "must be positive"));
    }
    if cfg.batch == 0 {
        return Err(bad("--batch", "must be positive"));
    }
    let topk = matches!(cfg.activation, Activation::TopK | Activation::BatchTopK);
    let k = match (topk, cfg.k) {
        (true, Some(k)) if k >= 1 && k <= cfg.d_sae => k,
        (true, Some(k)) => {
            return Err(bad(
                "--k",
                format!("{k} must be between 1 and --d-sae {}", cfg.d_sae),
            ));
        }
        (true, None) => return Err(bad("--k", format!("{} needs --k", cfg.activation))),
        (false, Some(_)) => {
            return Err(bad("--k", format!("{} has no k", cfg.activation)));
        }
        (false, None) => 0,
    };
    if cfg.kind == Kind::SkipTranscoder && cfg.normalize == Normalize::LayerNorm {
        return Err(bad(
            "--normalize",
            "a skip transcoder's skip term reads the raw input: use scale or none",
        ));
    }
    if let Some(dir) = &cfg.export_saelens
        && let Some(why) = export::saelens_unsupported(cfg.kind, cfg.activation)
    {
        return Err(Error::format(dir, format!("cannot be written: {why}")));
    }
    let total = ds.rows();
    let eval_rows = match cfg.eval_tokens {
        Some(n) if n >= total => {
            return Err(bad(
                "--eval-tokens",
                format!("{n} leaves none of the {total} rows for training"),
            ));
        }
        Some(n) => n,
        None => (total / 10).min(16384),
    };
    let train_rows = total - eval_rows;
    if train_rows == 0 {
        return Err(bad("--input", "holds no rows to train on"));
    }
    let tokens = cfg.tokens.unwrap_or(train_rows);
    let steps = tokens.div_ceil(cfg.batch as u64).max(1);
    let decoder_norm = cfg
        .decoder_norm
        .unwrap_or(if cfg.activation == Activation::Relu {
            DecoderNorm::Penalty
        } else {
            DecoderNorm::Unit
        });
    let arch = Arch {
        kind: cfg.kind,
        activation: cfg.activation,
        d_in,
        d_out,
        n_layers,
        d_sae: cfg.d_sae,
        k,
        k_aux: cfg
            .k_aux
            .unwrap_or((d_out * n_layers / 2).max(1))
            .clamp(1, cfg.d_sae),
        decoder_norm,
        apply_b_dec_to_input: !transcoder,
    };
    // JumpReLU's ε and initial θ: 0.001 where E‖x‖² = 1 (Rajamanoharan et al.), here E‖x‖ = √d.
    let unit = (d_in as f64).sqrt();
    let bandwidth = cfg.bandwidth.unwrap_or(0.001 * unit);
    let theta0 = cfg.init_threshold.unwrap_or(0.001 * unit);
    let sparsity = cfg
        .sparsity_coeff
        .unwrap_or_else(|| default_sparsity(cfg.activation, d_in * n_layers));
    let warmup = cfg.warmup_steps.unwrap_or((steps / 20).min(1000));
    let schedule = Schedule {
        steps,
        lr: cfg.lr,
        warmup,
        decay: (steps as f64 * cfg.decay_fraction.clamp(0.0, 1.0)) as u64,
        sparsity,
        sparsity_warmup: (steps as f64 * cfg.sparsity_warmup.clamp(0.0, 1.0)) as u64,
    };
    let dead_tokens = cfg
        .dead_tokens
        .unwrap_or_else(|| (steps * cfg.batch as u64 / 10).clamp(cfg.batch as u64, 10_000_000));
    let hyper = Hyper {
        schedule,
        aux: cfg.aux_coeff,
        bandwidth,
        dead_tokens,
        clip: cfg.clip_grad,
        threshold_beta: 0.999,
        threshold_start: (steps / 5).min(1000),
    };
    let row_bytes = ds.row_width * 4;
    let capacity = cfg
        .shuffle_buffer
        .unwrap_or(((256usize << 20) / row_bytes.max(1)).min(1 << 18))
        .max(2 * cfg.batch)
        .min(train_rows as usize)
        .max(cfg.batch);
    let mut fp = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        fp.insert(k.to_string(), v);
    };
    put("kind", cfg.kind.to_string());
    put("activation", cfg.activation.to_string());
    put("d_sae", cfg.d_sae.to_string());
    put("k", k.to_string());
    put("k_aux", arch.k_aux.to_string());
    put("batch", cfg.batch.to_string());
    put("steps", steps.to_string());
    put("lr", format!("{:?}", cfg.lr));
    put("warmup", warmup.to_string());
    put("decay", format!("{:?}", cfg.decay_fraction));
    put("sparsity", format!("{sparsity:?}"));
    put("sparsity_warmup", format!("{:?}", cfg.sparsity_warmup));
    put("aux", format!("{:?}", cfg.aux_coeff));
    put("bandwidth", format!("{bandwidth:?}"));
    put("theta0", format!("{theta0:?}"));
    put("dead_tokens", dead_tokens.to_string());
    put("decoder_norm", decoder_norm.as_str().into());
    put("b_dec_init", cfg.b_dec_init.as_str().into());
    put("normalize", cfg.normalize.as_str().into());
    put("clip", format!("{:?}", cfg.clip_grad));
    put("betas", format!("{:?},{:?}", cfg.beta1, cfg.beta2));
    put("seed", cfg.seed.to_string());
    put("eval_rows", eval_rows.to_string());
    put("shuffle_buffer", capacity.to_string());
    put("sparse_below", format!("{:?}", cfg.sparse_below));
    let shards: Vec<String> = ds
        .sources
        .iter()
        .map(|s| {
            s.shards
                .iter()
                .map(|h| {
                    format!(
                        "{}:{}",
                        h.path
                            .file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default(),
                        h.rows
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    put("data", shards.join(" | "));
    Ok(Plan {
        arch,
        hyper,
        steps,
        sparsity,
        theta0,
        eval_rows,
        capacity,
        fingerprint: fp,
    })
}

const READ_CHUNK: usize = 1024;
const OPEN_SHARDS: usize = 4;
const INIT_ROWS: usize = 8192;

/// The normalisation and `b_dec` measured on a sample of training rows.
fn measure(
    cfg: &TrainConfig,
    arch: &Arch,
    ds: &Dataset,
    segments: &[data::Segment],
) -> Result<(Norm, Vec<f32>)> {
    let total: u64 = segments.iter().map(|s| s.end - s.start).sum();
    let n = (INIT_ROWS as u64).min(total) as usize;
    let mut stream = Stream::new(
        segments.to_vec(),
        ds.row_width,
        data::mix(cfg.seed, 0x5a3b1e, 0),
        n,
        READ_CHUNK,
        OPEN_SHARDS * 4,
    );
    let mut rows = Array2::<f32>::zeros((n, ds.row_width));
    stream.next_batch(ds, &mut rows)?;
    let wi = arch.width_in();
    let mut norm = Norm {
        mode: cfg.normalize,
        s_in: 1.0,
        s_out: 1.0,
    };
    if cfg.normalize == Normalize::Scale {
        let m_in = data::mean_norm(&rows, 0..wi, arch.d_in);
        if m_in > 0.0 {
            norm.s_in = ((arch.d_in as f64).sqrt() / m_in) as f32;
        }
        if ds.row_width > wi {
            let m_out = data::mean_norm(&rows, wi..ds.row_width, arch.d_out);
            if m_out > 0.0 {
                norm.s_out = ((arch.d_out as f64).sqrt() / m_out) as f32;
            }
        }
    }
    norm.apply(&mut rows, wi, arch.in_blocks());
    let targets = if ds.row_width > wi {
        rows.slice(s![.., wi..]).to_owned()
    } else {
        rows.slice(s![.., ..wi]).to_owned()
    };
    let wo = targets.ncols();
    let d = arch.d_out;
    let mut b_dec = vec![0f32; wo];
    for b in 0..wo / d.max(1) {
        let block = targets.slice(s![.., b * d..(b + 1) * d]).mapv(f64::from);
        let v = match cfg.b_dec_init {
            BDecInit::Zeros => vec![0.0; d],
            BDecInit::Mean => block
                .mean_axis(ndarray::Axis(0))
                .map(|a| a.to_vec())
                .unwrap_or_else(|| vec![0.0; d]),
            BDecInit::Median => data::geometric_median(&block),
        };
        for (o, x) in b_dec[b * d..(b + 1) * d].iter_mut().zip(v) {
            *o = x as f32;
        }
    }
    Ok((norm, b_dec))
}

fn norm_from(path: &Path, s: &(String, u32, u32)) -> Result<Norm> {
    Ok(Norm {
        mode: s
            .0
            .parse()
            .map_err(|e: String| Error::format(path, format!("normalisation: {e}")))?,
        s_in: f32::from_bits(s.1),
        s_out: f32::from_bits(s.2),
    })
}

/// The evaluation on the held-out rows, with the dictionary as exported.
fn evaluate(
    trainer: &Trainer,
    ds: &Dataset,
    segments: &[data::Segment],
    norm: &Norm,
    batch: usize,
) -> Result<Option<Eval>> {
    if segments.is_empty() {
        return Ok(None);
    }
    let arch = &trainer.arch;
    let wi = arch.width_in();
    let mut ws = Workspace::<f32>::new(arch);
    ws.sparse_below = trainer.ws.sparse_below;
    let coeffs = Coeffs {
        sparsity: 0.0,
        aux: 0.0,
        bandwidth: trainer.hyper.bandwidth,
    };
    let threshold = trainer.batch_threshold();
    let mut count = vec![0u64; arch.d_sae];
    let (mut n, mut sq_err, mut nnz) = (0u64, 0.0f64, 0u64);
    let wo = arch.width_out();
    let mut ysum = vec![0.0f64; wo];
    let mut ysq = 0.0f64;
    data::for_each_block(ds, segments, batch, |block| {
        let mut block = block.clone();
        norm.apply(&mut block, wi, arch.in_blocks());
        let x = block.slice(s![.., ..wi]);
        let y = (ds.row_width > wi).then(|| block.slice(s![.., wi..]));
        let st = model::step(
            arch,
            &trainer.params,
            &mut ws,
            Batch { x, y },
            &coeffs,
            StepOptions {
                infer_threshold: threshold,
                ..StepOptions::default()
            },
            None,
        );
        sq_err += st.sq_err;
        for &j in &ws.acts.idx {
            count[j as usize] += 1;
        }
        nnz += ws.acts.idx.len() as u64;
        n += block.nrows() as u64;
        for row in y.unwrap_or(x).rows() {
            for (s, &v) in ysum.iter_mut().zip(row.iter()) {
                *s += f64::from(v);
                ysq += f64::from(v) * f64::from(v);
            }
        }
        Ok(())
    })?;
    let nf = n.max(1) as f64;
    let sq_total = ysq - ysum.iter().map(|s| s * s).sum::<f64>() / nf;
    let m = arch.d_sae as f64;
    Ok(Some(Eval {
        tokens: n,
        fvu: if sq_total > 0.0 {
            sq_err / sq_total
        } else {
            0.0
        },
        mse: sq_err / nf,
        l0: nnz as f64 / nf,
        dead_fraction: count.iter().filter(|&&c| c == 0).count() as f64 / m,
        dense_fraction: count
            .iter()
            .filter(|&&c| c as f64 > report::DENSE_ABOVE * nf)
            .count() as f64
            / m,
    }))
}

/// Runs (or resumes) a training run, writes the dictionary, the SAELens folder and the report.
pub fn train(cfg: &TrainConfig, control: &Control) -> Result<Outcome> {
    let ds = Dataset::open(
        &cfg.inputs,
        &cfg.targets,
        cfg.tensor.as_deref(),
        cfg.target_tensor.as_deref(),
    )?;
    let plan = plan(cfg, &ds)?;
    let arch = plan.arch.clone();
    let (train_segs, eval_segs) = ds.split(plan.eval_rows);
    let mut stream = Stream::new(
        train_segs.clone(),
        ds.row_width,
        cfg.seed,
        plan.capacity,
        READ_CHUNK,
        OPEN_SHARDS,
    );
    let ckpt_dir = cfg.checkpoint_dir();
    let resume_from = if cfg.resume {
        checkpoint::latest(&ckpt_dir)?
    } else {
        None
    };
    let hyper = plan.hyper;
    let (mut trainer, norm, mut history, seconds_before, resumed_from) = match resume_from {
        Some(path) => {
            let mut ld = checkpoint::load(&path)?;
            let st = ld.state.clone();
            let diff: Vec<String> = plan
                .fingerprint
                .iter()
                .filter(|(k, v)| st.fingerprint.get(*k) != Some(*v))
                .map(|(k, v)| {
                    format!(
                        "{k} = {v} (the checkpoint has {})",
                        st.fingerprint.get(k).map_or("nothing", |s| s.as_str())
                    )
                })
                .collect();
            if !diff.is_empty() {
                return Err(Error::format(
                    &path,
                    format!(
                        "was written by a run with other settings; resuming needs the same: {}",
                        diff.join("; ")
                    ),
                ));
            }
            let mut params = Params::<f32>::zeros(&arch);
            ld.fill_params("", &mut params)?;
            let mut t = Trainer::new(arch.clone(), hyper, params, cfg.beta1, cfg.beta2);
            ld.fill_params("adam_m.", &mut t.adam.m)?;
            ld.fill_params("adam_v.", &mut t.adam.v)?;
            t.adam.t = st.adam_t;
            t.last_active = ld.take_u64("last_active", &[arch.d_sae])?;
            t.tokens = st.tokens;
            t.step = st.step;
            t.threshold_ema = (f64::from_bits(st.threshold_ema.0), st.threshold_ema.1);
            let buffer = ld.take_buffer(ds.row_width)?;
            stream.restore(StreamState {
                epoch: st.stream.0,
                next: st.stream.1,
                open: st.stream.2.clone(),
                counter: st.stream.3,
                buffer,
            });
            let norm = norm_from(&path, &st.norm)?;
            (t, norm, st.history, st.seconds, Some(st.step))
        }
        None => {
            let (norm, b_dec) = measure(cfg, &arch, &ds, &train_segs)?;
            let params = init_params(&arch, cfg.seed, &b_dec, plan.theta0);
            let t = Trainer::new(arch.clone(), hyper, params, cfg.beta1, cfg.beta2);
            (t, norm, Vec::new(), 0.0, None)
        }
    };
    trainer.ws.sparse_below = cfg.sparse_below;

    let steps = plan.steps;
    let wi = arch.width_in();
    let log_every = (steps / 100).max(1);
    let tty = std::io::stderr().is_terminal();
    let bar = if cfg.progress && tty {
        let b = indicatif::ProgressBar::new(steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_position(trainer.step);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let tokens_at_start = trainer.tokens;
    let mut batch = Array2::<f32>::zeros((cfg.batch, ds.row_width));
    let mut smooth: Option<(f64, f64, f64)> = None;
    let save = |trainer: &Trainer, stream: &Stream, history: &[Point], norm: &Norm| {
        let st = checkpoint::State {
            step: trainer.step,
            tokens: trainer.tokens,
            adam_t: trainer.adam.t,
            threshold_ema: (trainer.threshold_ema.0.to_bits(), trainer.threshold_ema.1),
            norm: (
                norm.mode.as_str().into(),
                norm.s_in.to_bits(),
                norm.s_out.to_bits(),
            ),
            stream: (
                stream.state.epoch,
                stream.state.next,
                stream.state.open.clone(),
                stream.state.counter,
            ),
            history: history.to_vec(),
            fingerprint: plan.fingerprint.clone(),
            seconds: seconds_before + started.elapsed().as_secs_f64(),
        };
        checkpoint::save(
            &ckpt_dir,
            cfg.keep_checkpoints,
            &checkpoint::Snapshot {
                state: &st,
                params: &trainer.params,
                adam: &trainer.adam,
                last_active: &trainer.last_active,
                buffer: &stream.state.buffer,
                width: ds.row_width,
            },
        )
    };
    let mut last: Option<Point> = history.last().cloned();
    while trainer.step < steps {
        stream.next_batch(&ds, &mut batch)?;
        norm.apply(&mut batch, wi, arch.in_blocks());
        let x = batch.slice(s![.., ..wi]);
        let y = (ds.row_width > wi).then(|| batch.slice(s![.., wi..]));
        let lr = hyper.schedule.lr(trainer.step);
        let st = trainer.train_step(x, y)?;
        let dead = trainer.dead_mask().iter().filter(|&&d| d).count() as f64 / arch.d_sae as f64;
        let point = Point {
            step: trainer.step,
            tokens: trainer.tokens,
            loss: st.loss,
            mse: st.mse,
            fvu: st.fvu(),
            l0: st.l0,
            dead_fraction: dead,
            lr,
        };
        let sm = match smooth {
            None => (st.loss, st.fvu(), st.l0),
            Some((a, b, c)) => (
                0.9 * a + 0.1 * st.loss,
                0.9 * b + 0.1 * st.fvu(),
                0.9 * c + 0.1 * st.l0,
            ),
        };
        smooth = Some(sm);
        let rate =
            (trainer.tokens - tokens_at_start) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let msg = format!(
            "{:.0} tok/s  loss {:.4}  FVU {:.4}  L0 {:.1}  dead {:.1}%",
            rate,
            sm.0,
            sm.1,
            sm.2,
            100.0 * dead
        );
        bar.set_position(trainer.step);
        bar.set_message(msg.clone());
        if trainer.step % log_every == 0 || trainer.step == steps {
            history.push(point.clone());
            if cfg.progress && !tty {
                eprintln!("step {}/{steps}  {msg}", trainer.step);
            }
        }
        last = Some(point);
        let interrupted = control.stop.load(Ordering::SeqCst);
        let stop_here = cfg.stop_after == Some(trainer.step) && trainer.step < steps;
        if interrupted || stop_here {
            let path = save(&trainer, &stream, &history, &norm)?;
            bar.abandon();
            return Ok(Outcome::Stopped {
                step: trainer.step,
                checkpoint: path,
            });
        }
        if cfg.checkpoint_every > 0
            && trainer.step % cfg.checkpoint_every == 0
            && trainer.step < steps
        {
            save(&trainer, &stream, &history, &norm)?;
        }
    }
    bar.finish();
    let seconds = seconds_before + started.elapsed().as_secs_f64();
    let rate =
        (trainer.tokens - tokens_at_start) as f64 / started.elapsed().as_secs_f64().max(1e-9);

    let eval = evaluate(&trainer, &ds, &eval_segs, &norm, cfg.batch)?;
    let hooks = export::Hooks {
        hook_in: cfg.hook_in.clone(),
        hook_out: cfg.hook_out.clone(),
        model: cfg.model.clone(),
    };
    let threshold = trainer.batch_threshold();
    let (meta, weights) = export::dictionary(&arch, &trainer.params, &norm, threshold, &hooks)?;
    if let Some(parent) = cfg.output.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    crate::import::write::write(&meta, &weights, &cfg.output)?;
    if let Some(dir) = &cfg.export_saelens {
        export::write_saelens(dir, &meta, &weights)?;
    }
    let report = Report {
        kind: arch.kind.to_string(),
        activation: arch.activation.to_string(),
        d_in: arch.d_in,
        d_out: arch.d_out,
        d_sae: arch.d_sae,
        n_layers: arch.n_layers,
        k: arch.is_topk().then_some(arch.k),
        input_norm: meta.input_norm.to_string(),
        seed: cfg.seed,
        batch: cfg.batch,
        steps,
        tokens: trainer.tokens,
        lr: cfg.lr,
        sparsity_coeff: plan.sparsity,
        resumed_from,
        seconds,
        tokens_per_second: rate,
        last,
        eval,
        batchtopk_threshold: threshold.map(f64::from),
        history,
        output: cfg.output.display().to_string(),
        saelens: cfg.export_saelens.as_ref().map(|p| p.display().to_string()),
    };
    if let Some(path) = &cfg.report {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::format(path, e.to_string()))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
    }
    Ok(Outcome::Finished(Box::new(Finished {
        report,
        arch,
        params: trainer.params,
        norm,
        threshold,
    })))
}

/// The trainer's own forward pass on raw activations (`[B, width_in]`): normalise, then encode as
/// the exported dictionary does.
pub fn encode_raw(
    arch: &Arch,
    params: &Params<f32>,
    norm: &Norm,
    threshold: Option<f32>,
    x: ArrayView2<'_, f32>,
) -> Array2<f32> {
    let mut xn = x.to_owned();
    norm.apply(&mut xn, arch.width_in(), arch.in_blocks());
    model::encode(arch, params, xn.view(), threshold)
}
