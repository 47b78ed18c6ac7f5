//! The control-vector type: one steering direction per layer.

use std::collections::BTreeMap;

/// A control vector read from a GGUF file: one direction per layer, all of one length.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVector {
    /// `controlvector.model_hint`: the model type the vector was made for, when the file says.
    pub model_hint: Option<String>,
    /// The direction of each layer, keyed by `N` of the tensor `direction.{N}` (1-based; see the
    /// module docs for which block that is).
    pub directions: BTreeMap<usize, Vec<f32>>,
    /// The length of every direction (the model's hidden size).
    pub n_embd: usize,
}
