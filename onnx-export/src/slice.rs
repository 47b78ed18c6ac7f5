//! `tiller-export slice`: a dictionary reduced to chosen features.
//!
//! Exact for ReLU, JumpReLU, BatchTopK and Gated dictionaries (a feature's activation depends only
//! on its own encoder column). A TopK feature's membership in the top k depends on every feature,
//! so a sliced TopK dictionary becomes a JumpReLU one whose per-feature thresholds are fitted on
//! calibration activations (`tiller.exact = false`).

use ndarray::{Array1, Array2, Axis};
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, DictionaryFile, Meta, Weights};

use crate::{Error, Result};

/// A sliced dictionary, and for TopK sources how often the fitted JumpReLU agrees with TopK on
/// the calibration data (mean over the kept features of the fraction of tokens classified alike).
#[derive(Debug, Clone)]
pub struct Sliced {
    /// Its metadata (`feature_ids` lists the original features).
    pub meta: Meta,
    /// Its weights.
    pub weights: Weights,
    /// TopK sources: the calibration agreement.
    pub agreement: Option<f64>,
}

/// Slices `file` to `features` (indices into its columns); TopK needs `calibrate` (`[n, width]`).
pub fn slice(
    file: &DictionaryFile,
    features: &[u32],
    calibrate: Option<&Array2<f32>>,
) -> Result<Sliced> {
    let path = file.path();
    let m = file.meta();
    if features.is_empty() {
        return Err(Error::format(path, "no feature to keep"));
    }
    let mut seen = std::collections::HashSet::new();
    for &f in features {
        if f as usize >= m.d_sae {
            return Err(Error::format(
                path,
                format!("feature {f} is out of range (d_sae = {})", m.d_sae),
            ));
        }
        if !seen.insert(f) {
            return Err(Error::format(path, format!("feature {f} is listed twice")));
        }
    }
    let cols: Vec<usize> = features.iter().map(|&f| f as usize).collect();
    let w = file.weights()?;
    let mut out = Weights {
        w_enc: w.w_enc.select(Axis(1), &cols),
        b_enc: w.b_enc.select(Axis(0), &cols),
        w_dec: w.w_dec.select(Axis(0), &cols),
        b_dec: w.b_dec.clone(),
        threshold: match m.activation {
            Activation::JumpRelu => w.threshold.as_ref().map(|t| t.select(Axis(0), &cols)),
            _ => w.threshold.clone(),
        },
        gated: w.gated.as_ref().map(|g| tiller_runtime::dictionary::Gated {
            r_mag: g.r_mag.select(Axis(0), &cols),
            b_mag: g.b_mag.select(Axis(0), &cols),
        }),
        w_skip: w.w_skip.clone(),
        b_skip: w.b_skip.clone(),
        apply_b_dec_to_input: w.apply_b_dec_to_input,
    };
    let mut meta = m.clone();
    meta.d_sae = cols.len();
    // Compose with an earlier slice: the ids stay the original dictionary's.
    let original: Vec<u32> = match &m.feature_ids {
        Some(ids) => cols.iter().map(|&c| ids[c]).collect(),
        None => features.to_vec(),
    };
    meta.labels = m
        .labels
        .iter()
        .filter(|(k, _)| original.contains(k))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    meta.feature_ids = Some(original);
    let mut agreement = None;
    if m.activation == Activation::TopK {
        let Some(x) = calibrate else {
            return Err(Error::format(
                path,
                "slicing a TopK dictionary is not exact (membership in the top k depends on every feature): \
                 give calibration activations with --calibrate X.npy to fit JumpReLU thresholds",
            ));
        };
        let (threshold, agree) = fit_thresholds(m, &w, &cols, x);
        out.threshold = Some(threshold);
        meta.activation = Activation::JumpRelu;
        meta.k = None;
        meta.exact = false;
        agreement = Some(agree);
    }
    Ok(Sliced {
        meta,
        weights: out,
        agreement,
    })
}

/// For each kept TopK feature, the JumpReLU threshold that best reproduces "active under TopK" on
/// the calibration tokens, and the mean agreement.
fn fit_thresholds(m: &Meta, w: &Weights, cols: &[usize], x: &Array2<f32>) -> (Array1<f32>, f64) {
    let pre = reference::pre_activations(m, w, x.view());
    let k = m.k.unwrap_or(1).min(m.d_sae).max(1);
    // The k-th largest pre-activation of every token: TopK keeps the features at or above it.
    let cutoff: Vec<f64> = pre
        .rows()
        .into_iter()
        .map(|r| {
            let mut v: Vec<f64> = r.to_vec();
            let (_, kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth
        })
        .collect();
    let mut thresholds = Vec::with_capacity(cols.len());
    let mut agreement = 0.0;
    for &c in cols {
        // (pre-activation, active under TopK), sorted by pre-activation.
        let mut pts: Vec<(f64, bool)> = pre
            .column(c)
            .iter()
            .zip(&cutoff)
            .map(|(&p, &t)| (p, p >= t && p > 0.0))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = pts.len();
        let positives = pts.iter().filter(|p| p.1).count();
        // Threshold below pts[i]: tokens i.. are active. Errors = negatives at or above + positives below.
        let (mut best_err, mut best_i) = (usize::MAX, n);
        let mut pos_below = 0usize;
        for i in 0..=n {
            if i == n || i == 0 || pts[i].0 > pts[i - 1].0 {
                let neg_above = (n - i) - (positives - pos_below);
                let err = pos_below + neg_above;
                if err < best_err {
                    best_err = err;
                    best_i = i;
                }
            }
            if i < n && pts[i].1 {
                pos_below += 1;
            }
        }
        let t = match best_i {
            0 => pts.first().map_or(0.0, |p| p.0 - 1.0),
            i if i >= n => pts.last().map_or(0.0, |p| p.0 + 1.0),
            i => (pts[i - 1].0 + pts[i].0) / 2.0,
        };
        thresholds.push(t.max(0.0) as f32);
        agreement += 1.0 - best_err as f64 / n.max(1) as f64;
    }
    (
        Array1::from_vec(thresholds),
        agreement / cols.len().max(1) as f64,
    )
}
