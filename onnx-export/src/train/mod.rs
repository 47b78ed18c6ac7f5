//! `tiller-export train`: sparse autoencoders, transcoders, skip transcoders and crosscoders with
//! ReLU, TopK, BatchTopK or JumpReLU activations, trained on the CPU from streamed activations.
//!
//! The pieces: [`data`] streams shards through a shuffle buffer; [`model`] holds the forward and
//! backward passes of every kind and activation; [`optim`] is Adam with its schedules;
//! [`checkpoint`] saves and restores a run bit for bit; [`export`] writes the ONNX dictionary and a
//! SAELens folder; [`report`] is the JSON report. [`train`] runs the whole thing; [`Trainer`] is
//! one step of it on batches already in memory (the benchmark uses it).
//!
//! Every random choice derives from `--seed` and a counter, every parallel sum runs in a fixed
//! order, and the checkpoint holds the whole state: the same seed gives the same weights, bit for
//! bit, whether or not the run was interrupted and resumed.
//!
//! The run itself is split by noun: [`config`] is what it is asked to do, `plan` checks that
//! against the data, `measure` reads the data to set up and to evaluate, [`trainer`] is one
//! step, `run` the whole loop.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod export;
mod measure;
pub mod model;
pub mod norm;
pub mod optim;
mod plan;
pub mod report;
mod run;
pub mod shard;
pub mod trainer;

pub use config::{BDecInit, TrainConfig, default_sparsity};
pub use run::{Control, Finished, Outcome, encode_raw, train};
pub use trainer::{Hyper, Trainer, init_params};
