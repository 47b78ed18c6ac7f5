//! Dictionaries given directly as linear maps: raw steering directions (`vector`) and linear
//! read-outs (`probe`).

use super::build::Weights;
use super::meta::{Activation, Kind, Meta};
use crate::{Error, Result};

/// A `vector` dictionary over raw steering directions (`[n, d]`, one per row): its features are
/// the projections `x · u/‖u‖` (linear), and its decoder rows are the directions as given, for the
/// `vector` and `project_cap` ops.
pub fn vector_dictionary(directions: ndarray::Array2<f32>) -> Result<(Meta, Weights)> {
    let (n, d) = directions.dim();
    if n == 0 || d == 0 {
        return Err(Error::tensor(
            "directions",
            format!("shape [{n}, {d}] is empty"),
        ));
    }
    let mut unit = directions.clone();
    for (i, mut row) in unit.rows_mut().into_iter().enumerate() {
        let norm = row.dot(&row).sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Err(Error::tensor(
                "directions",
                format!("row {i} has length {norm}: not a direction"),
            ));
        }
        row /= norm;
    }
    let meta = Meta::new(Kind::Vector, Activation::Linear, d, n, d);
    let w = Weights::new(
        unit.t().to_owned(),
        ndarray::Array1::zeros(n),
        directions,
        ndarray::Array1::zeros(d),
    );
    Ok((meta, w))
}

/// A `probe` dictionary of linear read-outs: `weights` is `[n, d]` (one read-out per row, the
/// layout of torch's `nn.Linear.weight` and scikit-learn's `coef_`), `bias` `[n]`; its features
/// are `sigmoid(x·w_i + b_i)` (`activation` [`Activation::Sigmoid`]) or the logits `x·w_i + b_i`
/// ([`Activation::Linear`]). It has no decoder: `W_dec` is `[n, 0]`.
pub fn probe_dictionary(
    weights: ndarray::Array2<f32>,
    bias: ndarray::Array1<f32>,
    activation: Activation,
) -> Result<(Meta, Weights)> {
    let (n, d) = weights.dim();
    if n == 0 || d == 0 {
        return Err(Error::tensor(
            "weight",
            format!("shape [{n}, {d}] is empty"),
        ));
    }
    if bias.len() != n {
        return Err(Error::tensor(
            "bias",
            format!(
                "has {} values but there are {n} read-outs (weight [{n}, {d}])",
                bias.len()
            ),
        ));
    }
    if !matches!(activation, Activation::Sigmoid | Activation::Linear) {
        return Err(Error::invalid(
            "activation",
            format!("a probe outputs `sigmoid` or `linear` (logits), not `{activation}`"),
        ));
    }
    let meta = Meta::new(Kind::Probe, activation, d, n, d);
    let w = Weights::new(
        weights.t().as_standard_layout().into_owned(),
        bias,
        ndarray::Array2::zeros((n, 0)),
        ndarray::Array1::zeros(0),
    );
    w.check(&meta)?;
    Ok((meta, w))
}
