//! `torch.save` checkpoints, read without Python.
//!
//! Since PyTorch 1.6 `torch.save` writes a zip archive: `<name>/data.pkl` (a pickle of the saved
//! object), one `<name>/data/<key>` member per storage (raw elements in the order of
//! `<name>/byteorder`), and bookkeeping records (`<name>/version`, `.format_version`, …). The
//! pickle names each storage by a persistent id `('storage', torch.FloatStorage, key, location,
//! numel)` and rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size,
//! stride, …)`.
//!
//! The pickle is run here by a small machine that knows the opcodes state dicts and plain configs
//! use (protocols 2 to 5, and the common protocol 0/1 ones) and an allow-list of globals:
//! `collections.OrderedDict`, the tensor rebuild functions of `torch._utils` and `torch._tensor`,
//! the storage classes, the dtypes, `torch.Tensor` and `torch.nn.parameter.Parameter`. Any other
//! global is refused as soon as the pickle names it, and only allow-listed functions are ever
//! applied, so a checkpoint cannot run code. Legacy (pre-1.6) and bare pickle files are refused
//! with a message saying how to re-save them.
//!
//! [`load`] reads and checks the pickle; each tensor is read from the archive when it is taken,
//! converted to float32 (or int64) as it streams in, in the axis order asked for:
//!
//! ```no_run
//! # fn main() -> tiller_export::Result<()> {
//! let mut ck = tiller_export::torch::load(std::path::Path::new("ae.pt"))?;
//! // An `nn.Linear(2304, 16384)` weight, `[16384, 2304]`, read as the `[2304, 16384]` of `x · W`.
//! let w_enc = ck.take2_transposed("encoder.weight", 16384, 2304)?;
//! let k = ck.int("k")?;
//! # Ok(()) }
//! ```
//!
//! Every size read from the file is checked against the data before anything is allocated: the
//! archive's declared member sizes against the file size ([`MAX_COMPRESSION_RATIO`]) and an
//! absolute cap ([`MAX_TOTAL_BYTES`]); each member is read through a limit, so a header that lies
//! cannot make the reader allocate without bound; every length and count in the pickle against the
//! bytes that remain, with caps on its size, operations and nesting; every tensor's extent against
//! its storage.
mod archive;
mod checkpoint;
mod dtype;
mod elements;
mod flatten;
mod limits;
mod objects;
mod pickle;

pub use checkpoint::{Checkpoint, TensorInfo, is_archive, load};
pub use dtype::Dtype;
pub use limits::{MAX_COMPRESSION_RATIO, MAX_MEMBERS, MAX_PICKLE_BYTES, MAX_TOTAL_BYTES};
