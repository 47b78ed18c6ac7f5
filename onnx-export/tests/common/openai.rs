//! openai/sparse_autoencoder's `model.py` in float64: `LN` for TopK,
//! `activation((x - pre_bias) encoderᵀ + latent_bias)`, `decoder(latents) + pre_bias`, then
//! `· std + mu`.

use ndarray::Array2;

use super::torch::{Ref, linear, relu, topk};

/// `TopK(k)` when the checkpoint's activation is TopK (which the released TopK autoencoders pair
/// with `LN` on their input).
fn topk_k(r: &Ref) -> Option<usize> {
    (r.setting("activation").as_str() == Some("TopK"))
        .then(|| r.setting("k").as_u64().unwrap() as usize)
}

/// `LN`: `(x - mu) / (std + 1e-5)` per token with torch's unbiased `std`, for TopK autoencoders;
/// returns the input the encoder reads and each token's `(mu, std)`.
fn preprocess(r: &Ref, x: &Array2<f32>) -> (Array2<f64>, Vec<(f64, f64)>) {
    let mut xn = x.mapv(f64::from);
    let n = xn.ncols() as f64;
    let mut stats = Vec::new();
    if topk_k(r).is_some() {
        for mut row in xn.rows_mut() {
            let mu = row.sum() / n;
            row.mapv_inplace(|v| v - mu);
            let std = (row.iter().map(|v| v * v).sum::<f64>() / (n - 1.0)).sqrt();
            row.mapv_inplace(|v| v / (std + 1e-5));
            stats.push((mu, std));
        }
    }
    (xn, stats)
}

/// `Autoencoder.encode`: the latents of `x`.
pub fn encode(r: &Ref, x: &Array2<f32>) -> Array2<f64> {
    let (xn, _) = preprocess(r, x);
    let pre = linear(
        &(&xn - &r.v1("pre_bias")),
        &r.m2("encoder.weight"),
        Some(&r.v1("latent_bias")),
    );
    match topk_k(r) {
        Some(k) => relu(topk(&pre, k)),
        None => relu(pre),
    }
}

/// `Autoencoder.decode` of `latents` (which need not be `x`'s own), un-normalised with `x`'s
/// `(mu, std)` as `forward` does.
pub fn decode(r: &Ref, x: &Array2<f32>, latents: &Array2<f64>) -> Array2<f64> {
    let (_, stats) = preprocess(r, x);
    let mut y = linear(latents, &r.m2("decoder.weight"), None) + &r.v1("pre_bias");
    for (mut row, (mu, std)) in y.rows_mut().into_iter().zip(stats) {
        row.mapv_inplace(|v| v * std + mu);
    }
    y
}

/// `Autoencoder.forward`: the latents and the reconstruction.
pub fn reference(r: &Ref, x: &Array2<f32>) -> (Array2<f64>, Array2<f64>) {
    let latents = encode(r, x);
    let y = decode(r, x, &latents);
    (latents, y)
}
