//! The `longtake` binary's model and bench commands, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use longtake_model::io::SafetensorsFile;

mod support;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("model/tests/fixtures")
        .join(rel)
}

fn longtake(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args(args)
        .output()
        .expect("run longtake")
}

/// A tensor and its shape.
struct T(Vec<usize>, Vec<f32>);

fn read(path: &Path, name: &str) -> T {
    let (shape, data) = SafetensorsFile::open(path).unwrap().read_f32(name).unwrap();
    T(shape, data)
}

/// Relative L2 error of `got` against `want`; the shapes must match (a truncated or reshaped
/// output is a failure, not a small error).
fn rel_l2(got: &T, want: &T) -> f64 {
    assert_eq!(got.0, want.0, "shapes differ");
    assert_eq!(got.1.len(), want.1.len());
    let (a, b) = (&got.1, &want.1);
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn dit_forward_writes_the_reference_sample() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, tp) in [("tiny", "2"), ("odd", "3")] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let dir = fixture(&format!("dit/{name}"));
        let o = longtake(&[
            "model",
            "dit-forward",
            "--transformer",
            dir.join("transformer").to_str().unwrap(),
            "--input",
            dir.join("io.safetensors").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--tp",
            tp,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = rel_l2(
            &read(&out, "sample"),
            &read(&dir.join("io.safetensors"), "sample"),
        );
        assert!(err <= 1e-5, "{name} tp={tp}: relative L2 {err:.3e}");
        let partial = support::partial_files(tmp.path());
        assert!(partial.is_empty(), "temporary files left: {partial:?}");
    }
}

#[test]
fn dit_forward_rejects_bad_tp_and_bad_inputs_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("dit/tiny");
    let out = tmp.path().join("out.safetensors");
    let run = |transformer: &Path, input: &Path, tp: &str| {
        longtake(&[
            "model",
            "dit-forward",
            "--transformer",
            transformer.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--tp",
            tp,
        ])
    };
    let o = run(&dir.join("transformer"), &dir.join("io.safetensors"), "3");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("--tp") && stderr.contains("allowed: 1, 2"),
        "{stderr}"
    );

    // An input file without the expected names lists what it holds.
    let o = run(
        &dir.join("transformer"),
        &fixture("sched/unipc_n2_s3/trajectory.safetensors"),
        "1",
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("hidden_states") && stderr.contains("x_init"),
        "{stderr}"
    );

    // A directory that is not a checkpoint.
    let o = run(tmp.path(), &dir.join("io.safetensors"), "1");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("config.json"), "{stderr}");
    assert!(!out.exists(), "no output on failure");
}

#[test]
fn bench_dit_prints_the_figure_last() {
    let dir = fixture("dit/tiny");
    let o = longtake(&[
        "bench",
        "dit",
        "--transformer",
        dir.join("transformer").to_str().unwrap(),
        "--input",
        dir.join("io.safetensors").to_str().unwrap(),
        "--iters",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let mut parts = last.split(' ');
    let ms: f64 = parts
        .next()
        .unwrap()
        .strip_prefix("dit_forward_ms=")
        .unwrap()
        .parse()
        .unwrap();
    let gf: f64 = parts
        .next()
        .unwrap()
        .strip_prefix("gflops=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms > 0.0 && gf > 0.0, "{last}");
}

#[test]
fn vae_decode_and_generate_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let vae = fixture("vae/b2");
    let out = tmp.path().join("vae.safetensors");
    let o = longtake(&[
        "model",
        "vae-decode",
        "--vae",
        vae.join("vae").to_str().unwrap(),
        "--input",
        vae.join("io.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--chunk",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = rel_l2(
        &read(&out, "sample"),
        &read(&vae.join("io.safetensors"), "sample"),
    );
    assert!(err <= 1e-4, "vae-decode: {err:.3e}");

    let model = fixture("pipeline/tiny");
    let run = model.join("run_0.safetensors");
    let out = tmp.path().join("clip.safetensors");
    let o = longtake(&[
        "model",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red fox running through snow",
        "--negative-prompt",
        "blurry",
        "--num-frames",
        "9",
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "4",
        "--guidance",
        "5",
        "--noise-file",
        run.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let el = rel_l2(&read(&out, "latents"), &read(&run, "latents"));
    let ev = rel_l2(&read(&out, "video"), &read(&run, "video"));
    assert!(
        el <= 1e-4 && ev <= 1e-3,
        "generate: latents {el:.3e}, video {ev:.3e}"
    );

    // A bad request fails before any work and names the field.
    let o = longtake(&[
        "model",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--height",
        "30",
        "--width",
        "48",
        "--num-frames",
        "5",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("height") && stderr.contains("multiple of 16"),
        "{stderr}"
    );
}
