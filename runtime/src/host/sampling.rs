//! FVU and L0 sampling: the tokens a dictionary's gauges sample, copied out of the hook path
//! for the worker to measure.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};

use super::buffers::StepBuffers;
use super::state::{HookPlan, State};
use crate::fvu::{Meter, Reconstruct, Sample, Worker};
use crate::metrics::Metrics;

/// Picks the tokens of this call that dictionary `di`'s FVU and L0 gauges sample and copies
/// their rows of `xs` (`[n, width]`, the input as the dictionary read it) out: to the worker at
/// once when the reconstruction's target is the input, else into the step's buffer until the
/// dictionary's `hooks_out` have been read ([`collect_targets`]).
pub(super) fn sample(
    metrics: &Metrics,
    fvu: Option<&Worker>,
    state: &Arc<State>,
    sc: &mut StepBuffers,
    di: usize,
    width: usize,
    xs: &[f32],
) {
    let d = &state.dicts[di];
    let n = sc.tokens.len();
    let (Some(_), Some(worker)) = (&d.meter, fvu) else {
        return;
    };
    let Some((first, every)) = d.sampler.pick(n) else {
        return;
    };
    let rows: Vec<usize> = (first..n)
        .step_by(every)
        .filter(|&t| sc.finite[t])
        .collect();
    if rows.is_empty() {
        return;
    }
    let mut input = Vec::with_capacity(rows.len() * width);
    for &t in &rows {
        input.extend_from_slice(&xs[t * width..(t + 1) * width]);
    }
    if d.target_is_input {
        submit(metrics, worker, state, di, rows.len(), input, None);
    } else {
        let outs = d.hooks_out.len();
        let f = &mut sc.fvu[di];
        f.target.clear();
        f.target.resize(rows.len() * outs * d.meta.d_out, 0.0);
        f.seen = vec![false; outs];
        f.rows = rows;
        f.input = input;
    }
}

/// At hook `name`, before any edit: copies the rows sampled at the input of each dictionary that
/// writes here and reconstructs this hook's activations (a transcoder's or CLT's `hook_out`), and
/// hands them to the worker once every output layer has been read.
pub(super) fn collect_targets(
    metrics: &Metrics,
    fvu: Option<&Worker>,
    state: &Arc<State>,
    plan: &HookPlan,
    sc: &mut StepBuffers,
    name: &str,
    x: &[f32],
) {
    let Some(worker) = fvu else {
        return;
    };
    for &di in &plan.writes {
        let d = &state.dicts[di];
        let f = &mut sc.fvu[di];
        if f.rows.is_empty() || d.target_is_input || d.meter.is_none() {
            continue;
        }
        let (outs, w) = (d.hooks_out.len(), d.meta.d_out);
        for (l, _) in d.hooks_out.iter().enumerate().filter(|(_, h)| *h == name) {
            for (k, &t) in f.rows.iter().enumerate() {
                let at = (k * outs + l) * w;
                f.target[at..at + w].copy_from_slice(&x[t * w..(t + 1) * w]);
            }
            f.seen[l] = true;
        }
        if f.seen.iter().all(|s| *s) {
            let n = f.rows.len();
            f.rows.clear();
            let (input, target) = (std::mem::take(&mut f.input), std::mem::take(&mut f.target));
            submit(metrics, worker, state, di, n, input, Some(target));
        }
    }
}

/// Queues the measurement of `n` sampled tokens of dictionary `di` (`input` `[n, input width]`;
/// `target` `[n, output width]`, or `None` when the target is the input); the worker counts
/// them dropped when its queue is full.
pub(super) fn submit(
    metrics: &Metrics,
    worker: &Worker,
    state: &Arc<State>,
    di: usize,
    n: usize,
    input: Vec<f32>,
    target: Option<Vec<f32>>,
) {
    worker.submit(Sample {
        key: (Arc::as_ptr(state) as usize, di),
        source: Arc::new(Sampled {
            state: state.clone(),
            di,
            errors: metrics.errors.with_label_values(&["encode"]),
        }),
        input,
        target,
        n,
    });
}

/// A dictionary of a state, as the FVU worker measures it.
pub(super) struct Sampled {
    pub(super) state: Arc<State>,
    pub(super) di: usize,
    pub(super) errors: prometheus::IntCounter,
}

impl Reconstruct for Sampled {
    fn reconstruct(&self, x: ArrayView2<'_, f32>) -> Option<(Array2<f32>, Array2<f32>)> {
        let r = self.state.dicts[self.di].dict.encode_decode(x);
        if r.is_err() {
            self.errors.inc();
        }
        r.ok()
    }

    fn meter(&self) -> &Meter {
        // Only dictionaries with a meter are sampled.
        self.state.dicts[self.di]
            .meter
            .as_ref()
            .unwrap_or_else(|| unreachable!("a sampled dictionary has a meter"))
    }
}
