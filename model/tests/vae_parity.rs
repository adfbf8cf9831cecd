//! The Wan VAE decoder against diffusers' `AutoencoderKLWan.decode` on random-weight fixtures,
//! and the streaming (chunked) decode against the one-shot decode.

mod common;

use common::{fixture, read, rel_l2};
use longtake_model::backend::Backend;
use longtake_model::backend::cpu::Cpu;
use longtake_model::pipeline::PipelineBackend;
use longtake_model::vae::WanVaeDecoder;

/// Relative L2 error allowed against the reference.
const TOLERANCE: f64 = 1e-4;

fn decode(name: &str, chunk: usize) -> (Vec<f32>, Vec<f32>) {
    decode_on(&Cpu, name, chunk)
}

fn decode_on<B: PipelineBackend>(b: &B, name: &str, chunk: usize) -> (Vec<f32>, Vec<f32>) {
    let dir = fixture(&format!("vae/{name}"));
    let io = dir.join("io.safetensors");
    let (ls, latents) = read(&io, "latents");
    let (ss, sample) = read(&io, "sample");
    let vae = WanVaeDecoder::load(&dir.join("vae"), b).unwrap();
    let (shape, got) = vae
        .decode_all(&latents, [ls[0], ls[1], ls[2], ls[3], ls[4]], chunk)
        .unwrap();
    assert_eq!(shape, ss, "{name}: output shape");
    (got, sample)
}

#[test]
fn decode_matches_diffusers() {
    for name in ["small", "b2", "long"] {
        // One latent frame per call is how diffusers decodes.
        let (got, expected) = decode(name, 1);
        let err = rel_l2(&got, &expected);
        eprintln!("vae {name}: relative L2 error {err:.3e}");
        assert!(
            err <= TOLERANCE,
            "{name}: relative L2 error {err:.3e} > {TOLERANCE:e}"
        );
    }
}

/// The same decodes on GPU 0.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn decode_matches_diffusers_on_cuda() {
    let gpu = common::cuda();
    for name in ["small", "b2", "long"] {
        let (got, expected) = decode_on(&gpu, name, 1);
        let err = rel_l2(&got, &expected);
        eprintln!("vae {name} on {}: relative L2 error {err:.3e}", gpu.name());
        assert!(err <= common::cuda_tolerance(), "{name}: {err:.3e}");
    }
}

#[test]
fn chunked_decode_equals_one_shot() {
    let (one_shot, _) = decode("long", usize::MAX);
    for chunk in [1, 2, 4] {
        let (chunked, _) = decode("long", chunk);
        let err = rel_l2(&chunked, &one_shot);
        eprintln!("vae long chunk {chunk} vs one-shot: relative L2 {err:.3e}");
        assert!(err <= 1e-5, "chunk {chunk}: {err:.3e}");
    }
}

#[test]
fn encode_matches_diffusers() {
    use longtake_model::vae::WanVaeEncoder;
    for name in ["small", "b2"] {
        let dir = fixture(&format!("vae/{name}"));
        let io = dir.join("io.safetensors");
        let (vs, video) = read(&io, "video");
        let (ms, mean) = read(&io, "posterior_mean");
        let (_, logvar) = read(&io, "posterior_logvar");
        let enc = WanVaeEncoder::load(&dir.join("vae"), &Cpu).unwrap();
        let post = enc.encode(&video, [vs[1], vs[2], vs[3], vs[4]]).unwrap();
        assert_eq!(post.shape[..], ms[1..], "{name}: posterior shape");
        let em = rel_l2(&post.mean, &mean);
        let el = rel_l2(&post.logvar, &logvar);
        eprintln!("vae {name} encode: mean relative L2 {em:.3e}, logvar {el:.3e}");
        assert!(
            em <= TOLERANCE && el <= TOLERANCE,
            "{name}: mean {em:.3e}, logvar {el:.3e}"
        );
        let bad = enc.encode(&video[..video.len() - 1], [vs[1], vs[2], vs[3], vs[4]]);
        assert!(bad.is_err_and(|e| e.to_string().contains("video")));
    }
}
