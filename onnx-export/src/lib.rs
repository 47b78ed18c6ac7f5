//! The offline side of Tiller: import dictionaries trained elsewhere, inspect and run them.
//!
//! The binary `tiller-export` wraps these modules; its commands are in docs/cli.md.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod dashboard;
mod error;
pub mod import;
pub mod npy;
pub mod probe;
pub mod slice;
pub mod tensors;
pub mod torch;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
// The formats were modules of the crate root before they moved under `import`.
pub use import::{
    circuit_tracer, dictionary_learning, gemma_scope, goodfire, llama_scope, openai, saelens,
    sparsify, steering_vectors,
};
