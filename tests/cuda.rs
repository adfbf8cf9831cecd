//! What can be checked of the CUDA backend on a machine without a GPU:
//!
//! - every kernel module compiles with NVRTC for compute_80 and compute_90 (`longtake kernels`)
//!   and assembles with `ptxas` for sm_80 and sm_90 with no register spills (NVRTC and ptxas
//!   come from NVIDIA's PyPI wheels, installed into `target/test-tools/` when missing);
//! - `--device cuda` on a machine without a usable GPU is a clear error with a non-zero exit
//!   code, never a panic (on a GPU machine: a GPU ordinal that does not exist is).
//!
//! Numerical parity of the kernels needs a GPU: `scripts/gpu-check`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn longtake() -> Command {
    Command::new(env!("CARGO_BIN_EXE_longtake"))
}

/// `ptxas -v` of one PTX file: (kernel, registers, spill store bytes, spill load bytes).
fn ptxas(ptxas: &Path, ptx: &Path, sm: &str) -> Vec<(String, u32, u32, u32)> {
    let o = Command::new(ptxas)
        .args([&format!("-arch={sm}"), "-v", "-o", "/dev/null"])
        .arg(ptx)
        .output()
        .expect("run ptxas");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "ptxas {sm} {}:\n{text}", ptx.display());
    let num_before = |line: &str, word: &str| -> u32 {
        let i = line
            .find(word)
            .unwrap_or_else(|| panic!("{word:?} in {line:?}"));
        line[..i]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a number before {word:?} in {line:?}"))
    };
    let mut out = Vec::new();
    let mut current: Option<(String, u32, u32)> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap().to_string();
            current = Some((name, 0, 0));
        } else if line.contains("bytes spill stores") {
            let c = current.as_mut().expect("spill line after an entry");
            c.1 = num_before(line, "bytes spill stores");
            c.2 = num_before(line, "bytes spill loads");
        } else if line.contains("Used") && line.contains("registers") {
            let (name, st, ld) = current.take().expect("register line after an entry");
            out.push((name, num_before(line, "registers"), st, ld));
        }
    }
    out
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    let cu = support::cuda_compilers();
    let dir = tempfile::tempdir().unwrap();
    let o = longtake()
        .args(["kernels", "--arch", "compute_80,compute_90", "--out"])
        .arg(dir.path())
        .env("LD_LIBRARY_PATH", cu.join("lib"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "longtake kernels failed:\n{stderr}");
    assert!(stderr.contains("NVRTC 13.0"), "{stderr}");
    let modules = [
        "cast",
        "elementwise",
        "norm",
        "layout",
        "attention",
        "text",
        "vae",
        "vae_attention",
    ];
    let mut kernels: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for (arch, sm) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        for m in modules {
            let ptx = dir.path().join(format!("{m}-{arch}.ptx"));
            assert!(ptx.exists(), "no PTX for module {m} ({arch})");
            let entries = ptxas(&cu.join("bin/ptxas"), &ptx, sm);
            assert!(!entries.is_empty(), "module {m} has no kernel");
            for (name, regs, st, ld) in entries {
                assert!(
                    st == 0 && ld == 0,
                    "{name} ({sm}) spills: {st} bytes stored, {ld} loaded"
                );
                let e = kernels.entry(name).or_default();
                if sm == "sm_80" {
                    e.0 = regs;
                } else {
                    e.1 = regs;
                }
            }
        }
    }
    // The families every backend op needs are there.
    for k in [
        "cast_f32_to_bf16",
        "layer_norm_affine_mod_bf16",
        "rope_rows",
        "patchify_rows",
        "embedding_bf16",
        "vae_conv_igemm_64x128",
        "vae_channel_rms_norm",
    ] {
        assert!(kernels.contains_key(k), "kernel {k} missing: {kernels:?}");
    }
    eprintln!(
        "{} kernels, registers sm_80 / sm_90, no spills:",
        kernels.len()
    );
    for (k, (a, b)) in &kernels {
        eprintln!("  {k:<40} {a:>3} / {b:>3}");
    }
}

#[test]
fn cuda_without_a_usable_gpu_is_a_clear_error() {
    let driver = longtake_model::backend::cuda::driver_present();
    let gpus = longtake_model::backend::cuda::devices().map_or(0, |d| d.len());
    // Without a driver every GPU request fails on the driver; with one, an ordinal past the
    // machine's GPUs does.
    let (device, expect) = if driver {
        (
            "cuda:99".to_string(),
            format!("this machine has {gpus} GPU(s)"),
        )
    } else {
        ("cuda".to_string(), "libcuda.so".to_string())
    };
    for args in [
        vec!["render", "--prompt", "a red circle", "--duration", "1"],
        vec!["worker", "--coordinator", "127.0.0.1:9"],
        vec!["bench", "text", "--model", "builtin:smoke", "--prompt", "x"],
    ] {
        let o = longtake()
            .args(&args)
            .args(["--device", &device])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--device") && stderr.contains(&expect),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // A device name outside the grammar is refused by the argument parser, naming the forms.
    let o = longtake()
        .args(["render", "--prompt", "x", "--device", "tpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("allowed: cpu, cuda"), "{stderr}");
}
