//! Reading safetensors checkpoints with every shape and dtype checked: the header reader shared
//! by every importer and the trainer's activation shards ([`Header`]), and the tensors of one
//! file read on demand as float32 ([`TensorFile`]), and the lookup every container offers
//! ([`Tensors`]).

mod container;
mod file;
mod header;

pub use container::Tensors;
pub use file::TensorFile;
pub use header::Header;
