//! `longtake model encode-text` and `longtake bench text`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use longtake_model::backend::cpu::Cpu;
use longtake_model::io::write_f32;
use longtake_model::text::{PromptEmbeds, PromptEncoder};

fn load(model: &Path) -> Result<PromptEncoder<Cpu>> {
    let start = Instant::now();
    let enc = PromptEncoder::load(model, &Cpu)?;
    let c = enc.encoder().config();
    eprintln!(
        "text encoder: {} layers, d_model {}, {} heads, d_ff {}; loaded in {:.1} ms",
        c.num_layers,
        c.d_model,
        c.num_heads,
        c.d_ff,
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

pub fn encode(model: &Path, prompt: &str, output: &Path) -> Result<()> {
    let enc = load(model)?;
    let start = Instant::now();
    let e = enc.encode_prompt(prompt)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    warn_truncated(&e, enc.max_len());
    write_f32(output, &[("prompt_embeds", &e.shape, &e.data)])?;
    eprintln!(
        "wrote {} (prompt_embeds {:?}, {} real tokens) in {ms:.1} ms",
        output.display(),
        e.shape,
        e.seq_len
    );
    Ok(())
}

pub fn bench(model: &Path, prompt: &str, iters: usize) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let enc = load(model)?;
    let warm = enc.encode_prompt(prompt)?;
    warn_truncated(&warm, enc.max_len());
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        std::hint::black_box(enc.encode_prompt(prompt)?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    eprintln!(
        "text encode: {} real tokens padded to {}, {} threads; tokenize + encode + pad",
        warm.seq_len,
        enc.max_len(),
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
