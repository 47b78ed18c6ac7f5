//! The offline side of Tiller: import dictionaries trained elsewhere, inspect and run them.
//!
//! The binary `tiller-export` wraps these modules; see the README for its commands.
#![deny(missing_docs)]

pub mod circuit_tracer;
pub mod dashboard;
pub mod dictionary_learning;
mod error;
pub mod gemma_scope;
pub mod goodfire;
pub mod import;
pub mod llama_scope;
pub mod npy;
pub mod openai;
pub mod probe;
pub mod saelens;
pub mod slice;
pub mod sparsify;
pub mod steering_vectors;
pub mod tensors;
pub mod torch;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
