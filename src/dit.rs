//! `longtake model dit-forward` and `longtake bench dit`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use longtake_model::backend::Backend;
use longtake_model::backend::cpu::Cpu;
use longtake_model::comm::Comm;
use longtake_model::io::{SafetensorsFile, write_f32};
use longtake_model::tp::{agree, run_group};
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

pub fn forward(transformer: &Path, input: &Path, output: &Path, tp: usize) -> Result<()> {
    check_tp(transformer, tp)?;
    let inp = read_inputs(input)?;
    let start = Instant::now();
    let sample = run_group(tp, |comm| {
        let model = agree(
            &comm,
            &Cpu,
            WanTransformer::load(transformer, &Cpu, comm.rank(), tp),
        )?;
        let [b, s, dt] = inp.context_shape;
        let context = TextContext::from_host(&Cpu, b, s, dt, &inp.context)?;
        let latents = Cpu.upload_f32(&inp.latents_shape, inp.latents.clone())?;
        let out = model.forward(
            &comm,
            &DitInputs {
                latents: &latents,
                timesteps: &inp.timesteps,
                context: &context,
            },
        )?;
        Ok((out.shape().to_vec(), Cpu.download(&out)?))
    })?;
    write_f32(output, &[("sample", &sample.0, &sample.1)])?;
    eprintln!(
        "wrote {} (sample {:?}) in {:.1} ms, tp={tp}",
        output.display(),
        sample.0,
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

pub fn bench(transformer: &Path, input: &Path, tp: usize, iters: usize) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let cfg = check_tp(transformer, tp)?;
    let inp = read_inputs(input)?;
    let times = run_group(tp, |comm| {
        let model = agree(
            &comm,
            &Cpu,
            WanTransformer::load(transformer, &Cpu, comm.rank(), tp),
        )?;
        let [b, s, dt] = inp.context_shape;
        let context = TextContext::from_host(&Cpu, b, s, dt, &inp.context)?;
        let latents = Cpu.upload_f32(&inp.latents_shape, inp.latents.clone())?;
        let inputs = DitInputs {
            latents: &latents,
            timesteps: &inp.timesteps,
            context: &context,
        };
        if comm.rank() == 0 {
            eprintln!(
                "text context: {s} rows, {} computed after collapsing zero padding",
                context.compressed_len()
            );
        }
        let mut times = Vec::with_capacity(iters);
        for i in 0..=iters {
            let t = Instant::now();
            model.forward(&comm, &inputs)?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(times)
    })?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let [b, s, _] = inp.context_shape;
    let [pt, ph, pw] = cfg.patch_size;
    let tokens =
        inp.latents_shape[2] / pt * (inp.latents_shape[3] / ph) * (inp.latents_shape[4] / pw);
    let flops = WanTransformer::<Cpu>::flops(&cfg, tokens, s) * b as f64;
    eprintln!(
        "dit forward: {} layers, dim {}, {tokens} video tokens, {s} text rows, batch {b}, tp {tp}, {} threads",
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
