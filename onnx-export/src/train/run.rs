//! A whole training run: planning, streaming, stepping, checkpointing, evaluating and writing
//! the dictionary, interruptible and resumable.

use super::config::TrainConfig;
use super::measure::{OPEN_SHARDS, READ_CHUNK, evaluate, measure, norm_from};
use super::plan::plan;
use super::trainer::{Trainer, init_params};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ndarray::{Array2, ArrayView2, s};

use super::data::{Dataset, Norm, Stream, StreamState};
use super::model::{self, Arch, Params};
use super::report::{Point, Report};
use super::{checkpoint, export};
use crate::{Error, Result};

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
