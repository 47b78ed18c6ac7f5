//! Sparse activations in compressed rows, and decoding from them.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::real::{Real, axpy};

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
    pub(super) fn from_chunks(chunks: Vec<ChunkCsr<T>>) -> Self {
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
pub(super) struct ChunkCsr<T> {
    pub(super) counts: Vec<usize>,
    pub(super) idx: Vec<u32>,
    pub(super) val: Vec<T>,
}

impl<T> ChunkCsr<T> {
    pub(super) fn new() -> Self {
        Self {
            counts: Vec::new(),
            idx: Vec::new(),
            val: Vec::new(),
        }
    }
}

/// `out_b = Σ_j v_bj W[j]` for every row (plus `bias` when given).
pub(super) fn sparse_decode<T: Real>(
    acts: &Csr<T>,
    w: &Array2<T>,
    bias: Option<&[T]>,
    out: &mut Array2<T>,
) {
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

pub(super) fn rows_of<'a, T: Real>(
    a: &'a ArrayView2<'_, T>,
    b: usize,
) -> std::borrow::Cow<'a, [T]> {
    match a.row(b).to_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.row(b).to_vec()),
    }
}
