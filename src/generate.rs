//! `longtake model generate`: one clip through the whole pipeline, no cluster.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use longtake_model::comm::Comm;
use longtake_model::io::{SafetensorsFile, write_f32};
use longtake_model::pipeline::{
    Clip, ClipRequest, ModelDir, PipelineBackend, WanPipeline, latent_shape,
};
use longtake_model::tp::{RankJob, run_job};

use crate::device::DeviceArgs;

#[derive(Args)]
pub struct GenerateArgs {
    /// A diffusers Wan2.1 model directory (model_index.json, transformer/, vae/, text_encoder/,
    /// tokenizer/, scheduler/).
    #[arg(long)]
    model: PathBuf,
    /// What the clip shows.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (default: the empty prompt, as the reference).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Pixel frames; snapped down to the form 4k + 1 as the reference does.
    #[arg(long, default_value_t = 81)]
    num_frames: usize,
    /// Pixel height, a multiple of 16.
    #[arg(long, default_value_t = 480)]
    height: usize,
    /// Pixel width, a multiple of 16.
    #[arg(long, default_value_t = 832)]
    width: usize,
    /// Sampler steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (1 or less: no guidance, one model pass per step).
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
    /// Override the scheduler's flow shift (scheduler_config.json's value otherwise).
    #[arg(long)]
    flow_shift: Option<f64>,
    /// Seed of the counter-based initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Safetensors file with `noise` [1,16,T,h,w]: the initial latents, replacing the seeded
    /// noise (to reproduce a reference run exactly).
    #[arg(long)]
    noise_file: Option<PathBuf>,
    /// Output safetensors: `latents` (final, before de-normalisation) and `video` [1,3,F,H,W]
    /// in [−1, 1]. Written atomically.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

struct GenerateJob<'a> {
    model: &'a std::path::Path,
    req: &'a ClipRequest,
}

impl RankJob for GenerateJob<'_> {
    type Output = Clip;

    fn run<B: PipelineBackend>(
        &self,
        backend: &B,
        comm: &dyn Comm<B>,
    ) -> longtake_model::Result<Clip> {
        let start = Instant::now();
        let pipe = WanPipeline::load(self.model, backend)?;
        eprintln!(
            "loaded {} on {} in {:.1} s",
            self.model.display(),
            backend.name(),
            start.elapsed().as_secs_f64()
        );
        let t0 = Instant::now();
        pipe.generate(comm, self.req, |i, n| {
            eprintln!("step {i}/{n} ({:.1} s)", t0.elapsed().as_secs_f64());
        })
    }
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    let noise = match &a.noise_file {
        Some(p) => Some(
            SafetensorsFile::open(p)?
                .read_f32("noise")
                .with_context(|| format!("--noise-file {}", p.display()))?,
        ),
        None => None,
    };
    let req = ClipRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        num_frames: a.num_frames,
        height: a.height,
        width: a.width,
        steps: a.steps,
        guidance: a.guidance,
        flow_shift: a.flow_shift,
        seed: a.seed,
        noise,
    };
    // Check the directory and the request before loading any weights.
    latent_shape(&ModelDir::open(&a.model)?, &req, &mut Vec::new())?;
    let placement = a.device.placement()?;
    let start = Instant::now();
    let clip = run_job(
        &placement,
        1,
        a.device.precision,
        &GenerateJob {
            model: &a.model,
            req: &req,
        },
    )?;
    for n in &clip.notices {
        eprintln!("note: {n}");
    }
    write_f32(
        &a.output,
        &[
            ("latents", &clip.latents_shape, &clip.latents),
            ("video", &clip.video_shape, &clip.video),
        ],
    )?;
    eprintln!(
        "wrote {} (latents {:?}, video {:?}) in {:.1} s",
        a.output.display(),
        clip.latents_shape,
        clip.video_shape,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
