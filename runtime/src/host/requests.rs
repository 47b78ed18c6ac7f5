//! The runtime's requests: begun with a profile and overrides, summarised, ended.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::handle::Runtime;
use super::policies::apply_policy;
use super::report::RequestSummary;
use super::request::{Request, lock};
use super::state::column;
use crate::config::Overrides;
use crate::{Error, Result};

impl Runtime {
    /// Begins request `id` with a profile (or none) and optional JSON overrides.
    pub fn begin_request(
        &self,
        id: u64,
        profile: Option<&str>,
        overrides: Option<&str>,
    ) -> Result<()> {
        // Every refusal is logged here, by kind and field only: see `logging`.
        self.begin_request_checked(id, profile, overrides)
            .inspect_err(crate::logging::request_refused)
    }

    pub(super) fn begin_request_checked(
        &self,
        id: u64,
        profile: Option<&str>,
        overrides: Option<&str>,
    ) -> Result<()> {
        let state = self.state();
        if let Some(p) = profile
            && !state.profiles.contains_key(p)
        {
            self.metrics.error("profile");
            return Err(Error::Unknown {
                what: "profile",
                name: p.to_string(),
                message: "no such profile in the config".into(),
            });
        }
        // Checked whole here, against the operator's `[requests]`: a refused request leaves nothing.
        let overrides = match overrides {
            Some(o) if !o.trim().is_empty() => {
                let dicts: HashSet<&str> = state.dict_index.keys().map(String::as_str).collect();
                let monitors: HashSet<&str> =
                    state.monitor_index.keys().map(String::as_str).collect();
                state
                    .requests
                    .parse(o, &dicts, &monitors, |d, f| {
                        let d = &state.dicts[*state.dict_index.get(d)?];
                        column(&d.meta, &d.name, f).err()
                    })
                    .inspect_err(|_| self.metrics.error("override"))?
            }
            _ => Overrides::default(),
        };
        let mut req = Request::new(id, profile.map(str::to_string), overrides);
        req.sync(&state, &self.metrics).inspect_err(|e| {
            if matches!(e, Error::Override { .. }) {
                self.metrics.error("override");
            }
        })?;
        let req = Arc::new(Mutex::new(req));
        {
            let mut map = self.requests.write().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&id) {
                return Err(Error::Unknown {
                    what: "request",
                    name: id.to_string(),
                    message: "is already running".into(),
                });
            }
            map.insert(id, req.clone());
        }
        let profile = profile.unwrap_or("");
        for policy in &state.policies {
            let outcome = policy.request_begin(id, profile);
            apply_policy(
                &self.metrics,
                &state,
                policy,
                outcome,
                &mut lock(&req),
                0,
                None,
            );
        }
        Ok(())
    }

    /// Ends request `id` and returns its summary.
    pub fn end_request(&self, id: u64) -> Result<RequestSummary> {
        let req = self
            .requests
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or_else(|| self.unknown_request(id))?;
        let state = self.state();
        let mut r = lock(&req);
        let last = r.tokens.saturating_sub(1);
        for policy in &state.policies {
            let outcome = policy.request_end(id);
            apply_policy(&self.metrics, &state, policy, outcome, &mut r, last, None);
        }
        Ok(r.summary())
    }

    /// The summary so far of a running request.
    pub fn request_summary(&self, id: u64) -> Result<RequestSummary> {
        let map = self.requests.read().unwrap_or_else(|p| p.into_inner());
        let req = map.get(&id).ok_or_else(|| self.unknown_request(id))?;
        Ok(req.lock().unwrap_or_else(|p| p.into_inner()).summary())
    }
}
