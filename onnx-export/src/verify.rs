//! `tiller-export verify`: the ONNX graph, run by the runtime, against the float64 reference maths
//! computed from the source checkpoint's weights.

use std::path::Path;

use ndarray::Array2;
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, Dictionary, Meta, SessionOptions, Weights};

use crate::{Error, Result};

/// What `verify` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Rows encoded.
    pub rows: usize,
    /// `max |acts - ref|`.
    pub acts_max_abs: f64,
    /// `max |acts - ref| / max |ref|`.
    pub acts_rel: f64,
    /// `max |recon - ref|` (0 for a probe, which has no reconstruction).
    pub recon_max_abs: f64,
    /// `max |recon - ref| / max |ref|`.
    pub recon_rel: f64,
    /// TopK dictionaries: the fraction of rows whose set of active features is the reference's.
    pub topk_agreement: Option<f64>,
    /// The tolerance on both relative errors.
    pub tolerance: f64,
    /// Whether everything is within tolerance and every TopK set agrees.
    pub pass: bool,
}

fn errors(a: &Array2<f32>, b: &Array2<f64>) -> (f64, f64) {
    let scale = b
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let abs = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()));
    (abs, abs / scale)
}

/// Encodes `x` with the dictionary at `dict` through the runtime and with the reference maths of
/// `(meta, weights)` (the source checkpoint), and compares.
pub fn verify(
    dict: &Path,
    meta: &Meta,
    weights: &Weights,
    x: &Array2<f32>,
    tolerance: f64,
) -> Result<Report> {
    let d = Dictionary::load(dict, &SessionOptions::default())?;
    let dm = d.meta();
    if (dm.d_in, dm.d_sae, dm.d_out, dm.n_layers)
        != (meta.d_in, meta.d_sae, meta.d_out, meta.n_layers)
    {
        return Err(Error::format(
            dict,
            format!(
                "has sizes d_in {} d_sae {} d_out {} layers {}, the source has {} {} {} {}",
                dm.d_in,
                dm.d_sae,
                dm.d_out,
                dm.n_layers,
                meta.d_in,
                meta.d_sae,
                meta.d_out,
                meta.n_layers
            ),
        ));
    }
    // A probe has no reconstruction: its read-outs are all there is to compare.
    let (acts, ref_acts, (recon_max_abs, recon_rel)) = if meta.has_decoder() {
        let (acts, recon) = d.encode_decode(x.view())?;
        let (ref_acts, ref_recon) = reference::encode_decode(meta, weights, x.view());
        let recon_errors = errors(&recon, &ref_recon);
        (acts, ref_acts, recon_errors)
    } else {
        let acts = d.encode(x.view())?.acts;
        (acts, reference::encode(meta, weights, x.view()), (0.0, 0.0))
    };
    let (acts_max_abs, acts_rel) = errors(&acts, &ref_acts);
    let topk_agreement = (meta.activation == Activation::TopK).then(|| {
        let same = acts
            .rows()
            .into_iter()
            .zip(ref_acts.rows())
            .filter(|(a, r)| {
                a.iter()
                    .zip(r.iter())
                    .all(|(a, r)| (*a > 0.0) == (*r > 0.0))
            })
            .count();
        same as f64 / x.nrows().max(1) as f64
    });
    let pass =
        acts_rel < tolerance && recon_rel < tolerance && topk_agreement.is_none_or(|a| a == 1.0);
    Ok(Report {
        rows: x.nrows(),
        acts_max_abs,
        acts_rel,
        recon_max_abs,
        recon_rel,
        topk_agreement,
        tolerance,
        pass,
    })
}
