//! longtake-worker: a process that owns local devices, forms tensor-parallel groups, loads models
//! from `longtake-model`, executes the window tasks the coordinator hands out and exchanges halos.
//!
//! # Layout
//!
//! - [`media`]: decoded frames to H.264/MP4 and PNG.

pub mod media;
pub use longtake_model as model;
