//! The dictionary being trained: its parameters, the forward pass of every activation and kind,
//! the losses, and their gradients.
//!
//! One step computes, for a batch `x` (`[B, width_in]`, already normalised) and a target `y`
//! (`[B, width_out]`; `x` itself for SAEs and crosscoders):
//!
//! ```text
//! x'  = x - b_dec·[apply_b_dec_to_input]
//! pre = x' W_enc + b_enc
//! f   = act(pre)                       relu | topk | batchtopk | jumprelu
//! ŷ   = f W_dec + b_dec (+ x W_skipᵀ)
//! L   = (1/B) Σ_b ‖ŷ_b - y_b‖² + sparsity + auxiliary
//! ```
//!
//! - ReLU (Anthropic, April 2024 update): sparsity `λ/B Σ_b Σ_i f_bi ‖W_dec,i‖`; crosscoders
//!   weight by the sum of the per-layer norms, `Σ_l ‖W_dec,l,i‖`.
//! - JumpReLU (Rajamanoharan et al. 2024): `f = pre·H(pre - θ)`, sparsity `λ/B Σ H(pre - θ)`
//!   (the L0 norm); `θ = exp(log θ)`. The step function has no useful derivative, so `θ` gets the
//!   straight-through pseudo-derivatives with a rectangle kernel `K(u) = 1[|u| < ½]` of bandwidth
//!   `ε`: `∂f/∂θ = -(θ/ε) K((pre-θ)/ε)`, `∂H/∂θ = -(1/ε) K((pre-θ)/ε)`; `pre` gets `H(pre-θ)` from
//!   the JumpReLU and nothing from the L0 term.
//! - TopK (Gao et al. 2024): the k largest pre-activations of each row, ReLU'd. BatchTopK
//!   (Bussmann et al. 2024): the `B·k` largest ReLU'd pre-activations of the whole batch. Both add
//!   the AuxK loss `α/B Σ_b ‖e_b - ê_b‖²`, where `e = y - ŷ` is held constant (no gradient) and
//!   `ê = z W_dec` decodes the `k_aux` largest pre-activations among the dead latents.
//!
//! When the activations are sparse (below [`Workspace::sparse_below`] of the batch's entries,
//! always the case for TopK), everything after the encoder's matrix product works on the active
//! entries only: the decoder's forward and backward passes touch only the active rows of `W_dec`,
//! and the encoder's gradient only the active rows of `W_encᵀ`, as OpenAI's kernels do. Dense
//! activations (early ReLU training) use matrix products instead. Both are deterministic: every
//! sum runs in a fixed order whatever the number of threads.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use tiller_runtime::{Activation, Kind};

/// The float type the model is written for: `f32` to train, `f64` for gradient checks.
pub trait Real:
    num_traits::Float
    + ndarray::LinalgScalar
    + ndarray::ScalarOperand
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Send
    + Sync
    + std::fmt::Debug
    + Default
    + 'static
{
    /// From an `f64`.
    fn of(v: f64) -> Self;
    /// To an `f64`.
    fn f64(self) -> f64;
    /// `Σ a_i b_i`.
    fn dot(a: &[Self], b: &[Self]) -> Self;
    /// `y += a·x`.
    fn axpy(y: &mut [Self], a: Self, x: &[Self]);
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn f64(self) -> f64 {
        f64::from(self)
    }
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_f32(a, b)
    }
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        axpy_f32(y, a, x)
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn f64(self) -> f64 {
        self
    }
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
    fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * xi;
        }
    }
}

/// Partial sums of [`dot_f32`]: two AVX-512 registers' worth, so the additions do not wait on
/// each other.
const LANES: usize = 32;

// FMA only where the target has it: elsewhere `mul_add` would be a slow library call.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let fma =
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_arch = "aarch64"));
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = if fma {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    let fma =
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_arch = "aarch64"));
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if fma {
            xi.mul_add(a, *yi)
        } else {
            *yi + a * xi
        };
    }
}

/// How the decoder rows' scale is held in check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderNorm {
    /// Rows renormalised to unit norm after every step, and the radial part of their gradient
    /// removed before it (Bricken et al. 2023; Gao et al. 2024).
    Unit,
    /// Rows free; ReLU's L1 term is weighted by their norms (Anthropic, April 2024). For the other
    /// activations, whose sparsity term does not read the norms, this leaves the rows free.
    Penalty,
}

impl DecoderNorm {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unit => "unit",
            Self::Penalty => "penalty",
        }
    }
}

impl std::str::FromStr for DecoderNorm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unit" => Ok(Self::Unit),
            "penalty" => Ok(Self::Penalty),
            other => Err(format!("`{other}` is not unit or penalty")),
        }
    }
}

/// The shape and kind of the dictionary.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    /// `sae`, `transcoder`, `skip_transcoder` or `crosscoder`.
    pub kind: Kind,
    /// `relu`, `topk`, `batchtopk` or `jumprelu`.
    pub activation: Activation,
    /// Width of one layer's input.
    pub d_in: usize,
    /// Width of one layer's output.
    pub d_out: usize,
    /// Layers (crosscoders; 1 otherwise).
    pub n_layers: usize,
    /// Number of features.
    pub d_sae: usize,
    /// TopK and BatchTopK: active features per token.
    pub k: usize,
    /// TopK and BatchTopK: dead latents the AuxK loss decodes per token.
    pub k_aux: usize,
    /// How the decoder's scale is held.
    pub decoder_norm: DecoderNorm,
    /// Whether `b_dec` is subtracted from the input before encoding.
    pub apply_b_dec_to_input: bool,
}

impl Arch {
    /// Width of the encoder's input, all layers together.
    pub fn width_in(&self) -> usize {
        self.in_blocks() * self.d_in
    }

    /// Width of the decoder's output, all layers together.
    pub fn width_out(&self) -> usize {
        self.out_blocks() * self.d_out
    }

    /// Layers read (crosscoders: `n_layers`).
    pub fn in_blocks(&self) -> usize {
        if self.kind == Kind::Crosscoder {
            self.n_layers
        } else {
            1
        }
    }

    /// Layers written (crosscoders: `n_layers`).
    pub fn out_blocks(&self) -> usize {
        self.in_blocks()
    }

    /// Whether the model has a skip connection `x W_skipᵀ`.
    pub fn has_skip(&self) -> bool {
        self.kind == Kind::SkipTranscoder
    }

    /// Whether the activation is TopK or BatchTopK (and so has the AuxK loss).
    pub fn is_topk(&self) -> bool {
        matches!(self.activation, Activation::TopK | Activation::BatchTopK)
    }
}

/// The trainable tensors. Absent ones (`log_threshold` without JumpReLU, `w_skip` without a skip
/// connection) are empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Params<T> {
    /// `W_encᵀ`, `[d_sae, width_in]`: row `i` is feature `i`'s encoder direction (kept transposed
    /// so the sparse backward pass writes whole rows).
    pub w_enc_t: Array2<T>,
    /// `[d_sae]`.
    pub b_enc: Array1<T>,
    /// `[d_sae, width_out]`.
    pub w_dec: Array2<T>,
    /// `[width_out]`.
    pub b_dec: Array1<T>,
    /// JumpReLU: `log θ`, `[d_sae]`.
    pub log_threshold: Array1<T>,
    /// Skip transcoders: `[d_out, d_in]`.
    pub w_skip: Array2<T>,
}

/// The names of [`Params`]' tensors, in the order of [`Params::tensors`].
pub const PARAM_NAMES: [&str; 6] = [
    "W_enc_t",
    "b_enc",
    "W_dec",
    "b_dec",
    "log_threshold",
    "W_skip",
];

impl<T: Real> Params<T> {
    /// All-zero parameters of `arch`'s shapes.
    pub fn zeros(arch: &Arch) -> Self {
        let (m, wi, wo) = (arch.d_sae, arch.width_in(), arch.width_out());
        Self {
            w_enc_t: Array2::zeros((m, wi)),
            b_enc: Array1::zeros(m),
            w_dec: Array2::zeros((m, wo)),
            b_dec: Array1::zeros(wo),
            log_threshold: Array1::zeros(if arch.activation == Activation::JumpRelu {
                m
            } else {
                0
            }),
            w_skip: if arch.has_skip() {
                Array2::zeros((arch.d_out, arch.d_in))
            } else {
                Array2::zeros((0, 0))
            },
        }
    }

    /// Every tensor as a flat slice, in [`PARAM_NAMES`] order.
    pub fn tensors(&self) -> [&[T]; 6] {
        [
            self.w_enc_t.as_slice().unwrap_or(&[]),
            self.b_enc.as_slice().unwrap_or(&[]),
            self.w_dec.as_slice().unwrap_or(&[]),
            self.b_dec.as_slice().unwrap_or(&[]),
            self.log_threshold.as_slice().unwrap_or(&[]),
            self.w_skip.as_slice().unwrap_or(&[]),
        ]
    }

    /// Every tensor as a flat mutable slice, in [`PARAM_NAMES`] order.
    pub fn tensors_mut(&mut self) -> [&mut [T]; 6] {
        [
            self.w_enc_t.as_slice_mut().unwrap_or(&mut []),
            self.b_enc.as_slice_mut().unwrap_or(&mut []),
            self.w_dec.as_slice_mut().unwrap_or(&mut []),
            self.b_dec.as_slice_mut().unwrap_or(&mut []),
            self.log_threshold.as_slice_mut().unwrap_or(&mut []),
            self.w_skip.as_slice_mut().unwrap_or(&mut []),
        ]
    }

    /// The same parameters in another float type.
    pub fn cast<U: Real>(&self) -> Params<U> {
        let c2 = |a: &Array2<T>| a.mapv(|v| U::of(v.f64()));
        let c1 = |a: &Array1<T>| a.mapv(|v| U::of(v.f64()));
        Params {
            w_enc_t: c2(&self.w_enc_t),
            b_enc: c1(&self.b_enc),
            w_dec: c2(&self.w_dec),
            b_dec: c1(&self.b_dec),
            log_threshold: c1(&self.log_threshold),
            w_skip: c2(&self.w_skip),
        }
    }

    /// Decoder row norms as the sparsity term reads them: `‖W_dec,i‖`, or for crosscoders
    /// `Σ_l ‖W_dec,l,i‖`.
    pub fn decoder_norms(&self, arch: &Arch) -> Vec<T> {
        let blocks = arch.out_blocks();
        self.w_dec
            .rows()
            .into_iter()
            .map(|r| {
                let r = r.to_slice().unwrap_or(&[]);
                r.chunks(arch.d_out.max(1))
                    .take(blocks)
                    .map(|b| dot(b, b).sqrt())
                    .fold(T::zero(), |a, b| a + b)
            })
            .collect()
    }

    /// Scales every decoder row to unit norm (zero rows are left alone).
    pub fn normalize_decoder(&mut self) {
        let w = self.w_dec.ncols().max(1);
        if let Some(s) = self.w_dec.as_slice_mut() {
            s.par_chunks_mut(w).for_each(|row| {
                let n = dot(row, row).sqrt();
                if n > T::zero() {
                    let inv = T::one() / n;
                    row.iter_mut().for_each(|v| *v *= inv);
                }
            });
        }
    }
}

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

/// What the activation selects, for one forward pass.
#[derive(Debug, Clone, Copy)]
enum Select<T> {
    Relu,
    Jump,
    TopK(usize),
    /// Keep ReLU'd values at or above the threshold (BatchTopK in training).
    AtLeast(T),
    /// Keep values strictly above the threshold (BatchTopK at inference).
    Above(T),
}

/// Compressed sparse rows: row `b`'s entries are `idx[ptr[b]..ptr[b+1]]`, `val[..]`.
#[derive(Debug, Clone, Default)]
pub struct Csr<T> {
    /// Row starts, `rows + 1` long.
    pub ptr: Vec<usize>,
    /// Column (feature) of each entry.
    pub idx: Vec<u32>,
    /// Value of each entry.
    pub val: Vec<T>,
}

impl<T: Copy> Csr<T> {
    fn from_chunks(chunks: Vec<ChunkCsr<T>>) -> Self {
        let mut out = Csr {
            ptr: vec![0],
            idx: Vec::new(),
            val: Vec::new(),
        };
        for c in chunks {
            for n in c.counts {
                let last = out.ptr.last().copied().unwrap_or(0);
                out.ptr.push(last + n);
            }
            out.idx.extend(c.idx);
            out.val.extend(c.val);
        }
        out
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.ptr.len().saturating_sub(1)
    }

    /// Row `b`'s `(feature, value)` pairs.
    pub fn row(&self, b: usize) -> impl Iterator<Item = (usize, T)> + '_ {
        let (s, e) = (self.ptr[b], self.ptr[b + 1]);
        self.idx[s..e]
            .iter()
            .zip(&self.val[s..e])
            .map(|(&j, &v)| (j as usize, v))
    }
}

#[derive(Debug)]
struct ChunkCsr<T> {
    counts: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<T>,
}

impl<T> ChunkCsr<T> {
    fn new() -> Self {
        Self {
            counts: Vec::new(),
            idx: Vec::new(),
            val: Vec::new(),
        }
    }
}

/// One entry of the sparse backward pass, filed under its feature.
#[derive(Debug, Clone, Copy)]
struct Entry<T> {
    /// The row.
    b: u32,
    /// Coefficient of `∂L/∂ŷ_b` in the decoder row's gradient (the activation `f`).
    main: T,
    /// Coefficient of `∂L/∂ê_b` in the decoder row's gradient (the AuxK activation `z`).
    aux: T,
    /// `∂L/∂pre`: coefficient of `x'_b` in the encoder row's gradient.
    dpre: T,
    /// JumpReLU: contribution to `∂L/∂θ`.
    dth: T,
}

/// Rows per parallel task in row-wise passes.
const ROW_CHUNK: usize = 32;
/// Features per parallel task in feature-wise passes.
const FEATURE_CHUNK: usize = 16;

/// Buffers reused from step to step (the batch-sized matrices are the largest allocations).
#[derive(Debug)]
pub struct Workspace<T> {
    xc: Array2<T>,
    pre: Array2<T>,
    dense_f: Array2<T>,
    err: Array2<T>,
    ehat: Array2<T>,
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

fn resize<T: Real>(a: &mut Array2<T>, rows: usize, cols: usize) {
    if a.dim() != (rows, cols) {
        *a = Array2::zeros((rows, cols));
    }
}

/// `Σ a_i b_i`.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    T::dot(a, b)
}

/// `y += a·x`.
#[inline]
pub fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    T::axpy(y, a, x)
}

/// Column sums of a matrix, in row order per column (deterministic).
fn colsum<T: Real>(a: ArrayView2<'_, T>) -> Array1<T> {
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

/// Orders `(index, value)` pairs best first: larger values, and among equal values the lower
/// index.
fn better<T: Real>(a: &(u32, T), b: &(u32, T)) -> std::cmp::Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// Keeps the `k` best of `out` (see [`better`]), sorted by index.
fn keep_best<T: Real>(out: &mut Vec<(u32, T)>, k: usize) {
    if out.len() > k {
        if k == 0 {
            out.clear();
            return;
        }
        out.select_nth_unstable_by(k - 1, better);
        out.truncate(k);
    }
    out.sort_unstable_by_key(|e| e.0);
}

/// The `k` largest of `row[j]` over the candidates `cand`, as `(j, value)` sorted by `j`; ties go
/// to the lower index.
fn top_k<T: Real>(row: &[T], cand: &[usize], k: usize, out: &mut Vec<(u32, T)>) {
    out.clear();
    out.extend(
        cand.iter()
            .map(|&j| (j as u32, row[j]))
            .filter(|(_, v)| !v.is_nan()),
    );
    keep_best(out, k);
}

/// [`top_k`] over a whole row. The k-th largest of the maxima of blocks of 16 is a lower bound of
/// the row's k-th largest value (k blocks reach it), so only the blocks whose maximum reaches it (a
/// few times k values) need sorting out. `bias`, when given, is added to the row on the way.
fn top_k_row<T: Real>(
    row: &mut [T],
    bias: Option<&[T]>,
    k: usize,
    out: &mut Vec<(u32, T)>,
    maxima: &mut Vec<T>,
    sorted: &mut Vec<T>,
) {
    const BLOCK: usize = 16;
    out.clear();
    if k == 0 {
        return;
    }
    maxima.clear();
    for (b, block) in row.chunks_mut(BLOCK).enumerate() {
        if let Some(bias) = bias {
            for (v, c) in block.iter_mut().zip(&bias[b * BLOCK..]) {
                *v += *c;
            }
        }
        maxima.push(
            block
                .iter()
                .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m }),
        );
    }
    let bar = if maxima.len() > k {
        sorted.clear();
        sorted.extend_from_slice(maxima);
        let (_, t, _) = sorted.select_nth_unstable_by(k - 1, |a, b| {
            b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal)
        });
        *t
    } else {
        T::neg_infinity()
    };
    for (b, &mx) in maxima.iter().enumerate() {
        if mx >= bar {
            let start = b * BLOCK;
            for (i, &v) in row[start..(start + BLOCK).min(row.len())]
                .iter()
                .enumerate()
            {
                if v >= bar {
                    out.push(((start + i) as u32, v));
                }
            }
        }
    }
    keep_best(out, k);
}

/// The threshold that keeps the `keep` largest positive values of `pre` (ties at the threshold all
/// kept): a histogram over the top bits of the values' `f64` representations (monotonic for
/// positive floats), then an exact selection inside the one bucket that holds the threshold.
/// `None` when there are no more than `keep` positive values.
fn batch_threshold<T: Real>(pre: &[T], keep: usize) -> Option<T> {
    const BITS: u32 = 16;
    let key = |v: T| (v.f64().to_bits() >> (64 - BITS)) as usize;
    let hist = pre
        .par_chunks(1 << 16)
        .fold(
            || vec![0u64; 1 << BITS],
            |mut h, c| {
                for &v in c {
                    if v > T::zero() {
                        h[key(v)] += 1;
                    }
                }
                h
            },
        )
        .reduce(
            || vec![0u64; 1 << BITS],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let total: u64 = hist.iter().sum();
    if total as usize <= keep || keep == 0 {
        return None;
    }
    let mut above = 0usize;
    let mut bucket = 0;
    for (i, &n) in hist.iter().enumerate().rev() {
        if above + n as usize >= keep {
            bucket = i;
            break;
        }
        above += n as usize;
    }
    let mut vals: Vec<T> = pre
        .par_chunks(1 << 16)
        .flat_map_iter(|c| {
            c.iter()
                .copied()
                .filter(move |&v| v > T::zero() && key(v) == bucket)
        })
        .collect();
    let nth = keep - above - 1;
    let (_, t, _) = vals.select_nth_unstable_by(nth, |a, b| {
        b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal)
    });
    Some(*t)
}

/// One forward pass's selection: adds `b_enc` to `pre` in place and returns the active entries
/// (positive only), the AuxK entries and JumpReLU's near-threshold entries (`|pre - θ| < ε/2`,
/// with `pre` as value).
#[allow(clippy::too_many_arguments)]
fn select<T: Real>(
    pre: &mut Array2<T>,
    b_enc: &[T],
    sel: Select<T>,
    theta: &[T],
    half_eps: T,
    dead: &[usize],
    k_aux: usize,
    bias_added: bool,
) -> (Csr<T>, Csr<T>, Csr<T>) {
    let m = pre.ncols();
    let Some(data) = pre.as_slice_mut() else {
        return (Csr::default(), Csr::default(), Csr::default());
    };
    let out: Vec<(ChunkCsr<T>, ChunkCsr<T>, ChunkCsr<T>)> = data
        .par_chunks_mut(ROW_CHUNK * m.max(1))
        .map(|rows| {
            let (mut main, mut aux, mut near) = (ChunkCsr::new(), ChunkCsr::new(), ChunkCsr::new());
            let mut top = Vec::new();
            let (mut maxima, mut sorted) = (Vec::new(), Vec::new());
            for row in rows.chunks_mut(m.max(1)) {
                if let Select::TopK(k) = sel {
                    // Adds the bias while it looks for the top k.
                    let bias = (!bias_added).then_some(b_enc);
                    top_k_row(row, bias, k, &mut top, &mut maxima, &mut sorted);
                } else if !bias_added {
                    for (v, b) in row.iter_mut().zip(b_enc) {
                        *v += *b;
                    }
                }
                let before = main.idx.len();
                let before_near = near.idx.len();
                match sel {
                    Select::Relu => {
                        for (j, &v) in row.iter().enumerate() {
                            if v > T::zero() {
                                main.idx.push(j as u32);
                                main.val.push(v);
                            }
                        }
                    }
                    Select::Jump => {
                        for (j, (&v, &t)) in row.iter().zip(theta).enumerate() {
                            if v > t && v > T::zero() {
                                main.idx.push(j as u32);
                                main.val.push(v);
                            }
                            if (v - t).abs() < half_eps {
                                near.idx.push(j as u32);
                                near.val.push(v);
                            }
                        }
                    }
                    Select::TopK(_) => {
                        for &(j, v) in &top {
                            if v > T::zero() {
                                main.idx.push(j);
                                main.val.push(v);
                            }
                        }
                    }
                    Select::AtLeast(t) => {
                        for (j, &v) in row.iter().enumerate() {
                            if v > T::zero() && v >= t {
                                main.idx.push(j as u32);
                                main.val.push(v);
                            }
                        }
                    }
                    Select::Above(t) => {
                        for (j, &v) in row.iter().enumerate() {
                            if v > t && v > T::zero() {
                                main.idx.push(j as u32);
                                main.val.push(v);
                            }
                        }
                    }
                }
                main.counts.push(main.idx.len() - before);
                near.counts.push(near.idx.len() - before_near);
                let before_aux = aux.idx.len();
                if !dead.is_empty() && k_aux > 0 {
                    top_k(row, dead, k_aux, &mut top);
                    for &(j, v) in &top {
                        if v > T::zero() {
                            aux.idx.push(j);
                            aux.val.push(v);
                        }
                    }
                }
                aux.counts.push(aux.idx.len() - before_aux);
            }
            (main, aux, near)
        })
        .collect();
    let mut mains = Vec::with_capacity(out.len());
    let mut auxs = Vec::with_capacity(out.len());
    let mut nears = Vec::with_capacity(out.len());
    for (a, b, c) in out {
        mains.push(a);
        auxs.push(b);
        nears.push(c);
    }
    (
        Csr::from_chunks(mains),
        Csr::from_chunks(auxs),
        Csr::from_chunks(nears),
    )
}

/// `out_b = Σ_j v_bj W[j]` for every row (plus `bias` when given).
fn sparse_decode<T: Real>(acts: &Csr<T>, w: &Array2<T>, bias: Option<&[T]>, out: &mut Array2<T>) {
    let d = out.ncols().max(1);
    let Some(o) = out.as_slice_mut() else { return };
    o.par_chunks_mut(d).enumerate().for_each(|(b, row)| {
        match bias {
            Some(bias) => row.copy_from_slice(bias),
            None => row.iter_mut().for_each(|v| *v = T::zero()),
        }
        for (j, v) in acts.row(b) {
            if let Some(wj) = w.row(j).to_slice() {
                axpy(row, v, wj);
            }
        }
    });
}

fn rows_of<'a, T: Real>(a: &'a ArrayView2<'_, T>, b: usize) -> std::borrow::Cow<'a, [T]> {
    match a.row(b).to_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.row(b).to_vec()),
    }
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
    /// Remove the radial part of each decoder row's gradient ([`DecoderNorm::Unit`]).
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

/// The sum of `grads`' squares, in a fixed order.
pub fn sum_squares<T: Real>(g: &Params<T>) -> f64 {
    g.tensors()
        .iter()
        .map(|t| {
            let parts: Vec<f64> = t
                .par_chunks(1 << 14)
                .map(|c| c.iter().map(|v| v.f64() * v.f64()).sum::<f64>())
                .collect();
            parts.iter().sum::<f64>()
        })
        .sum()
}
