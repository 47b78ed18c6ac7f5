//! Error measures for comparing results with a reference.

use ndarray::Array2;

/// Normwise relative error `max|a - b| / max|b|`, in float64 (the reference `b` in float32 or
/// float64).
pub fn rel_err<B: Copy + Into<f64>>(a: &Array2<f32>, b: &Array2<B>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let scale = b
        .iter()
        .fold(0.0f64, |m, v| m.max((*v).into().abs()))
        .max(1e-30);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        m.max((f64::from(*x) - (*y).into()).abs())
    }) / scale
}
