//! The subcommands of `tiller-export`, one module each.

mod dashboard;
mod diffmeans;
mod encode;
mod import;
mod inspect;
mod replay;
mod setup;
mod slice;
mod train;
mod train_probe;
mod verify;

use anyhow::Result;
use clap::Subcommand;

/// A subcommand.
#[derive(Subcommand)]
pub enum Command {
    /// Convert a checkpoint (SAELens, sparsify, Gemma Scope, …) into a Tiller dictionary (.onnx).
    Import(import::ImportArgs),
    /// Print what a dictionary is: kind, activation, sizes, hooks, source, exactness, opset.
    Inspect(inspect::InspectArgs),
    /// Encode activations from a .npy file through the runtime.
    Encode(encode::EncodeArgs),
    /// Dry-run a config: run recorded activations through the runtime as one request at one hook,
    /// and write the steered activations, the metrics text and the request summary.
    Replay(replay::ReplayArgs),
    /// Compare a dictionary, run by the runtime, with the reference maths on its source checkpoint.
    Verify(verify::VerifyArgs),
    /// Keep only some features of a dictionary (exact for ReLU, JumpReLU, Gated; TopK is calibrated).
    Slice(slice::SliceArgs),
    /// Download ONNX Runtime into the cache (done on first use otherwise) and print its path.
    Setup,
    /// Write a static HTML page (and JSON beside it) showing what features fire on, from a folder
    /// of activation shards with their tokens.
    Dashboard(dashboard::DashboardArgs),
    /// Train an SAE, transcoder, skip transcoder or crosscoder on activations (.npy/.safetensors).
    Train(Box<train::TrainArgs>),
    /// Train a linear probe (L2-penalised logistic regression) on activations and 0/1 labels.
    TrainProbe(Box<train_probe::TrainProbeArgs>),
    /// Write the unit difference-in-means direction of two sets of activations as a `vector`
    /// dictionary (for the `vector` and `project_cap` ops and projection monitors).
    Diffmeans(diffmeans::DiffmeansArgs),
}

/// Runs `command`.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Import(a) => a.run(),
        Command::Inspect(a) => a.run(),
        Command::Encode(a) => a.run(),
        Command::Replay(a) => a.run(),
        Command::Verify(a) => a.run(),
        Command::Slice(a) => a.run(),
        Command::Setup => setup::run(),
        Command::Dashboard(a) => a.run(),
        Command::Train(a) => a.run(),
        Command::TrainProbe(a) => a.run(),
        Command::Diffmeans(a) => a.run(),
    }
}
