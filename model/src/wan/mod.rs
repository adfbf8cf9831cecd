//! Wan2.1 (diffusers layout): the diffusion transformer and its configuration.

mod config;
mod rope;
mod transformer;

pub use config::WanConfig;
pub use rope::RopeTables;
pub use transformer::{DitInputs, TextContext, WanTransformer, timestep_embedding};
