//! `longtake model encode-text` and `longtake bench text`, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use longtake_model::io::{SafetensorsFile, read_json};

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

fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    SafetensorsFile::open(path).unwrap().read_f32(name).unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// The fixture's cases: (prompt, real token count).
fn cases() -> Vec<(String, usize)> {
    read_json(&fixture("text/tiny/cases.json"))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["prompt"].as_str().unwrap().to_string(),
                c["seq_len"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn encode_text(model: &Path, prompt: &str, out: &Path) -> Output {
    longtake(&[
        "model",
        "encode-text",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--output",
        out.to_str().unwrap(),
    ])
}

#[test]
fn encode_text_writes_the_reference_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("text/tiny");
    let all = cases();
    // A short case and the truncated one.
    let short = all.iter().position(|c| c.1 < 512).unwrap();
    let long = all.iter().position(|c| c.1 == 512).unwrap();
    for i in [short, long] {
        let out = tmp.path().join(format!("case{i}.safetensors"));
        let o = encode_text(&dir, &all[i].0, &out);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        let (shape, got) = read(&out, "prompt_embeds");
        let (_, want) = read(&dir.join("io.safetensors"), &format!("prompt_embeds_{i}"));
        assert_eq!(shape[..2], [1, 512]);
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-5, "case {i}: relative L2 {err:.3e}");
        let partial = support::partial_files(tmp.path());
        assert!(partial.is_empty(), "temporary files left: {partial:?}");
        if i == long {
            assert!(
                stderr.contains("warning") && stderr.contains("512"),
                "truncation must be reported: {stderr}"
            );
        } else {
            assert!(!stderr.contains("warning"), "{stderr}");
        }
    }
}

#[test]
fn encode_text_names_a_missing_subfolder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    // A model directory with only the tokenizer.
    let model = tmp.path().join("model");
    std::fs::create_dir_all(model.join("tokenizer")).unwrap();
    std::fs::copy(
        fixture("text/tiny/tokenizer/tokenizer.json"),
        model.join("tokenizer/tokenizer.json"),
    )
    .unwrap();
    let o = encode_text(&model, "a cat", &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("text_encoder"), "{stderr}");

    // A directory that is not a model at all.
    let o = encode_text(tmp.path(), "a cat", &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("tokenizer"), "{stderr}");
    assert!(!out.exists(), "no output on failure");
}

#[test]
fn bench_text_prints_the_figure_last() {
    let dir = fixture("text/tiny");
    let o = longtake(&[
        "bench",
        "text",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "a cat walks on the grass",
        "--iters",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let ms: f64 = last
        .strip_prefix("text_ms=")
        .unwrap_or_else(|| panic!("{last}"))
        .parse()
        .unwrap();
    assert!(ms > 0.0, "{last}");
}
