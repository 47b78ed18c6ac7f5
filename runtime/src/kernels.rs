//! Small dense kernels for the native sliced path, written so the compiler vectorises them, and
//! compiled for several instruction sets with run-time dispatch (`multiversion`). Unlike a general
//! GEMM they allocate nothing, which keeps a steady-state hook call allocation-free.

use multiversion::multiversion;

const LANES: usize = 8;

/// `out[t·m + j] = Σ_k x[t·d + k] · wt[j·d + k]` for `n` tokens and `m` features: each output is
/// the dot product of a token with one (transposed) encoder column.
pub fn dots(x: &[f32], n: usize, d: usize, wt: &[f32], m: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= n * d && wt.len() >= m * d && out.len() >= n * m);
    dots_impl(x, n, d, wt, m, out);
}

#[multiversion(targets("x86_64+avx2+fma", "x86_64+avx", "aarch64+neon"))]
fn dots_impl(x: &[f32], n: usize, d: usize, wt: &[f32], m: usize, out: &mut [f32]) {
    let mut t = 0;
    // Four tokens at a time share each load of an encoder column.
    while t + 4 <= n {
        let xs = [
            &x[t * d..(t + 1) * d],
            &x[(t + 1) * d..(t + 2) * d],
            &x[(t + 2) * d..(t + 3) * d],
            &x[(t + 3) * d..(t + 4) * d],
        ];
        for j in 0..m {
            let s = dot4(xs, &wt[j * d..(j + 1) * d]);
            for (i, v) in s.iter().enumerate() {
                out[(t + i) * m + j] = *v;
            }
        }
        t += 4;
    }
    while t < n {
        let xt = &x[t * d..(t + 1) * d];
        for j in 0..m {
            out[t * m + j] = dot(xt, &wt[j * d..(j + 1) * d]);
        }
        t += 1;
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0f32; LANES]; 2];
    let mut ca = a.chunks_exact(2 * LANES);
    let mut cb = b.chunks_exact(2 * LANES);
    for (pa, pb) in (&mut ca).zip(&mut cb) {
        for u in 0..2 {
            for i in 0..LANES {
                acc[u][i] += pa[u * LANES + i] * pb[u * LANES + i];
            }
        }
    }
    let mut s: f32 = acc[0].iter().zip(&acc[1]).map(|(a, b)| a + b).sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; LANES]; 4];
    let chunks = w.len() / LANES;
    for c in 0..chunks {
        let wc = &w[c * LANES..(c + 1) * LANES];
        for (r, xr) in x.iter().enumerate() {
            let xc = &xr[c * LANES..(c + 1) * LANES];
            for i in 0..LANES {
                acc[r][i] += xc[i] * wc[i];
            }
        }
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let mut s: f32 = acc[r].iter().sum();
        for k in chunks * LANES..w.len() {
            s += x[r][k] * w[k];
        }
        out[r] = s;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
