//! Small dense kernels for the native sliced path, written so the compiler vectorises them, and
//! compiled for several instruction sets with run-time dispatch (`multiversion`). Unlike a general
//! GEMM they allocate nothing, which keeps a steady-state hook call allocation-free.

use multiversion::multiversion;

const L: usize = 8;

/// `out = x · w` for `x` `[n, d]`, `w` `[d, m]` (the selected encoder columns, in their natural
/// layout) and `out` `[n, m]`, all row-major.
///
/// Each block keeps `TB` tokens × `VB·L` features in registers and streams `w` row by row: every
/// load of `w` feeds `TB` multiply-adds, and a token's value is broadcast once per row.
pub fn matmul(x: &[f32], n: usize, d: usize, w: &[f32], m: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= n * d && w.len() >= d * m && out.len() >= n * m);
    imp(x, n, d, w, m, out);
}

// FMA only where the target has it: elsewhere `mul_add` would be a slow library call.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn imp(x: &[f32], n: usize, d: usize, w: &[f32], m: usize, out: &mut [f32]) {
    let fma =
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_arch = "aarch64"));
    let mut t = 0;
    while t + 4 <= n {
        let mut j = 0;
        while j + 2 * L <= m {
            gblock::<4, 2>(x, t, d, w, j, m, out, fma);
            j += 2 * L;
        }
        while j + L <= m {
            gblock::<4, 1>(x, t, d, w, j, m, out, fma);
            j += L;
        }
        tail(x, t, 4, d, w, j, m, out);
        t += 4;
    }
    while t < n {
        let mut j = 0;
        while j + 8 * L <= m {
            gblock::<1, 8>(x, t, d, w, j, m, out, fma);
            j += 8 * L;
        }
        while j + 2 * L <= m {
            gblock::<1, 2>(x, t, d, w, j, m, out, fma);
            j += 2 * L;
        }
        while j + L <= m {
            gblock::<1, 1>(x, t, d, w, j, m, out, fma);
            j += L;
        }
        tail(x, t, 1, d, w, j, m, out);
        t += 1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gblock<const TB: usize, const VB: usize>(
    x: &[f32],
    t: usize,
    d: usize,
    w: &[f32],
    j: usize,
    m: usize,
    out: &mut [f32],
    fma: bool,
) {
    let mut acc = [[[0f32; L]; VB]; TB];
    let xs: [&[f32]; TB] = std::array::from_fn(|a| &x[(t + a) * d..(t + a + 1) * d]);
    for k in 0..d {
        let row = &w[k * m + j..k * m + j + VB * L];
        let xv: [f32; TB] = std::array::from_fn(|a| xs[a][k]);
        for v in 0..VB {
            let wv = <&[f32; L]>::try_from(&row[v * L..v * L + L]).unwrap_or(&[0.0; L]);
            for a in 0..TB {
                for i in 0..L {
                    acc[a][v][i] = if fma {
                        xv[a].mul_add(wv[i], acc[a][v][i])
                    } else {
                        acc[a][v][i] + xv[a] * wv[i]
                    };
                }
            }
        }
    }
    for a in 0..TB {
        for v in 0..VB {
            out[(t + a) * m + j + v * L..(t + a) * m + j + v * L + L].copy_from_slice(&acc[a][v]);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tail(x: &[f32], t: usize, tb: usize, d: usize, w: &[f32], j0: usize, m: usize, out: &mut [f32]) {
    for a in t..t + tb {
        for j in j0..m {
            let mut s = 0.0;
            for k in 0..d {
                s += x[a * d + k] * w[k * m + j];
            }
            out[a * m + j] = s;
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
    let mut m = [0f32; L];
    // `v - v` is 0 for finite values and NaN for NaN and ±inf; the sum keeps any NaN.
    let mut z = [0f32; L];
    let chunks = row.chunks_exact(L);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..L {
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
    }

    #[test]
    fn matmul_matches_a_float64_reference() {
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
                let mut out = vec![f32::NAN; n * m];
                matmul(&x, n, d, &w, m, &mut out);
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
