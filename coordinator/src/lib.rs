//! longtake-coordinator: the gRPC API, request validation, window planning, scheduling, job state
//! and output assembly. It depends on `longtake-proto` only and never links the model.
//!
//! # Layout
//!
//! - [`plan`]: the window plan and fusion weights (pure).

pub mod plan;
