//! The edits of the steering rules that write a hook, token by token.

use super::buffers::StepBuffers;
use super::request::lock;
use crate::config::Op;
use crate::steering::covers;

/// Applies the rules that write hook `name` through dictionary `di` (or, with `None`, the raw
/// direction rules) to every token.
pub(super) fn edit(
    sc: &mut StepBuffers,
    name: &str,
    width: usize,
    di: Option<usize>,
    x: &mut [f32],
) {
    let n = sc.tokens.len();
    for t in 0..n {
        if !sc.finite[t] {
            continue;
        }
        let slot = sc.token_req[t];
        let phase = sc.tokens[t].phase;
        let rules = &sc.rules[slot];
        let row = &mut x[t * width..(t + 1) * width];
        // The request's lock, taken at the first rule that applies and held for the token's rules.
        let mut held = None;
        // Edits whose result is known finite wait here and go into `row` together, in one pass,
        // in rule order (the same values as one pass per edit).
        let mut waiting = Waiting::default();
        for (ri, rule) in rules.iter().enumerate() {
            if rule.dictionary != di || rule.hook != name || !covers(rule.apply_to, phase) {
                continue;
            }
            let req = held.get_or_insert_with(|| lock(&sc.reqs[slot]));
            if let Some(mi) = rule.when
                && !req
                    .monitors
                    .get(mi)
                    .is_some_and(|r| r.fired && sc.token_index[t] >= r.fired_at)
            {
                continue;
            }
            let f = match di {
                Some(di) => sc.pending[di].get(t, rule),
                None => 0.0,
            };
            if rule.op == Op::ProjectCap {
                // Its coefficient reads `row`, which must hold the edits before it.
                waiting.apply(row);
            }
            let Some(c) = rule.coefficient(f, row) else {
                continue;
            };
            let c = match di {
                Some(di) if rule.gain_layer.is_some() => {
                    let c = sc.pending[di].in_model_space(t, rule, c);
                    if c == 0.0 || !c.is_finite() {
                        continue;
                    }
                    c
                }
                _ => c,
            };
            let applied = match rule.fast_bound(c, sc.bound[t]) {
                Some(bound) => {
                    sc.bound[t] = bound;
                    waiting.push(c, &rule.direction, row);
                    true
                }
                None => {
                    waiting.apply(row);
                    rule.apply(c, row, &mut sc.bound[t])
                }
            };
            if applied {
                sc.edited[t] = true;
                if rule.counts {
                    rule.counter.inc();
                    if let Some(count) = req.steering.get_mut(ri) {
                        *count += 1;
                    }
                }
            }
        }
        waiting.apply(row);
    }
}

/// Edits `x += c·d` of one token waiting to be applied in one pass.
#[derive(Default)]
pub(super) struct Waiting<'a> {
    pub(super) c: [f32; crate::encode::kernels::AXPY_MANY],
    pub(super) d: [&'a [f32]; crate::encode::kernels::AXPY_MANY],
    pub(super) len: usize,
}

impl<'a> Waiting<'a> {
    pub(super) fn push(&mut self, c: f32, d: &'a [f32], row: &mut [f32]) {
        if self.len == self.c.len() {
            self.apply(row);
        }
        self.c[self.len] = c;
        self.d[self.len] = d;
        self.len += 1;
    }

    pub(super) fn apply(&mut self, row: &mut [f32]) {
        if self.len > 0 {
            crate::encode::kernels::axpy_many(&self.c[..self.len], &self.d[..self.len], row);
            self.len = 0;
        }
    }
}
