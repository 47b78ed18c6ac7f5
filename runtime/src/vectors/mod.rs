//! Raw steering directions written by other tools: llama.cpp / repeng control vectors (GGUF) and
//! NumPy `.npy` arrays. These feed the `vector` steering op
//! (docs/design.md#4-steering-edits-that-keep-the-dictionarys-error-term).
//!
//! Both readers treat the file as hostile (docs/design.md#10-bad-input): every count, length,
//! offset and shape is checked against the bytes that are actually left in the file before anything
//! is allocated or read, and every failure is an [`Error::Invalid`](crate::Error::Invalid) that
//! names the file and what was wrong in it.
//!
//! # Layer indices in control vectors
//!
//! A control vector holds one tensor `direction.{N}` per steered layer. [`ControlVector`] keeps
//! `N` exactly as the file spells it. What llama.cpp does with it:
//! - `common_control_vector_load_one` refuses `N = 0` and stores `direction.N` at row `N - 1` of
//!   a flat `n_embd`-wide buffer ("do not store data for layer 0").
//! - `llama_adapter_cvec::apply` fills the vector of block `il` (0-based, `il = 1..n_layer`) from
//!   row `il - 1` of that buffer, and every model graph adds it to that block's output
//!   (`build_cvec(cur, il)` right before `l_out`).
//!
//! The two shifts cancel: `direction.N` is added to the residual stream after block `N`
//! (0-based), i.e. Hugging Face's `hidden_states[N + 1]`. The first block's output (N = 0) can
//! never be steered, and `N >= n_layer` is silently ignored by llama.cpp. repeng numbers the same
//! way: its layer ids index `model.layers` and it trains on `hidden_states[layer + 1]`.
//!
//! Where this reader differs from llama.cpp, it is stricter or documents why: F16 directions are
//! accepted (llama.cpp takes F32 only), two tensors naming the same layer (`direction.3` and
//! `direction.03`) are an error (llama.cpp sums them), non-finite values are an error, and
//! `controlvector.layer_count` is read past but not trusted, because writers disagree on it
//! (repeng writes the number of directions, others the model's layer count) and llama.cpp
//! ignores it.
//!
//! The module holds the [`ControlVector`] type (`control_vector`), the GGUF reader (`gguf`) and
//! the `.npy` reader (`npy`, over the project's one `.npy` reader, [`crate::npy`]).

mod control_vector;
mod gguf;
mod npy;

pub use control_vector::ControlVector;
pub use gguf::read_gguf_control_vector;
pub use npy::read_npy_vectors;
