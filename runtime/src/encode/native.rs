//! The native encode paths, which run without ONNX Runtime's per-call overhead:
//!
//! - [`SlicedEncoder`]: when a hook needs only some features of a ReLU, JumpReLU or Gated
//!   dictionary (for which slicing is exact), their encoder columns are packed in panels and
//!   computed with the full encoder's kernel.
//! - [`FullEncoder`]: every feature of a dictionary, with `W_enc` packed in panels at its stored
//!   width (f32, f16 or bf16) so that an encode streams the weights from memory once, in order,
//!   at the memory's bandwidth (the weights of a 2304 × 16384 dictionary are far larger than any
//!   cache). TopK selects its k largest after the product.

use ndarray::{Array1, Array2, Axis};
use onnx_protobuf::tensor_proto::DataType;
use protobuf::Enum;

use crate::dictionary::{Activation, DictionaryFile, InputNorm, Kind, LAYER_NORM_EPS, WeightDtype};
use crate::encode::kernels::{PANEL, Widen, pack_panels, panel_matmul};
use crate::{Error, Result};

/// What follows the product: the bias and the activation function, per feature.
#[derive(Debug, Clone)]
struct Epilogue {
    activation: Activation,
    /// `b_enc` (`b_gate` for a gated SAE), minus `b_dec·W` when that is folded in.
    b: Array1<f32>,
    /// Per feature (BatchTopK's one threshold repeated).
    threshold: Option<Array1<f32>>,
    /// A gated SAE's `exp(r_mag)` and `b_mag`.
    gated: Option<(Array1<f32>, Array1<f32>)>,
}

impl Epilogue {
    /// Folds `b_dec` into the biases: without input normalisation, `(x - b_dec)·W = x·W -
    /// b_dec·W`, so the kernel reads the host's activations directly. `bdw[j]` is `b_dec·W[:, j]`
    /// in f64.
    fn fold(&mut self, bdw: &[f64]) {
        for (j, bj) in self.b.iter_mut().enumerate() {
            *bj = (f64::from(*bj) - bdw[j]) as f32;
            if let Some((r, bm)) = self.gated.as_mut() {
                bm[j] = (f64::from(bm[j]) - bdw[j] * f64::from(r[j])) as f32;
            }
        }
    }

    /// Turns `row`, which holds `x·W` (without the bias) for one token, into its activations.
    /// TopK is not handled here (it needs the whole row: [`FullEncoder`]).
    fn apply(&self, row: &mut [f32]) {
        let b = self.b.as_slice().unwrap_or(&[]);
        match self.activation {
            Activation::Relu => {
                for (v, b) in row.iter_mut().zip(b) {
                    *v = (*v + b).max(0.0);
                }
            }
            Activation::Linear => {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
            Activation::Sigmoid => {
                for (v, b) in row.iter_mut().zip(b) {
                    *v = sigmoid(*v + b);
                }
            }
            Activation::JumpRelu | Activation::BatchTopK => {
                let t = self.threshold.as_ref().and_then(|t| t.as_slice());
                for (j, (v, b)) in row.iter_mut().zip(b).enumerate() {
                    let pre = *v + b;
                    let t = t.map_or(0.0, |t| t[j]);
                    *v = if pre > t { pre.max(0.0) } else { 0.0 };
                }
            }
            Activation::Gated => match &self.gated {
                Some((r, bm)) => {
                    for (j, (v, b)) in row.iter_mut().zip(b).enumerate() {
                        let xw = *v;
                        *v = if xw + b > 0.0 {
                            (xw * r[j] + bm[j]).max(0.0)
                        } else {
                            0.0
                        };
                    }
                }
                None => row.fill(0.0),
            },
            Activation::TopK => row.fill(0.0),
        }
    }
}

/// Reads the epilogue of `file` for the encoder columns `cols` (`None`: every feature).
/// `Ok(None)` where a tensor does not have the size the metadata implies.
fn epilogue(file: &DictionaryFile, cols: Option<&[usize]>) -> Result<Option<Epilogue>> {
    let m = file.meta();
    let pick = |name: &str, len: usize| -> Result<Option<Array1<f32>>> {
        let v = file.tensor_f32(name)?.1;
        if v.len() != len {
            return Ok(None);
        }
        let v = Array1::from_vec(v);
        Ok(Some(match cols {
            Some(c) if len == m.d_sae => v.select(Axis(0), c),
            _ => v,
        }))
    };
    let width = cols.map_or(m.d_sae, <[usize]>::len);
    let gated = m.activation == Activation::Gated;
    let Some(b) = pick(if gated { "b_gate" } else { "b_enc" }, m.d_sae)? else {
        return Ok(None);
    };
    let threshold = match m.activation {
        Activation::JumpRelu => match pick("threshold", m.d_sae)? {
            Some(t) => Some(t),
            None => return Ok(None),
        },
        Activation::BatchTopK => match pick("threshold", 1)? {
            Some(t) => Some(Array1::from_elem(width, t[0])),
            None => return Ok(None),
        },
        _ => None,
    };
    let gated = if gated {
        match (pick("r_mag", m.d_sae)?, pick("b_mag", m.d_sae)?) {
            (Some(r), Some(bm)) => Some((r.mapv(f32::exp), bm)),
            _ => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Epilogue {
        activation: m.activation,
        b,
        threshold,
        gated,
    }))
}

/// Copies the rows of `x` (`[n, d_in]`) into `scratch`, zeroing the rows where `finite` (default
/// all rows) is false, then normalises them and subtracts `b_dec` as the graph does.
fn prepare(
    norm: InputNorm,
    b_dec_in: Option<&[f32]>,
    d_in: usize,
    x: &[f32],
    finite: Option<&[bool]>,
    scratch: &mut Vec<f32>,
) {
    scratch.clear();
    for (t, row) in x.chunks_exact(d_in.max(1)).enumerate() {
        if finite.is_none_or(|f| f.get(t).copied().unwrap_or(false)) {
            scratch.extend_from_slice(row);
        } else {
            scratch.resize(scratch.len() + d_in, 0.0);
        }
    }
    let d = d_in as f32;
    for row in scratch.chunks_exact_mut(d_in.max(1)) {
        match norm {
            InputNorm::None => {}
            InputNorm::Scale(s) => row.iter_mut().for_each(|v| *v *= s),
            InputNorm::NormRescale => {
                let c = d.sqrt() / row.iter().map(|v| v * v).sum::<f32>().sqrt();
                row.iter_mut().for_each(|v| *v *= c);
            }
            InputNorm::LayerNorm => {
                let mu = row.iter().sum::<f32>() / d;
                row.iter_mut().for_each(|v| *v -= mu);
                let std = (row.iter().map(|v| v * v).sum::<f32>() / (d - 1.0).max(1.0)).sqrt();
                let denom = std + LAYER_NORM_EPS as f32;
                row.iter_mut().for_each(|v| *v /= denom);
            }
        }
        if let Some(b) = b_dec_in {
            row.iter_mut().zip(b.iter()).for_each(|(v, b)| *v -= b);
        }
    }
}

/// The encoder columns of some features of one dictionary.
#[derive(Debug, Clone)]
pub struct SlicedEncoder {
    norm: InputNorm,
    d_in: usize,
    /// The selected encoder columns, packed in panels by [`pack_panels`] (as the full encoder
    /// packs `W_enc`): each weight read feeds up to 8 tokens.
    w: Vec<f32>,
    m: usize,
    b_dec_in: Option<Array1<f32>>,
    epilogue: Epilogue,
}

/// Whether slicing `activation` keeps the activations exact.
pub fn slicing_is_exact(activation: Activation) -> bool {
    matches!(
        activation,
        Activation::Relu
            | Activation::JumpRelu
            | Activation::BatchTopK
            | Activation::Gated
            | Activation::Linear
            | Activation::Sigmoid
    )
}

impl SlicedEncoder {
    /// Slices the encoder of `file` to `features`; `None` where slicing would not be exact or the
    /// graph is not one of Tiller's own.
    pub fn new(file: &DictionaryFile, features: &[u32]) -> Result<Option<Self>> {
        let m = file.meta();
        if !slicing_is_exact(m.activation) || m.kind == Kind::Crosscoder {
            return Ok(None);
        }
        let (dims, w_enc) = file.tensor_f32("W_enc")?;
        if dims != [m.d_in, m.d_sae] {
            return Ok(None);
        }
        let w_enc = Array2::from_shape_vec((m.d_in, m.d_sae), w_enc)
            .map_err(|e| Error::dictionary(file.path(), format!("`W_enc`: {e}")))?;
        let cols: Vec<usize> = features.iter().map(|&f| f as usize).collect();
        if let Some(bad) = cols.iter().find(|&&c| c >= m.d_sae) {
            return Err(Error::dictionary(
                file.path(),
                format!("feature {bad} is out of range (d_sae = {})", m.d_sae),
            ));
        }
        let w: Vec<f32> = w_enc.select(Axis(1), &cols).iter().copied().collect();
        let n_cols = cols.len();
        let Some(mut epilogue) = epilogue(file, Some(&cols))? else {
            return Ok(None);
        };
        let mut b_dec_in = if file.b_dec_on_input() {
            Some(file.b_dec()?)
        } else {
            None
        };
        if b_dec_in.as_ref().is_some_and(|b| b.len() != m.d_in) {
            return Ok(None);
        }
        if m.input_norm == InputNorm::None
            && let Some(bd) = b_dec_in.take()
        {
            let bdw: Vec<f64> = (0..n_cols)
                .map(|j| {
                    (0..m.d_in)
                        .map(|k| f64::from(bd[k]) * f64::from(w[k * n_cols + j]))
                        .sum()
                })
                .collect();
            epilogue.fold(&bdw);
        }
        let w = pack_panels(m.d_in, n_cols, |i| w[i]);
        Ok(Some(Self {
            norm: m.input_norm,
            d_in: m.d_in,
            w,
            m: n_cols,
            b_dec_in,
            epilogue,
        }))
    }

    /// Whether [`Self::encode`] multiplies `x` as it is, with no normalised copy first (no input
    /// normalisation; a `b_dec` subtracted from the input is folded into the bias).
    pub fn reads_input_as_is(&self) -> bool {
        self.norm == InputNorm::None && self.b_dec_in.is_none()
    }

    /// Encodes `x` (`[n, d_in]` row-major) into `out` (`[n, width]`, row-major), using `scratch`.
    /// Rows where `finite` is false, or that are not finite when it is `None`, give unspecified
    /// values: the caller skips them.
    pub fn encode(
        &self,
        x: &[f32],
        n: usize,
        finite: Option<&[bool]>,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let x = &x[..n * self.d_in];
        let xs: &[f32] = if self.reads_input_as_is() {
            x
        } else {
            let b = self.b_dec_in.as_ref().and_then(|b| b.as_slice());
            prepare(self.norm, b, self.d_in, x, finite, scratch);
            scratch
        };
        panel_matmul(xs, n, self.d_in, &self.w, self.m, out);
        for row in out.chunks_exact_mut(self.m.max(1)).take(n) {
            self.epilogue.apply(row);
        }
    }
}

/// `W_enc` packed by [`pack_panels`] at its stored width.
enum Packed {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (dtype, len) = match self {
            Self::F32(w) => ("f32", w.len()),
            Self::F16(w) => ("f16", w.len()),
            Self::Bf16(w) => ("bf16", w.len()),
        };
        write!(f, "Packed({dtype}, {len} values)")
    }
}

/// `Σ_k v[k]·W[k, j]` in f64 for every column `j < m` of a packed matrix.
fn column_dots<E: Widen>(w: &[E], d: usize, m: usize, v: &[f32]) -> Vec<f64> {
    let mut out = vec![0f64; m.div_ceil(PANEL) * PANEL];
    for (p, panel) in w.chunks_exact((d * PANEL).max(1)).enumerate() {
        let acc = &mut out[p * PANEL..(p + 1) * PANEL];
        for (row, &vk) in panel.chunks_exact(PANEL).zip(v) {
            for (a, e) in acc.iter_mut().zip(row) {
                *a += f64::from(vk) * f64::from(e.widen());
            }
        }
    }
    out.truncate(m);
    out
}

/// Reusable buffers of [`FullEncoder::encode`]: after the first call of a given batch size, an
/// encode allocates nothing.
#[derive(Debug, Default)]
pub struct Scratch {
    x: Vec<f32>,
    heap: Vec<(f32, u32)>,
}

/// A whole dictionary's encoder, computed natively from `W_enc` packed at its stored width.
#[derive(Debug)]
pub struct FullEncoder {
    norm: InputNorm,
    d_in: usize,
    d_sae: usize,
    /// TopK's k.
    k: Option<usize>,
    weights: Packed,
    b_dec_in: Option<Array1<f32>>,
    epilogue: Epilogue,
}

impl FullEncoder {
    /// Packs the encoder of `file`; `None` where the native path does not apply: crosscoders,
    /// weights not stored as f32, f16, bf16 or f64, non-finite weights, or a graph whose tensors
    /// are not shaped as Tiller writes them. ONNX Runtime runs those.
    pub fn new(file: &DictionaryFile) -> Result<Option<Self>> {
        let m = file.meta();
        if m.kind == Kind::Crosscoder || (m.activation == Activation::TopK && m.k.is_none()) {
            return Ok(None);
        }
        let (d, f) = (m.d_in, m.d_sae);
        let weights = {
            let (dims, ty, bytes) = file.tensor_bytes("W_enc")?;
            if dims != [d, f] {
                return Ok(None);
            }
            // The reader checked that the initializer's size does not overflow.
            let n = d * f;
            let at = |i: usize, size: usize| &bytes[i * size..(i + 1) * size];
            let b2 = |i| -> [u8; 2] { at(i, 2).try_into().unwrap_or_default() };
            match DataType::from_i32(ty) {
                Some(DataType::FLOAT) if bytes.len() == n * 4 => {
                    Packed::F32(pack_panels(d, f, |i| {
                        f32::from_le_bytes(at(i, 4).try_into().unwrap_or_default())
                    }))
                }
                Some(DataType::DOUBLE) if bytes.len() == n * 8 => {
                    Packed::F32(pack_panels(d, f, |i| {
                        f64::from_le_bytes(at(i, 8).try_into().unwrap_or_default()) as f32
                    }))
                }
                Some(DataType::FLOAT16) if bytes.len() == n * 2 => {
                    Packed::F16(pack_panels(d, f, |i| half::f16::from_le_bytes(b2(i))))
                }
                Some(DataType::BFLOAT16) if bytes.len() == n * 2 => {
                    Packed::Bf16(pack_panels(d, f, |i| half::bf16::from_le_bytes(b2(i))))
                }
                _ => return Ok(None),
            }
        };
        // f16 infinities and NaN would widen to finite values (see `Widen for f16`).
        let finite = match &weights {
            Packed::F32(w) => w.iter().all(|v| v.is_finite()),
            Packed::F16(w) => w.iter().all(|v| v.is_finite()),
            Packed::Bf16(w) => w.iter().all(|v| v.is_finite()),
        };
        if !finite {
            return Ok(None);
        }
        let Some(mut epilogue) = epilogue(file, None)? else {
            return Ok(None);
        };
        let mut b_dec_in = if file.b_dec_on_input() {
            Some(file.b_dec()?)
        } else {
            None
        };
        if b_dec_in.as_ref().is_some_and(|b| b.len() != d) {
            return Ok(None);
        }
        if m.input_norm == InputNorm::None
            && let Some(bd) = b_dec_in.take()
        {
            let bd = bd.as_slice().unwrap_or(&[]);
            let bdw = match &weights {
                Packed::F32(w) => column_dots(w, d, f, bd),
                Packed::F16(w) => column_dots(w, d, f, bd),
                Packed::Bf16(w) => column_dots(w, d, f, bd),
            };
            epilogue.fold(&bdw);
        }
        Ok(Some(Self {
            norm: m.input_norm,
            d_in: d,
            d_sae: f,
            k: m.k.filter(|_| m.activation == Activation::TopK),
            weights,
            b_dec_in,
            epilogue,
        }))
    }

    /// The element type the weights are read in.
    pub fn dtype(&self) -> WeightDtype {
        match self.weights {
            Packed::F32(_) => WeightDtype::F32,
            Packed::F16(_) => WeightDtype::F16,
            Packed::Bf16(_) => WeightDtype::Bf16,
        }
    }

    /// Encodes `x` (`[n, d_in]` row-major) into `acts` (`[n, d_sae]` row-major); a TopK dictionary
    /// also writes its k largest, largest first (ties: lower index first), into `top` (values
    /// and indices, `[n, k]` each). `finite` marks the rows to encode (default all): the others
    /// give unspecified values, which the caller skips.
    pub fn encode(
        &self,
        x: &[f32],
        n: usize,
        finite: Option<&[bool]>,
        scratch: &mut Scratch,
        acts: &mut [f32],
        mut top: Option<(&mut [f32], &mut [i64])>,
    ) {
        let (d, f) = (self.d_in, self.d_sae);
        let x = &x[..n * d];
        let xs: &[f32] = if self.norm == InputNorm::None && self.b_dec_in.is_none() {
            x
        } else {
            let b = self.b_dec_in.as_ref().and_then(|b| b.as_slice());
            prepare(self.norm, b, d, x, finite, &mut scratch.x);
            &scratch.x
        };
        let acts = &mut acts[..n * f];
        match &self.weights {
            Packed::F32(w) => panel_matmul(xs, n, d, w, f, acts),
            Packed::F16(w) => panel_matmul(xs, n, d, w, f, acts),
            Packed::Bf16(w) => panel_matmul(xs, n, d, w, f, acts),
        }
        let Some(k) = self.k else {
            for row in acts.chunks_exact_mut(f.max(1)) {
                self.epilogue.apply(row);
            }
            return;
        };
        let b = self.epilogue.b.as_slice().unwrap_or(&[]);
        for (t, row) in acts.chunks_exact_mut(f.max(1)).enumerate() {
            for (v, b) in row.iter_mut().zip(b) {
                *v += b;
            }
            select_top(row, k, &mut scratch.heap);
            row.fill(0.0);
            for (r, &(v, j)) in scratch.heap.iter().enumerate() {
                let v = v.max(0.0);
                row[j as usize] = v;
                if let Some((values, indices)) = top.as_mut() {
                    values[t * k + r] = v;
                    indices[t * k + r] = i64::from(j);
                }
            }
        }
    }
}

/// The `k` largest values of `row` as `(value, index)`, largest first, ties to the lower index
/// (ONNX `TopK`'s order), in `heap`. A min-heap of the best `k` so far: most values fail the one
/// comparison with its root.
fn select_top(row: &[f32], k: usize, heap: &mut Vec<(f32, u32)>) {
    // `a` ranks below `b` when it is smaller, or equal with a higher index.
    fn below(a: (f32, u32), b: (f32, u32)) -> bool {
        a.0 < b.0 || (a.0 == b.0 && a.1 > b.1)
    }
    fn sift_down(h: &mut [(f32, u32)], mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut low = i;
            if l < h.len() && below(h[l], h[low]) {
                low = l;
            }
            if r < h.len() && below(h[r], h[low]) {
                low = r;
            }
            if low == i {
                return;
            }
            h.swap(i, low);
            i = low;
        }
    }
    heap.clear();
    let k = k.min(row.len());
    if k == 0 {
        return;
    }
    for (j, &v) in row.iter().enumerate() {
        let j = j as u32;
        if heap.len() < k {
            heap.push((v, j));
            let mut i = heap.len() - 1;
            while i > 0 && below(heap[i], heap[(i - 1) / 2]) {
                heap.swap(i, (i - 1) / 2);
                i = (i - 1) / 2;
            }
        } else if v > heap[0].0 {
            // An equal value never displaces the root: its index is higher.
            heap[0] = (v, j);
            sift_down(heap, 0);
        }
    }
    heap.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
}

/// `1 / (1 + exp(-v))`, written so that neither branch overflows (ONNX Runtime's `Sigmoid`
/// does the same).
pub(crate) fn sigmoid(v: f32) -> f32 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_with_ties_to_the_lower_index() {
        let row = [1.0, 3.0, 2.0, 3.0, -1.0, 3.0, 0.5, 2.0];
        let mut heap = Vec::new();
        select_top(&row, 4, &mut heap);
        assert_eq!(heap, vec![(3.0, 1), (3.0, 3), (3.0, 5), (2.0, 2)]);
        select_top(&row, 2, &mut heap);
        assert_eq!(heap, vec![(3.0, 1), (3.0, 3)]);
        select_top(&row, 8, &mut heap);
        assert_eq!(heap.len(), 8);
        assert_eq!(heap[7], (-1.0, 4));
        // Against a full sort on pseudo-random rows with many ties.
        for seed in 0..50u32 {
            let row: Vec<f32> = (0..300u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 23) as f32)
                .collect();
            let mut idx: Vec<u32> = (0..300).collect();
            idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            for k in [1, 7, 32, 300] {
                select_top(&row, k, &mut heap);
                let got: Vec<u32> = heap.iter().map(|e| e.1).collect();
                assert_eq!(got, idx[..k], "seed {seed} k {k}");
            }
        }
    }
}
