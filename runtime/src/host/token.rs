//! The tokens of a forward step: which request each belongs to, and its phase.

use serde::Serialize;

/// Whether a token belongs to the prompt or was generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A prompt token (prefill).
    Prompt,
    /// A generated token (decode).
    Generated,
}

/// One token of a forward step: the request it belongs to and its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The request id given to [`crate::Runtime::begin_request`].
    pub request: u64,
    /// Prompt or generated.
    pub phase: Phase,
}
