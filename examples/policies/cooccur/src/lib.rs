//! Flags a request when `count` distinct monitored features fire within `window` tokens.
//! Config: `window=20 count=3` (the defaults).
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use tiller_policy_sdk::{Actions, Pair, Policy, export_policy, host};

/// Per request: the recent (token, feature) firings and whether it was flagged.
#[derive(Debug, Default)]
struct Window {
    recent: VecDeque<(u64, u32)>,
    /// How many times each feature is in `recent`: its length is the number of distinct features.
    counts: BTreeMap<u32, u32>,
    flagged: bool,
}

/// The co-occurrence policy.
#[derive(Debug)]
pub struct Cooccur {
    window: u64,
    count: usize,
    requests: BTreeMap<u64, Window>,
}

fn setting(config: &str, key: &str, default: u64) -> u64 {
    config
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

impl Cooccur {
    /// Reads its settings from the policy's config string.
    pub fn new() -> Self {
        let c = host::config_string();
        Self {
            window: setting(&c, "window", 20).max(1),
            count: setting(&c, "count", 3).max(1) as usize,
            requests: BTreeMap::new(),
        }
    }
}

impl Default for Cooccur {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for Cooccur {
    fn on_features(
        &mut self,
        request: u64,
        token: u64,
        _generated: bool,
        pairs: &[Pair],
        out: &mut Actions,
    ) {
        let w = self.requests.entry(request).or_default();
        for p in pairs {
            w.recent.push_back((token, p.feature));
            *w.counts.entry(p.feature).or_insert(0) += 1;
        }
        while let Some(&(t, f)) = w.recent.front() {
            if token < self.window || t > token - self.window {
                break;
            }
            w.recent.pop_front();
            if let Some(c) = w.counts.get_mut(&f) {
                *c -= 1;
                if *c == 0 {
                    w.counts.remove(&f);
                }
            }
        }
        let distinct = w.counts.len();
        if !w.flagged && distinct >= self.count {
            w.flagged = true;
            host::count(0, 1);
            out.flag(&format!(
                "{} features within {} tokens",
                distinct, self.window
            ));
        }
    }

    fn on_request_end(&mut self, request: u64, _out: &mut Actions) {
        self.requests.remove(&request);
    }
}

export_policy!(Cooccur, Cooccur::new());

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_policy_sdk::{Action, Harness};

    #[test]
    fn flags_once_when_three_features_meet_within_the_window() {
        Harness::<Cooccur>::set_config("window=5 count=3");
        let mut h2 = Harness::new(Cooccur::new(), "window=5 count=3");
        assert_eq!(h2.policy.window, 5);
        // Two features, then a gap longer than the window, then three within it.
        assert!(h2.token(1, 0, false, &[(10, 1.0), (11, 0.5)]).is_empty());
        for t in 1..6 {
            assert!(h2.token(1, t, false, &[]).is_empty());
        }
        assert!(
            h2.token(1, 6, true, &[(12, 1.0)]).is_empty(),
            "features 10 and 11 left the window"
        );
        assert!(h2.token(1, 7, true, &[(10, 1.0)]).is_empty());
        let a = h2.token(1, 8, true, &[(11, 2.0)]);
        assert_eq!(a, vec![Action::Flag("3 features within 5 tokens".into())]);
        assert_eq!(h2.counter(0), 1);
        assert!(
            h2.token(1, 9, true, &[(13, 1.0)]).is_empty(),
            "flags once per request"
        );
        // Another request has its own window.
        assert!(h2.token(2, 0, false, &[(10, 1.0), (11, 1.0)]).is_empty());
        assert_eq!(h2.token(2, 1, false, &[(12, 1.0)]).len(), 1);
        h2.end(1);
        assert!(!h2.policy.requests.contains_key(&1));
    }
}
