//! longtake-model: tensors, backends, collectives, the Wan2.1 diffusion transformer, samplers and
//! checkpoint loading. It knows nothing of gRPC, async runtimes, etcd or object storage.
//!
//! # Layout
//!
//! - [`backend`]: the [`Backend`](backend::Backend) seam (device-resident tensors and model-level
//!   ops), the CPU reference backend and the CUDA backend.
//! - [`device`]: `--device cpu | cuda | cuda:N,…` and the default (the GPUs when present).
//! - [`comm`]: the [`Comm`](comm::Comm) collectives interface and its CPU implementation across
//!   threads, for tensor parallelism.
//! - [`io`]: memory-mapped safetensors, diffusers checkpoint directories, per-rank shards.
//! - [`config`]: JSON config reading with errors that name the key.
//! - [`wan`]: the Wan2.1 transformer (`WanTransformer3DModel`).
//! - [`sched`]: the flow-matching samplers (UniPC, Euler).
//! - [`builtin`]: the models compiled into the binary (`builtin:demo`, the default, and the
//!   random-weight `builtin:smoke` for tests).
//! - [`tp`]: running a tensor-parallel group of ranks on threads (CPU ranks, or GPUs over NCCL);
//!   [`group`]: a tensor-parallel transformer driven from one thread (the worker's `--tp`).
//! - [`umt5`]: the UMT5 text encoder; [`text`]: prompt cleaning, tokenizing and encoding.
//! - [`vae`]: the Wan2.1 video autoencoder (streaming causal decoder).
//! - [`noise`]: counter-based initial noise keyed by (seed, frame, channel, row, column).
//! - [`pipeline`]: the single-clip text-to-video pipeline over a diffusers model directory.
//! - [`window`]: denoising long sequences as overlapping windows (co-denoising, independent,
//!   autoregressive).

pub mod backend;
pub mod builtin;
pub mod comm;
pub mod config;
pub mod device;
pub mod dtype;
pub mod error;
pub mod group;
pub mod io;
pub mod noise;
pub mod pipeline;
pub mod sched;
pub mod text;
pub mod tp;
pub mod umt5;
pub mod vae;
pub mod wan;
pub mod window;

pub use error::{Error, Result};
