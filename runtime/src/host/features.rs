//! A dictionary's features at its input hook, through the backend chosen when the state was
//! built ([`super::backend::Encoder`]).

use ndarray::{Array2, ArrayView2};

use super::backend::Pass;
use super::buffers::StepBuffers;
use super::state::State;
use crate::dictionary::InputNorm;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// Computes dictionary `di`'s features for every token into `sc.pending[di]` (unspecified for
/// non-finite tokens, which every reader skips); with `needs_full` (a request's own rules name
/// features outside the slice) every feature, through the full dictionary.
#[allow(clippy::too_many_arguments)]
pub(super) fn encode(
    metrics: &Metrics,
    state: &State,
    sc: &mut StepBuffers,
    di: usize,
    width: usize,
    xs: &[f32],
    needs_full: bool,
) -> Result<()> {
    let d = &state.dicts[di];
    let n = sc.tokens.len();
    let m = d.features.len();
    let pass = d.encoder.pass(needs_full);
    if matches!(pass, Some(Pass::OnnxRuntime)) {
        // The input with non-finite tokens zeroed, for ONNX Runtime.
        sc.enc_in.clear();
        sc.enc_in.extend_from_slice(xs);
        for (t, ok) in sc.finite.iter().enumerate() {
            if !ok {
                sc.enc_in[t * width..(t + 1) * width].fill(0.0);
            }
        }
    }
    let p = &mut sc.pending[di];
    p.valid = true;
    p.m = m;
    p.gains.clear();
    if d.meta.denormalizes_output() && d.meta.input_norm != InputNorm::None {
        // The gains of the input as the dictionary reads it, before this hook's edits.
        let layers = d.hooks_in.len();
        let d_in = d.meta.d_in;
        p.gain_layers = layers;
        p.gains.extend(
            xs.chunks_exact(d_in.max(1))
                .take(n * layers)
                .map(|row| d.meta.input_norm.output_gain(row)),
        );
    }
    p.named.clear();
    p.named.resize(n * m, 0.0);
    if let Some(full) = p.full.take() {
        p.spare = full.into_raw_vec_and_offset().0;
    }
    let x = || {
        ArrayView2::from_shape((n, width), &sc.enc_in)
            .map_err(|e| Error::tensor("activations", e.to_string()))
    };
    match pass {
        Some(Pass::Sliced(s)) => {
            // No statistics yet when it reads the input as it is (see `process`).
            let finite = (sc.finite.len() == n).then_some(&sc.finite[..]);
            s.encode(xs, n, finite, &mut sc.enc_scratch, &mut p.named);
        }
        None => {}
        Some(Pass::Native(fe)) => {
            // Every feature natively, into last time's storage (no allocation at a steady batch
            // size).
            let f = d.meta.d_sae;
            let mut buf = std::mem::take(&mut p.spare);
            buf.clear();
            buf.resize(n * f, 0.0);
            fe.encode(
                xs,
                n,
                Some(&sc.finite),
                &mut sc.full_scratch,
                &mut buf,
                None,
            );
            for t in 0..n {
                for (j, &c) in d.features.iter().enumerate() {
                    p.named[t * m + j] = buf[t * f + c as usize];
                }
            }
            if needs_full {
                let full = Array2::from_shape_vec((n, f), buf)
                    .map_err(|e| Error::tensor("activations", e.to_string()))?;
                p.full = Some(full);
            } else {
                p.spare = buf;
            }
        }
        Some(Pass::OnnxRuntime) => {
            let enc = d.dict.encode(x()?).inspect_err(|e| {
                metrics.error("encode");
                crate::logging::encode_failed(&d.name, e);
            })?;
            for t in 0..n {
                for (j, &f) in d.features.iter().enumerate() {
                    p.named[t * m + j] = enc.acts[[t, f as usize]];
                }
            }
            p.full = needs_full.then_some(enc.acts);
        }
    }
    Ok(())
}
