//! Turning the settings and the dataset into a plan: the dictionary's shape, the batches, the
//! schedule, each setting checked against the data.

use super::config::{TrainConfig, default_sparsity};
use super::trainer::Hyper;
use std::collections::BTreeMap;

use tiller_runtime::{Activation, Kind};

use super::data::{Dataset, Normalize};
use super::export;
use super::model::{Arch, DecoderNorm};
use super::optim::Schedule;
use crate::{Error, Result};

/// Everything [`train`] settles before the first step.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) arch: Arch,
    pub(super) hyper: Hyper,
    pub(super) steps: u64,
    pub(super) sparsity: f64,
    pub(super) theta0: f64,
    pub(super) eval_rows: u64,
    pub(super) capacity: usize,
    pub(super) fingerprint: BTreeMap<String, String>,
}

pub(super) fn bad(flag: &str, m: impl Into<String>) -> Error {
    Error::format(flag, m)
}

pub(super) fn plan(cfg: &TrainConfig, ds: &Dataset) -> Result<Plan> {
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
