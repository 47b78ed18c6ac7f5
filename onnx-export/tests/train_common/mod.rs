//! Shared by the `train_*` tests: synthetic activations with a known dictionary, written as
//! shards in the formats the trainer reads.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use ndarray::{Array2, s};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// Sparse combinations of random unit directions in superposition: `n_true` directions in `d`
/// dimensions, each active in a token with probability `p`, with a magnitude uniform in
/// [0.5, 1.5]. Returns the directions (`[n_true, d]`) and the tokens (`[rows, d]`).
pub fn synthetic(
    seed: u64,
    d: usize,
    n_true: usize,
    p: f64,
    rows: usize,
) -> (Array2<f32>, Array2<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dirs = Array2::<f32>::from_shape_simple_fn((n_true, d), || {
        <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng)
    });
    for mut r in dirs.rows_mut() {
        let n = r.dot(&r).sqrt();
        r /= n;
    }
    let mut x = Array2::<f32>::zeros((rows, d));
    for mut row in x.rows_mut() {
        for u in dirs.rows() {
            if rng.random_bool(p) {
                let a: f32 = rng.random_range(0.5..1.5);
                row.scaled_add(a, &u);
            }
        }
    }
    (dirs, x)
}

/// Bytes of a `.npy` file.
pub fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// The stored form of `x` in `dtype`.
pub fn encode(x: &Array2<f32>, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => x
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => x
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F64 => x.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect(),
        _ => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes `x` as a `.npy` file in `dtype` (float16, float32 or float64).
pub fn write_npy(path: &Path, x: &Array2<f32>, dtype: Dtype) {
    let descr = match dtype {
        Dtype::F16 => "<f2",
        Dtype::F64 => "<f8",
        _ => "<f4",
    };
    std::fs::write(path, npy_bytes(descr, x.shape(), &encode(x, dtype))).unwrap();
}

/// Writes `tensors` to a safetensors file in `dtype`.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Array2<f32>)], dtype: Dtype) {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, x)| (n.to_string(), encode(x, dtype), x.shape().to_vec()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes `x` into `dir` as `n` shards, alternating float16 `.npy`, bfloat16 `.safetensors` and
/// float32 `.npy`.
pub fn write_shards(dir: &Path, x: &Array2<f32>, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let per = x.nrows().div_ceil(n);
    for i in 0..n {
        let part = x
            .slice(s![i * per..((i + 1) * per).min(x.nrows()), ..])
            .to_owned();
        match i % 3 {
            0 => write_npy(&dir.join(format!("shard_{i:03}.npy")), &part, Dtype::F16),
            1 => write_safetensors(
                &dir.join(format!("shard_{i:03}.safetensors")),
                &[("activations", &part)],
                Dtype::BF16,
            ),
            _ => write_npy(&dir.join(format!("shard_{i:03}.npy")), &part, Dtype::F32),
        }
    }
    dir.to_path_buf()
}

/// Mean over the true directions of the best cosine similarity with a decoder row.
pub fn mmcs(dirs: &Array2<f32>, w_dec: &Array2<f32>) -> f64 {
    let norms: Vec<f32> = w_dec
        .rows()
        .into_iter()
        .map(|r| r.dot(&r).sqrt().max(1e-12))
        .collect();
    let mut total = 0.0;
    for u in dirs.rows() {
        let best = w_dec
            .rows()
            .into_iter()
            .zip(&norms)
            .map(|(w, n)| u.dot(&w) / n)
            .fold(f32::MIN, f32::max);
        total += f64::from(best);
    }
    total / dirs.nrows() as f64
}
