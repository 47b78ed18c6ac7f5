//! Choosing the active latents: ReLU, JumpReLU, TopK and BatchTopK's batch-wide threshold.

use ndarray::Array2;
use rayon::prelude::*;

use super::real::Real;
use super::sparse::{ChunkCsr, Csr};

/// Rows per parallel task in row-wise passes.
pub(super) const ROW_CHUNK: usize = 32;

/// What the activation selects, for one forward pass.
#[derive(Debug, Clone, Copy)]
pub(super) enum Select<T> {
    Relu,
    Jump,
    TopK(usize),
    /// Keep ReLU'd values at or above the threshold (BatchTopK in training).
    AtLeast(T),
    /// Keep values strictly above the threshold (BatchTopK at inference).
    Above(T),
}

/// Orders `(index, value)` pairs best first: larger values, and among equal values the lower
/// index.
pub(super) fn better<T: Real>(a: &(u32, T), b: &(u32, T)) -> std::cmp::Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// Keeps the `k` best of `out` (see [`better`]), sorted by index.
pub(super) fn keep_best<T: Real>(out: &mut Vec<(u32, T)>, k: usize) {
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
pub(super) fn top_k<T: Real>(row: &[T], cand: &[usize], k: usize, out: &mut Vec<(u32, T)>) {
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
pub(super) fn top_k_row<T: Real>(
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
pub(super) fn batch_threshold<T: Real>(pre: &[T], keep: usize) -> Option<T> {
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
pub(super) fn select<T: Real>(
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
