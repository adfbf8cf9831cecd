//! `longtake model encode-text` and `longtake bench text`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use longtake_model::comm::Comm;
use longtake_model::io::write_f32;
use longtake_model::pipeline::PipelineBackend;
use longtake_model::text::{PromptEmbeds, PromptEncoder};
use longtake_model::tp::{RankJob, run_job};

use crate::device::DeviceArgs;

fn load<B: PipelineBackend>(model: &Path, backend: &B) -> longtake_model::Result<PromptEncoder<B>> {
    let start = Instant::now();
    let enc = PromptEncoder::load(model, backend)?;
    let c = enc.encoder().config();
    eprintln!(
        "text encoder: {} layers, d_model {}, {} heads, d_ff {}; loaded on {} in {:.1} ms",
        c.num_layers,
        c.d_model,
        c.num_heads,
        c.d_ff,
        backend.name(),
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(enc)
}

/// The pipeline truncates long prompts silently; say so.
fn warn_truncated(e: &PromptEmbeds, max_len: usize) {
    if e.truncated {
        eprintln!(
            "warning: the prompt has {} tokens; only the first {max_len} (with </s>) are encoded, \
             as the pipeline's max_sequence_length of {max_len} allows",
            e.full_len
        );
    }
}

/// Encode once (`iters` 0), or time `iters` encodes after a warm-up.
struct TextJob<'a> {
    model: &'a Path,
    prompt: &'a str,
    iters: usize,
}

impl RankJob for TextJob<'_> {
    type Output = (PromptEmbeds, usize, Vec<f64>);

    fn run<B: PipelineBackend>(
        &self,
        backend: &B,
        _comm: &dyn Comm<B>,
    ) -> longtake_model::Result<Self::Output> {
        let enc = load(self.model, backend)?;
        let first = enc.encode_prompt(self.prompt)?;
        let mut times = Vec::with_capacity(self.iters);
        for _ in 0..self.iters {
            let t = Instant::now();
            std::hint::black_box(enc.encode_prompt(self.prompt)?);
            backend.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((first, enc.max_len(), times))
    }
}

pub fn encode(model: &Path, prompt: &str, output: &Path, device: &DeviceArgs) -> Result<()> {
    let placement = device.placement()?;
    let start = Instant::now();
    let job = TextJob {
        model,
        prompt,
        iters: 0,
    };
    let (e, max_len, _) = run_job(&placement, 1, device.precision, &job)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    warn_truncated(&e, max_len);
    write_f32(output, &[("prompt_embeds", &e.shape, &e.data)])?;
    eprintln!(
        "wrote {} (prompt_embeds {:?}, {} real tokens) in {ms:.1} ms including loading",
        output.display(),
        e.shape,
        e.seq_len
    );
    Ok(())
}

pub fn bench(model: &Path, prompt: &str, iters: usize, device: &DeviceArgs) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let placement = device.placement()?;
    let job = TextJob {
        model,
        prompt,
        iters,
    };
    let (warm, max_len, times) = run_job(&placement, 1, device.precision, &job)?;
    warn_truncated(&warm, max_len);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    eprintln!(
        "text encode: {} real tokens padded to {max_len}, on {placement}, {} CPU threads; tokenize + encode + pad",
        warm.seq_len,
        rayon::current_num_threads()
    );
    eprintln!(
        "times (ms): {}",
        times
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    out!("text_ms={median:.3}");
    Ok(())
}
