//! The machine's limits, measured on one thread in the same run as the benchmarks they judge:
//! memory bandwidth (STREAM's copy) and dense matrix-product FLOP/s.

use std::time::Instant;

use ndarray::Array2;

/// Bytes in each of the copy's two arrays: far past any last-level cache.
const COPY_BYTES: usize = 256 << 20;

/// Single-thread memory bandwidth in GB/s (1e9 bytes per second), as STREAM's `Copy` counts it:
/// `2 × bytes / time` for `b[i] = a[i]` over two 256 MiB arrays, the best of `rounds`.
pub fn stream_copy_gbps(rounds: usize) -> f64 {
    let n = COPY_BYTES / 4;
    let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut b = vec![0f32; n];
    b.copy_from_slice(&a);
    let best = (0..rounds.max(1))
        .map(|_| {
            let t = Instant::now();
            b.copy_from_slice(std::hint::black_box(&a));
            std::hint::black_box(&mut b);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * COPY_BYTES as f64 / best / 1e9
}

/// Single-thread read bandwidth in GB/s: sums over one 256 MiB array, read as 1, 2, 4 and 8
/// interleaved streams (a core keeps more misses in flight with several streams), the best of
/// `rounds` rounds of each. What an encode at batch 1 mostly does with its weights.
pub fn stream_read_gbps(rounds: usize) -> f64 {
    stream_read_best(rounds).0
}

/// [`stream_read_gbps`] and the number of streams that reached it.
pub fn stream_read_best(rounds: usize) -> (f64, usize) {
    let n = COPY_BYTES / 4;
    let a: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = (f64::INFINITY, 1);
    for streams in [1, 2, 4, 8] {
        for _ in 0..rounds.max(1) {
            let t = Instant::now();
            read_pass(&a, streams);
            let t = t.elapsed().as_secs_f64();
            if t < best.0 {
                best = (t, streams);
            }
        }
    }
    (COPY_BYTES as f64 / best.0 / 1e9, best.1)
}

/// One read pass over `a` as `streams` interleaved streams (its sum): what the read bandwidth
/// times, for a caller that times it beside a call reading as many bytes.
pub fn read_pass(a: &[f32], streams: usize) -> f32 {
    std::hint::black_box(sum_streams(std::hint::black_box(a), streams))
}

/// The sum of `a` read as `streams` equal parts side by side, a cache line of each in turn.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn sum_streams(a: &[f32], streams: usize) -> f32 {
    const LINE: usize = 16;
    let part = a.len() / streams / LINE * LINE;
    let mut acc = [[0f32; LINE]; 8];
    for off in (0..part).step_by(LINE) {
        for (s, acc) in acc.iter_mut().enumerate().take(streams) {
            let base = s * part + off;
            for (x, v) in acc.iter_mut().zip(&a[base..base + LINE]) {
                *x += v;
            }
        }
    }
    acc.iter().flatten().sum::<f32>() + a[streams * part..].iter().sum::<f32>()
}

/// Single-thread read bandwidth from cache in GB/s: sums over one `bytes` buffer (512 KiB fits
/// the L2 of most cores), repeated to about 64 MiB a round, the best of `rounds`. What a call whose
/// weights stay in cache between calls can reach.
pub fn cache_read_gbps(bytes: usize, rounds: usize) -> f64 {
    let n = (bytes / 4).max(32);
    let a: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let reps = ((64 << 20) / (n * 4)).max(1);
    sum(&a);
    let best = (0..rounds.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(sum(std::hint::black_box(&a)));
            }
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (reps * n * 4) as f64 / best / 1e9
}

/// A sum with 128 independent lanes, so that the loop is bound by loads, not by the adds'
/// latency; compiled for AVX-512 and AVX2 as well (run-time dispatch), so that a load is as wide as
/// the machine's (the cache delivers a whole vector per load).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 128];
    let mut chunks = a.chunks_exact(128);
    for c in &mut chunks {
        for (s, v) in acc.iter_mut().zip(c) {
            *s += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Single-thread dense f32 matrix product in GFLOP/s: `[n, n] × [n, n]` with ndarray's GEMM
/// (matrixmultiply; run with `MATMUL_NUM_THREADS=1` where its threading feature is on), the best
/// of `rounds`.
pub fn dense_gflops(n: usize, rounds: usize) -> f64 {
    let a = Array2::from_shape_fn((n, n), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
    let b = Array2::from_shape_fn((n, n), |(i, j)| ((i * 5 + j) % 13) as f32 - 6.0);
    let mut c = Array2::<f32>::zeros((n, n));
    ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    let best = (0..rounds.max(1))
        .map(|_| {
            let t = Instant::now();
            ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
            std::hint::black_box(&mut c);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (n * n * n) as f64 / best / 1e9
}
