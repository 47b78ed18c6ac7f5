//! The dictionary being trained: its parameters, the forward pass of every activation and kind,
//! the losses, and their gradients.
//!
//! One step computes, for a batch `x` (`[B, width_in]`, already normalised) and a target `y`
//! (`[B, width_out]`; `x` itself for SAEs and crosscoders):
//!
//! ```text
//! x'  = x - b_dec·[apply_b_dec_to_input]
//! pre = x' W_enc + b_enc
//! f   = act(pre)                       relu | topk | batchtopk | jumprelu
//! ŷ   = f W_dec + b_dec (+ x W_skipᵀ)
//! L   = (1/B) Σ_b ‖ŷ_b - y_b‖² + sparsity + auxiliary
//! ```
//!
//! - ReLU (Anthropic, April 2024 update): sparsity `λ/B Σ_b Σ_i f_bi ‖W_dec,i‖`; crosscoders
//!   weight by the sum of the per-layer norms, `Σ_l ‖W_dec,l,i‖`.
//! - JumpReLU (Rajamanoharan et al. 2024): `f = pre·H(pre - θ)`, sparsity `λ/B Σ H(pre - θ)`
//!   (the L0 norm); `θ = exp(log θ)`. The step function has no useful derivative, so `θ` gets the
//!   straight-through pseudo-derivatives with a rectangle kernel `K(u) = 1[|u| < ½]` of bandwidth
//!   `ε`: `∂f/∂θ = -(θ/ε) K((pre-θ)/ε)`, `∂H/∂θ = -(1/ε) K((pre-θ)/ε)`; `pre` gets `H(pre-θ)` from
//!   the JumpReLU and nothing from the L0 term.
//! - TopK (Gao et al. 2024): the k largest pre-activations of each row, ReLU'd. BatchTopK
//!   (Bussmann et al. 2024): the `B·k` largest ReLU'd pre-activations of the whole batch. Both add
//!   the AuxK loss `α/B Σ_b ‖e_b - ê_b‖²`, where `e = y - ŷ` is held constant (no gradient) and
//!   `ê = z W_dec` decodes the `k_aux` largest pre-activations among the dead latents.
//!
//! When the activations are sparse (below [`Workspace::sparse_below`] of the batch's entries,
//! always the case for TopK), everything after the encoder's matrix product works on the active
//! entries only: the decoder's forward and backward passes touch only the active rows of `W_dec`,
//! and the encoder's gradient only the active rows of `W_encᵀ`, as OpenAI's kernels do. Dense
//! activations (early ReLU training) use matrix products instead. Both are deterministic: every
//! sum runs in a fixed order whatever the number of threads.
//!
//! The float type and its kernels are in `real`, the dictionary's shape in `arch`, its
//! parameters in `params`, sparse activations in `sparse`, the choice of active latents in
//! `select`, and the step itself in `step`.

mod arch;
mod params;
mod real;
mod select;
mod sparse;
mod step;

pub use arch::{Arch, DecoderNorm};
pub use params::{PARAM_NAMES, Params, sum_squares};
pub use real::{Real, axpy, dot};
pub use sparse::Csr;
pub use step::{Batch, Coeffs, StepOptions, StepStats, Workspace, encode, step};
