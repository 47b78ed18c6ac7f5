//! Recognising checkpoint formats and writing them as Tiller dictionaries.
//!
//! One module per format, registered in the `formats!` table ([`Format`]); [`read_all`] picks the
//! format and reads every dictionary a checkpoint holds, [`write()`] stores one as ONNX. The
//! folder walking the folder-based formats share lives in `discover`, below the formats.

pub mod circuit_tracer;
pub mod dictionary_learning;
pub(crate) mod discover;
mod format;
pub mod gemma_scope;
pub mod goodfire;
pub(crate) mod imported;
pub mod llama_scope;
pub mod openai;
pub mod saelens;
pub mod sparsify;
pub mod steering_vectors;
pub(crate) mod write;

pub use format::{Format, detect, read, read_all};
pub use imported::{ImportOptions, Imported};
pub use write::{output_path, write, write_as};
