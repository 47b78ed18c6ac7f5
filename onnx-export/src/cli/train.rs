//! `tiller-export train`: train an SAE, transcoder, skip transcoder or crosscoder on activations
//! (.npy/.safetensors).

use std::path::PathBuf;

use anyhow::{Context, Result};

/// `tiller-export train`: see docs/cli.md#train.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Input activations: a .npy/.safetensors file or a folder of shards; one per layer for a
    /// crosscoder (repeat the flag).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// Transcoders: the output activations, lined up with --input.
    #[arg(long)]
    target: Option<PathBuf>,
    /// The tensor to read from safetensors shards holding several.
    #[arg(long)]
    tensor: Option<String>,
    /// The tensor to read from the target's safetensors shards.
    #[arg(long)]
    target_tensor: Option<String>,
    /// sae, transcoder, skip_transcoder or crosscoder.
    #[arg(long, default_value = "sae")]
    kind: tiller_runtime::Kind,
    /// relu, topk, batchtopk or jumprelu.
    #[arg(long)]
    activation: tiller_runtime::Activation,
    /// TopK / BatchTopK: active features per token.
    #[arg(long)]
    k: Option<usize>,
    /// TopK / BatchTopK: dead latents per token in the AuxK loss [default: half the width].
    #[arg(long)]
    k_aux: Option<usize>,
    /// Number of features.
    #[arg(long)]
    d_sae: usize,
    /// A crosscoder reading one [tokens, width] source: its layers.
    #[arg(long)]
    n_layers: Option<usize>,
    /// Tokens to train on [default: one pass over the training rows].
    #[arg(long)]
    tokens: Option<u64>,
    /// Tokens per step.
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Peak learning rate (Adam).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Learning-rate warm-up steps [default: 5% of the run, at most 1000].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Fraction of the run over which the learning rate decays linearly to zero.
    #[arg(long, default_value_t = 0.2)]
    decay_fraction: f64,
    /// λ: the L1 (relu) or L0 (jumprelu) coefficient [default: 5 for relu, 0.002·d_in for jumprelu].
    #[arg(long)]
    sparsity_coeff: Option<f64>,
    /// Fraction of the run over which λ rises from zero.
    #[arg(long, default_value_t = 0.05)]
    sparsity_warmup: f64,
    /// α: the AuxK coefficient (topk, batchtopk).
    #[arg(long, default_value_t = 1.0 / 32.0)]
    aux_coeff: f64,
    /// JumpReLU: the kernel bandwidth ε [default: 0.001·√d_in].
    #[arg(long)]
    bandwidth: Option<f64>,
    /// JumpReLU: the initial threshold [default: 0.001·√d_in].
    #[arg(long)]
    init_threshold: Option<f64>,
    /// Tokens without firing after which a latent is dead [default: 10% of the run, at most 10M].
    #[arg(long)]
    dead_tokens: Option<u64>,
    /// unit (rows renormalised) or penalty (L1 weighted by row norms) [default: penalty for relu].
    #[arg(long)]
    decoder_norm: Option<tiller_export::train::model::DecoderNorm>,
    /// How b_dec starts: median (geometric), mean or zeros.
    #[arg(long, default_value = "median")]
    b_dec_init: tiller_export::train::BDecInit,
    /// Dataset-wise normalisation stored in the dictionary: scale (E‖x‖ = √d), layer_norm or none.
    #[arg(long, default_value = "scale")]
    normalize: tiller_export::train::data::Normalize,
    /// Gradient norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip_grad: f64,
    /// Adam's β1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// Adam's β2.
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    /// The seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out tokens for the final evaluation [default: 10% of the rows, at most 16384].
    #[arg(long)]
    eval_tokens: Option<u64>,
    /// Rows in the shuffle buffer [default: 256 MiB of rows].
    #[arg(long)]
    shuffle_buffer: Option<usize>,
    /// The dictionary to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Also write a SAELens folder (cfg.json, sae_weights.safetensors).
    #[arg(long)]
    export_saelens: Option<PathBuf>,
    /// Write a JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where checkpoints go [default: OUT.ckpt].
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Steps between checkpoints (0: only when interrupted).
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Go on from the latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps, with a checkpoint (resume later with --resume).
    #[arg(long)]
    stop_after: Option<u64>,
    /// The hook it reads (tiller.hook_in; comma separated for crosscoders).
    #[arg(long, default_value = "")]
    hook_in: String,
    /// The hook it writes [default: --hook-in].
    #[arg(long, default_value = "")]
    hook_out: String,
    /// The model the activations came from.
    #[arg(long, default_value = "")]
    model: String,
    /// No progress bar or progress lines.
    #[arg(long)]
    quiet: bool,
}

impl TrainArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        train(self)
    }
}

fn train(a: TrainArgs) -> Result<()> {
    use tiller_export::train::{self, Outcome, TrainConfig};
    let mut cfg = TrainConfig::new(a.input, a.kind, a.activation, a.d_sae, a.output);
    cfg.targets = a.target.into_iter().collect();
    cfg.tensor = a.tensor;
    cfg.target_tensor = a.target_tensor;
    cfg.k = a.k;
    cfg.k_aux = a.k_aux;
    cfg.n_layers = a.n_layers;
    cfg.tokens = a.tokens;
    cfg.batch = a.batch;
    cfg.lr = a.lr;
    cfg.warmup_steps = a.warmup_steps;
    cfg.decay_fraction = a.decay_fraction;
    cfg.sparsity_coeff = a.sparsity_coeff;
    cfg.sparsity_warmup = a.sparsity_warmup;
    cfg.aux_coeff = a.aux_coeff;
    cfg.bandwidth = a.bandwidth;
    cfg.init_threshold = a.init_threshold;
    cfg.dead_tokens = a.dead_tokens;
    cfg.decoder_norm = a.decoder_norm;
    cfg.b_dec_init = a.b_dec_init;
    cfg.normalize = a.normalize;
    cfg.clip_grad = a.clip_grad;
    cfg.beta1 = a.beta1;
    cfg.beta2 = a.beta2;
    cfg.seed = a.seed;
    cfg.eval_tokens = a.eval_tokens;
    cfg.shuffle_buffer = a.shuffle_buffer;
    cfg.export_saelens = a.export_saelens;
    cfg.report = a.report;
    cfg.checkpoint_dir = a.checkpoint_dir;
    cfg.checkpoint_every = a.checkpoint_every;
    cfg.keep_checkpoints = a.keep_checkpoints;
    cfg.resume = a.resume;
    cfg.stop_after = a.stop_after;
    cfg.hook_in = a.hook_in;
    cfg.hook_out = a.hook_out;
    cfg.model = a.model;
    cfg.progress = !a.quiet;
    let control = train::Control::default();
    let stop = control.stop.clone();
    // First Ctrl-C (or SIGTERM): finish the step and save a checkpoint; a second one exits at once.
    ctrlc::set_handler(move || {
        if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    match train::train(&cfg, &control)? {
        Outcome::Finished(f) => {
            let r = &f.report;
            println!(
                "wrote {}: {} {} {}x{}, {} steps, {} tokens in {:.1}s ({:.0} tokens/s)",
                r.output,
                r.kind,
                r.activation,
                r.d_in,
                r.d_sae,
                r.steps,
                r.tokens,
                r.seconds,
                r.tokens_per_second
            );
            if let Some(e) = &r.eval {
                println!(
                    "held-out ({} tokens): FVU {:.4}  L0 {:.2}  dead {:.2}%  dense {:.2}%",
                    e.tokens,
                    e.fvu,
                    e.l0,
                    100.0 * e.dead_fraction,
                    100.0 * e.dense_fraction
                );
            }
            if let Some(t) = r.batchtopk_threshold {
                println!("BatchTopK threshold {t:.6} (exported as JumpReLU)");
            }
            if let Some(d) = &r.saelens {
                println!("wrote SAELens folder {d}");
            }
            Ok(())
        }
        Outcome::Stopped { step, checkpoint } => {
            println!(
                "stopped after step {step}: checkpoint {}; continue with --resume",
                checkpoint.display()
            );
            if control.stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            Ok(())
        }
    }
}
