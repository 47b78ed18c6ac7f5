//! The dictionary file, format v1 (docs/design.md#2-the-dictionary-file-format-v1): metadata,
//! weights, the graph built from them, the reader that validates a file, and the float64 reference
//! maths.

mod build;
mod file;
mod linear;
mod meta;
pub mod reference;

pub use build::{
    Gated, Weights, build_model, build_model_as, write_dictionary, write_dictionary_as,
    write_dictionary_with,
};
pub use file::DictionaryFile;
pub use linear::{probe_dictionary, vector_dictionary};
pub use meta::{
    Activation, FORMAT_VERSION, InputNorm, Kind, LAYER_NORM_EPS, Meta, WeightDtype, parse_labels,
    split_hooks,
};
