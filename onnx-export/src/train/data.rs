//! Activations for training, streamed from `.npy` and `.safetensors` shards.
//!
//! A source is one file or a folder of shards (every `.npy` and `.safetensors` file in it, in name
//! order), each `[n, d]` (or `[n, layers, d]`) in float16, bfloat16, float32 or float64, widened
//! to float32 as it is read. Several sources line up row by row: the MLP input and output of a
//! transcoder, the layers of a crosscoder. Nothing is loaded whole: a [`Stream`] reads chunks of
//! rows from a few shards at a time, in an order shuffled every epoch, into a shuffle buffer, and
//! draws each batch's rows from it at random. Its state (cursor, buffer, random counters) goes
//! into checkpoints, so a resumed run sees the same batches as an uninterrupted one.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

pub use super::norm::{Norm, Normalize, geometric_median, layer_norm, mean_norm};
pub use super::shard::{DType, Shard};
use crate::{Error, Result};

/// One input: a file or a folder of shards, all of one width.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path given.
    pub path: PathBuf,
    /// Its shards, in name order.
    pub shards: Vec<Shard>,
    /// Floats per row.
    pub width: usize,
    /// Layers per row (3-D arrays), else 1.
    pub layers: usize,
}

impl Source {
    /// Opens a file, or every `.npy`/`.safetensors` file of a folder.
    pub fn open(path: &Path, tensor: Option<&str>) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|e| e == "npy" || e == "safetensors")
                })
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(Error::format(path, "holds no .npy or .safetensors shards"));
            }
            v
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            return Err(Error::format(path, "does not exist"));
        };
        let shards = files
            .iter()
            .map(|f| Shard::open(f, tensor))
            .collect::<Result<Vec<_>>>()?;
        let (width, layers) = (shards[0].width, shards[0].layers);
        if let Some(s) = shards
            .iter()
            .find(|s| s.width != width || s.layers != layers)
        {
            return Err(Error::format(
                &s.path,
                format!(
                    "rows of {} values in {} layers, but {} has {width} in {layers}",
                    s.width,
                    s.layers,
                    shards[0].path.display()
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            shards,
            width,
            layers,
        })
    }
}

/// A run of rows of one shard index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The shard index (the same in every source).
    pub shard: usize,
    /// First row.
    pub start: u64,
    /// One past the last row.
    pub end: u64,
}

/// Sources read together, row by row: a training row is the concatenation of their rows.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Inputs first, then targets.
    pub sources: Vec<Source>,
    /// How many of `sources` are inputs.
    pub inputs: usize,
    /// Floats per training row.
    pub row_width: usize,
    /// Rows of each shard index.
    pub shard_rows: Vec<u64>,
}

impl Dataset {
    /// Opens the inputs and (transcoders) the targets; their shards must line up.
    pub fn open(
        inputs: &[PathBuf],
        targets: &[PathBuf],
        tensor: Option<&str>,
        target_tensor: Option<&str>,
    ) -> Result<Self> {
        let mut sources = Vec::new();
        for p in inputs {
            sources.push(Source::open(p, tensor)?);
        }
        for p in targets {
            sources.push(Source::open(p, target_tensor.or(tensor))?);
        }
        let Some(first) = sources.first() else {
            return Err(Error::format("--input", "no input was given"));
        };
        let shard_rows: Vec<u64> = first.shards.iter().map(|s| s.rows).collect();
        for s in &sources[1..] {
            if s.shards.len() != shard_rows.len() {
                return Err(Error::format(
                    &s.path,
                    format!(
                        "has {} shards but {} has {}: the sources must line up shard by shard",
                        s.shards.len(),
                        first.path.display(),
                        shard_rows.len()
                    ),
                ));
            }
            for (a, b) in s.shards.iter().zip(&first.shards) {
                if a.rows != b.rows {
                    return Err(Error::format(
                        &a.path,
                        format!(
                            "has {} rows but {} has {}: the sources must line up row by row",
                            a.rows,
                            b.path.display(),
                            b.rows
                        ),
                    ));
                }
            }
        }
        let row_width = sources.iter().map(|s| s.width).sum();
        Ok(Self {
            inputs: inputs.len(),
            sources,
            row_width,
            shard_rows,
        })
    }

    /// All rows.
    pub fn rows(&self) -> u64 {
        self.shard_rows.iter().sum()
    }

    /// Floats per row of the inputs together.
    pub fn input_width(&self) -> usize {
        self.sources[..self.inputs].iter().map(|s| s.width).sum()
    }

    /// Reads rows `start..start+count` of shard `shard` of every source into `out`
    /// (`count·row_width` floats).
    pub fn read(&self, shard: usize, start: u64, count: usize, out: &mut [f32]) -> Result<()> {
        if self.sources.len() == 1 {
            return self.sources[0].shards[shard].read(start, count, out);
        }
        let mut off = 0;
        for s in &self.sources {
            let mut tmp = vec![0f32; count * s.width];
            s.shards[shard].read(start, count, &mut tmp)?;
            for (r, src) in tmp.chunks_exact(s.width).enumerate() {
                let o = r * self.row_width + off;
                out[o..o + s.width].copy_from_slice(src);
            }
            off += s.width;
        }
        Ok(())
    }

    /// Splits the rows: the last `eval_rows` (in file order) are held out for evaluation.
    pub fn split(&self, eval_rows: u64) -> (Vec<Segment>, Vec<Segment>) {
        let mut train = Vec::new();
        let mut eval = Vec::new();
        let mut left = eval_rows;
        for (i, &n) in self.shard_rows.iter().enumerate().rev() {
            let held = left.min(n);
            left -= held;
            if held > 0 {
                eval.push(Segment {
                    shard: i,
                    start: n - held,
                    end: n,
                });
            }
            if n > held {
                train.push(Segment {
                    shard: i,
                    start: 0,
                    end: n - held,
                });
            }
        }
        train.reverse();
        eval.reverse();
        (train, eval)
    }
}

/// A 64-bit mix of `seed`, a purpose tag and a counter (SplitMix64's finaliser), to seed the
/// random generator of one use.
pub fn mix(seed: u64, tag: u64, counter: u64) -> u64 {
    let mut z = seed
        ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ counter.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const TAG_ORDER: u64 = 1;
const TAG_FILL: u64 = 2;
const TAG_DRAW: u64 = 3;

/// Where a [`Stream`] stands; saved in checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamState {
    /// Passes begun over the training rows (the first is 0).
    pub epoch: u64,
    /// The next segment of this epoch's order to open.
    pub next: usize,
    /// Segments being read: (segment index, next row).
    pub open: Vec<(usize, u64)>,
    /// Random draws made so far.
    pub counter: u64,
    /// Rows waiting in the shuffle buffer, `[rows, row_width]` row-major.
    pub buffer: Vec<f32>,
}

/// Batches of rows drawn at random from a shuffle buffer fed by a few shards at a time.
#[derive(Debug)]
pub struct Stream {
    segments: Vec<Segment>,
    order: Vec<usize>,
    seed: u64,
    capacity: usize,
    chunk: usize,
    open_max: usize,
    width: usize,
    /// The stream's position.
    pub state: StreamState,
}

impl Stream {
    /// A stream over `segments` of rows `width` wide, with a buffer of `capacity` rows, reading
    /// `chunk` rows at a time from up to `open_max` segments.
    pub fn new(
        segments: Vec<Segment>,
        width: usize,
        seed: u64,
        capacity: usize,
        chunk: usize,
        open_max: usize,
    ) -> Self {
        let mut s = Self {
            segments,
            order: Vec::new(),
            seed,
            capacity: capacity.max(1),
            chunk: chunk.max(1),
            open_max: open_max.max(1),
            width,
            state: StreamState {
                epoch: 0,
                next: 0,
                open: Vec::new(),
                counter: 0,
                buffer: Vec::new(),
            },
        };
        s.order = s.order_of(0);
        s
    }

    fn order_of(&self, epoch: u64) -> Vec<usize> {
        let mut o: Vec<usize> = (0..self.segments.len()).collect();
        o.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, TAG_ORDER, epoch)));
        o
    }

    /// Puts the stream back where `state` says.
    pub fn restore(&mut self, state: StreamState) {
        self.order = self.order_of(state.epoch);
        self.state = state;
    }

    fn rows(&self) -> usize {
        self.state.buffer.len() / self.width.max(1)
    }

    fn fill(&mut self, ds: &Dataset) -> Result<()> {
        let w = self.width;
        let mut rng = StdRng::seed_from_u64(mix(self.seed, TAG_FILL, self.state.counter));
        self.state.counter += 1;
        while self.rows() < self.capacity {
            while self.state.open.len() < self.open_max {
                if self.state.next >= self.order.len() {
                    if !self.state.open.is_empty() {
                        break;
                    }
                    self.state.epoch += 1;
                    self.state.next = 0;
                    self.order = self.order_of(self.state.epoch);
                    if self.order.is_empty() {
                        return Err(Error::format("--input", "there are no training rows"));
                    }
                }
                let seg = self.order[self.state.next];
                self.state.open.push((seg, self.segments[seg].start));
                self.state.next += 1;
            }
            let i = rng.random_range(0..self.state.open.len());
            let (seg, cur) = self.state.open[i];
            let s = self.segments[seg];
            let n = (self.chunk as u64)
                .min(s.end - cur)
                .min((self.capacity - self.rows()) as u64) as usize;
            let at = self.state.buffer.len();
            self.state.buffer.resize(at + n * w, 0.0);
            ds.read(s.shard, cur, n, &mut self.state.buffer[at..])?;
            if cur + n as u64 >= s.end {
                self.state.open.remove(i);
            } else {
                self.state.open[i].1 = cur + n as u64;
            }
        }
        Ok(())
    }

    /// Fills `out` (`[B, width]`) with rows drawn at random from the buffer (refilled first).
    pub fn next_batch(&mut self, ds: &Dataset, out: &mut Array2<f32>) -> Result<()> {
        let (b, w) = out.dim();
        if w != self.width || b > self.capacity {
            return Err(Error::format(
                "--batch",
                format!(
                    "a batch of {b} rows does not fit a shuffle buffer of {} rows",
                    self.capacity
                ),
            ));
        }
        self.fill(ds)?;
        let mut rng = StdRng::seed_from_u64(mix(self.seed, TAG_DRAW, self.state.counter));
        self.state.counter += 1;
        let Some(o) = out.as_slice_mut() else {
            return Err(Error::format(
                "--batch",
                "the batch buffer is not contiguous",
            ));
        };
        for r in 0..b {
            let n = self.rows();
            let j = rng.random_range(0..n);
            let buf = &mut self.state.buffer;
            o[r * w..(r + 1) * w].copy_from_slice(&buf[j * w..(j + 1) * w]);
            if j != n - 1 {
                buf.copy_within((n - 1) * w..n * w, j * w);
            }
            buf.truncate((n - 1) * w);
        }
        Ok(())
    }
}

/// Reads `segments` in order, `batch` rows at a time, calling `f` on each block of rows.
pub fn for_each_block(
    ds: &Dataset,
    segments: &[Segment],
    batch: usize,
    mut f: impl FnMut(&Array2<f32>) -> Result<()>,
) -> Result<()> {
    let w = ds.row_width;
    for s in segments {
        let mut at = s.start;
        while at < s.end {
            let n = (batch as u64).min(s.end - at) as usize;
            let mut block = Array2::<f32>::zeros((n, w));
            let Some(buf) = block.as_slice_mut() else {
                return Ok(());
            };
            ds.read(s.shard, at, n, buf)?;
            f(&block)?;
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_the_tail() {
        let ds = Dataset {
            sources: Vec::new(),
            inputs: 0,
            row_width: 1,
            shard_rows: vec![10, 5],
        };
        let (train, eval) = ds.split(7);
        assert_eq!(
            train,
            vec![Segment {
                shard: 0,
                start: 0,
                end: 8
            }]
        );
        assert_eq!(
            eval,
            vec![
                Segment {
                    shard: 0,
                    start: 8,
                    end: 10
                },
                Segment {
                    shard: 1,
                    start: 0,
                    end: 5
                }
            ]
        );
    }
}
