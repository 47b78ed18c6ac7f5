//! The WASM policies in the hook path: loaded with the state, called per token, and what they
//! answer applied to their requests.

use super::buffers::StepBuffers;
use super::report::{Event, StepResult};
use super::request::{Request, lock};
use super::state::{Names, State, column};
use super::token::Phase;
use crate::config::{ApplyTo, Op, SteerConfig};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// Loads the `[[policy]]` entries of the state's config.
pub(super) fn load_policies(
    state: &State,
    metrics: &Metrics,
) -> Result<Vec<crate::policy::Policy>> {
    if state.config.policies.is_empty() {
        return Ok(Vec::new());
    }
    let engine = crate::policy::engine()?;
    let mut out = Vec::new();
    for pc in &state.config.policies {
        let di = state.dict_index[&pc.dictionary];
        let d = &state.dicts[di];
        let mut columns = Vec::with_capacity(pc.features.len());
        for &id in &pc.features {
            let c = column(&d.meta, &d.name, id)
                .map_err(|m| Error::invalid(format!("policy `{}`", pc.name), m))?;
            columns.push((c as usize, id));
        }
        let path = state.config.resolve(&pc.module);
        out.push(crate::policy::Policy::load(
            &engine, pc, &path, di, columns, &d.meta, metrics,
        )?);
    }
    Ok(out)
}

/// Calls the policies that read dictionary `di` for every finite token of the step.
pub(super) fn run_policies(
    metrics: &Metrics,
    state: &State,
    sc: &mut StepBuffers,
    di: usize,
    result: &mut StepResult,
) {
    let d = &state.dicts[di];
    let full = sc.pending[di].full.take();
    for policy in state.policies.iter().filter(|p| p.dictionary == di) {
        for t in 0..sc.tokens.len() {
            if !sc.finite[t] {
                continue;
            }
            sc.pairs.clear();
            for &(c, id) in &policy.columns {
                let v = match (d.position.get(&(c as u32)), &full) {
                    (Some(&p), _) => sc.pending[di].named[t * sc.pending[di].m + p],
                    (None, Some(f)) => f[[t, c]],
                    (None, None) => 0.0,
                };
                if v > d.active_above {
                    sc.pairs.push((id, v));
                }
            }
            let generated = sc.tokens[t].phase == Phase::Generated;
            let token = sc.token_index[t];
            let request = sc.tokens[t].request;
            let outcome = policy.features(request, token, generated, &sc.pairs);
            let mut req = lock(&sc.reqs[sc.token_req[t]]);
            apply_policy(
                metrics,
                state,
                policy,
                outcome,
                &mut req,
                token,
                Some(result),
            );
        }
    }
    sc.pending[di].full = full;
}

/// Applies what a policy call answered to its request: actions on success; on failure, nothing
/// (or a stop when the policy fails closed), and an event when the failure disabled the policy.
pub(super) fn apply_policy(
    metrics: &Metrics,
    state: &State,
    policy: &crate::policy::Policy,
    outcome: crate::policy::Outcome,
    req: &mut Request,
    token: u64,
    mut result: Option<&mut StepResult>,
) {
    use crate::policy::{Outcome, PolicyAction};
    let event = |req: &mut Request,
                 action: &'static str,
                 reason: String,
                 result: &mut Option<&mut StepResult>| {
        let e = Event {
            monitor: policy.name.clone(),
            action,
            request: req.id,
            token,
            value: 0.0,
            reason,
        };
        if let Some(r) = result.as_deref_mut() {
            r.events.push(e.clone());
        }
        req.events.push(e);
    };
    let stop = |req: &mut Request, result: &mut Option<&mut StepResult>| {
        req.stopped = true;
        if let Some(r) = result.as_deref_mut()
            && !r.stop.contains(&req.id)
        {
            r.stop.push(req.id);
        }
    };
    match outcome {
        Outcome::Disabled => {}
        Outcome::Failed { why, disabled_now } => {
            if disabled_now {
                metrics.error("policy");
                event(
                    req,
                    "disable",
                    format!("disabled after repeated failures (last: {})", why.as_str()),
                    &mut result,
                );
            }
            if policy.fail_closed {
                event(
                    req,
                    "stop",
                    format!("the policy failed ({}) and fails closed", why.as_str()),
                    &mut result,
                );
                stop(req, &mut result);
            }
        }
        Outcome::Actions(actions) => {
            for a in actions {
                match a {
                    PolicyAction::Flag(reason) => {
                        req.flagged = true;
                        event(req, "flag", reason, &mut result);
                    }
                    PolicyAction::SwitchProfile(p) if state.profiles.contains_key(&p) => {
                        req.profile = Some(p.clone());
                        req.switched = true;
                        event(req, "switch_profile", p, &mut result);
                    }
                    PolicyAction::SwitchProfile(p) => {
                        event(
                            req,
                            "ignored",
                            format!("asked for the unknown profile `{p}`"),
                            &mut result,
                        );
                    }
                    PolicyAction::Stop => {
                        event(req, "stop", String::new(), &mut result);
                        stop(req, &mut result);
                    }
                    PolicyAction::Clamp(..) | PolicyAction::Ablate(_) | PolicyAction::Add(..)
                        if state
                            .dicts
                            .get(policy.dictionary)
                            .is_some_and(|d| !d.meta.has_decoder()) =>
                    {
                        event(
                            req,
                            "ignored",
                            "asked to steer through a probe, which has no decoder rows".into(),
                            &mut result,
                        );
                    }
                    PolicyAction::Clamp(f, v) => add_rule(req, policy, Op::Clamp, f, Some(v)),
                    PolicyAction::Ablate(f) => add_rule(req, policy, Op::Ablate, f, None),
                    PolicyAction::Add(f, v) => add_rule(req, policy, Op::Add, f, Some(v)),
                    PolicyAction::Clear => {
                        let before = req.policy_rules.len();
                        req.policy_rules
                            .retain(|s| s.name.as_deref() != Some(policy.name.as_str()));
                        req.dirty |= req.policy_rules.len() != before;
                    }
                }
            }
        }
    }
}

/// A steering rule a policy asked for: one of the request's rules from its next step.
pub(super) fn add_rule(
    req: &mut Request,
    policy: &crate::policy::Policy,
    op: Op,
    feature: u32,
    value: Option<f32>,
) {
    // Bounded: a policy cannot grow a request's rules without limit.
    if req.policy_rules.len() >= 64 {
        return;
    }
    let dictionary = Some(policy_dictionary_name(policy, &req.names));
    req.policy_rules.push(SteerConfig {
        // Tagged with the policy's name, so that `clear` finds them.
        name: Some(policy.name.clone()),
        op,
        dictionary,
        feature: Some(feature),
        value: if op == Op::Clamp { value } else { None },
        strength: if op == Op::Add { value } else { None },
        factor: None,
        normalize: false,
        apply_to: ApplyTo::All,
        only_active: false,
        when: None,
        vector: None,
        index: None,
        hook: None,
    });
    req.dirty = true;
}

pub(super) fn policy_dictionary_name(policy: &crate::policy::Policy, names: &Names) -> String {
    names
        .dicts
        .get(policy.dictionary)
        .map(|(n, _)| n.clone())
        .unwrap_or_default()
}
