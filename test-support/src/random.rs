//! Seeded normal matrices.

use ndarray::Array2;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// A `shape` matrix of normals with mean 0 and standard deviation `scale`, drawn from `rng`.
pub fn randn(rng: &mut StdRng, shape: (usize, usize), scale: f32) -> Array2<f32> {
    randn_around(rng, shape, 0.0, scale)
}

/// A `shape` matrix of normals with mean `mean` and standard deviation `scale`, drawn from `rng`.
pub fn randn_around(rng: &mut StdRng, shape: (usize, usize), mean: f32, scale: f32) -> Array2<f32> {
    let n = Normal::new(mean, scale).unwrap();
    Array2::from_shape_simple_fn(shape, || n.sample(rng))
}

/// A `shape` matrix of standard normals from a generator seeded with `seed`.
pub fn randn_seeded(seed: u64, shape: (usize, usize)) -> Array2<f32> {
    randn(&mut StdRng::seed_from_u64(seed), shape, 1.0)
}
