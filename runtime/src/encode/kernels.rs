//! Small dense kernels for the native encode paths, written so the compiler vectorises them, and
//! compiled for several instruction sets with run-time dispatch (`multiversion`). Unlike a general
//! GEMM they allocate nothing, which keeps a steady-state hook call allocation-free.
//!
//! One product, [`panel_matmul`], over encoder columns packed by [`pack_panels`]: a whole encoder
//! (the full path, whose weights stream from memory once per call) or the few columns a hook needs
//! (the sliced path, whose weights sit in cache).

use multiversion::multiversion;

/// Lanes of the vector loops below (`axpy`, `dot`, `row_stats`).
const L: usize = 8;

/// Features per panel of an encoder packed by [`pack_panels`]: two AVX-512 vectors, four AVX2 or
/// eight NEON vectors of accumulators per token.
pub const PANEL: usize = 32;

/// An element type a packed encoder stores its weights in, widened to f32 in registers.
pub trait Widen: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Whether a lone token reads panels streamed from memory two at a time (see [`CACHED`]): f32
    /// only, as measured (docs/benchmarks.md#the-kernels-choices).
    const STREAM_PAIRS: bool;

    /// The value as f32, exactly.
    fn widen(self) -> f32;
}

impl Widen for f32 {
    const STREAM_PAIRS: bool = true;

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    const STREAM_PAIRS: bool = false;

    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// 2^112: moves a float16 exponent (bias 15) to float32's (bias 127).
const F16_RESCALE: f32 = f32::from_bits((127 + 112) << 23);

impl Widen for half::f16 {
    const STREAM_PAIRS: bool = false;

    /// Integer shifts and one exact multiplication, which vectorise on every target (F16C would
    /// need intrinsics, and this is not the bottleneck: the loads are). Sign-extending puts the
    /// sign in bit 31; shifting by 13 puts the exponent and mantissa in float32's places (the
    /// mask clears the sign copies above the exponent); the result is the value times 2^-112,
    /// subnormals included (they land on float32 subnormals), which the multiplication undoes
    /// exactly. Infinities and NaN would come out finite: packed weights are checked finite.
    #[inline(always)]
    fn widen(self) -> f32 {
        let bits = ((i32::from(self.to_bits() as i16) << 13) as u32) & 0x8FFF_E000;
        f32::from_bits(bits) * F16_RESCALE
    }
}

/// Packs `m` columns of a `[d, m]` row-major matrix (element `(k, j)` is `get(k·m + j)`) into
/// panels of [`PANEL`] columns: panel `p` holds rows `0..d` of columns `p·PANEL..(p+1)·PANEL`, one
/// row of `PANEL` values after another, so that one pass over the panels reads memory in order.
/// Columns past `m` in the last panel are zero.
pub fn pack_panels<T: Copy + Default>(d: usize, m: usize, get: impl Fn(usize) -> T) -> Vec<T> {
    let panels = m.div_ceil(PANEL);
    let mut out = vec![T::default(); panels * d * PANEL];
    for k in 0..d {
        for j in 0..m {
            out[((j / PANEL) * d + k) * PANEL + j % PANEL] = get(k * m + j);
        }
    }
    out
}

/// `out = x · w` for `x` `[n, d]` row-major, `w` packed by [`pack_panels`] from `[d, m]`, and
/// `out` `[n, m]` row-major.
///
/// Panel by panel, every block of tokens reads the panel (once from memory, then from cache) one
/// row at a time, widening it in registers and feeding each token's accumulators: at batch 1 the
/// weights stream through once at the memory's speed; at larger batches each weight read feeds
/// up to 8 tokens.
pub fn panel_matmul<E: Widen>(x: &[f32], n: usize, d: usize, w: &[E], m: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= n * d && w.len() >= m.div_ceil(PANEL) * d * PANEL);
    debug_assert!(out.len() >= n * m);
    if d == 0 {
        out[..n * m].fill(0.0);
        return;
    }
    panel_imp(x, n, d, w, m, out);
}

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn panel_imp<E: Widen>(x: &[f32], n: usize, d: usize, w: &[E], m: usize, out: &mut [f32]) {
    let fma =
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_arch = "aarch64"));
    // AVX-512 has 32 vector registers: 8 tokens × 2 vectors of accumulators fit, with room for
    // the weights. Elsewhere (16 registers) 2 tokens × 4 vectors.
    let wide = multiversion::target::target_cfg_f!(target_feature = "avx512f");
    // The hardware prefetcher alone leaves bandwidth unused on a single stream: prefetching
    // `PREFETCH` bytes ahead reads half-width weights faster
    // (docs/benchmarks.md#the-kernels-choices). The intrinsic is safe to call here, in a clone compiled with the feature it needs.
    let prefetch = |p: *const u8| {
        multiversion::target::match_target! {
            "x86_64+avx512f" => std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()),
            "x86_64+avx2" => std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()),
            "x86_64+avx" => std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()),
            _ => {
                let _ = p;
            }
        }
    };
    if m.div_ceil(PANEL) * d * PANEL * size_of::<E>() <= CACHED {
        panel_body(x, n, d, w, m, out, wide, fma, true, &|_| {});
    } else {
        panel_body(x, n, d, w, m, out, wide, fma, false, &prefetch);
    }
}

/// How far ahead of the row being read the kernels prefetch, in bytes.
const PREFETCH: usize = 16 << 10;

/// Packed weights up to this size (a sliced encoder's few columns) are taken to stay in a core's
/// L2 from one call to the next, and are read without software prefetch (its instructions take
/// load slots); larger weights stream from memory, where prefetching pays.
///
/// A lone token (batch 1, or the odd one of a batch of cached weights) reads two panels at once:
/// two streams read faster than one, from L2 and from memory (half widths from memory excepted,
/// see [`Widen::STREAM_PAIRS`]; measured in docs/benchmarks.md#the-kernels-choices).
const CACHED: usize = 2 << 20;

/// The body of [`panel_matmul`] for one instruction set (`wide`: 32 vector registers; `fma`:
/// fused multiply-add; `cached`: the weights sit in cache, see [`CACHED`]), inlined into each of
/// its clones. Tests call it directly to run every blocking on any machine.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn panel_body<E: Widen>(
    x: &[f32],
    n: usize,
    d: usize,
    w: &[E],
    m: usize,
    out: &mut [f32],
    wide: bool,
    fma: bool,
    cached: bool,
    prefetch: &impl Fn(*const u8),
) {
    let panels = m.div_ceil(PANEL);
    // The blocks of tokens leave at most one token. It reads the panels in pairs after the blocks
    // (below) when the weights are cached, or when it is alone and its type reads streamed pairs
    // faster; otherwise each panel right after its blocks, while the panel is still in cache.
    let lone = if cached || (n == 1 && E::STREAM_PAIRS) {
        n % 2
    } else {
        0
    };
    for (p, panel) in w.chunks_exact(d * PANEL).take(panels).enumerate() {
        let col = p * PANEL;
        let width = PANEL.min(m - col);
        let rows = panel.as_chunks::<PANEL>().0;
        let mut t = 0;
        if wide {
            while t + 8 <= n {
                pblock::<E, 8>(x, t, d, rows, out, m, col, width, fma, prefetch);
                t += 8;
            }
            while t + 4 <= n {
                pblock::<E, 4>(x, t, d, rows, out, m, col, width, fma, prefetch);
                t += 4;
            }
        }
        while t + 2 <= n {
            pblock::<E, 2>(x, t, d, rows, out, m, col, width, fma, prefetch);
            t += 2;
        }
        while t < n - lone {
            let row = &mut out[t * m + col..t * m + col + width];
            if wide {
                pgemv::<E, 4>(&x[t * d..(t + 1) * d], panel, row, fma, prefetch);
            } else {
                pgemv::<E, 2>(&x[t * d..(t + 1) * d], panel, row, fma, prefetch);
            }
            t += 1;
        }
    }
    if lone == 1 {
        let t = n - 1;
        let xt = &x[t * d..(t + 1) * d];
        for (q, pair) in w.chunks_exact(2 * d * PANEL).take(panels / 2).enumerate() {
            let col = 2 * q * PANEL;
            let row = &mut out[t * m + col..t * m + m.min(col + 2 * PANEL)];
            let (a, b) = pair.split_at(d * PANEL);
            if wide {
                pgemv_pair::<E, 2>(xt, a, b, row, fma, prefetch);
            } else {
                pgemv_pair::<E, 1>(xt, a, b, row, fma, prefetch);
            }
        }
        if panels % 2 == 1 {
            let col = (panels - 1) * PANEL;
            let panel = &w[col * d..(col + PANEL) * d];
            let row = &mut out[t * m + col..t * m + m];
            if wide {
                pgemv::<E, 4>(xt, panel, row, fma, prefetch);
            } else {
                pgemv::<E, 2>(xt, panel, row, fma, prefetch);
            }
        }
    }
}

/// One token against two panels `a` and `b` read side by side (two streams), `U` rows at a time:
/// 2 with AVX-512's 32 registers (8 vectors of accumulators), 1 with 16. The rows are taken as
/// arrays of fixed size: written over slices, the same loops kept the accumulators in memory for
/// some element types and left bf16 scalar.
#[inline(always)]
fn pgemv_pair<E: Widen, const U: usize>(
    x: &[f32],
    a: &[E],
    b: &[E],
    out: &mut [f32],
    fma: bool,
    prefetch: &impl Fn(*const u8),
) {
    let d = x.len();
    // Rows of `PANEL` weights in groups of `U`: every index below is fixed at compile time.
    let (ga, ta) = a.as_chunks::<PANEL>().0[..d].as_chunks::<U>();
    let (gb, tb) = b.as_chunks::<PANEL>().0[..d].as_chunks::<U>();
    let (gx, tx) = x.as_chunks::<U>();
    let lines = (U * PANEL * size_of::<E>()).div_ceil(64);
    let mut acc_a = [[0f32; PANEL]; U];
    let mut acc_b = [[0f32; PANEL]; U];
    for ((wa, wb), xv) in ga.iter().zip(gb).zip(gx) {
        for r in [wa.as_ptr().cast::<u8>(), wb.as_ptr().cast::<u8>()] {
            for l in 0..lines {
                prefetch(r.wrapping_add(PREFETCH + 64 * l));
            }
        }
        for u in 0..U {
            madd_row(&mut acc_a[u], xv[u], &wa[u], fma);
            madd_row(&mut acc_b[u], xv[u], &wb[u], fma);
        }
    }
    for ((wa, wb), &xv) in ta.iter().zip(tb).zip(tx) {
        madd_row(&mut acc_a[0], xv, wa, fma);
        madd_row(&mut acc_b[0], xv, wb, fma);
    }
    // Summed with constant indices (indexing the accumulators by a run-time column would keep
    // them in memory through the loops above).
    let mut sum = [0f32; 2 * PANEL];
    for i in 0..PANEL {
        sum[i] = acc_a.iter().map(|a| a[i]).sum();
        sum[PANEL + i] = acc_b.iter().map(|a| a[i]).sum();
    }
    for (o, v) in out.iter_mut().zip(&sum) {
        *o = *v;
    }
}

/// `acc += x·w` for one row of a panel, the weights widened in registers.
#[inline(always)]
fn madd_row<E: Widen>(acc: &mut [f32; PANEL], x: f32, w: &[E; PANEL], fma: bool) {
    for i in 0..PANEL {
        let w = w[i].widen();
        acc[i] = if fma {
            x.mul_add(w, acc[i])
        } else {
            acc[i] + x * w
        };
    }
}

/// One token against one panel: `U` sets of accumulators over consecutive rows (4 with AVX-512's
/// 32 registers, 2 with 16), so that the multiply-adds' latency never limits the stream of
/// weights.
#[inline(always)]
fn pgemv<E: Widen, const U: usize>(
    x: &[f32],
    panel: &[E],
    out: &mut [f32],
    fma: bool,
    prefetch: &impl Fn(*const u8),
) {
    let mut acc = [[0f32; PANEL]; U];
    let (rows, rest) = panel.as_chunks::<PANEL>().0[..x.len()].as_chunks::<U>();
    let (xs, xrest) = x.as_chunks::<U>();
    let lines = (U * PANEL * size_of::<E>()).div_ceil(64);
    for (r, xv) in rows.iter().zip(xs) {
        let ahead = r.as_ptr().cast::<u8>().wrapping_add(PREFETCH);
        for l in 0..lines {
            prefetch(ahead.wrapping_add(64 * l));
        }
        for u in 0..U {
            madd_row(&mut acc[u], xv[u], &r[u], fma);
        }
    }
    for (r, &xv) in rest.iter().zip(xrest) {
        madd_row(&mut acc[0], xv, r, fma);
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = acc.iter().map(|a| a[i]).sum();
    }
}

/// `TB` tokens against one panel: each row of weights is widened once and feeds `TB` tokens.
/// The loop indexes slices whose length is `d`, so that it has no bounds check and a single exit
/// (which keeps the accumulators in registers).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pblock<E: Widen, const TB: usize>(
    x: &[f32],
    t: usize,
    d: usize,
    rows: &[[E; PANEL]],
    out: &mut [f32],
    m: usize,
    col: usize,
    width: usize,
    fma: bool,
    prefetch: &impl Fn(*const u8),
) {
    let rows = &rows[..d];
    let lines = (PANEL * size_of::<E>()).div_ceil(64);
    let xs: [&[f32]; TB] = std::array::from_fn(|a| &x[(t + a) * d..(t + a + 1) * d]);
    // At most 4 tokens' accumulators in one array: LLVM keeps larger ones in memory.
    let mut lo = [[0f32; PANEL]; 4];
    let mut hi = [[0f32; PANEL]; 4];
    for k in 0..d {
        let r = &rows[k];
        let ahead = r.as_ptr().cast::<u8>().wrapping_add(PREFETCH);
        for l in 0..lines {
            prefetch(ahead.wrapping_add(64 * l));
        }
        for a in 0..TB.min(4) {
            madd_row(&mut lo[a], xs[a][k], r, fma);
        }
        for a in 4..TB {
            madd_row(&mut hi[a - 4], xs[a][k], r, fma);
        }
    }
    let acc: [[f32; PANEL]; TB] = std::array::from_fn(|a| if a < 4 { lo[a] } else { hi[a - 4] });
    for (a, acc) in acc.iter().enumerate() {
        let start = (t + a) * m + col;
        for (o, v) in out[start..start + width].iter_mut().zip(acc) {
            *o = *v;
        }
    }
}

/// `x += c·d`.
pub fn axpy(c: f32, d: &[f32], x: &mut [f32]) {
    axpy_impl(c, d, x);
}

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn axpy_impl(c: f32, d: &[f32], x: &mut [f32]) {
    for (a, b) in x.iter_mut().zip(d) {
        *a += c * b;
    }
}

/// The most edits [`axpy_many`] applies in one pass.
pub const AXPY_MANY: usize = 8;

/// `x += c[0]·d[0] + c[1]·d[1] + …` in one pass over `x`, with every element's additions in the
/// order of the pairs, so that the result is the same, bit for bit, as one [`axpy`] per pair.
pub fn axpy_many(c: &[f32], d: &[&[f32]], x: &mut [f32]) {
    debug_assert!(c.len() == d.len() && c.len() <= AXPY_MANY);
    debug_assert!(d.iter().all(|d| d.len() == x.len()));
    axpy_many_impl(c, d, x);
}

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn axpy_many_impl(c: &[f32], d: &[&[f32]], x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(RL);
    for (i, chunk) in (&mut chunks).enumerate() {
        let chunk: &mut [f32; RL] = chunk.try_into().expect("chunks of RL");
        let mut a = *chunk;
        for (&c, d) in c.iter().zip(d) {
            let d: &[f32; RL] = d[i * RL..(i + 1) * RL].try_into().expect("RL values");
            for k in 0..RL {
                a[k] += c * d[k];
            }
        }
        *chunk = a;
    }
    let rest = chunks.into_remainder();
    let start = d.first().map_or(0, |d| d.len() - rest.len());
    for (i, v) in rest.iter_mut().enumerate() {
        for (&c, d) in c.iter().zip(d) {
            *v += c * d[start + i];
        }
    }
}

/// `x · u`, accumulated in lanes.
pub fn dot(x: &[f32], u: &[f32]) -> f32 {
    dot_impl(x, u)
}

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn dot_impl(x: &[f32], u: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let (cx, cu) = (x.chunks_exact(L), u.chunks_exact(L));
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cu.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in cx.zip(cu) {
        for i in 0..L {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest magnitude in `row`, and whether every value is finite, in one vectorisable pass.
pub fn row_stats(row: &[f32]) -> (f32, bool) {
    row_stats_impl(row)
}

/// Lanes of [`row_stats`]: four vectors of 8 (two of 16 with AVX-512) per accumulator, so that
/// the additions' latency does not bound the pass.
const RL: usize = 4 * L;

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn row_stats_impl(row: &[f32]) -> (f32, bool) {
    let mut m = [0f32; RL];
    // `v - v` is 0 for finite values and NaN for NaN and ±inf; the sum keeps any NaN.
    let mut z = [0f32; RL];
    let chunks = row.chunks_exact(RL);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..RL {
            let a = ch[i].abs();
            m[i] = if a > m[i] { a } else { m[i] };
            #[allow(clippy::eq_op)]
            let zero = ch[i] - ch[i];
            z[i] += zero;
        }
    }
    let mut max = m.iter().fold(0.0f32, |a, b| a.max(*b));
    let mut sum: f32 = z.iter().sum();
    for v in rest {
        max = max.max(v.abs());
        #[allow(clippy::eq_op)]
        let zero = v - v;
        sum += zero;
    }
    (max, sum == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_stats_finds_the_maximum_and_non_finite_values() {
        let mut r: Vec<f32> = (0..37).map(|i| (i as f32 - 20.0) * 0.5).collect();
        assert_eq!(row_stats(&r), (10.0, true));
        for (pos, bad) in [(3, f32::NAN), (36, f32::INFINITY), (17, f32::NEG_INFINITY)] {
            let old = r[pos];
            r[pos] = bad;
            assert!(!row_stats(&r).1, "{bad} at {pos}");
            r[pos] = old;
        }
        r[36] = -1e30;
        assert_eq!(row_stats(&r), (1e30, true));
        // Lengths around the lane count, the largest value and a bad one at each end.
        for len in [0usize, 1, 31, 32, 33, 64, 95, 2304] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let want = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(row_stats(&row), (want, true), "length {len}");
            for pos in [0, len.saturating_sub(1)].into_iter().filter(|_| len > 0) {
                let mut big = row.clone();
                big[pos] = -3e38;
                assert_eq!(row_stats(&big), (3e38, true), "length {len}, at {pos}");
                for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut b = row.clone();
                    b[pos] = bad;
                    assert!(!row_stats(&b).1, "length {len}: {bad} at {pos}");
                }
            }
        }
        assert_eq!(
            row_stats(&[-0.0, f32::MIN_POSITIVE / 2.0]).0,
            f32::MIN_POSITIVE / 2.0
        );
    }

    #[test]
    fn axpy_many_is_one_axpy_per_pair_bit_for_bit() {
        for len in [0usize, 1, 31, 32, 33, 95, 2304] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let dirs: Vec<Vec<f32>> = (0..AXPY_MANY)
                .map(|k| {
                    (0..len)
                        .map(|i| ((i * 13 + k * 29) % 83) as f32 / 41.0 - 1.0)
                        .collect()
                })
                .collect();
            let cs: Vec<f32> = (0..AXPY_MANY).map(|k| 0.3 - 0.17 * k as f32).collect();
            for pairs in 0..=AXPY_MANY {
                let mut want = x.clone();
                for k in 0..pairs {
                    axpy(cs[k], &dirs[k], &mut want);
                }
                let ds: Vec<&[f32]> = dirs[..pairs].iter().map(Vec::as_slice).collect();
                let mut got = x.clone();
                axpy_many(&cs[..pairs], &ds, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "length {len}, {pairs} pairs");
            }
        }
    }

    #[test]
    fn widening_is_exact_for_every_finite_half_value() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            if h.is_finite() {
                assert_eq!(h.widen().to_bits(), h.to_f32().to_bits(), "f16 {bits:#06x}");
            }
            let b = half::bf16::from_bits(bits);
            if b.is_finite() {
                assert_eq!(
                    b.widen().to_bits(),
                    b.to_f32().to_bits(),
                    "bf16 {bits:#06x}"
                );
            }
        }
    }

    #[test]
    fn panel_matmul_matches_a_float64_reference() {
        panels_match_a_float64_reference(|v| v);
        panels_match_a_float64_reference(half::f16::from_f32);
        panels_match_a_float64_reference(half::bf16::from_f32);
    }

    /// The weights rounded to `E` and packed; the reference takes the rounded values.
    fn panels_match_a_float64_reference<E: Widen>(to: impl Fn(f32) -> E) {
        // Depths with and without a remainder of the 4-row unroll, widths with a partial last
        // panel and with panel pairs (full, partial, an odd panel after), batches that use every
        // token block.
        for d in [1, 3, 37, 64] {
            for m in [1, 31, 32, 50, 64, 75] {
                let w: Vec<E> = (0..d * m)
                    .map(|i| to(((i * 53 % 89) as f32 - 44.0) / 23.0))
                    .collect();
                let packed = pack_panels(d, m, |i| w[i]);
                for n in [1, 2, 3, 4, 7, 8, 9, 19] {
                    let x: Vec<f32> = (0..n * d)
                        .map(|i| ((i * 31 % 97) as f32 - 48.0) / 17.0)
                        .collect();
                    let mut outs = Vec::new();
                    let mut out = vec![f32::NAN; n * m];
                    panel_matmul(&x, n, d, &packed, m, &mut out);
                    outs.push(("dispatched", out));
                    // Every blocking, whatever this machine dispatches to, with the weights taken
                    // as streamed and as cached (a lone token reads panel pairs when they are
                    // cached, or at batch 1 when they are streamed f32).
                    for (name, wide, fma, cached) in [
                        ("narrow", false, false, false),
                        ("wide", true, true, false),
                        ("narrow, cached", false, false, true),
                        ("wide, cached", true, true, true),
                    ] {
                        let mut out = vec![f32::NAN; n * m];
                        panel_body(&x, n, d, &packed, m, &mut out, wide, fma, cached, &|_| {});
                        outs.push((name, out));
                    }
                    for t in 0..n {
                        for j in 0..m {
                            let terms = (0..d)
                                .map(|k| f64::from(x[t * d + k]) * f64::from(w[k * m + j].widen()));
                            let r: f64 = terms.clone().sum();
                            let scale: f64 = terms.map(f64::abs).sum();
                            for (name, o) in &outs {
                                assert!(
                                    (f64::from(o[t * m + j]) - r).abs() <= 1e-6 * scale,
                                    "{} {name} d={d} m={m} n={n} t={t} j={j}",
                                    std::any::type_name::<E>()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sliced_shapes_match_a_float64_reference() {
        let d = 37;
        // Feature counts that exercise every block shape and the scalar tail.
        for m in [1, 7, 8, 11, 16, 64, 75] {
            for n in [1, 3, 4, 5, 9] {
                let x: Vec<f32> = (0..n * d)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) / 17.0)
                    .collect();
                let w: Vec<f32> = (0..d * m)
                    .map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0)
                    .collect();
                let packed = pack_panels(d, m, |i| w[i]);
                let mut out = vec![f32::NAN; n * m];
                panel_matmul(&x, n, d, &packed, m, &mut out);
                for t in 0..n {
                    for j in 0..m {
                        let terms =
                            (0..d).map(|k| f64::from(x[t * d + k]) * f64::from(w[k * m + j]));
                        let r: f64 = terms.clone().sum();
                        let scale: f64 = terms.map(f64::abs).sum();
                        assert!(
                            (f64::from(out[t * m + j]) - r).abs() <= 1e-6 * scale,
                            "m={m} n={n} t={t} j={j}"
                        );
                    }
                }
            }
        }
    }
}
