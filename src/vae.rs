//! `longtake model vae-decode` and `longtake bench vae`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use longtake_model::comm::Comm;
use longtake_model::io::{SafetensorsFile, write_f32};
use longtake_model::pipeline::PipelineBackend;
use longtake_model::tp::{RankJob, run_job};
use longtake_model::vae::WanVaeDecoder;

use crate::device::DeviceArgs;

#[derive(Args)]
pub struct VaeDecodeArgs {
    /// A diffusers `vae/` directory (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    vae: PathBuf,
    /// Safetensors file holding `latents` [B,16,T,h,w] as passed to `AutoencoderKLWan.decode`.
    #[arg(long)]
    input: PathBuf,
    /// Safetensors file that receives `sample` [B,3,F,H,W] (f32, in [−1, 1]); written atomically.
    #[arg(long)]
    output: PathBuf,
    /// Latent frames decoded per step of the stream (memory grows with it; the result does not
    /// change).
    #[arg(long, default_value_t = 1)]
    chunk: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct BenchVaeArgs {
    /// A diffusers `vae/` directory.
    #[arg(long)]
    vae: PathBuf,
    /// Safetensors file holding `latents` [B,16,T,h,w].
    #[arg(long)]
    input: PathBuf,
    /// Timed decodes after one warm-up.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Latent frames per step of the stream.
    #[arg(long, default_value_t = 1)]
    chunk: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

fn read_latents(path: &Path) -> Result<([usize; 5], Vec<f32>)> {
    let (shape, data) = SafetensorsFile::open(path)?.read_f32("latents")?;
    let Ok(shape) = <[usize; 5]>::try_from(shape.as_slice()) else {
        bail!(
            "input `latents`: shape {shape:?}; expected [batch, channels, frames, height, width]"
        );
    };
    Ok((shape, data))
}

fn check_chunk(chunk: usize) -> Result<()> {
    if chunk == 0 {
        bail!("--chunk must be at least 1 (latent frames per decoding step)");
    }
    Ok(())
}

/// Decode once (`iters` 0: the video is returned), or time `iters` decodes after a warm-up
/// (frames dropped as they come: decoding alone, in bounded memory).
struct VaeJob<'a> {
    vae: &'a Path,
    shape: [usize; 5],
    latents: &'a [f32],
    chunk: usize,
    iters: usize,
}

impl RankJob for VaeJob<'_> {
    type Output = (Vec<usize>, Vec<f32>, Vec<f64>);

    fn run<B: PipelineBackend>(
        &self,
        backend: &B,
        _comm: &dyn Comm<B>,
    ) -> longtake_model::Result<Self::Output> {
        let vae = WanVaeDecoder::load(self.vae, backend)?;
        if self.iters == 0 {
            let (shape, video) = vae.decode_all(self.latents, self.shape, self.chunk)?;
            return Ok((shape, video, Vec::new()));
        }
        let [b, c, t, h, w] = self.shape;
        let per_item = c * t * h * w;
        let mut times = Vec::with_capacity(self.iters);
        for i in 0..=self.iters {
            let start = Instant::now();
            for bi in 0..b {
                let item = self
                    .latents
                    .get(bi * per_item..(bi + 1) * per_item)
                    .unwrap_or(&[]);
                vae.decode_stream(item, [c, t, h, w], self.chunk, |_| Ok(()))?;
            }
            backend.synchronize()?;
            if i > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok((Vec::new(), Vec::new(), times))
    }
}

pub fn decode(a: &VaeDecodeArgs) -> Result<()> {
    check_chunk(a.chunk)?;
    let placement = a.device.placement()?;
    let (shape, latents) = read_latents(&a.input)?;
    let start = Instant::now();
    let job = VaeJob {
        vae: &a.vae,
        shape,
        latents: &latents,
        chunk: a.chunk,
        iters: 0,
    };
    let (out_shape, video, _) = run_job(&placement, 1, a.device.precision, &job)?;
    write_f32(&a.output, &[("sample", &out_shape, &video)])?;
    eprintln!(
        "wrote {} (sample {out_shape:?}) on {placement} in {:.1} ms including loading",
        a.output.display(),
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

pub fn bench(a: &BenchVaeArgs) -> Result<()> {
    check_chunk(a.chunk)?;
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let placement = a.device.placement()?;
    let (shape, latents) = read_latents(&a.input)?;
    let job = VaeJob {
        vae: &a.vae,
        shape,
        latents: &latents,
        chunk: a.chunk,
        iters: a.iters,
    };
    let (_, _, mut times) = run_job(&placement, 1, a.device.precision, &job)?;
    eprintln!(
        "vae decode of latents {shape:?}, chunk {}, on {placement}, {} CPU threads; times (ms): {}",
        a.chunk,
        rayon::current_num_threads(),
        times
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    times.sort_by(f64::total_cmp);
    out!("vae_ms={:.2}", times[times.len() / 2]);
    Ok(())
}
