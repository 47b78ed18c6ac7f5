//! # Tiller
//!
//! Tiller is a runtime that an LLM inference server embeds in its own process to read
//! sparse-dictionary features (sparse autoencoders, transcoders, crosscoders) out of the model's
//! activations and to steer the model by editing those activations in place. Dictionaries are ONNX
//! files (format v1, see [`dictionary`]) run by ONNX Runtime. Linear probes ([`Kind::Probe`],
//! read-outs with no decoder) and raw steering directions ([`Kind::Vector`], e.g. a
//! difference-in-means direction) are dictionaries too: monitored and exported like features,
//! and (directions only) steered with.
//!
//! ```no_run
//! use tiller_runtime::{Dictionary, SessionOptions};
//! # fn main() -> tiller_runtime::Result<()> {
//! let dict = Dictionary::load("res12.onnx", &SessionOptions::default())?;
//! let x = ndarray::Array2::<f32>::zeros((4, dict.meta().d_in));
//! let encoded = dict.encode(x.view())?;
//! println!("{} features per token", encoded.acts.ncols());
//! # Ok(())
//! # }
//! ```
//!
//! Core concepts and their costs:
//! - [`DictionaryFile`]: a validated dictionary file; parsing it reads the whole file once.
//! - [`Dictionary`]: ONNX Runtime sessions over one dictionary; building one costs milliseconds
//!   to seconds (weights are prepacked), a call costs microseconds. Share it between threads.
//!   With [`SessionOptions::native`] it encodes natively instead where it can ([`Backend`]):
//!   `W_enc` packed for streaming at its stored width (f32, f16 or bf16), as the [`Runtime`]'s
//!   hooks do.
//! - [`onnxruntime`]: loads ONNX Runtime once per process, downloading the pinned wheel from PyPI
//!   into a cache on first use.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod config;
pub mod dictionary;
mod encode;
mod error;
mod fvu;
pub mod graph;
mod host;
mod logging;
pub mod metrics;
pub mod npy;
pub mod onnxruntime;
mod overrides;
pub mod policy;
mod service;
pub mod steering;
pub mod vectors;

pub use dictionary::{Activation, DictionaryFile, InputNorm, Kind, Meta, Weights};
pub use encode::session::{Backend, Dictionary, Encoded, SessionOptions};
pub use error::{Error, Result};
pub use host::{
    ActivationsMut, Event, FeatureStats, Phase, RequestSummary, Runtime, Step, StepResult, Token,
};
pub use service::Service;

/// The Rust examples of `README.md`, compiled as doctests so that they follow the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;

/// The Rust examples of `docs/runtime.md`, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/runtime.md")]
struct RuntimeGuideExamples;
