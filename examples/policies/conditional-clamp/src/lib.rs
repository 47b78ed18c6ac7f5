//! Clamps feature `a` to `value` only while feature `b` is active: when `b` fires on a token, `a` is
//! clamped from the request's next step; when `b` stops firing, the clamp is removed.
//! Config: `a=12 b=34 value=0`.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::collections::BTreeSet;
use tiller_policy_sdk::{Actions, Pair, Policy, export_policy, host};

/// The conditional clamp.
#[derive(Debug)]
pub struct ConditionalClamp {
    a: u32,
    b: u32,
    value: f32,
    clamped: BTreeSet<u64>,
}

fn setting<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

impl ConditionalClamp {
    /// Reads `a`, `b` and `value` from the policy's config string.
    pub fn new() -> Self {
        let c = host::config_string();
        Self {
            a: setting(&c, "a").and_then(|v| v.parse().ok()).unwrap_or(0),
            b: setting(&c, "b").and_then(|v| v.parse().ok()).unwrap_or(1),
            value: setting(&c, "value")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
            clamped: BTreeSet::new(),
        }
    }
}

impl Default for ConditionalClamp {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for ConditionalClamp {
    fn on_features(
        &mut self,
        request: u64,
        _token: u64,
        _generated: bool,
        pairs: &[Pair],
        out: &mut Actions,
    ) {
        let b_active = pairs.iter().any(|p| p.feature == self.b);
        let was = self.clamped.contains(&request);
        if b_active && !was {
            self.clamped.insert(request);
            out.clamp(self.a, self.value);
        } else if !b_active && was {
            self.clamped.remove(&request);
            out.clear();
        }
    }

    fn on_request_end(&mut self, request: u64, _out: &mut Actions) {
        self.clamped.remove(&request);
    }
}

export_policy!(ConditionalClamp, ConditionalClamp::new());

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_policy_sdk::{Action, Harness};

    #[test]
    fn clamps_a_while_b_is_active() {
        Harness::<ConditionalClamp>::set_config("a=12 b=34 value=0.5");
        let mut h = Harness::new(ConditionalClamp::new(), "a=12 b=34 value=0.5");
        assert!(
            h.token(1, 0, false, &[(12, 3.0)]).is_empty(),
            "a alone does nothing"
        );
        assert_eq!(
            h.token(1, 1, false, &[(34, 1.0)]),
            vec![Action::Clamp(12, 0.5)]
        );
        assert!(
            h.token(1, 2, false, &[(34, 1.0), (12, 2.0)]).is_empty(),
            "already clamped"
        );
        assert_eq!(h.token(1, 3, true, &[(12, 2.0)]), vec![Action::Clear]);
        assert!(h.token(1, 4, true, &[]).is_empty());
        // Requests are independent.
        assert_eq!(
            h.token(2, 0, true, &[(34, 0.1)]),
            vec![Action::Clamp(12, 0.5)]
        );
        assert!(h.token(1, 5, true, &[]).is_empty());
    }
}
