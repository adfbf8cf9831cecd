//! longtake-worker: a process that owns local devices, loads models from `longtake-model`,
//! executes the window tasks the coordinator hands out and exchanges halos.
//!
//! # Layout
//!
//! - [`runtime`]: register, heartbeat, pull tasks and hand them to the compute thread.
//! - `compute`: the compute thread: denoise and decode tasks on the worker's devices, results
//!   and progress reported.
//! - [`media`]: decoded frames to H.264/MP4 and PNG.

mod compute;
pub mod media;
pub mod runtime;
pub use longtake_model as model;
pub use runtime::{
    Exit, WorkerBackend, WorkerError, WorkerMetrics, WorkerOptions, noise_layout_from_pb,
    noise_layout_to_pb, run, stitching_from_pb, stitching_to_pb,
};
