//! The runtime's log events, written through `tracing`.
//!
//! The library never installs a subscriber: a host installs its own (the examples print to stderr,
//! filtered by `RUST_LOG`), and with none installed every event costs a load and a branch.
//!
//! No event carries request content. Prompts never reach the runtime, but a request's overrides
//! do, and an error about them quotes what the client sent (an unknown field's name, a path, a
//! profile name): a refusal is logged by its error's kind and by the field at fault only, and the
//! field is one of the fixed names below, so nothing a client wrote can reach the log.
//!
//! Events that a broken host or policy can raise on every hook call (a wrong shape, a trapping
//! policy) are throttled to one line a second per site; each says how many it stands for, and the
//! exact counts are in `tiller_errors_total` and `tiller_policy_traps_total`.

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::Error;

/// The shortest time between two lines of one throttled site.
const THROTTLE_MS: u64 = 1000;

/// The fields of a request's overrides a refusal may name (those of `Overrides` and
/// `SteerConfig`, and the profile a request asks for).
const REQUEST_FIELDS: &[&str] = &[
    "steer",
    "replace",
    "profile",
    "name",
    "op",
    "dictionary",
    "feature",
    "value",
    "strength",
    "factor",
    "normalize",
    "apply_to",
    "only_active",
    "when",
    "vector",
    "index",
    "hook",
];

/// An accepted reload of `file` (`None`: a config given in memory), now running as `generation`.
pub(crate) fn reload_accepted(file: Option<&Path>, generation: u64) {
    let file = file.map_or_else(|| "<config>".into(), |p| p.display().to_string());
    tracing::info!(file, generation, "config reload accepted");
}

/// A rejected reload of `file`: names the file, and the line and key when the error has them.
pub(crate) fn reload_rejected(file: Option<&Path>, e: &Error) {
    let (file, line, key) = match e {
        Error::Config {
            file,
            line,
            message,
        } => (
            file.clone(),
            (*line > 0).then_some(*line as u64),
            leading_key(message),
        ),
        Error::Io { path, .. } if file.is_none() => (path.display().to_string(), None, None),
        _ => (
            file.map_or_else(|| "<config>".into(), |p| p.display().to_string()),
            None,
            None,
        ),
    };
    tracing::error!(
        file,
        line,
        key,
        error = %e,
        "config reload rejected; the running config is kept"
    );
}

/// A request refused at its start (its profile or overrides), or another error about one
/// request: the error's kind and the field at fault, never the error's text (see the module doc).
pub(crate) fn request_refused(e: &Error) {
    let (kind, field) = refusal(e);
    tracing::warn!(kind, field, "request refused");
}

/// A reload left a running request's own rules (`what`: `overrides`, `policy rules`) or its
/// profile outside the new config: they no longer apply, and its steps go on without them.
pub(crate) fn request_rules_dropped(what: &'static str, e: &Error) {
    let (kind, field) = refusal(e);
    tracing::warn!(
        what,
        kind,
        field,
        "a running request's rules dropped after a reload"
    );
}

/// An error at hook `hook` of a step (`kind` as in `tiller_errors_total`), throttled per kind.
pub(crate) fn hook_error(kind: &'static str, hook: &str, e: &Error) {
    static SHAPE: Throttle = Throttle::new();
    static UNKNOWN_HOOK: Throttle = Throttle::new();
    static OTHER: Throttle = Throttle::new();
    let throttle = match kind {
        "shape" => &SHAPE,
        "unknown_hook" => &UNKNOWN_HOOK,
        _ => &OTHER,
    };
    // Hook names and shapes come from the host's code and the config, not from a request.
    if let Some(suppressed) = throttle.admit() {
        tracing::warn!(kind, hook, suppressed, error = %e, "hook call failed");
    }
}

/// ONNX Runtime failed to encode a step's activations with dictionary `dictionary`, throttled.
pub(crate) fn encode_failed(dictionary: &str, e: &Error) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.admit() {
        tracing::warn!(kind = "encode", dictionary, suppressed, error = %e, "encode failed");
    }
}

/// A step named a request id that is not running (the host's bookkeeping, not a client's input).
pub(crate) fn unknown_request(id: u64) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.admit() {
        tracing::warn!(
            kind = "unknown_request",
            request = id,
            suppressed,
            "request was never begun or has ended"
        );
    }
}

/// The key an error message of the config's form "`key`: why" starts with.
fn leading_key(message: &str) -> Option<&str> {
    let rest = message.strip_prefix('`')?;
    let (key, after) = rest.split_once('`')?;
    after.starts_with(':').then_some(key)
}

/// The kind of a request's error and the field at fault, the field built only of the names in
/// [`REQUEST_FIELDS`] and indices.
fn refusal(e: &Error) -> (&'static str, Option<String>) {
    let known = |k: &str| REQUEST_FIELDS.iter().copied().find(|f| *f == k);
    match e {
        Error::Override { field, .. } => ("override", field_path(field)),
        Error::Unknown { what, .. } => ("unknown", Some((*what).to_string())),
        Error::Invalid { what, message } => {
            let field = leading_key(message).and_then(known).or_else(|| {
                if what.starts_with("rule") {
                    Some("steer")
                } else if what == "request overrides" {
                    Some("overrides")
                } else {
                    None
                }
            });
            ("invalid", field.map(str::to_string))
        }
        Error::Config { message, .. } => (
            "config",
            leading_key(message).and_then(known).map(str::to_string),
        ),
        Error::Tensor { .. } => ("tensor", None),
        Error::Io { .. } => ("io", None),
        _ => ("other", None),
    }
}

/// A path into a request's overrides (`steer[3].strength`) rebuilt from the fixed field names
/// and the indices; it stops at the first part that is neither (a key the client made up), which
/// shows as `?`. `None` for an empty path (the whole text).
fn field_path(path: &str) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (i, part) in path.split('.').enumerate() {
        let (name, indices) = part.split_at(part.find('[').unwrap_or(part.len()));
        let indices_ok = indices.split_inclusive(']').all(|ix| {
            ix.len() > 2
                && ix.starts_with('[')
                && ix.ends_with(']')
                && ix[1..ix.len() - 1].bytes().all(|b| b.is_ascii_digit())
        });
        let Some(name) = REQUEST_FIELDS.iter().find(|f| **f == name) else {
            out.push_str(if i == 0 { "?" } else { ".?" });
            break;
        };
        if i > 0 {
            out.push('.');
        }
        out.push_str(name);
        if !indices_ok {
            out.push_str("[?]");
            break;
        }
        out.push_str(indices);
    }
    Some(out)
}

/// The time since the first throttled event of the process.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Lets one event through per [`THROTTLE_MS`] and counts the others.
#[derive(Debug)]
pub(crate) struct Throttle {
    /// When the last event went through, plus one (0: never).
    last: AtomicU64,
    /// Events held back since then.
    held: AtomicU64,
}

impl Throttle {
    /// A throttle that lets its first event through.
    pub(crate) const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(events held back since the last one through)` when this event may be logged.
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms() + 1)
    }

    /// [`Throttle::admit`] at `now` (milliseconds, from 1).
    fn admit_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= THROTTLE_MS;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_key_reads_the_config_form_only() {
        assert_eq!(leading_key("`strength`: is NaN"), Some("strength"));
        assert_eq!(leading_key("`strength` is NaN"), None);
        assert_eq!(leading_key("unknown field `x`: no"), None);
    }

    #[test]
    fn refusals_name_only_fixed_fields() {
        let some = |s: &str| Some(s.to_string());
        let e = Error::invalid("request overrides", "`sk-secret`: unknown field");
        assert_eq!(refusal(&e), ("invalid", some("overrides")));
        let e = Error::invalid("rule 0 of `request-7`", "`strength`: is not finite");
        assert_eq!(refusal(&e), ("invalid", some("strength")));
        let e = Error::invalid("rule `sk-secret`", "feature 9 is out of range");
        assert_eq!(refusal(&e), ("invalid", some("steer")));
        let over = |field: &str| Error::Override {
            field: field.into(),
            message: "sk-secret".into(),
        };
        assert_eq!(
            refusal(&over("steer[3].strength")),
            ("override", some("steer[3].strength"))
        );
        assert_eq!(refusal(&over("replace")), ("override", some("replace")));
        assert_eq!(refusal(&over("")), ("override", None));
        assert_eq!(
            refusal(&over("steer[0].sk-secret")),
            ("override", some("steer[0].?"))
        );
        assert_eq!(refusal(&over("sk-secret.op")), ("override", some("?")));
        assert_eq!(
            refusal(&over("steer[sk-secret].op")),
            ("override", some("steer[?]"))
        );
        assert_eq!(refusal(&over("steer[]")), ("override", some("steer[?]")));
        let e = Error::io("/etc/sk-secret", std::io::Error::other("no"));
        assert_eq!(refusal(&e), ("io", None));
    }

    #[test]
    fn throttle_lets_one_through_per_window_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.admit_at(5), Some(0));
        assert_eq!(t.admit_at(6), None);
        assert_eq!(t.admit_at(5 + THROTTLE_MS - 1), None);
        assert_eq!(t.admit_at(5 + THROTTLE_MS), Some(2));
        assert_eq!(t.admit_at(5 + THROTTLE_MS + 1), None);
        assert_eq!(t.admit_at(5 + 3 * THROTTLE_MS), Some(1));
    }
}
