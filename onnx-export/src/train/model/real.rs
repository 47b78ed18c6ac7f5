//! The float type the trainer is generic over (`f32` for training, `f64` for gradient checks),
//! and the dot product and `axpy` kernels it runs on.

/// The float type the model is written for: `f32` to train, `f64` for gradient checks.
pub trait Real:
    num_traits::Float
    + ndarray::LinalgScalar
    + ndarray::ScalarOperand
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Send
    + Sync
    + std::fmt::Debug
    + Default
    + 'static
{
    /// From an `f64`.
    fn of(v: f64) -> Self;
    /// To an `f64`.
    fn f64(self) -> f64;
    /// `Σ a_i b_i`.
    fn dot(a: &[Self], b: &[Self]) -> Self;
    /// `y += a·x`.
    fn axpy(y: &mut [Self], a: Self, x: &[Self]);
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn f64(self) -> f64 {
        f64::from(self)
    }
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_f32(a, b)
    }
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        axpy_f32(y, a, x)
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn f64(self) -> f64 {
        self
    }
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
    fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * xi;
        }
    }
}

/// Partial sums of [`dot_f32`]: two AVX-512 registers' worth, so the additions do not wait on
/// each other.
pub(super) const LANES: usize = 32;

// FMA only where the target has it: elsewhere `mul_add` would be a slow library call.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let fma =
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_arch = "aarch64"));
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = if fma {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+avx",
    "aarch64+neon"
))]
pub(super) fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    let fma =
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_arch = "aarch64"));
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if fma {
            xi.mul_add(a, *yi)
        } else {
            *yi + a * xi
        };
    }
}

/// `Σ a_i b_i`.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    T::dot(a, b)
}

/// `y += a·x`.
#[inline]
pub fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    T::axpy(y, a, x)
}
