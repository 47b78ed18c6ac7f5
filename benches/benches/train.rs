//! Training throughput: a TopK SAE, d_in 384, 6144 features, k 32, batch 4096, on every core.
//!
//! Prints a table: the dense matrix product `[4096, 384] × [384, 6144]` measured in the same run
//! (the encoder's product, the one dense product of a TopK step), the training step (forward,
//! sparse backward, Adam, unit-norm decoder), its FLOP/s counted from the work it does, and the
//! ratio of the two; then the whole pipeline, streaming from a float16 `.npy` shard.
//!
//! `cargo bench -p tiller-benches --bench train`

use std::time::Instant;

use ndarray::Array2;
use ndarray::linalg::general_mat_mul;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use tiller_export::train::model::{self, Arch, Batch, Coeffs, DecoderNorm, StepOptions};
use tiller_export::train::optim::Schedule;
use tiller_export::train::{self, Hyper, Trainer};
use tiller_runtime::{Activation, Kind};

const D: usize = 384;
const M: usize = 6144;
const K: usize = 32;
const B: usize = 4096;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rounds of the dense product and the training step.
const ROUNDS: usize = 15;

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    median(t)
}

/// Activations with some structure: sparse combinations of 4·D random directions plus noise.
fn batches(n: usize, seed: u64) -> Vec<Array2<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs = Array2::<f32>::from_shape_simple_fn((4 * D, D), || StandardNormal.sample(&mut rng));
    (0..n)
        .map(|_| {
            let mut x = Array2::<f32>::from_shape_simple_fn((B, D), || {
                0.1 * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng)
            });
            for mut row in x.rows_mut() {
                for _ in 0..8 {
                    let j = rng.random_range(0..dirs.nrows());
                    let a: f32 = rng.random_range(0.5..2.0);
                    row.scaled_add(a / (D as f32).sqrt(), &dirs.row(j));
                }
            }
            x
        })
        .collect()
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("training benchmark: TopK SAE d_in {D}, d_sae {M}, k {K}, batch {B}, {threads} cores");

    // The dense reference: the same product, plain row-major operands.
    let mut rng = StdRng::seed_from_u64(1);
    let a = Array2::<f32>::from_shape_simple_fn((B, D), || StandardNormal.sample(&mut rng));
    let w = Array2::<f32>::from_shape_simple_fn((D, M), || StandardNormal.sample(&mut rng));
    let mut c = Array2::<f32>::zeros((B, M));
    let gemm_flops = 2.0 * (B * D * M) as f64;
    // The same product with the encoder stored as the trainer keeps it, `W_encᵀ` `[M, D]`.
    let wt = w.t().as_standard_layout().to_owned();

    let arch = Arch {
        kind: Kind::Sae,
        activation: Activation::TopK,
        d_in: D,
        d_out: D,
        n_layers: 1,
        d_sae: M,
        k: K,
        k_aux: D / 2,
        decoder_norm: DecoderNorm::Unit,
        apply_b_dec_to_input: true,
    };
    let hyper = Hyper {
        schedule: Schedule {
            steps: 1_000_000,
            lr: 2e-4,
            warmup: 0,
            decay: 0,
            sparsity: 0.0,
            sparsity_warmup: 0,
        },
        aux: 1.0 / 32.0,
        bandwidth: 1e-3,
        dead_tokens: 10_000_000,
        clip: 1.0,
        threshold_beta: 0.999,
        threshold_start: 0,
    };
    let params = train::init_params(&arch, 0, &vec![0.0; D], 1e-3);
    let mut trainer = Trainer::new(arch.clone(), hyper, params, 0.9, 0.999);
    let data = batches(4, 2);
    let mut i = 0;
    let mut nnz = 0.0;

    // Other work on the machine slows both alike when they alternate: rounds of the dense product
    // and of a training step, medians of each.
    let step = |trainer: &mut Trainer, i: &mut usize, nnz: &mut f64| {
        let st = trainer
            .train_step(data[*i % data.len()].view(), None)
            .expect("step");
        *nnz = st.l0 * B as f64;
        *i += 1;
    };
    general_mat_mul(1.0, &a, &w, 0.0, &mut c);
    step(&mut trainer, &mut i, &mut nnz);
    let (mut tg, mut tgt, mut ts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        tg.push(time(1, || general_mat_mul(1.0, &a, &w, 0.0, &mut c)));
        tgt.push(time(1, || general_mat_mul(1.0, &a, &wt.t(), 0.0, &mut c)));
        ts.push(time(1, || step(&mut trainer, &mut i, &mut nnz)));
    }
    let (t_gemm, t_gemm_t, t_step) = (median(tg), median(tgt), median(ts));
    let dense_rate = gemm_flops / t_gemm;
    // The work a step does: the encoder's product, then per active entry the decoder row's
    // forward (ŷ += f·W_dec,i), its gradient (∂L/∂f = g·W_dec,i), the decoder row's gradient
    // (+= f·g) and the encoder row's (+= ∂L/∂pre·x').
    let sparse_flops = nnz * 2.0 * (3 * D + D) as f64;
    let step_flops = gemm_flops + sparse_flops;
    let step_rate = step_flops / t_step;

    // The parts of a step: forward and backward, then the optimiser.
    let coeffs = Coeffs {
        sparsity: 0.0,
        aux: 1.0 / 32.0,
        bandwidth: 1e-3,
    };
    let opts = StepOptions {
        project: true,
        ..StepOptions::default()
    };
    let t_fb = time(10, || {
        model::step(
            &trainer.arch,
            &trainer.params,
            &mut trainer.ws,
            Batch {
                x: data[i % data.len()].view(),
                y: None,
            },
            &coeffs,
            opts,
            Some(&mut trainer.grads),
        );
        i += 1;
    });
    let t_adam = time(10, || {
        let n = model::sum_squares(&trainer.grads).sqrt();
        trainer
            .adam
            .update(&mut trainer.params, &trainer.grads, 1e-5, 1.0 / n.max(1.0));
        trainer.params.normalize_decoder();
    });

    // With AuxK at work: a quarter of the latents marked dead before each step.
    let mut aux_trainer = Trainer::new(
        arch.clone(),
        hyper,
        train::init_params(&arch, 0, &vec![0.0; D], 1e-3),
        0.9,
        0.999,
    );
    let mut dead = 0;
    let t_aux = time(5, || {
        aux_trainer.tokens = 20_000_000;
        for j in (0..M).step_by(4) {
            aux_trainer.last_active[j] = 0;
        }
        let st = aux_trainer
            .train_step(data[i % data.len()].view(), None)
            .expect("step");
        dead = st.dead;
        i += 1;
    });

    println!();
    println!("| measurement | time per call | tokens/s | GFLOP/s |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| dense product [{B}x{D}]·[{D}x{M}] | {:.1} ms | | {:.1} |",
        1e3 * t_gemm,
        dense_rate / 1e9
    );
    println!(
        "| same, encoder layout `x'·(W_encᵀ)ᵀ` | {:.1} ms | | {:.1} |",
        1e3 * t_gemm_t,
        gemm_flops / t_gemm_t / 1e9
    );
    println!(
        "| TopK training step (sparse backward, Adam) | {:.1} ms | {:.0} | {:.1} |",
        1e3 * t_step,
        B as f64 / t_step,
        step_rate / 1e9
    );
    println!("| of which forward + backward | {:.1} ms | | |", 1e3 * t_fb);
    println!(
        "| of which clipping + Adam + decoder norms | {:.1} ms | | |",
        1e3 * t_adam
    );
    println!(
        "| same, AuxK over {dead} dead latents | {:.1} ms | {:.0} | |",
        1e3 * t_aux,
        B as f64 / t_aux
    );
    println!();
    println!(
        "step FLOPs: {:.2} G (encoder product {:.2} G + sparse decoder/backward {:.2} G, {:.1} active per token)",
        step_flops / 1e9,
        gemm_flops / 1e9,
        sparse_flops / 1e9,
        nnz / B as f64
    );
    println!(
        "training step at {:.0}% of the dense product's FLOP/s (target: 60% or more)",
        100.0 * step_rate / dense_rate
    );

    // The whole pipeline: 16 batches from a float16 .npy shard, streamed, shuffled, normalised.
    let dir = tempfile::tempdir().expect("temp dir");
    let shard = dir.path().join("acts.npy");
    let rows: Vec<&Array2<f32>> = data.iter().collect();
    write_f16_npy(&shard, &rows, 4);
    let mut cfg = train::TrainConfig::new(
        vec![shard],
        Kind::Sae,
        Activation::TopK,
        M,
        dir.path().join("sae.onnx"),
    );
    cfg.k = Some(K);
    cfg.batch = B;
    cfg.eval_tokens = Some(B as u64);
    cfg.tokens = Some(16 * B as u64);
    cfg.checkpoint_every = 0;
    let start = Instant::now();
    let outcome = train::train(&cfg, &train::Control::default()).expect("train");
    let total = start.elapsed();
    if let train::Outcome::Finished(f) = outcome {
        println!(
            "end to end (f16 .npy shard, shuffle buffer, normalisation, eval, export): {:.0} tokens/s over {} steps; {:.1} s in all",
            f.report.tokens_per_second,
            f.report.steps,
            total.as_secs_f64()
        );
    }
}

/// Writes `parts` (each repeated `times`) as one float16 `.npy` file.
fn write_f16_npy(path: &std::path::Path, parts: &[&Array2<f32>], times: usize) {
    let rows: usize = parts.iter().map(|p| p.nrows()).sum::<usize>() * times;
    let mut header =
        format!("{{'descr': '<f2', 'fortran_order': False, 'shape': ({rows}, {D}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for _ in 0..times {
        for p in parts {
            out.extend(p.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()));
        }
    }
    std::fs::write(path, out).expect("write shard");
}
