//! longtake-model: tensors, backends, collectives, the Wan2.1 diffusion transformer, samplers and
//! checkpoint loading. It knows nothing of gRPC, async runtimes, etcd or object storage.
//!
//! # Layout
//!
//! - [`backend`]: the [`Backend`](backend::Backend) seam (device-resident tensors and model-level
//!   ops) and the CPU reference backend.
//! - [`comm`]: the [`Comm`](comm::Comm) collectives interface and its CPU implementation across
//!   threads, for tensor parallelism.
//! - [`io`]: memory-mapped safetensors, diffusers checkpoint directories, per-rank shards.
//! - [`config`]: JSON config reading with errors that name the key.
//! - [`wan`]: the Wan2.1 transformer (`WanTransformer3DModel`).
//! - [`sched`]: the flow-matching samplers (UniPC, Euler).
//! - [`tp`]: running a tensor-parallel group of CPU ranks on threads.

pub mod backend;
pub mod comm;
pub mod config;
pub mod dtype;
pub mod error;
pub mod io;
pub mod sched;
pub mod tp;
pub mod wan;

pub use error::{Error, Result};
