//! A forward step: opened over a batch's tokens, called at each hook, finished with what the
//! monitors asked for.

use std::sync::Arc;
use std::time::Instant;

use super::activations::ActivationsMut;
use super::buffers::{FvuRows, Pending, StepBuffers};
use super::handle::Runtime;
use super::hook::process;
use super::report::StepResult;
use super::request::lock;
use super::state::State;
use super::token::Token;
use crate::{Error, Result};

/// One forward step. Call [`Step::hook`] at each hook, in the model's order, then [`Step::finish`].
pub struct Step<'r> {
    rt: RuntimeRef<'r>,
    state: Arc<State>,
    /// Always `Some` until the step is dropped, when it goes back to the runtime's pool.
    sc: Option<StepBuffers>,
    result: StepResult,
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("tokens", &self.sc.as_ref().map_or(0, |s| s.tokens.len()))
            .finish_non_exhaustive()
    }
}

/// How a step holds its runtime: borrowed, or shared (for handles that outlive a borrow).
pub(super) enum RuntimeRef<'r> {
    Borrowed(&'r Runtime),
    Shared(Arc<Runtime>),
}

impl std::ops::Deref for RuntimeRef<'_> {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        match self {
            Self::Borrowed(r) => r,
            Self::Shared(r) => r,
        }
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if let Some(mut sc) = self.sc.take() {
            // Release the requests and rules now: a pooled buffer must not keep them alive.
            sc.reqs.clear();
            sc.rules.clear();
            self.rt
                .scratch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sc);
        }
    }
}

impl Runtime {
    /// Opens a forward step over `tokens` (the batch's token → request map and phases).
    pub fn step(&self, tokens: &[Token]) -> Result<Step<'_>> {
        self.open_step(RuntimeRef::Borrowed(self), tokens)
    }

    /// [`Runtime::step`] for a shared runtime: the step keeps the runtime alive itself, so it can
    /// outlive the caller's borrow (for the C ABI and other owners of handles).
    pub fn step_shared(self: &Arc<Self>, tokens: &[Token]) -> Result<Step<'static>> {
        self.open_step(RuntimeRef::Shared(self.clone()), tokens)
    }

    pub(super) fn open_step<'r>(&self, rt: RuntimeRef<'r>, tokens: &[Token]) -> Result<Step<'r>> {
        let state = self.state();
        let mut sc = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| {
                let sc = StepBuffers::default();
                self.locals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Arc::downgrade(&sc.local));
                sc
            });
        sc.tokens.clear();
        sc.tokens.extend_from_slice(tokens);
        sc.token_req.clear();
        sc.token_index.clear();
        sc.ids.clear();
        sc.reqs.clear();
        sc.rules.clear();
        let mut step = Step {
            rt,
            state,
            sc: Some(sc),
            result: StepResult::default(),
        };
        step.open(tokens)?;
        Ok(step)
    }
}

impl Step<'_> {
    pub(super) fn open(&mut self, tokens: &[Token]) -> Result<()> {
        let rt: &Runtime = &self.rt;
        let state = self.state.clone();
        let Some(sc) = self.sc.as_mut() else {
            return Ok(());
        };
        {
            let map = rt.requests.read().unwrap_or_else(|p| p.into_inner());
            for t in tokens {
                let slot = match sc.ids.iter().position(|&i| i == t.request) {
                    Some(s) => s,
                    None => {
                        let r = map
                            .get(&t.request)
                            .ok_or_else(|| rt.unknown_request(t.request))?;
                        sc.ids.push(t.request);
                        sc.reqs.push(r.clone());
                        sc.ids.len() - 1
                    }
                };
                sc.token_req.push(slot);
            }
        }
        for r in &sc.reqs {
            sc.rules.push(lock(r).sync(&state, &rt.metrics)?);
        }
        for &slot in &sc.token_req {
            let mut r = lock(&sc.reqs[slot]);
            sc.token_index.push(r.tokens);
            r.tokens += 1;
        }
        sc.pending.resize_with(state.dicts.len(), Pending::default);
        // Rows sampled in an earlier step whose targets never came are dropped.
        sc.fvu.resize_with(state.dicts.len(), FvuRows::default);
        for f in &mut sc.fvu {
            f.rows.clear();
        }
        for p in &mut sc.pending {
            p.valid = false;
        }
        Ok(())
    }

    /// Processes the activations at hook `name` in place: `[n_tokens, width]`.
    pub fn hook(&mut self, name: &str, mut acts: ActivationsMut<'_>) -> Result<()> {
        // Debug builds only: lets the C ABI tests check that a panic inside the runtime reaches a
        // C caller as a status (release builds never read this).
        #[cfg(debug_assertions)]
        if std::env::var_os("TILLER_TEST_PANIC_AT_HOOK").is_some_and(|h| h == name) {
            panic!("injected panic at hook `{name}` (TILLER_TEST_PANIC_AT_HOOK)");
        }
        let started = Instant::now();
        let rt: &Runtime = &self.rt;
        let state = self.state.clone();
        let Some(plan) = state.hooks.get(name) else {
            rt.metrics.error("unknown_hook");
            let e = Error::Unknown {
                what: "hook",
                name: name.to_string(),
                message: "no dictionary or rule is attached to it".into(),
            };
            crate::logging::hook_error("unknown_hook", name, &e);
            return Err(e);
        };
        let Some(sc) = self.sc.as_mut() else {
            return Ok(());
        };
        let n = sc.tokens.len();
        let width = plan.width;
        if acts.len() != n * width {
            rt.metrics.error("shape");
            let e = Error::tensor(
                name,
                format!(
                    "holds {} values; {n} tokens × width {width} = {} expected",
                    acts.len(),
                    n * width
                ),
            );
            crate::logging::hook_error("shape", name, &e);
            return Err(e);
        }
        // f32 host memory is read and edited where it lies; f16/bf16 go through an f32 buffer.
        let mut buf = std::mem::take(&mut sc.x);
        let converted = !matches!(acts, ActivationsMut::F32(_));
        let x: &mut [f32] = match &mut acts {
            ActivationsMut::F32(host) => host,
            other => {
                buf.resize(n * width, 0.0);
                other.read_into(&mut buf);
                &mut buf
            }
        };
        let outcome = process(
            &rt.metrics,
            rt.fvu.as_ref(),
            &state,
            plan,
            sc,
            name,
            width,
            x,
            &mut self.result,
        );
        if converted {
            for t in (0..n).filter(|&t| sc.edited[t]) {
                acts.write_row(t * width, &buf[t * width..(t + 1) * width]);
            }
        }
        sc.x = buf;
        plan.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Closes the step: the requests to stop and the events that fired.
    pub fn finish(mut self) -> StepResult {
        std::mem::take(&mut self.result)
    }
}
