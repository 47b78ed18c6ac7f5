//! One training step: the forward pass, the losses and their gradients, and encoding alone.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use tiller_runtime::Activation;

use super::arch::Arch;
use super::params::Params;
use super::real::{Real, axpy, dot};
use super::select::{ROW_CHUNK, Select, batch_threshold, select};
use super::sparse::{Csr, rows_of, sparse_decode};

/// Weights of the losses at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coeffs {
    /// λ: the L1 coefficient (ReLU) or the L0 coefficient (JumpReLU), after its warm-up.
    pub sparsity: f64,
    /// α: the AuxK coefficient (TopK, BatchTopK).
    pub aux: f64,
    /// ε: JumpReLU's kernel bandwidth.
    pub bandwidth: f64,
}

/// What one step measured. Sums are over the batch, in `f64`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    /// Rows in the batch.
    pub rows: usize,
    /// The whole loss.
    pub loss: f64,
    /// Mean squared reconstruction error per token, summed over dimensions.
    pub mse: f64,
    /// The sparsity term.
    pub sparsity: f64,
    /// The AuxK term.
    pub aux: f64,
    /// `Σ_b ‖ŷ_b - y_b‖²`.
    pub sq_err: f64,
    /// `Σ_b ‖y_b - ȳ‖²` (ȳ the batch mean).
    pub sq_total: f64,
    /// Active features per token.
    pub l0: f64,
    /// BatchTopK: the smallest positive activation kept.
    pub batch_threshold: Option<f64>,
    /// Whether the dense path ran.
    pub dense: bool,
    /// Dead latents the AuxK loss read.
    pub dead: usize,
}

impl StepStats {
    /// Fraction of variance unexplained: `Σ‖ŷ - y‖² / Σ‖y - ȳ‖²`.
    pub fn fvu(&self) -> f64 {
        if self.sq_total > 0.0 {
            self.sq_err / self.sq_total
        } else {
            0.0
        }
    }
}

/// One entry of the sparse backward pass, filed under its feature.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry<T> {
    /// The row.
    pub(super) b: u32,
    /// Coefficient of `∂L/∂ŷ_b` in the decoder row's gradient (the activation `f`).
    pub(super) main: T,
    /// Coefficient of `∂L/∂ê_b` in the decoder row's gradient (the AuxK activation `z`).
    pub(super) aux: T,
    /// `∂L/∂pre`: coefficient of `x'_b` in the encoder row's gradient.
    pub(super) dpre: T,
    /// JumpReLU: contribution to `∂L/∂θ`.
    pub(super) dth: T,
}

/// Features per parallel task in feature-wise passes.
pub(super) const FEATURE_CHUNK: usize = 16;

/// Buffers reused from step to step (the batch-sized matrices are the largest allocations).
#[derive(Debug)]
pub struct Workspace<T> {
    pub(super) xc: Array2<T>,
    pub(super) pre: Array2<T>,
    pub(super) dense_f: Array2<T>,
    pub(super) err: Array2<T>,
    pub(super) ehat: Array2<T>,
    /// Which features fired in the last step.
    pub fired: Vec<bool>,
    /// The activations of the last step (positive entries only).
    pub acts: Csr<T>,
    /// Above this fraction of active entries the backward pass uses dense matrix products.
    pub sparse_below: f64,
}

impl<T: Real> Workspace<T> {
    /// Buffers for `arch`, grown as batches need.
    pub fn new(arch: &Arch) -> Self {
        Self {
            xc: Array2::zeros((0, arch.width_in())),
            pre: Array2::zeros((0, arch.d_sae)),
            dense_f: Array2::zeros((0, 0)),
            err: Array2::zeros((0, arch.width_out())),
            ehat: Array2::zeros((0, arch.width_out())),
            fired: vec![false; arch.d_sae],
            acts: Csr::default(),
            sparse_below: 0.1,
        }
    }
}

pub(super) fn resize<T: Real>(a: &mut Array2<T>, rows: usize, cols: usize) {
    if a.dim() != (rows, cols) {
        *a = Array2::zeros((rows, cols));
    }
}

/// Column sums of a matrix, in row order per column (deterministic).
pub(super) fn colsum<T: Real>(a: ArrayView2<'_, T>) -> Array1<T> {
    const COLS: usize = 256;
    let (rows, cols) = a.dim();
    let mut out = Array1::<T>::zeros(cols);
    if let Some(o) = out.as_slice_mut() {
        o.par_chunks_mut(COLS).enumerate().for_each(|(c, part)| {
            let c0 = c * COLS;
            for b in 0..rows {
                let row = a.row(b);
                match row.to_slice() {
                    Some(r) => {
                        for (v, x) in part.iter_mut().zip(&r[c0..]) {
                            *v += *x;
                        }
                    }
                    None => {
                        for (i, v) in part.iter_mut().enumerate() {
                            *v += row[c0 + i];
                        }
                    }
                }
            }
        });
    }
    out
}

/// The inputs of one step.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a, T> {
    /// `[B, width_in]`, normalised.
    pub x: ArrayView2<'a, T>,
    /// `[B, width_out]`; `None` means `x` (SAEs, crosscoders).
    pub y: Option<ArrayView2<'a, T>>,
}

/// Options of [`step`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions<'a, T> {
    /// Latents dead so far (AuxK reads their pre-activations).
    pub dead: Option<&'a [bool]>,
    /// For gradient checks: the residual the AuxK loss predicts, held fixed (by default it is the
    /// step's own `y - ŷ`, with no gradient through it).
    pub aux_target: Option<ArrayView2<'a, T>>,
    /// Remove the radial part of each decoder row's gradient ([`DecoderNorm::Unit`](super::DecoderNorm::Unit)).
    pub project: bool,
    /// BatchTopK at inference: a scalar threshold instead of the batch selection.
    pub infer_threshold: Option<T>,
}

/// One forward pass and, when `grads` is given, the backward pass: the gradients of the loss are
/// written into `grads` (every tensor overwritten).
pub fn step<T: Real>(
    arch: &Arch,
    p: &Params<T>,
    ws: &mut Workspace<T>,
    batch: Batch<'_, T>,
    c: &Coeffs,
    opts: StepOptions<'_, T>,
    grads: Option<&mut Params<T>>,
) -> StepStats {
    let x = batch.x;
    let y = batch.y.unwrap_or(x);
    let bsz = x.nrows();
    let (m, wi, wo) = (arch.d_sae, arch.width_in(), arch.width_out());
    let inv_b = T::one() / T::of(bsz.max(1) as f64);
    let lambda = T::of(c.sparsity);

    // x' = x - b_dec, contiguous for the products below.
    resize(&mut ws.xc, bsz, wi);
    ws.xc.assign(&x);
    if arch.apply_b_dec_to_input {
        ws.xc -= &p.b_dec;
    }
    // pre = x' W_enc (b_enc is added while selecting).
    resize(&mut ws.pre, bsz, m);
    general_mat_mul(T::one(), &ws.xc, &p.w_enc_t.t(), T::zero(), &mut ws.pre);

    let theta: Vec<T> = p.log_threshold.iter().map(|v| v.exp()).collect();
    let dead_idx: Vec<usize> = match opts.dead {
        Some(d) if arch.is_topk() && c.aux > 0.0 => d
            .iter()
            .enumerate()
            .filter(|(_, x)| **x)
            .map(|(j, _)| j)
            .collect(),
        _ => Vec::new(),
    };
    let b_enc = p.b_enc.as_slice().unwrap_or(&[]);
    let mut bias_added = false;
    let mut batch_thr = None;
    let sel = match (arch.activation, opts.infer_threshold) {
        (Activation::Relu, _) => Select::Relu,
        (Activation::JumpRelu, _) => Select::Jump,
        (Activation::TopK, _) => Select::TopK(arch.k),
        (Activation::BatchTopK, Some(t)) => Select::Above(t),
        (_, _) => {
            if let Some(pre) = ws.pre.as_slice_mut() {
                pre.par_chunks_mut(m.max(1)).for_each(|row| {
                    for (v, b) in row.iter_mut().zip(b_enc) {
                        *v += *b;
                    }
                });
            }
            bias_added = true;
            match batch_threshold(ws.pre.as_slice().unwrap_or(&[]), bsz * arch.k) {
                Some(t) => {
                    batch_thr = Some(t);
                    Select::AtLeast(t)
                }
                None => Select::Relu,
            }
        }
    };
    let half_eps = T::of(c.bandwidth / 2.0);
    let k_aux = if dead_idx.is_empty() { 0 } else { arch.k_aux };
    let (acts, aux, near) = select(
        &mut ws.pre,
        b_enc,
        sel,
        &theta,
        half_eps,
        &dead_idx,
        k_aux,
        bias_added,
    );
    let nnz = acts.idx.len();
    ws.fired.iter_mut().for_each(|f| *f = false);
    for &j in &acts.idx {
        ws.fired[j as usize] = true;
    }
    let mut stats = StepStats {
        rows: bsz,
        l0: nnz as f64 / bsz.max(1) as f64,
        dead: dead_idx.len(),
        ..StepStats::default()
    };
    if arch.activation == Activation::BatchTopK && opts.infer_threshold.is_none() {
        stats.batch_threshold = acts
            .val
            .iter()
            .copied()
            .fold(None, |m: Option<T>, v| Some(m.map_or(v, |m| m.min(v))))
            .map(|v| v.f64())
            .or(batch_thr.map(|t| t.f64()));
    }
    let dense = (nnz as f64) > ws.sparse_below * (bsz * m) as f64;
    stats.dense = dense;

    // ŷ = f W_dec + b_dec (+ x W_skipᵀ).
    resize(&mut ws.err, bsz, wo);
    if dense {
        resize(&mut ws.dense_f, bsz, m);
        ws.dense_f.fill(T::zero());
        for b in 0..bsz {
            for (j, v) in acts.row(b) {
                ws.dense_f[[b, j]] = v;
            }
        }
        ws.err.assign(&p.b_dec);
        general_mat_mul(T::one(), &ws.dense_f, &p.w_dec, T::one(), &mut ws.err);
    } else {
        sparse_decode(&acts, &p.w_dec, p.b_dec.as_slice(), &mut ws.err);
    }
    if arch.has_skip() {
        general_mat_mul(T::one(), &x, &p.w_skip.t(), T::one(), &mut ws.err);
    }
    // err = ŷ - y; the batch's squared error and variance.
    let ymean = colsum(y).mapv(|v| v * inv_b);
    let (sq_err, sq_total) = {
        let err = &mut ws.err;
        let parts: Vec<(f64, f64)> = err
            .as_slice_mut()
            .unwrap_or(&mut [])
            .par_chunks_mut(wo.max(1))
            .enumerate()
            .map(|(b, row)| {
                let yb = rows_of(&y, b);
                let (mut se, mut st) = (0.0, 0.0);
                for ((e, &yv), &mu) in row.iter_mut().zip(yb.iter()).zip(ymean.iter()) {
                    *e -= yv;
                    se += e.f64() * e.f64();
                    let d = (yv - mu).f64();
                    st += d * d;
                }
                (se, st)
            })
            .collect();
        parts
            .iter()
            .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d))
    };
    stats.sq_err = sq_err;
    stats.sq_total = sq_total;
    stats.mse = sq_err / bsz.max(1) as f64;

    let norms = p.decoder_norms(arch);
    stats.sparsity = match arch.activation {
        Activation::Relu => {
            let mut s = 0.0;
            for (&j, &v) in acts.idx.iter().zip(&acts.val) {
                s += v.f64() * norms[j as usize].f64();
            }
            c.sparsity * s / bsz.max(1) as f64
        }
        Activation::JumpRelu => c.sparsity * nnz as f64 / bsz.max(1) as f64,
        _ => 0.0,
    };

    // AuxK: r = e - ê with e = y - ŷ (= -err) held fixed, or the given target.
    let has_aux = !aux.idx.is_empty();
    if has_aux {
        resize(&mut ws.ehat, bsz, wo);
        sparse_decode(&aux, &p.w_dec, None, &mut ws.ehat);
        let err = &ws.err;
        let target = opts.aux_target;
        let parts: Vec<f64> = ws
            .ehat
            .as_slice_mut()
            .unwrap_or(&mut [])
            .par_chunks_mut(wo.max(1))
            .enumerate()
            .map(|(b, row)| {
                let mut s = 0.0;
                let t = target.map(|t| rows_of(&t, b).into_owned());
                for (i, v) in row.iter_mut().enumerate() {
                    let e = match &t {
                        Some(t) => t[i],
                        None => -err[[b, i]],
                    };
                    // ehat becomes r = e - ê.
                    *v = e - *v;
                    s += v.f64() * v.f64();
                }
                s
            })
            .collect();
        stats.aux = c.aux * parts.iter().sum::<f64>() / bsz.max(1) as f64;
    }
    stats.loss = stats.mse + stats.sparsity + stats.aux;
    ws.acts = acts;

    let Some(g) = grads else {
        return stats;
    };

    // G = ∂L/∂ŷ = (2/B)·err; H = ∂L/∂ê = -(2α/B)·r.
    let two_b = T::of(2.0) * inv_b;
    ws.err.mapv_inplace(|v| v * two_b);
    if has_aux {
        let h = -T::of(2.0 * c.aux) * inv_b;
        ws.ehat.mapv_inplace(|v| v * h);
    }
    let gmat = &ws.err;
    let hmat = &ws.ehat;
    let acts = &ws.acts;
    let pen: Vec<T> = if arch.activation == Activation::Relu {
        norms.iter().map(|&n| lambda * inv_b * n).collect()
    } else {
        vec![T::zero(); m]
    };
    let inv_eps = T::one() / T::of(c.bandwidth);
    let l0_th = lambda * inv_b * inv_eps;

    // Per-entry derivatives, row by row: dF = G_b·W_dec,j (+ the L1 term), dZ = H_b·W_dec,j, and
    // JumpReLU's θ pseudo-derivatives.
    let w_dec = &p.w_dec;
    let entry_chunks: Vec<Vec<(u32, Entry<T>)>> = (0..bsz.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|ci| {
            let mut out = Vec::new();
            for b in ci * ROW_CHUNK..((ci + 1) * ROW_CHUNK).min(bsz) {
                let gb = gmat.row(b);
                let gb = gb.as_slice().unwrap_or(&[]);
                if !dense {
                    for (j, f) in acts.row(b) {
                        let wj = w_dec.row(j);
                        let df = dot(gb, wj.as_slice().unwrap_or(&[])) + pen[j];
                        out.push((
                            j as u32,
                            Entry {
                                b: b as u32,
                                main: f,
                                aux: T::zero(),
                                dpre: df,
                                dth: T::zero(),
                            },
                        ));
                    }
                }
                if has_aux {
                    let hb = hmat.row(b);
                    let hb = hb.as_slice().unwrap_or(&[]);
                    for (j, z) in aux.row(b) {
                        let wj = w_dec.row(j);
                        let dz = dot(hb, wj.as_slice().unwrap_or(&[]));
                        out.push((
                            j as u32,
                            Entry {
                                b: b as u32,
                                main: T::zero(),
                                aux: z,
                                dpre: dz,
                                dth: T::zero(),
                            },
                        ));
                    }
                }
                for (j, _) in near.row(b) {
                    let wj = w_dec.row(j);
                    let df = dot(gb, wj.as_slice().unwrap_or(&[]));
                    let dth = -(theta[j] * inv_eps) * df - l0_th;
                    out.push((
                        j as u32,
                        Entry {
                            b: b as u32,
                            main: T::zero(),
                            aux: T::zero(),
                            dpre: T::zero(),
                            dth,
                        },
                    ));
                }
            }
            out
        })
        .collect();

    // File the entries by feature (a stable counting sort: rows stay in order).
    let mut start = vec![0usize; m + 1];
    for c in &entry_chunks {
        for (j, _) in c {
            start[*j as usize + 1] += 1;
        }
    }
    for j in 0..m {
        start[j + 1] += start[j];
    }
    let mut filed: Vec<Entry<T>> = vec![
        Entry {
            b: 0,
            main: T::zero(),
            aux: T::zero(),
            dpre: T::zero(),
            dth: T::zero()
        };
        start[m]
    ];
    {
        let mut next = start.clone();
        for c in entry_chunks {
            for (j, e) in c {
                filed[next[j as usize]] = e;
                next[j as usize] += 1;
            }
        }
    }

    let mut gb_enc = Array1::<T>::zeros(m);
    let mut dth = vec![T::zero(); m];
    if dense {
        // dF = G W_decᵀ; ∂L/∂pre = (dF + L1 term) on the active entries.
        let mut dpre = std::mem::take(&mut ws.pre);
        general_mat_mul(T::one(), gmat, &p.w_dec.t(), T::zero(), &mut dpre);
        if let (Some(d), Some(f)) = (dpre.as_slice_mut(), ws.dense_f.as_slice()) {
            d.par_chunks_mut(m.max(1))
                .zip(f.par_chunks(m.max(1)))
                .for_each(|(drow, frow)| {
                    for ((dv, &fv), &pj) in drow.iter_mut().zip(frow).zip(&pen) {
                        *dv = if fv > T::zero() { *dv + pj } else { T::zero() };
                    }
                });
        }
        general_mat_mul(T::one(), &ws.dense_f.t(), gmat, T::zero(), &mut g.w_dec);
        general_mat_mul(T::one(), &dpre.t(), &ws.xc, T::zero(), &mut g.w_enc_t);
        gb_enc = colsum(dpre.view());
        ws.pre = dpre;
    }

    // Feature by feature: the decoder and encoder rows' gradients from the filed entries.
    let xc = &ws.xc;
    {
        let gdec = g.w_dec.as_slice_mut().unwrap_or(&mut []);
        let genc = g.w_enc_t.as_slice_mut().unwrap_or(&mut []);
        let gbe = gb_enc.as_slice_mut().unwrap_or(&mut []);
        gdec.par_chunks_mut(FEATURE_CHUNK * wo.max(1))
            .zip(genc.par_chunks_mut(FEATURE_CHUNK * wi.max(1)))
            .zip(gbe.par_chunks_mut(FEATURE_CHUNK))
            .zip(dth.par_chunks_mut(FEATURE_CHUNK))
            .enumerate()
            .for_each(|(ci, (((gd, ge), gbc), dthc))| {
                for (r, ((gdr, ger), (gb, dt))) in gd
                    .chunks_mut(wo.max(1))
                    .zip(ge.chunks_mut(wi.max(1)))
                    .zip(gbc.iter_mut().zip(dthc.iter_mut()))
                    .enumerate()
                {
                    let j = ci * FEATURE_CHUNK + r;
                    if !dense {
                        gdr.iter_mut().for_each(|v| *v = T::zero());
                        ger.iter_mut().for_each(|v| *v = T::zero());
                        *gb = T::zero();
                    }
                    for e in &filed[start[j]..start[j + 1]] {
                        let b = e.b as usize;
                        if e.main != T::zero() {
                            axpy(gdr, e.main, gmat.row(b).as_slice().unwrap_or(&[]));
                        }
                        if e.aux != T::zero() {
                            axpy(gdr, e.aux, hmat.row(b).as_slice().unwrap_or(&[]));
                        }
                        if e.dpre != T::zero() {
                            axpy(ger, e.dpre, xc.row(b).as_slice().unwrap_or(&[]));
                            *gb += e.dpre;
                        }
                        *dt += e.dth;
                    }
                }
            });
    }

    // The L1 term's gradient through the decoder norms, and the unit-norm projection.
    if arch.activation == Activation::Relu && c.sparsity != 0.0 {
        let mut fsum = vec![T::zero(); m];
        for (&j, &v) in acts.idx.iter().zip(&acts.val) {
            fsum[j as usize] += v;
        }
        let d_out = arch.d_out.max(1);
        let gdec = g.w_dec.as_slice_mut().unwrap_or(&mut []);
        let wdec = p.w_dec.as_slice().unwrap_or(&[]);
        gdec.par_chunks_mut(wo.max(1))
            .zip(wdec.par_chunks(wo.max(1)))
            .zip(fsum.par_iter())
            .for_each(|((gr, wr), &fs)| {
                if fs == T::zero() {
                    return;
                }
                for (gb, wb) in gr.chunks_mut(d_out).zip(wr.chunks(d_out)) {
                    let n = dot(wb, wb).sqrt();
                    if n > T::zero() {
                        axpy(gb, lambda * inv_b * fs / n, wb);
                    }
                }
            });
    }
    if opts.project {
        let gdec = g.w_dec.as_slice_mut().unwrap_or(&mut []);
        let wdec = p.w_dec.as_slice().unwrap_or(&[]);
        gdec.par_chunks_mut(wo.max(1))
            .zip(wdec.par_chunks(wo.max(1)))
            .for_each(|(gr, wr)| {
                let nn = dot(wr, wr);
                if nn > T::zero() {
                    let a = dot(gr, wr) / nn;
                    axpy(gr, -a, wr);
                }
            });
    }

    // b_enc, b_dec (through the output and, when subtracted, through the input), θ, W_skip.
    g.b_dec = colsum(gmat.view());
    if arch.apply_b_dec_to_input {
        let through_input = gb_enc.dot(&p.w_enc_t);
        g.b_dec -= &through_input;
    }
    g.b_enc = gb_enc;
    if arch.activation == Activation::JumpRelu {
        g.log_threshold = Array1::from_iter(dth.iter().zip(&theta).map(|(&d, &t)| d * t));
    }
    if arch.has_skip() {
        general_mat_mul(T::one(), &gmat.t(), &x, T::zero(), &mut g.w_skip);
    }
    stats
}

/// Feature activations of `x` as a dense matrix (`[B, d_sae]`), as the exported dictionary
/// computes them: BatchTopK uses `threshold`.
pub fn encode<T: Real>(
    arch: &Arch,
    p: &Params<T>,
    x: ArrayView2<'_, T>,
    threshold: Option<T>,
) -> Array2<T> {
    let mut ws = Workspace::new(arch);
    let coeffs = Coeffs {
        sparsity: 0.0,
        aux: 0.0,
        bandwidth: 1e-3,
    };
    let opts = StepOptions {
        infer_threshold: threshold,
        ..StepOptions::default()
    };
    let _ = step(arch, p, &mut ws, Batch { x, y: None }, &coeffs, opts, None);
    let mut out = Array2::zeros((x.nrows(), arch.d_sae));
    for b in 0..ws.acts.rows() {
        for (j, v) in ws.acts.row(b) {
            out[[b, j]] = v;
        }
    }
    out
}
