//! Helpers the Tiller crates' integration tests share (a dev-dependency only): seeded normal
//! matrices, dictionaries written to a folder, error measures, a GGUF control-vector writer, the Python the reference scripts run
//! with. Helpers that belong to one crate's tests stay in that crate's `tests/common` or
//! `tests/support`.
#![allow(clippy::unwrap_used)]

mod dictionary;
mod error;
mod gguf;
mod python;
mod random;

pub use dictionary::write_dictionary;
pub use error::rel_err;
pub use gguf::write_gguf;
pub use python::{python, run_python_json};
pub use random::{randn, randn_around, randn_seeded};
