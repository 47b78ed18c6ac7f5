//! The streaming pass's per-feature statistics: top activations and the exact histogram.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use ndarray::ArrayView2;

use super::model::*;
use crate::train::data::Shard;
use crate::{Error, Result};

/// One activation of one feature, ordered by value, then earlier rows first.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hit {
    pub(super) act: f32,
    /// Row over all shards.
    pub(super) row: u64,
}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        self.act
            .total_cmp(&other.act)
            .then_with(|| other.row.cmp(&self.row))
    }
}
impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Hit {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Hit {}

/// A histogram whose power-of-two bin width doubles (merging bins) as larger values arrive.
#[derive(Debug, Clone)]
pub(super) struct Bins {
    pub(super) width: f64,
    pub(super) counts: [u64; BINS],
}

impl Bins {
    pub(super) fn add(&mut self, v: f32) {
        let v = f64::from(v);
        if self.width == 0.0 {
            // The smallest power of two with v < BINS·w.
            let mut w = (v / BINS as f64).log2().floor().exp2();
            while v >= w * BINS as f64 {
                w *= 2.0;
            }
            self.width = w;
        }
        while v >= self.width * BINS as f64 {
            for i in 0..BINS / 2 {
                self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
            }
            self.counts[BINS / 2..].fill(0);
            self.width *= 2.0;
        }
        // Exact: dividing by a power of two only shifts the exponent.
        let i = ((v / self.width) as usize).min(BINS - 1);
        self.counts[i] += 1;
    }

    pub(super) fn finish(&self, max: f32) -> Histogram {
        if self.width == 0.0 {
            return Histogram {
                bin_width: 0.0,
                counts: Vec::new(),
            };
        }
        let last = ((f64::from(max) / self.width) as usize).min(BINS - 1);
        Histogram {
            bin_width: self.width,
            counts: self.counts[..=last].to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Stat {
    pub(super) count: u64,
    pub(super) max: f32,
    pub(super) bins: Bins,
    pub(super) top: BinaryHeap<Reverse<Hit>>,
}

impl Stat {
    pub(super) fn new() -> Self {
        Self {
            count: 0,
            max: 0.0,
            bins: Bins {
                width: 0.0,
                counts: [0; BINS],
            },
            top: BinaryHeap::new(),
        }
    }

    pub(super) fn add(&mut self, act: f32, row: u64, keep: usize) {
        self.count += 1;
        if act > self.max {
            self.max = act;
        }
        self.bins.add(act);
        let hit = Hit { act, row };
        if self.top.len() < keep {
            self.top.push(Reverse(hit));
        } else if self.top.peek().is_some_and(|Reverse(min)| hit > *min) {
            self.top.pop();
            self.top.push(Reverse(hit));
        }
    }

    /// The kept hits, largest first.
    pub(super) fn sorted(&self) -> Vec<Hit> {
        let mut v: Vec<Hit> = self.top.iter().map(|r| r.0).collect();
        v.sort_by(|a, b| b.cmp(a));
        v
    }
}

/// Reads rows `start..start + count` of a shard and encodes them.
pub(super) fn encode_rows(
    dict: &tiller_runtime::Dictionary,
    shard: &Shard,
    start: u64,
    count: usize,
    buf: &mut Vec<f32>,
) -> Result<ndarray::Array2<f32>> {
    buf.resize(count * shard.width, 0.0);
    shard.read(start, count, buf)?;
    let x = ArrayView2::from_shape((count, shard.width), buf.as_slice())
        .map_err(|e| Error::format(&shard.path, e.to_string()))?;
    let e = dict.encode(x).map_err(|e| {
        Error::format(
            &shard.path,
            format!("encoding rows {start}..{}: {e}", start + count as u64),
        )
    })?;
    Ok(e.acts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_double_exactly() {
        let mut b = Bins {
            width: 0.0,
            counts: [0; BINS],
        };
        let vals = [0.1f32, 0.2, 0.05, 3.0, 0.7, 12.5, 0.001];
        for v in vals {
            b.add(v);
        }
        let h = b.finish(12.5);
        assert_eq!(h.counts.iter().sum::<u64>(), vals.len() as u64);
        for v in vals {
            let i = (f64::from(v) / h.bin_width) as usize;
            assert!(i < h.counts.len());
        }
        assert!(12.5 < h.bin_width * h.counts.len() as f64);
        assert!(12.5 >= h.bin_width * (h.counts.len() - 1) as f64);
        assert!(h.counts.len() > BINS / 2);
    }
}
