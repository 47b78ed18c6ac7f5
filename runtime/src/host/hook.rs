//! One hook call: statistics of the input, the encodes of the dictionaries that read it, their
//! monitors and policies, then the edits of the rules that write it.

use std::sync::Arc;

use super::buffers::StepBuffers;
use super::edit::edit;
use super::features::encode;
use super::monitor::observe;
use super::policies::run_policies;
use super::report::StepResult;
use super::sampling::{collect_targets, sample};
use super::state::{HookPlan, State};
use crate::Result;
use crate::fvu::Worker;
use crate::metrics::Metrics;

/// One hook call on f32 activations `x` (`[n, width]`), edited in place.
#[allow(clippy::too_many_arguments)]
pub(super) fn process(
    metrics: &Metrics,
    fvu: Option<&Worker>,
    state: &Arc<State>,
    plan: &HookPlan,
    sc: &mut StepBuffers,
    name: &str,
    width: usize,
    x: &mut [f32],
    result: &mut StepResult,
) -> Result<()> {
    let n = sc.tokens.len();
    sc.finite.clear();
    sc.bound.clear();
    sc.edited.clear();
    sc.edited.resize(n, false);
    collect_targets(metrics, fvu, state, plan, sc, name, x);
    for &(di, layer) in &plan.reads {
        let d = &state.dicts[di];
        let layers = d.hooks_in.len();
        if layers == 1 {
            let full = needs_full(sc, di);
            // The sliced encoder reads the activations as they are, so their statistics can wait
            // until after the encode: activations just copied from a GPU come from memory, and
            // that first read then overlaps the encode's arithmetic instead of preceding it; the
            // statistics then find them in cache.
            let as_is = d.encoder.reads_input_as_is(full);
            if !as_is {
                input_stats(plan, sc, width, x);
            }
            let r = encode(metrics, state, sc, di, width, x, full);
            input_stats(plan, sc, width, x);
            r?;
            sample(metrics, fvu, state, sc, di, width, x);
        } else {
            input_stats(plan, sc, width, x);
            // A crosscoder: keep each layer's rows until the last layer arrives, then encode all.
            let p = &mut sc.pending[di];
            let row = layers * width;
            if layer == 0 {
                p.stash.clear();
                p.stash.resize(n * row, 0.0);
                p.stash_finite.clear();
                p.stash_finite.resize(n, true);
            }
            if p.stash.len() != n * row {
                // An earlier layer was not called in this step: nothing to encode.
                continue;
            }
            for t in 0..n {
                p.stash[t * row + layer * width..t * row + (layer + 1) * width]
                    .copy_from_slice(&x[t * width..(t + 1) * width]);
                p.stash_finite[t] &= sc.finite[t];
            }
            if layer + 1 < layers {
                continue;
            }
            let stash = std::mem::take(&mut p.stash);
            for t in 0..n {
                sc.finite[t] &= sc.pending[di].stash_finite[t];
            }
            let full = needs_full(sc, di);
            let r = encode(metrics, state, sc, di, row, &stash, full);
            if r.is_ok() {
                sample(metrics, fvu, state, sc, di, row, &stash);
            }
            sc.pending[di].stash = stash;
            sc.pending[di].stash.clear();
            r?;
        }
        observe(state, sc, di, result);
        if state.policies.iter().any(|p| p.dictionary == di) {
            run_policies(metrics, state, sc, di, result);
        }
    }
    // A hook whose rules only write.
    input_stats(plan, sc, width, x);
    for &di in &plan.writes {
        if !sc.pending[di].valid {
            continue;
        }
        edit(sc, name, width, Some(di), x);
    }
    if plan.vector_rules {
        edit(sc, name, width, None, x);
    }
    Ok(())
}

/// Each token's largest magnitude and whether all its values are finite, with the hook's token
/// counts: taken once per hook call, by the first call of this function in it.
pub(super) fn input_stats(plan: &HookPlan, sc: &mut StepBuffers, width: usize, x: &[f32]) {
    let n = sc.tokens.len();
    if sc.finite.len() == n {
        return;
    }
    for r in x.chunks_exact(width.max(1)).take(n) {
        let (m, finite) = crate::encode::kernels::row_stats(r);
        sc.finite.push(finite);
        sc.bound.push(m);
    }
    let bad = sc.finite.iter().filter(|f| !**f).count();
    if bad > 0 {
        plan.metrics.nonfinite.inc_by(bad as u64);
    }
    plan.metrics.tokens.inc_by(n as u64);
}

/// Whether a request of this step has a rule on a feature of dictionary `di` outside its slice,
/// which makes the full dictionary run.
pub(super) fn needs_full(sc: &StepBuffers, di: usize) -> bool {
    sc.rules
        .iter()
        .flat_map(|rs| rs.iter())
        .any(|r| r.dictionary == Some(di) && r.position.is_none())
}
