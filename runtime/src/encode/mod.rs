//! The encode backends a dictionary runs on, chosen once when the runtime's state is built
//! (`host::backend`): ONNX Runtime sessions ([`session`], the loaded
//! [`Dictionary`](crate::Dictionary)), the native encoders that run without ONNX Runtime's
//! per-call overhead ([`native`]), and the packed-panel kernels they share ([`kernels`]).

pub(crate) mod kernels;
pub(crate) mod native;
pub(crate) mod session;
