//! `longtake model dit-forward` and `longtake bench dit`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use longtake_model::backend::cpu::Cpu;
use longtake_model::comm::Comm;
use longtake_model::io::{SafetensorsFile, write_f32};
use longtake_model::pipeline::PipelineBackend;
use longtake_model::tp::{RankJob, agree, run_job};

use crate::device::DeviceArgs;
use longtake_model::wan::{DitInputs, TextContext, WanConfig, WanTransformer};

/// The three inputs of a transformer forward, read from a safetensors file.
struct HostInputs {
    latents_shape: Vec<usize>,
    latents: Vec<f32>,
    timesteps: Vec<f32>,
    context_shape: [usize; 3],
    context: Vec<f32>,
}

fn read_inputs(path: &Path) -> Result<HostInputs> {
    let f = SafetensorsFile::open(path)?;
    let (latents_shape, latents) = f.read_f32("hidden_states")?;
    let (ts_shape, timesteps) = f.read_f32("timestep")?;
    let (ctx_shape, context) = f.read_f32("encoder_hidden_states")?;
    if latents_shape.len() != 5 {
        bail!(
            "input `hidden_states`: shape {latents_shape:?}; expected [batch, channels, frames, height, width]"
        );
    }
    if ts_shape.len() != 1 {
        bail!(
            "input `timestep`: shape {ts_shape:?}; expected [batch] (one timestep per batch item)"
        );
    }
    let context_shape: [usize; 3] = ctx_shape.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!("input `encoder_hidden_states`: shape {ctx_shape:?}; expected [batch, sequence, text_dim]")
    })?;
    if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
        bail!(
            "input `hidden_states`: value {i} is {}; all values must be finite",
            latents[i]
        );
    }
    Ok(HostInputs {
        latents_shape,
        latents,
        timesteps,
        context_shape,
        context,
    })
}

/// Check the tensor-parallel size against the config before any rank starts.
fn check_tp(transformer: &Path, tp: usize) -> Result<WanConfig> {
    let cfg = WanConfig::from_file(&transformer.join("config.json"))?;
    WanTransformer::<Cpu>::check_parallelism(&cfg, tp).context("--tp")?;
    Ok(cfg)
}

/// One rank's forward (or timed forwards) of the transformer.
struct DitJob<'a> {
    transformer: &'a Path,
    inp: &'a HostInputs,
    tp: usize,
    /// Timed forwards after one warm-up; 0: one forward, whose output is returned.
    iters: usize,
}

enum DitOut {
    Sample(Vec<usize>, Vec<f32>),
    Times(Vec<f64>),
}

impl RankJob for DitJob<'_> {
    type Output = DitOut;

    fn run<B: PipelineBackend>(
        &self,
        backend: &B,
        comm: &dyn Comm<B>,
    ) -> longtake_model::Result<DitOut> {
        let model = agree(
            comm,
            backend,
            WanTransformer::load(self.transformer, backend, comm.rank(), self.tp),
        )?;
        let inp = self.inp;
        let [b, s, dt] = inp.context_shape;
        let context = TextContext::from_host(backend, b, s, dt, &inp.context)?;
        let latents = backend.upload_f32(&inp.latents_shape, inp.latents.clone())?;
        let inputs = DitInputs {
            latents: &latents,
            timesteps: &inp.timesteps,
            context: &context,
        };
        if self.iters == 0 {
            let out = model.forward(comm, &inputs)?;
            return Ok(DitOut::Sample(
                out.shape().to_vec(),
                backend.download(&out)?,
            ));
        }
        if comm.rank() == 0 {
            eprintln!(
                "text context: {s} rows, {} computed after collapsing zero padding; on {}",
                context.compressed_len(),
                backend.name()
            );
        }
        let mut times = Vec::with_capacity(self.iters);
        for i in 0..=self.iters {
            let t = Instant::now();
            let out = model.forward(comm, &inputs)?;
            // The clock stops when the device has finished, not when the work is queued.
            backend.synchronize()?;
            drop(out);
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(DitOut::Times(times))
    }
}

pub fn forward(
    transformer: &Path,
    input: &Path,
    output: &Path,
    tp: usize,
    device: &DeviceArgs,
) -> Result<()> {
    check_tp(transformer, tp)?;
    let inp = read_inputs(input)?;
    let placement = device.placement()?;
    let start = Instant::now();
    let job = DitJob {
        transformer,
        inp: &inp,
        tp,
        iters: 0,
    };
    let DitOut::Sample(shape, data) = run_job(&placement, tp, device.precision, &job)? else {
        bail!("the forward returned no sample");
    };
    write_f32(output, &[("sample", &shape, &data)])?;
    eprintln!(
        "wrote {} (sample {shape:?}) in {:.1} ms, tp={tp} on {placement}",
        output.display(),
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

pub fn bench(
    transformer: &Path,
    input: &Path,
    tp: usize,
    iters: usize,
    device: &DeviceArgs,
) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let cfg = check_tp(transformer, tp)?;
    let inp = read_inputs(input)?;
    let placement = device.placement()?;
    let job = DitJob {
        transformer,
        inp: &inp,
        tp,
        iters,
    };
    let DitOut::Times(times) = run_job(&placement, tp, device.precision, &job)? else {
        bail!("the benchmark returned no times");
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let [b, s, _] = inp.context_shape;
    let [pt, ph, pw] = cfg.patch_size;
    let tokens =
        inp.latents_shape[2] / pt * (inp.latents_shape[3] / ph) * (inp.latents_shape[4] / pw);
    let flops = WanTransformer::<Cpu>::flops(&cfg, tokens, s) * b as f64;
    eprintln!(
        "dit forward: {} layers, dim {}, {tokens} video tokens, {s} text rows, batch {b}, tp {tp} on {placement}, {} CPU threads",
        cfg.num_layers,
        cfg.inner_dim(),
        rayon::current_num_threads()
    );
    eprintln!(
        "times (ms): {}",
        times
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!(
        "gflops counts the reference's work ({:.2} GFLOP per forward)",
        flops / 1e9
    );
    out!(
        "dit_forward_ms={median:.2} gflops={:.1}",
        flops / median / 1e6
    );
    Ok(())
}
