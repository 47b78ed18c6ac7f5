//! Small dense kernels for the native sliced path, written so the compiler vectorises them, and
//! compiled for several instruction sets with run-time dispatch (`multiversion`). Unlike a general
//! GEMM they allocate nothing, which keeps a steady-state hook call allocation-free.

use multiversion::multiversion;

const L: usize = 8;

/// `out[t·m + j] = Σ_k x[t·d + k] · wt[j·d + k]` for `n` tokens and `m` features: each output is
/// the dot product of a token with one (transposed) encoder column.
pub fn dots(x: &[f32], n: usize, d: usize, wt: &[f32], m: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= n * d && wt.len() >= m * d && out.len() >= n * m);
    dots_impl(x, n, d, wt, m, out);
}

// FMA only where the target has it: elsewhere `mul_add` would be a slow library call.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
fn dots_impl(x: &[f32], n: usize, d: usize, wt: &[f32], m: usize, out: &mut [f32]) {
    let fma =
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_arch = "aarch64"));
    let mut t = 0;
    while t + 4 <= n {
        let mut j = 0;
        while j + 2 <= m {
            block::<4, 2>(x, t, d, wt, j, m, out, fma);
            j += 2;
        }
        while j < m {
            block::<4, 1>(x, t, d, wt, j, m, out, fma);
            j += 1;
        }
        t += 4;
    }
    while t < n {
        let mut j = 0;
        while j + 4 <= m {
            block::<1, 4>(x, t, d, wt, j, m, out, fma);
            j += 4;
        }
        while j < m {
            block::<1, 1>(x, t, d, wt, j, m, out, fma);
            j += 1;
        }
        t += 1;
    }
}

/// `TB` tokens from `t` against `FB` features from `j`: `TB·FB` independent accumulators of `L`
/// lanes, so that each load of a token or a column feeds several multiply-adds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<const TB: usize, const FB: usize>(
    x: &[f32],
    t: usize,
    d: usize,
    wt: &[f32],
    j: usize,
    m: usize,
    out: &mut [f32],
    fma: bool,
) {
    let mut acc = [[[0f32; L]; FB]; TB];
    let xs: [&[f32]; TB] = std::array::from_fn(|a| &x[(t + a) * d..(t + a + 1) * d]);
    let ws: [&[f32]; FB] = std::array::from_fn(|b| &wt[(j + b) * d..(j + b + 1) * d]);
    let chunks = d / L;
    for c in 0..chunks {
        let xv: [&[f32; L]; TB] = std::array::from_fn(|a| {
            <&[f32; L]>::try_from(&xs[a][c * L..c * L + L]).unwrap_or(&[0.0; L])
        });
        let wv: [&[f32; L]; FB] = std::array::from_fn(|b| {
            <&[f32; L]>::try_from(&ws[b][c * L..c * L + L]).unwrap_or(&[0.0; L])
        });
        for a in 0..TB {
            for b in 0..FB {
                for i in 0..L {
                    acc[a][b][i] = if fma {
                        xv[a][i].mul_add(wv[b][i], acc[a][b][i])
                    } else {
                        acc[a][b][i] + xv[a][i] * wv[b][i]
                    };
                }
            }
        }
    }
    for a in 0..TB {
        for b in 0..FB {
            let mut s: f32 = acc[a][b].iter().sum();
            for k in chunks * L..d {
                s += xs[a][k] * ws[b][k];
            }
            out[(t + a) * m + j + b] = s;
        }
    }
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
    fn dots_match_a_float64_reference() {
        let (d, m) = (37, 11);
        for n in [1, 3, 4, 5, 9] {
            let x: Vec<f32> = (0..n * d)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 17.0)
                .collect();
            let wt: Vec<f32> = (0..m * d)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0)
                .collect();
            let mut out = vec![0.0; n * m];
            dots(&x, n, d, &wt, m, &mut out);
            for t in 0..n {
                for j in 0..m {
                    let r: f64 = (0..d)
                        .map(|k| f64::from(x[t * d + k]) * f64::from(wt[j * d + k]))
                        .sum();
                    let scale: f64 = (0..d)
                        .map(|k| (f64::from(x[t * d + k]) * f64::from(wt[j * d + k])).abs())
                        .sum();
                    assert!(
                        (f64::from(out[t * m + j]) - r).abs() <= 1e-6 * scale,
                        "n={n} t={t} j={j}"
                    );
                }
            }
        }
    }
}
