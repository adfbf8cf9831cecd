//! `--device` and `--precision`, shared by every command that computes.

use anyhow::{Context, Result};
use clap::Args;
use longtake_model::backend::cuda::{Cuda, Precision};
use longtake_model::device::{DeviceSpec, Placement, resolve};

#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where to compute: `cpu`, `cuda` (every GPU), `cuda:N` or `cuda:N,M,…` (GPU ordinals).
    /// Default: the GPUs when the machine has any, else the CPU.
    #[arg(long, env = "LONGTAKE_DEVICE")]
    pub device: Option<DeviceSpec>,
    /// Attention arithmetic on GPUs: `bf16` (tensor cores, f32 accumulation) or `f32` (exact,
    /// slower). Linear layers follow the weights' storage type either way; the CPU is always f32.
    #[arg(long, default_value = "bf16", value_parser = parse_precision, env = "LONGTAKE_PRECISION")]
    pub precision: Precision,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    Precision::parse(s).ok_or_else(|| format!("unknown precision {s:?}; allowed: bf16, f32"))
}

impl DeviceArgs {
    /// The devices this machine gives for the request, or an error naming what is missing.
    pub fn placement(&self) -> Result<Placement> {
        resolve(self.device.as_ref()).context("--device")
    }

    /// Open GPUs `ids` in this precision, logging each.
    pub fn open_gpus(&self, ids: &[usize]) -> Result<Vec<Cuda>> {
        ids.iter()
            .map(|id| {
                let gpu = Cuda::new(*id, self.precision).context("--device")?;
                tracing::info!(gpu = %format!("cuda:{id}"), name = gpu.device_name(), "using GPU");
                Ok(gpu)
            })
            .collect()
    }
}
