//! Monitors: per-feature metrics, request statistics, and the monitors' thresholds over a
//! dictionary's activations.

use super::buffers::StepBuffers;
use super::report::{Event, StepResult};
use super::request::lock;
use super::state::{State, action_name};
use crate::config::{Action, Aggregate, Window};
use crate::steering::covers;

/// Metrics, request statistics and monitors for dictionary `di`'s activations.
pub(super) fn observe(state: &State, sc: &mut StepBuffers, di: usize, result: &mut StepResult) {
    let d = &state.dicts[di];
    // The step buffer's per-feature counts, for the state in force (rebuilt after a reload).
    let mut local = sc.local.lock().unwrap_or_else(|p| p.into_inner());
    if local.generation != state.generation {
        local.generation = state.generation;
        // The old buffers flush as they drop.
        local.features = state
            .dicts
            .iter()
            .map(|d| {
                d.feature_metrics
                    .iter()
                    .map(crate::metrics::LocalFeature::new)
                    .collect()
            })
            .collect();
    }
    let p = &sc.pending[di];
    let m = p.m;
    let local = &mut *local;
    let locals = &mut local.features[di];
    for t in 0..sc.tokens.len() {
        if !sc.finite[t] {
            continue;
        }
        let row = &p.named[t * m..(t + 1) * m];
        let mut req = lock(&sc.reqs[sc.token_req[t]]);
        for (j, &v) in row.iter().enumerate() {
            if v > d.active_above {
                locals[j].observe(f64::from(v));
                if let Some(s) = req.features.get_mut(di).and_then(|f| f.get_mut(j)) {
                    s.max = if s.count == 0 { v } else { s.max.max(v) };
                    s.count += 1;
                }
            }
        }
        let phase = sc.tokens[t].phase;
        let token_index = sc.token_index[t];
        for (mi, mon) in state
            .monitors
            .iter()
            .enumerate()
            .filter(|(_, m)| m.dictionary == di)
        {
            if !covers(mon.apply_to, phase) {
                continue;
            }
            let value = max_at(row, &mon.positions);
            let Some(run) = req.monitors.get_mut(mi) else {
                continue;
            };
            let fire = match mon.window {
                Window::Token => value > mon.threshold,
                Window::Request => {
                    if run.fired {
                        false
                    } else {
                        run.n += 1;
                        run.sum += f64::from(value);
                        run.max = if run.n == 1 {
                            value
                        } else {
                            run.max.max(value)
                        };
                        if value > mon.threshold {
                            run.count += 1;
                        }
                        match mon.aggregate {
                            Aggregate::Any => value > mon.threshold,
                            Aggregate::Count => run.count >= mon.count,
                            Aggregate::Max => run.max > mon.threshold,
                            Aggregate::Mean => (run.sum / run.n as f64) as f32 > mon.threshold,
                        }
                    }
                }
            };
            if !fire {
                continue;
            }
            if !run.fired {
                run.fired_at = token_index;
            }
            run.fired = true;
            let reported = match (mon.window, mon.aggregate) {
                (Window::Request, Aggregate::Count) => run.count as f32,
                (Window::Request, Aggregate::Max) => run.max,
                (Window::Request, Aggregate::Mean) => (run.sum / run.n as f64) as f32,
                _ => value,
            };
            mon.events.inc();
            let event = Event {
                monitor: mon.name.clone(),
                action: action_name(mon.action),
                request: req.id,
                token: token_index,
                value: reported,
                reason: String::new(),
            };
            match mon.action {
                Action::Flag => req.flagged = true,
                Action::SwitchProfile => {
                    req.profile = mon.profile.clone();
                    req.switched = true;
                }
                Action::Stop => {
                    req.stopped = true;
                    if !result.stop.contains(&req.id) {
                        result.stop.push(req.id);
                    }
                }
            }
            req.events.push(event.clone());
            result.events.push(event);
        }
    }
    // Flushing costs a few atomic operations per active feature: at batch 1 about as much as
    // the monitor itself, so it is done at most every FLUSH_EVERY (and at each scrape).
    if crate::metrics::flush_due(&mut local.flushed_at) {
        local.flush();
    }
}

/// The largest of `row[p]` for `p` in `positions` (NaN skipped; -inf when there is none), in
/// four independent lanes (one chain of comparisons through the gathered values is a serial
/// dependency on the batch-1 hook's path).
pub(super) fn max_at(row: &[f32], positions: &[usize]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 4];
    let chunks = positions.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &p) in lanes.iter_mut().zip(c) {
            let v = row[p];
            if v > *m {
                *m = v;
            }
        }
    }
    for &p in rest {
        if row[p] > lanes[0] {
            lanes[0] = row[p];
        }
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::max_at;

    #[test]
    pub(super) fn max_at_matches_a_plain_fold_at_every_length() {
        let row: Vec<f32> = (0..23)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.75)
            .collect();
        for len in 0..=row.len() {
            // Positions out of order, so that each lane sees its own values.
            let positions: Vec<usize> = (0..len).map(|i| (i * 5) % row.len()).collect();
            let want = positions
                .iter()
                .map(|&p| row[p])
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_at(&row, &positions), want, "{len} positions");
            // A NaN at any position is skipped, as `f32::max` skips it.
            for k in 0..len {
                let mut r = row.clone();
                r[positions[k]] = f32::NAN;
                let want = positions
                    .iter()
                    .map(|&p| r[p])
                    .fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max_at(&r, &positions), want, "{len} positions, NaN at {k}");
            }
        }
        assert_eq!(max_at(&row, &[]), f32::NEG_INFINITY);
        assert_eq!(max_at(&[f32::NAN, f32::NAN], &[0, 1]), f32::NEG_INFINITY);
    }
}
