//! Window stitching: one window equals the single-clip pipeline; several windows, co-denoised,
//! independent or autoregressive, equal the straightforward reference loops of
//! `tools/reference_codenoise.py`.

mod common;

use common::{fixture, read, rel_l2};
use longtake_model::backend::cpu::Cpu;
use longtake_model::comm::ThreadComm;
use longtake_model::pipeline::{ClipRequest, WanPipeline, latent_shape};
use longtake_model::window::{Geometry, Hold, Stitching, WindowSpec, denoise};

fn request(run: &serde_json::Value, noise: (Vec<usize>, Vec<f32>)) -> ClipRequest {
    let a = &run["args"];
    ClipRequest {
        prompt: a["prompt"].as_str().unwrap().into(),
        negative_prompt: a["negative_prompt"].as_str().map(String::from),
        num_frames: a["num_frames"].as_u64().unwrap() as usize,
        height: a["height"].as_u64().unwrap() as usize,
        width: a["width"].as_u64().unwrap() as usize,
        steps: a["num_inference_steps"]
            .as_u64()
            .or(a["steps"].as_u64())
            .unwrap() as usize,
        guidance: a["guidance_scale"]
            .as_f64()
            .or(a["guidance"].as_f64())
            .unwrap() as f32,
        flow_shift: None,
        seed: 0,
        noise: Some(noise),
    }
}

fn windows(starts: &[usize], len: usize, weights: &[f32]) -> Vec<WindowSpec> {
    starts
        .iter()
        .enumerate()
        .map(|(i, &s)| WindowSpec {
            start: s,
            len,
            weights: weights[i * len..(i + 1) * len].to_vec(),
        })
        .collect()
}

fn run_windows(
    pipe: &WanPipeline<Cpu>,
    req: &ClipRequest,
    plan: &[WindowSpec],
    stitching: Stitching,
) -> Vec<f32> {
    run_held(pipe, req, plan, stitching, Hold::default())
}

/// [`run_windows`] with autoregressive windows holding their shared frames as `hold` says.
fn run_held(
    pipe: &WanPipeline<Cpu>,
    req: &ClipRequest,
    plan: &[WindowSpec],
    stitching: Stitching,
    hold: Hold,
) -> Vec<f32> {
    let comm = ThreadComm::group(1).unwrap().remove(0);
    let [c, t, h, w] = latent_shape(&pipe.dir, req, &mut Vec::new()).unwrap();
    let geo = Geometry {
        channels: c,
        frames: t,
        height: h,
        width: w,
    };
    let guided = pipe.guided(req, &mut Vec::new()).unwrap();
    let scheduler = pipe.scheduler(req).unwrap();
    let noise = &req.noise.as_ref().unwrap().1;
    let mut calls = 0;
    let out = denoise(
        &guided,
        &comm,
        &scheduler,
        req.steps,
        &geo,
        noise,
        plan,
        stitching,
        hold,
        |d, n| {
            calls += 1;
            assert!(d <= n);
        },
    )
    .unwrap();
    assert_eq!(calls, req.steps * plan.len());
    out
}

#[test]
fn one_window_is_the_pipeline_bit_for_bit() {
    let dir = fixture("pipeline/tiny");
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("runs.json")).unwrap()).unwrap();
    let pipe = WanPipeline::load(&dir, &Cpu).unwrap();
    let run = &runs[0];
    let req = request(run, read(&dir.join("run_0.safetensors"), "noise"));
    let t = 3;
    let plan = vec![WindowSpec {
        start: 0,
        len: t,
        weights: vec![1.0; t],
    }];
    let comm = ThreadComm::group(1).unwrap().remove(0);
    let clip = pipe.generate(&comm, &req, |_, _| {}).unwrap();
    for stitching in [
        Stitching::Codenoise,
        Stitching::Independent,
        Stitching::Autoregressive,
    ] {
        let got = run_windows(&pipe, &req, &plan, stitching);
        assert_eq!(
            got, clip.latents,
            "{stitching:?} with one window differs from the pipeline"
        );
    }
}

#[test]
fn codenoise_matches_the_reference_loop() {
    let dir = fixture("codenoise/tiny");
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("runs.json")).unwrap()).unwrap();
    let pipe = WanPipeline::load(&fixture("pipeline/tiny"), &Cpu).unwrap();
    for (k, run) in runs.as_array().unwrap().iter().enumerate() {
        let file = dir.join(format!("run_{k}.safetensors"));
        let req = request(run, read(&file, "noise"));
        let (_, starts) = read(&file, "window_starts");
        let (ws, weights) = read(&file, "weights");
        let starts: Vec<usize> = starts.iter().map(|s| *s as usize).collect();
        let plan = windows(&starts, ws[1], &weights);
        let got = run_windows(&pipe, &req, &plan, Stitching::Codenoise);
        let (_, expected) = read(&file, "latents");
        let err = rel_l2(&got, &expected);
        eprintln!(
            "codenoise run {k} ({} windows): relative L2 {err:.3e}",
            plan.len()
        );
        assert!(err <= 1e-4, "run {k}: {err:.3e}");
    }
}

/// Independent and autoregressive windows (held to the end, and released for the last step)
/// against their reference loops in `tools/reference_codenoise.py` (same runs, same plan).
#[test]
fn independent_and_autoregressive_match_their_reference_loops() {
    let dir = fixture("codenoise/tiny");
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("runs.json")).unwrap()).unwrap();
    let pipe = WanPipeline::load(&fixture("pipeline/tiny"), &Cpu).unwrap();
    for (k, run) in runs.as_array().unwrap().iter().enumerate() {
        let file = dir.join(format!("run_{k}.safetensors"));
        let req = request(run, read(&file, "noise"));
        let (_, starts) = read(&file, "window_starts");
        let (ws, weights) = read(&file, "weights");
        let starts: Vec<usize> = starts.iter().map(|s| *s as usize).collect();
        let plan = windows(&starts, ws[1], &weights);
        // Held frames released for the last step only.
        let release = Hold {
            release: run["hold_release"].as_f64().unwrap() as f32,
            ..Hold::default()
        };
        for (stitching, hold, key) in [
            (
                Stitching::Independent,
                Hold::default(),
                "latents_independent",
            ),
            (
                Stitching::Autoregressive,
                Hold::default(),
                "latents_autoregressive",
            ),
            (
                Stitching::Autoregressive,
                release,
                "latents_autoregressive_release",
            ),
        ] {
            let got = run_held(&pipe, &req, &plan, stitching, hold);
            let (_, expected) = read(&file, key);
            let err = rel_l2(&got, &expected);
            eprintln!(
                "{key} run {k} ({} windows): relative L2 {err:.3e}",
                plan.len()
            );
            assert!(err <= 1e-4, "{key} run {k}: {err:.3e}");
        }
    }
}

/// The latent geometry of [`fox`]: 7 frames of 4×6.
fn fox_geometry() -> Geometry {
    Geometry {
        channels: 16,
        frames: 7,
        height: 4,
        width: 6,
    }
}

/// A 25-frame 48×32 request (7 latent frames of 4×6) over seeded noise, for the tiny pipeline.
fn fox(steps: usize, noise_seed: u64) -> ClipRequest {
    ClipRequest {
        prompt: "a fox".into(),
        negative_prompt: None,
        num_frames: 25,
        height: 32,
        width: 48,
        steps,
        guidance: 3.0,
        flow_shift: None,
        seed: 3,
        noise: Some((
            vec![1, 16, 7, 4, 6],
            longtake_model::noise::latent_noise(noise_seed, 16, 0..7, 4, 6),
        )),
    }
}

#[test]
fn strategies_differ_but_share_the_first_window_frames_where_expected() {
    let dir = fixture("pipeline/tiny");
    let pipe = WanPipeline::load(&dir, &Cpu).unwrap();
    let req = fox(2, 3);
    // Windows 0..3, 2..5, 4..7 with the plan's linear weights (overlap 1: ½ / ½).
    let w = |s| WindowSpec {
        start: s,
        len: 3,
        weights: vec![1.0, 1.0, 1.0],
    };
    let mut plan = vec![w(0), w(2), w(4)];
    plan[0].weights[2] = 0.5;
    plan[1].weights = vec![0.5, 1.0, 0.5];
    plan[2].weights[0] = 0.5;
    let co = run_windows(&pipe, &req, &plan, Stitching::Codenoise);
    let ind = run_windows(&pipe, &req, &plan, Stitching::Independent);
    let ar = run_windows(&pipe, &req, &plan, Stitching::Autoregressive);
    assert_ne!(co, ind);
    assert_ne!(co, ar);
    // Autoregressive: the first window's frames are exactly an independent run of it.
    let geo = fox_geometry();
    let alone = run_windows(
        &pipe,
        &ClipRequest {
            num_frames: 9,
            noise: Some((
                vec![1, 16, 3, 4, 6],
                geo.take(&req.noise.as_ref().unwrap().1, 0..3),
            )),
            ..req.clone()
        },
        &[WindowSpec {
            start: 0,
            len: 3,
            weights: vec![1.0; 3],
        }],
        Stitching::Codenoise,
    );
    assert_eq!(geo.take(&ar, 0..3), alone);
    assert!(co.iter().chain(&ind).chain(&ar).all(|v| v.is_finite()));
}

/// Held frames re-noised below the step's noise level: the first window is untouched, every
/// window hands its clean frames on unchanged, and what the later windows draw depends on it.
#[test]
fn autoregressive_hold_noise_changes_what_later_windows_draw_only() {
    let pipe = WanPipeline::load(&fixture("pipeline/tiny"), &Cpu).unwrap();
    let req = fox(3, 5);
    let w = |s| WindowSpec {
        start: s,
        len: 4,
        weights: vec![1.0; 4],
    };
    // Windows 0..4 and 3..7: frame 3 is held.
    let plan = vec![w(0), w(3)];
    let geo = fox_geometry();
    let noise = |noise| Hold {
        noise,
        ..Hold::default()
    };
    let full = run_held(&pipe, &req, &plan, Stitching::Autoregressive, noise(1.0));
    let half = run_held(&pipe, &req, &plan, Stitching::Autoregressive, noise(0.5));
    let clean = run_held(&pipe, &req, &plan, Stitching::Autoregressive, noise(0.0));
    // The first window (frames 0..4, the held frame included) is the same whatever the share.
    assert_eq!(geo.take(&full, 0..4), geo.take(&half, 0..4));
    assert_eq!(geo.take(&full, 0..4), geo.take(&clean, 0..4));
    // The second window's own frames differ with the share.
    let (f, h, c) = (
        geo.take(&full, 4..7),
        geo.take(&half, 4..7),
        geo.take(&clean, 4..7),
    );
    assert!(
        rel_l2(&f, &h) > 1e-4,
        "0.5 against 1: {:.3e}",
        rel_l2(&f, &h)
    );
    assert!(
        rel_l2(&h, &c) > 1e-4,
        "0 against 0.5: {:.3e}",
        rel_l2(&h, &c)
    );
    // The other strategies hold nothing, so the share does not touch them.
    for s in [Stitching::Codenoise, Stitching::Independent] {
        assert_eq!(
            run_held(&pipe, &req, &plan, s, noise(1.0)),
            run_held(&pipe, &req, &plan, s, noise(0.25))
        );
    }
}

/// Held frames released below a noise level: the first window's own frames are untouched; a
/// release at 1 holds nothing, so the later window is sampled alone and the shared frame is the
/// two windows' results half and half: bit for bit the independent windows fused with those
/// weights; a release for the last step only draws something else again.
#[test]
fn autoregressive_hold_release_blends_the_overlap() {
    let pipe = WanPipeline::load(&fixture("pipeline/tiny"), &Cpu).unwrap();
    let req = fox(3, 5);
    // Windows 0..4 and 3..7: frame 3 is shared, with half weight in each for the fusion.
    let plan = vec![
        WindowSpec {
            start: 0,
            len: 4,
            weights: vec![1.0, 1.0, 1.0, 0.5],
        },
        WindowSpec {
            start: 3,
            len: 4,
            weights: vec![0.5, 1.0, 1.0, 1.0],
        },
    ];
    let geo = fox_geometry();
    let release = |release| Hold {
        release,
        ..Hold::default()
    };
    let ar = |r| run_held(&pipe, &req, &plan, Stitching::Autoregressive, release(r));
    // Released for the last step only.
    let sampler = pipe.scheduler(&req).unwrap().build(req.steps).unwrap();
    let last = sampler.sigmas()[req.steps - 1];
    let (held, all, some) = (ar(0.0), ar(1.0), ar(last));
    assert_eq!(
        held,
        run_windows(&pipe, &req, &plan, Stitching::Autoregressive)
    );
    assert_eq!(all, run_windows(&pipe, &req, &plan, Stitching::Independent));
    for other in [&all, &some] {
        assert_eq!(geo.take(other, 0..3), geo.take(&held, 0..3));
    }
    for (a, b, what) in [
        (&held, &all, "release 1 against 0"),
        (&held, &some, "release at the last step against 0"),
        (&some, &all, "release at the last step against 1"),
    ] {
        for frames in [3..4, 4..7] {
            let e = rel_l2(&geo.take(a, frames.clone()), &geo.take(b, frames.clone()));
            assert!(e > 1e-4, "{what}, frames {frames:?}: {e:.3e}");
        }
    }
}
