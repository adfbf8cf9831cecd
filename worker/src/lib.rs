//! longtake-worker: a process that owns local devices, forms tensor-parallel groups, loads models
//! from `longtake-model`, executes the window tasks the coordinator hands out and exchanges halos.
//!
//! Only the crate boundary exists so far; the model it will drive lives in `longtake-model`.
pub use longtake_model as model;
