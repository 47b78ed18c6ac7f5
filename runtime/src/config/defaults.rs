//! Serde defaults shared by several tables.

/// `1`: one thread, one session, one instance, one token.
pub(super) fn one() -> usize {
    1
}
