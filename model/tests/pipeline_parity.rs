//! The whole single-clip pipeline against diffusers' `WanPipeline` run from the same initial
//! latents (`tools/make_fixtures.py` writes `runs.json` and `run_<k>.safetensors`).

mod common;

use common::{fixture, read, rel_l2};
use longtake_model::backend::cpu::Cpu;
use longtake_model::comm::{Comm, ThreadComm};
use longtake_model::pipeline::{ClipRequest, ModelDir, WanPipeline};

#[test]
fn runs_match_the_reference() {
    let pipe = WanPipeline::load(&fixture("pipeline/tiny"), &Cpu).unwrap();
    check_runs(&pipe, "tp 1");
}

/// The same runs with the transformer sharded over two CPU ranks, driven from this thread (the
/// worker's `--tp`): rank 1 lives on a helper thread and gets its inputs as host data.
#[test]
fn runs_match_the_reference_with_a_two_rank_transformer_group() {
    let comms: Vec<Box<dyn Comm<Cpu>>> = ThreadComm::group(2)
        .unwrap()
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Comm<Cpu>>)
        .collect();
    let pipe = WanPipeline::load_group(
        &fixture("pipeline/tiny"),
        vec![Cpu; 2].into_iter().zip(comms).collect(),
    )
    .unwrap();
    check_runs(&pipe, "tp 2 group");
}

fn check_runs(pipe: &WanPipeline<Cpu>, label: &str) {
    let dir = fixture("pipeline/tiny");
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("runs.json")).unwrap()).unwrap();
    let comm = ThreadComm::group(1).unwrap().remove(0);
    for (k, run) in runs.as_array().unwrap().iter().enumerate() {
        let a = &run["args"];
        let file = dir.join(format!("run_{k}.safetensors"));
        let noise = read(&file, "noise");
        let req = ClipRequest {
            prompt: a["prompt"].as_str().unwrap().into(),
            negative_prompt: a["negative_prompt"].as_str().map(String::from),
            num_frames: a["num_frames"].as_u64().unwrap() as usize,
            height: a["height"].as_u64().unwrap() as usize,
            width: a["width"].as_u64().unwrap() as usize,
            steps: a["num_inference_steps"].as_u64().unwrap() as usize,
            guidance: a["guidance_scale"].as_f64().unwrap() as f32,
            flow_shift: None,
            seed: 0,
            noise: Some(noise),
        };
        let mut steps = 0;
        let clip = pipe.generate(&comm, &req, |i, _| steps = i).unwrap();
        assert_eq!(steps, req.steps);
        let (ls, latents) = read(&file, "latents");
        let (vs, video) = read(&file, "video");
        assert_eq!(clip.latents_shape, ls);
        assert_eq!(clip.video_shape, vs);
        let el = rel_l2(&clip.latents, &latents);
        let ev = rel_l2(&clip.video, &video);
        eprintln!("pipeline run {k} ({label}): latents relative L2 {el:.3e}, video {ev:.3e}");
        assert!(el <= 1e-4, "run {k}: latents {el:.3e}");
        assert!(ev <= 1e-3, "run {k}: video {ev:.3e}");
    }
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn open_err(dir: &std::path::Path) -> String {
    match ModelDir::open(dir) {
        Ok(_) => panic!("{} should be rejected", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_model_directories_fail_early_and_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixture("pipeline/tiny"), &dir);
    assert!(ModelDir::open(&dir).is_ok());

    // A missing sub-folder.
    std::fs::rename(dir.join("vae"), tmp.path().join("vae")).unwrap();
    let e = open_err(&dir);
    assert!(e.contains("vae"), "{e}");
    std::fs::rename(tmp.path().join("vae"), dir.join("vae")).unwrap();

    // An unknown class.
    let idx_path = dir.join("model_index.json");
    let original = std::fs::read_to_string(&idx_path).unwrap();
    let mut idx: serde_json::Value = serde_json::from_str(&original).unwrap();
    idx["scheduler"] = serde_json::json!(["diffusers", "DDIMScheduler"]);
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("DDIMScheduler") && e.contains("UniPCMultistepScheduler"),
        "{e}"
    );
    idx["scheduler"] = serde_json::json!(["diffusers", "UniPCMultistepScheduler"]);
    idx["_class_name"] = "StableDiffusionPipeline".into();
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("_class_name") && e.contains("WanPipeline"),
        "{e}"
    );
    std::fs::write(&idx_path, &original).unwrap();

    // Text encoder width not matching the transformer's text_dim.
    let tc = dir.join("text_encoder/config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    c["d_model"] = 48.into();
    std::fs::write(&tc, c.to_string()).unwrap();
    let e = open_err(&dir);
    assert!(e.contains("text_dim") && e.contains("48"), "{e}");

    // Not a directory at all.
    let e = open_err(&tmp.path().join("nope"));
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn bad_requests_name_the_field() {
    let dir = fixture("pipeline/tiny");
    let pipe = WanPipeline::load(&dir, &Cpu).unwrap();
    let comm = ThreadComm::group(1).unwrap().remove(0);
    let base = ClipRequest {
        prompt: "a fox".into(),
        negative_prompt: None,
        num_frames: 5,
        height: 16,
        width: 32,
        steps: 1,
        guidance: 1.0,
        flow_shift: None,
        seed: 1,
        noise: None,
    };
    let check = |req: ClipRequest, parts: &[&str]| {
        let e = match pipe.generate(&comm, &req, |_, _| {}) {
            Ok(_) => panic!("{req:?} should fail"),
            Err(e) => e.to_string(),
        };
        for p in parts {
            assert!(e.contains(p), "{e:?} should mention {p:?}");
        }
    };
    check(
        ClipRequest {
            height: 20,
            ..base.clone()
        },
        &["height", "multiple of 16"],
    );
    check(
        ClipRequest {
            width: 0,
            ..base.clone()
        },
        &["width"],
    );
    check(
        ClipRequest {
            steps: 0,
            ..base.clone()
        },
        &["steps"],
    );
    check(
        ClipRequest {
            num_frames: 0,
            ..base.clone()
        },
        &["num_frames"],
    );
    check(
        ClipRequest {
            prompt: "  ".into(),
            ..base.clone()
        },
        &["prompt"],
    );
    check(
        ClipRequest {
            guidance: f32::NAN,
            ..base.clone()
        },
        &["guidance"],
    );
    check(
        ClipRequest {
            flow_shift: Some(-1.0),
            ..base.clone()
        },
        &["flow_shift"],
    );
    check(
        ClipRequest {
            noise: Some((vec![1, 16, 3, 2, 4], vec![0.0; 384])),
            ..base.clone()
        },
        &["noise", "[1, 16, 2, 2, 4]"],
    );
    // A frame count off the 4k + 1 grid is snapped, as the reference does, and said so.
    let clip = pipe
        .generate(
            &comm,
            &ClipRequest {
                num_frames: 7,
                ..base
            },
            |_, _| {},
        )
        .unwrap();
    assert_eq!(clip.video_shape[2], 5);
    assert!(clip.notices.iter().any(|n| n.contains("num_frames 7")));
}
