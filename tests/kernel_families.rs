//! Every CPU kernel family this machine can run passes the DiT, VAE and text parity checks
//! against the diffusers/transformers fixtures: the row kernels are compiled for AVX-512,
//! AVX2+FMA and the baseline, and `LONGTAKE_CPU_KERNELS` forces a lower family than the CPU's
//! best, so each one runs here. The families this CPU lacks cannot run on it and are listed as
//! such (the baseline and the host's own always run). An unknown or unsupported family is refused
//! before any work.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use longtake_model::io::SafetensorsFile;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("model/tests/fixtures")
        .join(rel)
}

fn longtake(family: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args(args)
        .env("LONGTAKE_CPU_KERNELS", family)
        .output()
        .expect("run longtake")
}

fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    SafetensorsFile::open(path).unwrap().read_f32(name).unwrap()
}

fn rel_l2(got: &(Vec<usize>, Vec<f32>), want: &(Vec<usize>, Vec<f32>)) -> f64 {
    assert_eq!(got.0, want.0, "shapes differ");
    let num: f64 = got
        .1
        .iter()
        .zip(&want.1)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = want.1.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The families this CPU can run, best last.
fn runnable() -> Vec<&'static str> {
    let mut f = vec!["baseline"];
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if avx2 {
            f.push("avx2-fma");
        }
        if avx512 {
            f.push("avx512");
        }
    }
    f
}

// The families are x86-64's; other architectures have one family and no variable to force.
#[cfg(target_arch = "x86_64")]
#[test]
fn every_runnable_kernel_family_matches_the_references() {
    let tmp = tempfile::tempdir().unwrap();
    let families = runnable();
    eprintln!("kernel families run on this CPU: {families:?}");
    let mut outputs: Vec<Vec<u32>> = Vec::new();
    for family in &families {
        // DiT, sharded over 2 ranks.
        let dit = fixture("dit/tiny");
        let out = tmp.path().join(format!("dit-{family}.safetensors"));
        let o = longtake(
            family,
            &[
                "model",
                "dit-forward",
                "--transformer",
                dit.join("transformer").to_str().unwrap(),
                "--input",
                dit.join("io.safetensors").to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--tp",
                "2",
            ],
        );
        assert!(
            o.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let e = rel_l2(
            &read(&out, "sample"),
            &read(&dit.join("io.safetensors"), "sample"),
        );
        assert!(e <= 1e-5, "{family} dit: {e:.3e}");

        // VAE decode.
        let vae = fixture("vae/b2");
        let out = tmp.path().join(format!("vae-{family}.safetensors"));
        let o = longtake(
            family,
            &[
                "model",
                "vae-decode",
                "--vae",
                vae.join("vae").to_str().unwrap(),
                "--input",
                vae.join("io.safetensors").to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
        );
        assert!(
            o.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v = rel_l2(
            &read(&out, "sample"),
            &read(&vae.join("io.safetensors"), "sample"),
        );
        assert!(v <= 1e-4, "{family} vae: {v:.3e}");

        // Text encoder, first fixture case.
        let text = fixture("text/tiny");
        let cases: serde_json::Value =
            serde_json::from_slice(&std::fs::read(text.join("cases.json")).unwrap()).unwrap();
        let prompt = cases[0]["prompt"].as_str().unwrap();
        let out = tmp.path().join(format!("text-{family}.safetensors"));
        let o = longtake(
            family,
            &[
                "model",
                "encode-text",
                "--model",
                text.to_str().unwrap(),
                "--prompt",
                prompt,
                "--output",
                out.to_str().unwrap(),
            ],
        );
        assert!(
            o.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let t = rel_l2(
            &read(&out, "prompt_embeds"),
            &read(&text.join("io.safetensors"), "prompt_embeds_0"),
        );
        assert!(t <= 1e-5, "{family} text: {t:.3e}");
        eprintln!("{family}: dit {e:.2e}, vae {v:.2e}, text {t:.2e}");
        let dit_out = read(
            &tmp.path().join(format!("dit-{family}.safetensors")),
            "sample",
        );
        outputs.push(dit_out.1.iter().map(|x| x.to_bits()).collect());
    }
    // Whether the families agree bit for bit (reported; within a family results are always
    // bit-identical, which is what rollbacks rely on).
    for (i, family) in families.iter().enumerate().skip(1) {
        let differing = outputs[i]
            .iter()
            .zip(&outputs[0])
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "dit output, {family} vs baseline: {differing} of {} values differ in their bits",
            outputs[0].len()
        );
    }
    // The family in use is the one forced: the render's manifest records its workers' family.
    for family in &families {
        let out = tmp.path().join(format!("render-{family}"));
        let o = longtake(
            family,
            &[
                "render",
                "--model",
                "builtin:smoke",
                "--prompt",
                "x",
                "--num-frames",
                "5",
                "--steps",
                "1",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(
            o.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Path::new(&dir).join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["kernel_family"], format!("cpu-x86_64-{family}"));
    }

    // An unknown family is refused, naming the variable and the allowed values.
    let o = longtake("sse9", &["analyze", "/nonexistent"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("LONGTAKE_CPU_KERNELS") && err.contains("baseline"),
        "{err}"
    );
}
