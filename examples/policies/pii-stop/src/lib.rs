//! Stops a request when a PII feature fires above `threshold` on a generated token (prompt tokens
//! may mention PII; the model must not produce it). Config: `threshold=0.5` (the policy's
//! `features` list in the Tiller config names the PII features).
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use tiller_policy_sdk::{Actions, Pair, Policy, export_policy, host};

/// The PII stop.
#[derive(Debug)]
pub struct PiiStop {
    threshold: f32,
}

impl PiiStop {
    /// Reads `threshold` from the policy's config string.
    pub fn new() -> Self {
        let c = host::config_string();
        let threshold = c
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "threshold")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.5);
        Self { threshold }
    }
}

impl Default for PiiStop {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for PiiStop {
    fn on_features(
        &mut self,
        _request: u64,
        token: u64,
        generated: bool,
        pairs: &[Pair],
        out: &mut Actions,
    ) {
        if !generated {
            return;
        }
        if let Some(p) = pairs.iter().find(|p| p.value > self.threshold) {
            out.flag(&format!(
                "PII feature {} at {:.2} on generated token {token}",
                p.feature, p.value
            ));
            out.stop();
        }
    }
}

export_policy!(PiiStop, PiiStop::new());

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_policy_sdk::{Action, Harness};

    #[test]
    fn stops_on_generated_pii_only() {
        Harness::<PiiStop>::set_config("threshold=0.5");
        let mut h = Harness::new(PiiStop::new(), "threshold=0.5");
        assert!(
            h.token(1, 0, false, &[(7, 3.0)]).is_empty(),
            "prompt tokens may carry PII"
        );
        assert!(
            h.token(1, 1, true, &[(7, 0.4)]).is_empty(),
            "below the threshold"
        );
        let a = h.token(1, 2, true, &[(3, 0.2), (7, 0.9)]);
        assert_eq!(a.len(), 2);
        assert_eq!(a[1], Action::Stop);
        assert!(matches!(&a[0], Action::Flag(r) if r.contains("feature 7")));
    }
}
