//! `tiller-export`: import, inspect and run Tiller dictionaries.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tiller_export::import::{self, Format};
use tiller_export::npy;
use tiller_runtime::{Dictionary, DictionaryFile, SessionOptions};

#[derive(Parser)]
#[command(
    name = "tiller-export",
    version,
    about = "Import, inspect and run sparse dictionaries for the Tiller runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a checkpoint (SAELens, sparsify, Gemma Scope, …) into a Tiller dictionary (.onnx).
    Import {
        /// The checkpoint: a folder or a file.
        path: PathBuf,
        /// The checkpoint's format.
        #[arg(long, default_value = "auto")]
        format: Format,
        /// A folder of several hookpoints (sparsify): the one to import (default: all).
        #[arg(long)]
        hookpoint: Option<String>,
        /// A per-layer checkpoint (circuit-tracer): the layer to import, or `all` (default).
        #[arg(long)]
        layer: Option<String>,
        /// The host's hook name to store (`{name}` is replaced by the hookpoint or layer).
        #[arg(long)]
        hook: Option<String>,
        /// Feature labels: a JSON object {feature_id: label}.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Probes: the .npy bias of a .npy weight (implies --format probe).
        #[arg(long)]
        bias: Option<PathBuf>,
        /// Probes: what each read-out outputs, `sigmoid` (a probability) or `logit`.
        #[arg(long, default_value = "sigmoid")]
        probe_output: tiller_export::probe::ProbeOutput,
        /// How to store `W_enc` and `W_dec`: `f32`, `f16` or `bf16` (rounded to nearest; the
        /// runtime's native encoder reads half-width weights at their width, moving half the bytes).
        #[arg(long, default_value = "f32")]
        dtype: tiller_runtime::dictionary::WeightDtype,
        /// The dictionary to write; several dictionaries go to `OUT.<name>.onnx`.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Print what a dictionary is: kind, activation, sizes, hooks, source, exactness, opset.
    Inspect {
        /// The dictionary.
        dict: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Encode activations from a .npy file through the runtime.
    Encode {
        /// The dictionary.
        dict: PathBuf,
        /// `[n, d_in]` activations (float32, float16 or float64).
        #[arg(long)]
        input: PathBuf,
        /// Where to write the `[n, d_sae]` feature activations.
        #[arg(long)]
        output: PathBuf,
        /// Where to write the `[n, d_out]` reconstruction.
        #[arg(long)]
        recon: Option<PathBuf>,
        /// Rows per call.
        #[arg(long, default_value_t = 1024)]
        batch: usize,
    },
    /// Dry-run a config: run recorded activations through the runtime as one request at one hook,
    /// and write the steered activations, the metrics text and the request summary.
    Replay {
        /// The runtime config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The hook the activations were recorded at.
        #[arg(long)]
        hook: String,
        /// `[n, width]` activations.
        #[arg(long)]
        input: PathBuf,
        /// Where to write the steered activations.
        #[arg(long)]
        output: PathBuf,
        /// The steering profile of the request.
        #[arg(long)]
        profile: Option<String>,
        /// The tokens' phase: `prompt` (steps of --batch tokens) or `generated` (one token per step).
        #[arg(long, default_value = "prompt")]
        phase: String,
        /// Tokens per step for the prompt phase.
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Where to write the Prometheus text exposition.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Where to write the request summary (JSON).
        #[arg(long)]
        summary: Option<PathBuf>,
    },
    /// Compare a dictionary, run by the runtime, with the reference maths on its source checkpoint.
    Verify {
        /// The dictionary.
        dict: PathBuf,
        /// The checkpoint it was imported from.
        #[arg(long)]
        source: PathBuf,
        /// The checkpoint's format.
        #[arg(long, default_value = "auto")]
        format: Format,
        /// Which hookpoint of a multi-hookpoint checkpoint.
        #[arg(long)]
        hookpoint: Option<String>,
        /// Which layer of a per-layer checkpoint.
        #[arg(long)]
        layer: Option<usize>,
        /// Activations to encode (`[n, d_in]`); random ones (seeded) when absent.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Rows of random activations.
        #[arg(long, default_value_t = 256)]
        rows: usize,
        /// Largest accepted normwise relative error.
        #[arg(long, default_value_t = 1e-5)]
        tolerance: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep only some features of a dictionary (exact for ReLU, JumpReLU, Gated; TopK is calibrated).
    Slice {
        /// The dictionary.
        dict: PathBuf,
        /// The features to keep, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        features: Vec<u32>,
        /// Activations (`[n, d_in]`) to fit the thresholds of a sliced TopK dictionary on.
        #[arg(long)]
        calibrate: Option<PathBuf>,
        /// The sliced dictionary to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Download ONNX Runtime into the cache (done on first use otherwise) and print its path.
    Setup,
    /// Write a static HTML page (and JSON beside it) showing what features fire on, from a folder
    /// of activation shards with their tokens.
    Dashboard {
        /// The dictionary.
        #[arg(long)]
        dictionary: PathBuf,
        /// The folder of `shard-NNNNN.npy` activations with `shard-NNNNN.jsonl` tokens.
        #[arg(long)]
        activations: PathBuf,
        /// The HTML page to write; its data goes beside it as `.json`.
        #[arg(short, long)]
        output: PathBuf,
        /// The features to show, comma separated [default: the --top-features densest].
        #[arg(long, value_delimiter = ',', conflicts_with = "top_features")]
        features: Option<Vec<u32>>,
        /// How many of the densest features that fired to show.
        #[arg(long, default_value_t = 64)]
        top_features: usize,
        /// Top contexts per feature.
        #[arg(long, default_value_t = 12)]
        contexts: usize,
        /// Tokens shown either side of the top token.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Read at most this many rows.
        #[arg(long)]
        max_rows: Option<u64>,
        /// Rows per encode call.
        #[arg(long, default_value_t = 1024)]
        batch: usize,
    },
    /// Train an SAE, transcoder, skip transcoder or crosscoder on activations (.npy/.safetensors).
    Train(Box<TrainArgs>),
    /// Train a linear probe (L2-penalised logistic regression) on activations and 0/1 labels.
    TrainProbe(Box<TrainProbeArgs>),
    /// Write the unit difference-in-means direction of two sets of activations as a `vector`
    /// dictionary (for the `vector` and `project_cap` ops and projection monitors).
    Diffmeans {
        /// `[n, d]` activations of the positive set (.npy).
        #[arg(long)]
        positive: PathBuf,
        /// `[n, d]` activations of the negative set (.npy).
        #[arg(long)]
        negative: PathBuf,
        /// The direction's label.
        #[arg(long)]
        name: Option<String>,
        /// The host's hook it reads and steers (tiller.hook_in / hook_out).
        #[arg(long, default_value = "")]
        hook: String,
        /// The model the activations came from.
        #[arg(long, default_value = "")]
        model: String,
        /// Write a JSON report.
        #[arg(long)]
        report: Option<PathBuf>,
        /// The dictionary to write.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// `tiller-export train-probe`: see the README section "Probes and difference-in-means".
#[derive(clap::Args)]
struct TrainProbeArgs {
    /// `[n, d]` activations (.npy, float16/32/64).
    #[arg(long)]
    input: PathBuf,
    /// `[n]` labels, 0 or 1 (.npy: bool, integer or float).
    #[arg(long)]
    labels: PathBuf,
    /// λ of the penalty (λ/2)‖w‖² on the standardised inputs' weights.
    #[arg(long, default_value_t = 1e-3)]
    l2: f64,
    /// Fraction of each class held out for evaluation (0: none).
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// The seed of the held-out split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// L-BFGS iterations at most.
    #[arg(long, default_value_t = 1000)]
    max_iter: usize,
    /// The read-out's label.
    #[arg(long)]
    name: Option<String>,
    /// The host's hook it reads (tiller.hook_in).
    #[arg(long, default_value = "")]
    hook: String,
    /// The model the activations came from.
    #[arg(long, default_value = "")]
    model: String,
    /// `sigmoid` (a probability) or `logit`.
    #[arg(long, default_value = "sigmoid")]
    probe_output: tiller_export::probe::ProbeOutput,
    /// Write a JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The probe dictionary to write.
    #[arg(short, long)]
    output: PathBuf,
}

/// `tiller-export train`: see the README section "Training".
#[derive(clap::Args)]
struct TrainArgs {
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

fn main() -> ExitCode {
    let result = run(Cli::parse());
    // For memory measurements (the large-import test): the process's peak resident set.
    if std::env::var_os("TILLER_REPORT_PEAK_RSS").is_some()
        && let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
    {
        eprintln!("peak RSS: {}", line.trim_start_matches("VmHWM:").trim());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Import {
            path,
            format,
            hookpoint,
            layer,
            hook,
            labels,
            bias,
            probe_output,
            dtype,
            output,
        } => {
            let layer = match layer.as_deref() {
                None | Some("all") => None,
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| anyhow::anyhow!("--layer `{l}` is not a number or `all`"))?,
                ),
            };
            let opts = import::ImportOptions {
                hookpoint,
                layer,
                hook,
                bias,
                probe_output,
            };
            let labels = match labels {
                Some(l) => {
                    let text = std::fs::read_to_string(&l)
                        .with_context(|| format!("reading {}", l.display()))?;
                    Some((
                        l.clone(),
                        tiller_runtime::dictionary::parse_labels(&text)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", l.display()))?,
                    ))
                }
                None => None,
            };
            let all = import::read_all(&path, format, &opts)?;
            let several = all.len() > 1;
            for mut one in all {
                if let Some((l, map)) = &labels {
                    if let Some(bad) = map.keys().find(|&&k| k as usize >= one.meta.d_sae) {
                        anyhow::bail!(
                            "{}: feature {bad} is out of range (d_sae = {})",
                            l.display(),
                            one.meta.d_sae
                        );
                    }
                    one.meta.labels = map.clone();
                }
                let out =
                    import::output_path(&output, if several { one.name.as_deref() } else { None });
                import::write_as(&one.meta, &one.weights, &out, dtype)?;
                let m = &one.meta;
                println!(
                    "wrote {}: {} {} {}x{} from {}",
                    out.display(),
                    m.kind,
                    m.activation,
                    m.d_in,
                    m.d_sae,
                    m.source
                );
            }
            Ok(())
        }
        Command::Inspect { dict, json } => inspect(&dict, json),
        Command::Encode {
            dict,
            input,
            output,
            recon,
            batch,
        } => encode(&dict, &input, &output, recon.as_deref(), batch),
        Command::Replay {
            config,
            hook,
            input,
            output,
            profile,
            phase,
            batch,
            metrics,
            summary,
        } => replay(
            &config,
            &hook,
            &input,
            &output,
            profile.as_deref(),
            &phase,
            batch,
            metrics.as_deref(),
            summary.as_deref(),
        ),
        Command::Verify {
            dict,
            source,
            format,
            hookpoint,
            layer,
            input,
            rows,
            tolerance,
            json,
        } => {
            let opts = import::ImportOptions {
                hookpoint,
                layer,
                ..Default::default()
            };
            let all = import::read_all(&source, format, &opts)?;
            if all.len() != 1 {
                let names: Vec<String> = all.iter().filter_map(|i| i.name.clone()).collect();
                anyhow::bail!(
                    "{} holds {} dictionaries ({}): choose one with --hookpoint or --layer",
                    source.display(),
                    all.len(),
                    names.join(", ")
                );
            }
            let one = &all[0];
            let width = one.meta.input_layers() * one.meta.d_in;
            let x = match &input {
                Some(p) => npy::read_activations(p, width)?,
                None => random_rows(rows, width),
            };
            let r = tiller_export::verify::verify(&dict, &one.meta, &one.weights, &x, tolerance)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} against {} ({} rows)",
                    dict.display(),
                    source.display(),
                    r.rows
                );
                println!(
                    "  acts   max abs {:.3e}  rel {:.3e}",
                    r.acts_max_abs, r.acts_rel
                );
                println!(
                    "  recon  max abs {:.3e}  rel {:.3e}",
                    r.recon_max_abs, r.recon_rel
                );
                if let Some(a) = r.topk_agreement {
                    println!("  TopK sets identical on {:.2}% of rows", a * 100.0);
                }
                println!(
                    "  {} (tolerance {:e})",
                    if r.pass { "PASS" } else { "FAIL" },
                    r.tolerance
                );
            }
            if !r.pass {
                anyhow::bail!("verification failed");
            }
            Ok(())
        }
        Command::Slice {
            dict,
            features,
            calibrate,
            output,
        } => {
            let f = DictionaryFile::open(&dict)?;
            let x = match &calibrate {
                Some(p) => Some(npy::read_activations(
                    p,
                    f.meta().input_layers() * f.meta().d_in,
                )?),
                None => None,
            };
            let s = tiller_export::slice::slice(&f, &features, x.as_ref())?;
            import::write(&s.meta, &s.weights, &output)?;
            print!(
                "wrote {}: {} of {} features",
                output.display(),
                s.meta.d_sae,
                f.meta().d_sae
            );
            match s.agreement {
                Some(a) => println!(
                    ", JumpReLU thresholds fitted on {} tokens agree with TopK {:.2}% (not exact)",
                    x.map_or(0, |x| x.nrows()),
                    a * 100.0
                ),
                None => println!(", exact"),
            }
            Ok(())
        }
        Command::Train(args) => train(*args),
        Command::TrainProbe(a) => {
            use tiller_export::probe::{TrainProbeConfig, train_probe};
            let mut cfg = TrainProbeConfig::new(a.input, a.labels, a.output);
            cfg.l2 = a.l2;
            cfg.holdout = a.holdout;
            cfg.seed = a.seed;
            cfg.max_iter = a.max_iter;
            cfg.name = a.name;
            cfg.hook = a.hook;
            cfg.model = a.model;
            cfg.probe_output = a.probe_output;
            cfg.report = a.report;
            print!("{}", train_probe(&cfg)?);
            Ok(())
        }
        Command::Diffmeans {
            positive,
            negative,
            name,
            hook,
            model,
            report,
            output,
        } => {
            let cfg = tiller_export::probe::DiffmeansConfig {
                positive,
                negative,
                output,
                name,
                hook,
                model,
                report,
            };
            print!("{}", tiller_export::probe::diffmeans(&cfg)?);
            Ok(())
        }
        Command::Dashboard {
            dictionary,
            activations,
            output,
            features,
            top_features,
            contexts,
            window,
            max_rows,
            batch,
        } => {
            let opts = tiller_export::dashboard::Options {
                features,
                top_features,
                contexts,
                window,
                max_rows,
                batch,
                progress: true,
                ..tiller_export::dashboard::Options::new(dictionary, activations, output)
            };
            let d = tiller_export::dashboard::write(&opts)?;
            println!(
                "wrote {} and {}: {} features of {} over {} rows (dead {:.2}%, mean L0 {:.2})",
                opts.output.display(),
                tiller_export::dashboard::json_path(&opts.output).display(),
                d.features.len(),
                d.d_sae,
                d.rows,
                100.0 * d.dead_fraction,
                d.mean_l0
            );
            Ok(())
        }
        Command::Setup => {
            let p = tiller_runtime::onnxruntime::resolve_library(None)?;
            tiller_runtime::onnxruntime::init(Some(&p))?;
            println!("{}", p.display());
            Ok(())
        }
    }
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let f = DictionaryFile::open(path)?;
    let m = f.meta();
    let value = serde_json::json!({
        "path": path.display().to_string(),
        "kind": m.kind.as_str(),
        "activation": m.activation.as_str(),
        "d_in": m.d_in,
        "d_sae": m.d_sae,
        "d_out": m.d_out,
        "k": m.k,
        "n_layers": m.n_layers,
        "hook_in": m.hook_in,
        "hook_out": m.hook_out,
        "model": m.model,
        "input_norm": m.input_norm.to_string(),
        "source": m.source,
        "exact": m.exact,
        "sliced": m.feature_ids.is_some(),
        "labels": m.labels.len(),
        "opset": f.opset(),
        "external_data": f.has_external_data(),
        "weights": f.weight_dtype().as_str(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{}", path.display());
    println!("  kind        {}", m.kind);
    println!(
        "  activation  {}{}",
        m.activation,
        m.k.map(|k| format!(" (k = {k})")).unwrap_or_default()
    );
    println!(
        "  sizes       d_in {}  d_sae {}  d_out {}  layers {}",
        m.d_in, m.d_sae, m.d_out, m.n_layers
    );
    println!("  hooks       in `{}`  out `{}`", m.hook_in, m.hook_out);
    println!("  model       {}", m.model);
    println!("  input norm  {}", m.input_norm);
    println!("  source      {}", m.source);
    println!("  exact       {}", m.exact);
    println!("  weights     {}", f.weight_dtype());
    if let Some(ids) = &m.feature_ids {
        println!("  sliced      {} of the original features", ids.len());
    }
    println!(
        "  opset       {}{}",
        f.opset(),
        if f.has_external_data() {
            "  (external data)"
        } else {
            ""
        }
    );
    if !m.labels.is_empty() {
        println!("  labels      {}", m.labels.len());
        for (id, label) in m.labels.iter().take(20) {
            println!("    {id:>8}  {label}");
        }
    }
    Ok(())
}

fn encode(
    dict: &Path,
    input: &Path,
    output: &Path,
    recon: Option<&Path>,
    batch: usize,
) -> Result<()> {
    let d = Dictionary::load(dict, &SessionOptions::default())?;
    let m = d.meta().clone();
    let x = npy::read_activations(input, m.n_layers * m.d_in)?;
    let n = x.nrows();
    let mut acts = ndarray::Array2::<f32>::zeros((n, m.d_sae));
    let mut rec = recon.map(|_| ndarray::Array2::<f32>::zeros((n, m.n_layers * m.d_out)));
    let batch = batch.max(1);
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let xs = x.slice(ndarray::s![start..end, ..]);
        match rec.as_mut() {
            Some(r) => {
                let (a, y) = d.encode_decode(xs)?;
                acts.slice_mut(ndarray::s![start..end, ..]).assign(&a);
                r.slice_mut(ndarray::s![start..end, ..]).assign(&y);
            }
            None => {
                let e = d.encode(xs)?;
                acts.slice_mut(ndarray::s![start..end, ..]).assign(&e.acts);
            }
        }
    }
    npy::write(output, &acts)?;
    if let (Some(p), Some(r)) = (recon, rec) {
        npy::write(p, &r)?;
    }
    let l0 = acts.iter().filter(|v| **v != 0.0).count() as f64 / n.max(1) as f64;
    println!("encoded {n} rows with {}: mean L0 {l0:.2}", dict.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn replay(
    config: &Path,
    hook: &str,
    input: &Path,
    output: &Path,
    profile: Option<&str>,
    phase: &str,
    batch: usize,
    metrics: Option<&Path>,
    summary: Option<&Path>,
) -> Result<()> {
    let phase = match phase {
        "prompt" => tiller_runtime::Phase::Prompt,
        "generated" => tiller_runtime::Phase::Generated,
        other => anyhow::bail!("--phase `{other}` is not prompt or generated"),
    };
    let rt = tiller_runtime::Runtime::from_config_file(config)?;
    let Some(&(_, width)) = rt.hooks().iter().find(|(h, _)| h == hook) else {
        let known: Vec<String> = rt.hooks().into_iter().map(|(h, _)| h).collect();
        anyhow::bail!(
            "{}: no dictionary or rule is attached to hook `{hook}` (hooks: {})",
            config.display(),
            known.join(", ")
        );
    };
    let mut x = npy::read_activations(input, width)?;
    let n = x.nrows();
    let step_len = if phase == tiller_runtime::Phase::Generated {
        1
    } else {
        batch.max(1)
    };
    rt.begin_request(1, profile, None)?;
    let mut stops = 0;
    for start in (0..n).step_by(step_len) {
        let end = (start + step_len).min(n);
        let tokens = vec![tiller_runtime::Token { request: 1, phase }; end - start];
        let mut rows = x.slice(ndarray::s![start..end, ..]).to_owned();
        let mut step = rt.step(&tokens)?;
        let data = rows.as_slice_mut().context("rows are contiguous")?;
        step.hook(hook, tiller_runtime::ActivationsMut::F32(data))?;
        stops += step.finish().stop.len();
        x.slice_mut(ndarray::s![start..end, ..]).assign(&rows);
    }
    let s = rt.end_request(1)?;
    npy::write(output, &x)?;
    if let Some(p) = metrics {
        std::fs::write(p, rt.metrics_text()).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = summary {
        std::fs::write(p, serde_json::to_string_pretty(&s)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let edited: u64 = s.steering.values().sum();
    println!(
        "replayed {n} tokens at `{hook}`: {edited} edits, {} events{}, flagged {}",
        s.events.len(),
        if stops > 0 { ", stop requested" } else { "" },
        s.flagged
    );
    Ok(())
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

/// Seeded standard-normal rows, for `verify` without an input file.
fn random_rows(rows: usize, width: usize) -> ndarray::Array2<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7111e5);
    ndarray::Array2::from_shape_simple_fn((rows, width), || {
        rand_distr::StandardNormal.sample(&mut rng)
    })
}
