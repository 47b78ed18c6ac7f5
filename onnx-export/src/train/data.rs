//! Activations for training, streamed from `.npy` and `.safetensors` shards.
//!
//! A source is one file or a folder of shards (every `.npy` and `.safetensors` file in it, in name
//! order), each `[n, d]` (or `[n, layers, d]`) in float16, bfloat16, float32 or float64, widened
//! to float32 as it is read. Several sources line up row by row: the MLP input and output of a
//! transcoder, the layers of a crosscoder. Nothing is loaded whole: a [`Stream`] reads chunks of
//! rows from a few shards at a time, in an order shuffled every epoch, into a shuffle buffer, and
//! draws each batch's rows from it at random. Its state (cursor, buffer, random counters) goes
//! into checkpoints, so a resumed run sees the same batches as an uninterrupted one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ndarray::Array2;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::{Error, Result};

/// A stored element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// float32.
    F32,
    /// float64.
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

/// One file of activations.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The file.
    pub path: PathBuf,
    /// Where its data starts.
    pub offset: u64,
    /// Its element type.
    pub dtype: DType,
    /// Rows (tokens).
    pub rows: u64,
    /// Floats per row (all layers).
    pub width: usize,
    /// Layers per row: the middle dimension of a `[n, layers, d]` array, else 1.
    pub layers: usize,
    /// Whether its elements are stored most significant byte first (a `>` `.npy`).
    pub big_endian: bool,
}

fn shape_of(path: &Path, shape: &[u64]) -> Result<(u64, usize, usize)> {
    match shape {
        [n, d] if *d > 0 => Ok((*n, *d as usize, 1)),
        [n, l, d] if *l > 0 && *d > 0 => Ok((*n, (*l * *d) as usize, *l as usize)),
        _ => Err(Error::format(
            path,
            format!("has shape {shape:?}; expected [tokens, d] or [tokens, layers, d] activations"),
        )),
    }
}

impl Shard {
    /// Reads the header of a `.npy` or `.safetensors` file; `tensor` names the tensor of a
    /// safetensors file that holds several.
    pub fn open(path: &Path, tensor: Option<&str>) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let is_npy = path.extension().is_some_and(|e| e == "npy");
        let (offset, dtype, big_endian, shape) = if is_npy {
            npy_header(path, &mut file, size)?
        } else {
            let (offset, dtype, shape) = safetensors_header(path, &mut file, size, tensor)?;
            (offset, dtype, false, shape)
        };
        let (rows, width, layers) = shape_of(path, &shape)?;
        let need = rows
            .checked_mul(width as u64)
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .and_then(|n| n.checked_add(offset));
        match need {
            Some(n) if n <= size => {}
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "is truncated: its header declares {rows} rows of {width} values, the file has {size} bytes"
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            offset,
            dtype,
            rows,
            width,
            layers,
            big_endian,
        })
    }

    /// Reads rows `start..start + count` into `out` (`count·width` floats), widening to float32
    /// and checking every value is finite.
    pub fn read(&self, start: u64, count: usize, out: &mut [f32]) -> Result<()> {
        let n = count * self.width;
        if out.len() != n || start + count as u64 > self.rows {
            return Err(Error::format(
                &self.path,
                format!(
                    "rows {start}..{} are out of range ({} rows)",
                    start + count as u64,
                    self.rows
                ),
            ));
        }
        let size = self.dtype.size();
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(
            self.offset + start * (self.width * size) as u64,
        ))
        .map_err(|e| Error::io(&self.path, e))?;
        let mut buf = vec![0u8; n * size];
        file.read_exact(&mut buf)
            .map_err(|e| Error::io(&self.path, e))?;
        if self.big_endian {
            for c in buf.chunks_exact_mut(size) {
                c.reverse();
            }
        }
        match self.dtype {
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F64 => {
                for (o, c) in out.iter_mut().zip(buf.chunks_exact(8)) {
                    *o =
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
                }
            }
        }
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                &self.path,
                format!(
                    "row {} contains NaN or infinite values",
                    start + (i / self.width) as u64
                ),
            ));
        }
        Ok(())
    }
}

/// Reads the header of a `.npy` activation shard through the project's one `.npy` reader: where
/// the data starts, its element type and byte order, and its shape.
fn npy_header(path: &Path, file: &mut File, size: u64) -> Result<(u64, DType, bool, Vec<u64>)> {
    let header = tiller_runtime::npy::read_header(&mut std::io::BufReader::new(file), size)
        .map_err(|e| crate::npy::lift(path, e))?;
    let element = header.float().map_err(|e| crate::npy::lift(path, e))?;
    let dtype = match element.size {
        2 => DType::F16,
        4 => DType::F32,
        _ => DType::F64,
    };
    if header.fortran_order {
        return Err(Error::format(
            path,
            "is stored in Fortran order; rows cannot be streamed (save it C-contiguous)",
        ));
    }
    Ok((header.data_offset, dtype, element.big_endian, header.shape))
}

fn safetensors_header(
    path: &Path,
    file: &mut File,
    size: u64,
    tensor: Option<&str>,
) -> Result<(u64, DType, Vec<u64>)> {
    let header = crate::tensors::Header::read(path, file, size)?;
    let meta = &header.metadata;
    let tensors = meta.tensors();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let name = match tensor {
        Some(t) => t.to_string(),
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(Error::format(
                path,
                format!(
                    "holds {} tensors ({}); choose one with --tensor",
                    names.len(),
                    names
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    let info = tensors.get(&name).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "has no tensor `{name}` (it has: {})",
                names
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let dtype = match info.dtype {
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        other => {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has dtype {other:?}, not a float type"),
            ));
        }
    };
    let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
    // The crate checked that the offsets fit the shape and dtype.
    Ok((header.data_start + info.data_offsets.0 as u64, dtype, shape))
}

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

/// Dataset-wise normalisation, as stored in the dictionary's `tiller.input_norm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    /// None.
    None,
    /// One constant factor `s` so that `E‖s·x‖ = √d_in` (Anthropic, April 2024); transcoders
    /// scale their targets alike, and the exporter folds that scale back into the decoder.
    Scale,
    /// Per-token layer norm (OpenAI's TopK SAEs); crosscoders normalise each layer.
    LayerNorm,
}

impl std::str::FromStr for Normalize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "scale" => Ok(Self::Scale),
            "layer_norm" => Ok(Self::LayerNorm),
            other => Err(format!("`{other}` is not none, scale or layer_norm")),
        }
    }
}

impl Normalize {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Scale => "scale",
            Self::LayerNorm => "layer_norm",
        }
    }
}

/// The normalisation applied to batches: the mode and the measured scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    /// The mode.
    pub mode: Normalize,
    /// Factor on the inputs ([`Normalize::Scale`]).
    pub s_in: f32,
    /// Factor on the targets (transcoders with [`Normalize::Scale`]).
    pub s_out: f32,
}

impl Norm {
    /// Normalises a block of rows in place: the first `width_in` columns are the input (in
    /// `blocks` layers of `d_in`), the rest the target.
    pub fn apply(&self, rows: &mut Array2<f32>, width_in: usize, blocks: usize) {
        let d_in = width_in / blocks.max(1);
        for mut row in rows.rows_mut() {
            let Some(r) = row.as_slice_mut() else {
                continue;
            };
            let (x, y) = r.split_at_mut(width_in.min(r.len()));
            match self.mode {
                Normalize::None => {}
                Normalize::Scale => {
                    x.iter_mut().for_each(|v| *v *= self.s_in);
                    y.iter_mut().for_each(|v| *v *= self.s_out);
                }
                Normalize::LayerNorm => {
                    for b in x.chunks_mut(d_in.max(1)) {
                        layer_norm(b);
                    }
                }
            }
        }
    }
}

/// `(x - mean) / (std + 1e-5)` with the unbiased standard deviation, as the dictionary's graph
/// computes it (`tiller_runtime::dictionary::LAYER_NORM_EPS`).
pub fn layer_norm(x: &mut [f32]) {
    let d = x.len() as f64;
    let mean = (x.iter().map(|&v| f64::from(v)).sum::<f64>() / d) as f32;
    x.iter_mut().for_each(|v| *v -= mean);
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let std = (ss / (d - 1.0).max(1.0)).sqrt() as f32;
    let denom = std + tiller_runtime::dictionary::LAYER_NORM_EPS as f32;
    x.iter_mut().for_each(|v| *v /= denom);
}

/// The mean Euclidean norm of the rows of `cols` of `rows`, per block of `d` columns.
pub fn mean_norm(rows: &Array2<f32>, cols: std::ops::Range<usize>, d: usize) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for row in rows.rows() {
        let r = row.to_slice().unwrap_or(&[]);
        for b in r[cols.clone()].chunks(d.max(1)) {
            sum += b
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt();
            n += 1;
        }
    }
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The geometric median of the rows (Weiszfeld's algorithm), the point minimising the summed
/// Euclidean distance: more robust than the mean to the few huge-norm tokens (BOS) of LM
/// activations. Bricken et al. 2023 and Gao et al. 2024 start `b_dec` there.
pub fn geometric_median(points: &Array2<f64>) -> Vec<f64> {
    let (n, d) = points.dim();
    if n == 0 {
        return vec![0.0; d];
    }
    let mut m: Vec<f64> = points
        .mean_axis(ndarray::Axis(0))
        .map(|a| a.to_vec())
        .unwrap_or_else(|| vec![0.0; d]);
    for _ in 0..200 {
        let mut num = vec![0.0; d];
        let mut den = 0.0;
        for row in points.rows() {
            let dist = row
                .iter()
                .zip(&m)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            let w = 1.0 / dist;
            for (acc, v) in num.iter_mut().zip(row.iter()) {
                *acc += w * v;
            }
            den += w;
        }
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let shift = next
            .iter()
            .zip(&m)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let scale = next.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        m = next;
        if shift < 1e-7 * scale {
            break;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_median_ignores_an_outlier() {
        let mut p = Array2::<f64>::zeros((5, 2));
        for i in 0..4 {
            p[[i, 0]] = if i % 2 == 0 { 1.0 } else { -1.0 };
            p[[i, 1]] = if i < 2 { 1.0 } else { -1.0 };
        }
        p[[4, 0]] = 1000.0;
        // The mean is (200, 0); the median balances four unit pulls against one: x ≈ 0.63.
        let m = geometric_median(&p);
        assert!((m[0] - 0.63).abs() < 0.02 && m[1].abs() < 1e-6, "{m:?}");
    }

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
