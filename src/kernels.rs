//! `longtake kernels`: compile every CUDA kernel module with NVRTC, without a GPU.
//!
//! Writes one PTX file per module and architecture (for `ptxas`, or to ship with a binary) and
//! prints what was compiled. A GPU machine compiles for its own architecture at start-up and
//! caches the result; this command is how a CPU machine checks that every kernel compiles.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use longtake_model::backend::cuda::nvrtc;

#[derive(Args)]
pub struct KernelsArgs {
    /// NVRTC architectures, comma-separated (compute_80, compute_86, compute_87, compute_89,
    /// compute_90, compute_100, compute_120).
    #[arg(long, value_delimiter = ',', default_value = "compute_80,compute_90")]
    arch: Vec<String>,
    /// Directory for the PTX files (`<module>-<arch>.ptx`); without it, only compile.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: &KernelsArgs) -> Result<()> {
    let arches: Vec<&'static str> = a
        .arch
        .iter()
        .map(|want| {
            nvrtc::ARCHES
                .iter()
                .find(|(name, _)| name == want)
                .map(|(name, _)| *name)
                .ok_or_else(|| {
                    let allowed: Vec<&str> = nvrtc::ARCHES.iter().map(|(n, _)| *n).collect();
                    anyhow::anyhow!(
                        "--arch: unknown architecture {want:?}; allowed: {}",
                        allowed.join(", ")
                    )
                })
        })
        .collect::<Result<_>>()?;
    if arches.is_empty() {
        bail!("--arch: name at least one architecture");
    }
    let (major, minor) = nvrtc::nvrtc_version().map_err(anyhow::Error::msg)?;
    if let Some(d) = &a.out {
        std::fs::create_dir_all(d).with_context(|| format!("--out {}", d.display()))?;
    }
    eprintln!("NVRTC {major}.{minor}");
    let mut failed = Vec::new();
    for arch in &arches {
        for module in nvrtc::modules() {
            let t = Instant::now();
            match nvrtc::compile(&module, arch) {
                Ok(ptx) => {
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let entries = nvrtc::Module::entries(&ptx);
                    out!(
                        "{arch} {:<14} {:>3} kernels {:>8} bytes of PTX {ms:>7.0} ms",
                        module.name,
                        entries.len(),
                        ptx.len()
                    );
                    if let Some(d) = &a.out {
                        let path = d.join(format!("{}-{arch}.ptx", module.name));
                        std::fs::write(&path, ptx)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    failed.push(format!("{} for {arch}", module.name));
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} module(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
