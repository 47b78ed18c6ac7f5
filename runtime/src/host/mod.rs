//! The host-facing runtime (docs/design.md#5-the-runtime): requests, forward steps, hooks,
//! monitors, steering, metrics, reloads.

mod activations;
mod backend;
mod buffers;
mod build;
mod edit;
mod features;
mod handle;
mod hook;
mod monitor;
mod policies;
mod report;
mod request;
mod requests;
mod rules;
mod sampling;
mod state;
mod step;
mod token;

pub use activations::ActivationsMut;
pub use handle::Runtime;
pub use report::{Event, FeatureStats, RequestSummary, StepResult};
pub use step::Step;
pub use token::{Phase, Token};
