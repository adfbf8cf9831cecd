//! `longtake render` end to end, as a user runs it: real processes, real gRPC between the
//! in-process coordinator and workers, outputs on the local filesystem.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use longtake_model::io::SafetensorsFile;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("model/tests/fixtures")
        .join(rel)
}

fn longtake(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args(args)
        .current_dir(cwd)
        // Keep the unpacked smoke model inside the test's directory.
        .env("XDG_CACHE_HOME", cwd.join("cache"))
        .output()
        .expect("run longtake")
}

/// Run a render and return its output directory (the last line on stdout).
/// Without `--model` in `args`, the fast random-weight model.
fn render(args: &[&str], cwd: &Path) -> PathBuf {
    let mut all = vec!["render"];
    if !args.contains(&"--model") {
        all.extend(["--model", "builtin:smoke"]);
    }
    all.extend_from_slice(args);
    let o = longtake(&all, cwd);
    assert!(
        o.status.success(),
        "render {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    cwd.join(
        out.lines()
            .last()
            .expect("the render's location on stdout")
            .trim(),
    )
}

fn latents(dir: &Path) -> Vec<f32> {
    SafetensorsFile::open(&dir.join("latents.safetensors"))
        .unwrap()
        .read_f32("latents")
        .unwrap()
        .1
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Video samples in an MP4 (the `stsz` box's sample count), read without external tools.
fn mp4_frames(path: &Path) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    let pos = bytes
        .windows(4)
        .position(|w| w == b"stsz")
        .expect("an stsz box");
    // stsz: type, version+flags (4), sample_size (4), sample_count (4)
    u32::from_be_bytes(bytes[pos + 12..pos + 16].try_into().unwrap())
}

#[test]
fn smoke_render_writes_every_promised_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = render(
        &[
            "--prompt",
            "a lighthouse",
            "--duration",
            "3",
            "--seed",
            "5",
            "--png-frames",
        ],
        tmp.path(),
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let frames = manifest["video"]["num_frames"].as_u64().unwrap() as u32;
    assert_eq!(frames, 49, "3 s at 16 fps is 4·12 + 1 frames");
    assert_eq!(mp4_frames(&dir.join("video.mp4")), frames);
    assert_eq!(
        std::fs::read_dir(dir.join("frames")).unwrap().count() as u32,
        frames
    );
    assert_eq!(manifest["smoke_test"], true);
    assert_eq!(manifest["seed"], 5);
    // The worker's identity of the model it loaded: the built-in model's fingerprint.
    let identity = manifest["model"]["identity"].as_str().unwrap_or_default();
    assert!(identity.contains(" fingerprint "), "{identity:?}");
    assert_eq!(latents(&dir).len(), 16 * 13 * 8 * 8);
}

#[test]
fn worker_count_does_not_change_the_latents() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |workers: &'static str| {
        vec![
            "--prompt",
            "waves",
            "--num-frames",
            "61",
            "--seed",
            "11",
            "--window",
            "5",
            "--overlap",
            "2",
            "--steps",
            "3",
            "--workers",
            workers,
        ]
    };
    let one = render(&args("1"), tmp.path());
    let three = render(&args("3"), tmp.path());
    let (a, b) = (latents(&one), latents(&three));
    assert!(
        a == b,
        "--workers 1 and --workers 3 differ (relative L2 {:.3e})",
        rel_l2(&a, &b)
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(three.join("manifest.json")).unwrap())
            .unwrap();
    let owners: std::collections::BTreeSet<&str> = m["plan"]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker"].as_str().unwrap())
        .collect();
    assert_eq!(
        owners.len(),
        3,
        "windows spread over three workers: {owners:?}"
    );
    let owners_of = |dir: &Path| -> std::collections::BTreeSet<String> {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap())
                .unwrap();
        m["plan"]["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["worker"].as_str().unwrap().to_string())
            .collect()
    };
    // Independent windows spread over the three workers and give the same latents.
    let mut a1 = args("1");
    a1.extend(["--stitching", "independent"]);
    let mut a3 = args("3");
    a3.extend(["--stitching", "independent"]);
    let (one, three) = (render(&a1, tmp.path()), render(&a3, tmp.path()));
    assert_eq!(owners_of(&three).len(), 3);
    assert!(latents(&one) == latents(&three), "independent");
    // Autoregressive windows depend on each other in order: the coordinator gives them all to one
    // worker whatever the pool, so three workers render exactly what one does, on one of them.
    let mut a1 = args("1");
    a1.extend(["--stitching", "autoregressive"]);
    let mut a3 = args("3");
    a3.extend(["--stitching", "autoregressive"]);
    let (one, three) = (render(&a1, tmp.path()), render(&a3, tmp.path()));
    assert_eq!(
        owners_of(&three).len(),
        1,
        "autoregressive runs on one worker"
    );
    assert!(latents(&one) == latents(&three), "autoregressive");
    // Held frames re-noised to half of each step's noise level: recorded in the manifest, and
    // the later windows draw something else (the first window is the same).
    let mut half = args("1");
    half.extend(["--stitching", "autoregressive", "--hold-noise", "0.5"]);
    let half = render(&half, tmp.path());
    let manifest = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
    };
    assert_eq!(manifest(&half)["plan"]["hold_noise"], 0.5);
    assert_eq!(manifest(&one)["plan"]["hold_noise"], 1.0);
    let d = rel_l2(&latents(&one), &latents(&half));
    assert!(
        d > 1e-3,
        "hold noise 0.5 changed nothing (relative L2 {d:.3e})"
    );
    // Held frames released from the first step at or below σ 0.9 (at least the last of the 3),
    // the overlaps blended: recorded in the manifest, and the later windows differ.
    let mut released = args("1");
    released.extend(["--stitching", "autoregressive", "--hold-release", "0.9"]);
    let released = render(&released, tmp.path());
    assert_eq!(manifest(&released)["plan"]["hold_release"], 0.9);
    assert_eq!(manifest(&released)["request"]["hold_release"], 0.9);
    assert_eq!(manifest(&one)["plan"]["hold_release"], 0.0);
    let d = rel_l2(&latents(&one), &latents(&released));
    assert!(
        d > 1e-3,
        "hold release 0.9 changed nothing (relative L2 {d:.3e})"
    );
    // Rescheduled noise: generated by each worker from the seed alike, so three workers still
    // give what one does; the manifest names the layout, and the latents are not those of
    // independent noise.
    let mut a1 = args("1");
    a1.extend(["--noise-layout", "rescheduled"]);
    let mut a3 = args("3");
    a3.extend(["--noise-layout", "rescheduled"]);
    let (r1, r3) = (render(&a1, tmp.path()), render(&a3, tmp.path()));
    assert_eq!(owners_of(&r3).len(), 3);
    assert!(latents(&r1) == latents(&r3), "rescheduled");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r3.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["plan"]["noise_layout"], "rescheduled");
    assert_eq!(m["request"]["noise_layout"], "rescheduled");
    let plain = render(&args("1"), tmp.path());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["plan"]["noise_layout"], "independent");
    let d = rel_l2(&latents(&plain), &latents(&r1));
    assert!(
        d > 1e-2,
        "rescheduled noise changed nothing (relative L2 {d:.3e})"
    );
}

/// The CPU thread count and a pool larger than the plan change nothing: `--threads 1` and
/// `--threads 2` give bit-identical latents, and so do 5 workers for a 3-window plan (two of
/// them get no window).
#[test]
fn threads_and_idle_workers_do_not_change_the_latents() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |threads: &'static str, workers: &'static str| {
        vec![
            "--threads",
            threads,
            "--prompt",
            "waves",
            "--num-frames",
            "41",
            "--seed",
            "5",
            "--window",
            "5",
            "--overlap",
            "2",
            "--steps",
            "3",
            "--workers",
            workers,
        ]
    };
    let base = latents(&render(&args("1", "1"), tmp.path()));
    assert!(
        latents(&render(&args("2", "1"), tmp.path())) == base,
        "--threads 2"
    );
    let five = render(&args("2", "5"), tmp.path());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(five.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["plan"]["windows"].as_array().unwrap().len(), 3);
    assert!(latents(&five) == base, "5 workers for 3 windows");
}

/// The delivered pixels: the PNG frames of a one-window render equal the reference pipeline's
/// video quantised as its post-processing does (`round(clamp(x/2 + 0.5, 0, 1)·255)`), in order
/// and at the requested size. Every value equals the reference's except where the reference
/// itself lies on a rounding boundary: a value within `TIE` of a half level (x·255 = k + 0.5 ± TIE)
/// may round to either neighbour, because the two implementations' floats agree to ~1e-6, not
/// bit for bit. `TIE` is 0.01 of a level, about eighty times the widest tie measured (1.2e-4
/// levels); any other difference, or a tie resolved more than one level off, fails. The MP4's frames are those PNGs
/// through H.264, each within the PSNR stated here and closest to its own PNG.
#[test]
fn delivered_frames_match_the_reference_video() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("pipeline/tiny");
    let run = fixture("pipeline/tiny/run_0.safetensors");
    let dir = render(
        &[
            "--prompt",
            "a red fox running through snow",
            "--negative-prompt",
            "blurry",
            "--model",
            model.to_str().unwrap(),
            "--num-frames",
            "9",
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "4",
            "--guidance",
            "5",
            "--noise-file",
            run.to_str().unwrap(),
            "--png-frames",
        ],
        tmp.path(),
    );
    let (shape, video) = SafetensorsFile::open(&run)
        .unwrap()
        .read_f32("video")
        .unwrap();
    assert_eq!(shape, [1, 3, 9, 32, 48]);
    let (f, h, w) = (9, 32, 48);
    // The reference frames before rounding, in levels (0..=255), interleaved RGB.
    let reference: Vec<Vec<f32>> = (0..f)
        .map(|t| {
            let mut rgb = vec![0f32; h * w * 3];
            for c in 0..3 {
                for i in 0..h * w {
                    let x = video[((c * f) + t) * h * w + i];
                    rgb[3 * i + c] = (x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
                }
            }
            rgb
        })
        .collect();
    const TIE: f32 = 0.01;
    let mut pngs = Vec::new();
    let (mut ties, mut values, mut nearest_tie, mut widest_tie) = (0, 0, f32::MAX, 0f32);
    for (t, want) in reference.iter().enumerate() {
        let file = std::fs::File::open(dir.join(format!("frames/{t:06}.png"))).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w as u32, h as u32));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        for (i, (&a, &x)) in buf.iter().zip(want).enumerate() {
            let from_half = (x - x.floor() - 0.5).abs();
            nearest_tie = nearest_tie.min(from_half);
            if a != x.round() as u8 {
                // Only a tie may go the other way, and only to the other side of its half level.
                let other = if x.round() > x { x.floor() } else { x.ceil() };
                assert!(
                    from_half < TIE && a == other as u8,
                    "frame {t}, value {i}: {a}, the reference {x:.5} rounds to {}",
                    x.round()
                );
                ties += 1;
                widest_tie = widest_tie.max(from_half);
            }
            values += 1;
        }
        pngs.push(buf);
    }
    assert!(
        !dir.join(format!("frames/{f:06}.png")).exists(),
        "no extra frame"
    );
    eprintln!(
        "PNG frames vs the reference video: {values} values, all equal but {ties} ties \
         rounded the other way (the reference at most {widest_tie:.2e} levels from a half \
         level; allowed {TIE}); the nearest reference value to a half level is \
         {nearest_tie:.2e} levels from it"
    );

    let mp4 = std::fs::read(dir.join("video.mp4")).unwrap();
    let (mw, mh, frames) = longtake_worker::media::decode_mp4(&mp4).unwrap();
    assert_eq!((mw, mh, frames.len()), (w, h, f));
    let psnr = |a: &[u8], b: &[u8]| {
        let mse = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
    };
    let mut worst = f64::INFINITY;
    for (t, frame) in frames.iter().enumerate() {
        let own = psnr(frame, &pngs[t]);
        worst = worst.min(own);
        // Frame order: each decoded frame is closest to its own PNG.
        for (u, other) in pngs.iter().enumerate() {
            if u != t {
                assert!(
                    psnr(frame, other) < own,
                    "MP4 frame {t} is closer to PNG {u}"
                );
            }
        }
    }
    // Colour range: a limited/full-range mix-up shifts every mean by several levels.
    let mean = |v: &[Vec<u8>]| {
        v.iter().flatten().map(|x| *x as f64).sum::<f64>()
            / v.iter().map(Vec::len).sum::<usize>() as f64
    };
    let shift = (mean(&frames) - mean(&pngs)).abs();
    eprintln!(
        "MP4 frames vs the PNG frames: worst PSNR {worst:.1} dB, mean level shift {shift:.2}"
    );
    // The writer spends about 0.15 bit per pixel per frame (at least 200 kbit/s): on this
    // random-weight model's noise-like 48×32 frames that measures 24–25 dB; 22 dB leaves margin
    // while a wrong frame, a transposed plane or a range mix-up falls far below it.
    assert!(worst >= 22.0, "MP4 worst PSNR {worst:.1} dB < 22 dB");
    assert!(shift < 2.0, "mean level shift {shift:.2}");
}

#[test]
fn one_window_and_codenoise_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("pipeline/tiny");
    let model = model.to_str().unwrap();
    // One window: WanPipeline from the same noise.
    let run = fixture("pipeline/tiny/run_0.safetensors");
    let dir = render(
        &[
            "--prompt",
            "a red fox running through snow",
            "--negative-prompt",
            "blurry",
            "--model",
            model,
            "--num-frames",
            "9",
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "4",
            "--guidance",
            "5",
            "--noise-file",
            run.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let expected = SafetensorsFile::open(&run)
        .unwrap()
        .read_f32("latents")
        .unwrap()
        .1;
    let err = rel_l2(&latents(&dir), &expected);
    assert!(err <= 1e-4, "one window vs WanPipeline: {err:.3e}");
    // Three co-denoised windows: the reference loop of tools/reference_codenoise.py.
    let run = fixture("codenoise/tiny/run_0.safetensors");
    let dir = render(
        &[
            "--prompt",
            "a red fox running through snow",
            "--negative-prompt",
            "blurry",
            "--model",
            model,
            "--num-frames",
            "25",
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "3",
            "--guidance",
            "5",
            "--window",
            "3",
            "--overlap",
            "1",
            "--noise-file",
            run.to_str().unwrap(),
            "--workers",
            "2",
        ],
        tmp.path(),
    );
    let expected = SafetensorsFile::open(&run)
        .unwrap()
        .read_f32("latents")
        .unwrap()
        .1;
    let err = rel_l2(&latents(&dir), &expected);
    assert!(err <= 1e-4, "codenoise vs the reference loop: {err:.3e}");
}

#[test]
fn bad_requests_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &[&str]); 15] = [
        (&["--prompt", "  "], &["prompt"]),
        (&["--prompt", "x", "--duration", "0"], &["duration"]),
        (
            &["--prompt", "x", "--duration", "100000"],
            &["duration", "600"],
        ),
        (&["--prompt", "x", "--width", "70"], &["width", "16"]),
        (
            &["--prompt", "x", "--window", "5", "--overlap", "5"],
            &["overlap"],
        ),
        (&["--prompt", "x", "--steps", "0"], &["steps"]),
        (
            &["--prompt", "x", "--stitching", "blend"],
            &["stitching", "codenoise"],
        ),
        (
            &["--prompt", "x", "--noise-layout", "fresh"],
            &["noise-layout", "independent, rescheduled"],
        ),
        (
            &[
                "--prompt",
                "x",
                "--noise-layout",
                "rescheduled",
                "--noise-file",
                "n.safetensors",
            ],
            &["noise-layout", "--noise-file"],
        ),
        (
            &["--prompt", "x", "--hold-noise", "2"],
            &["hold_noise", "from 0 to 1"],
        ),
        (
            &[
                "--prompt",
                "x",
                "--stitching",
                "codenoise",
                "--hold-noise",
                "0.5",
            ],
            &["hold_noise", "AUTOREGRESSIVE"],
        ),
        (
            &["--prompt", "x", "--hold-release", "1.5"],
            &["hold_release", "from 0 to 1"],
        ),
        (
            &[
                "--prompt",
                "x",
                "--stitching",
                "independent",
                "--hold-release",
                "0.4",
            ],
            &["hold_release", "AUTOREGRESSIVE"],
        ),
        (
            &["--prompt", "x", "--model", "/nonexistent/model"],
            &["model", "/nonexistent/model"],
        ),
        (&["--prompt", "x", "--workers", "0"], &["workers"]),
    ];
    for (args, parts) in cases {
        let mut all = vec!["render"];
        all.extend_from_slice(args);
        let o = longtake(&all, tmp.path());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        for p in parts {
            assert!(err.contains(p), "{args:?}: {err:?} should mention {p:?}");
        }
        let renders = tmp.path().join("renders");
        let written = renders.exists() && std::fs::read_dir(&renders).unwrap().next().is_some();
        assert!(!written, "{args:?} wrote a render");
    }
}

#[test]
fn a_killed_render_is_never_presented_as_finished() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args([
            "render",
            "--model",
            "builtin:smoke",
            "--prompt",
            "long",
            "--duration",
            "60",
            "--steps",
            "8",
            "--seed",
            "1",
        ])
        .current_dir(tmp.path())
        .env("XDG_CACHE_HOME", tmp.path().join("cache"))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it at a known phase: once it reports decoded frames (stderr is not a terminal, so
    // progress comes as lines).
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    let decoding = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            // "render <id>: decoding N/961 frames" with N > 0: frames are being decoded.
            Ok(line)
                if line
                    .split(": decoding ")
                    .nth(1)
                    .and_then(|r| r.split('/').next()?.parse::<u32>().ok())
                    .is_some_and(|n| n > 0) =>
            {
                break true;
            }
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        decoding,
        "the render never reported decoded frames: {seen:?}"
    );
    let dirs: Vec<_> = std::fs::read_dir(tmp.path().join("renders"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(dirs.len(), 1);
    let d = dirs[0].path();
    assert!(
        !d.join("manifest.json").exists(),
        "a killed render has a manifest: {}",
        d.display()
    );
    // Decoding starts from the fused latents, written once before it.
    assert!(d.join("latents.safetensors").is_file());
    for f in std::fs::read_dir(&d).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        assert!(
            // Intermediate data (windows' latents, checkpoints) stays until the render
            // finishes; nothing else is written.
            [
                "latents.safetensors",
                "video.mp4",
                "frames",
                "windows",
                "checkpoints",
                "inputs",
            ]
            .contains(&name.as_str()),
            "unexpected object {name}"
        );
    }
}

#[test]
fn analyze_reports_coherence_measures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = render(
        &["--prompt", "waves", "--num-frames", "97", "--seed", "2"],
        tmp.path(),
    );
    let o = longtake(&["analyze", dir.to_str().unwrap()], tmp.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| 2 / 25 / 97"), "{out}");
    assert!(
        out.contains("seam z-score") && out.contains("ΔE2000"),
        "{out}"
    );
    // Not a demo-world prompt: no scene rows.
    assert!(!out.contains("named background"), "{out}");

    let sheet = tmp.path().join("sheet.png");
    let o = longtake(
        &[
            "analyze",
            dir.to_str().unwrap(),
            "--json",
            "--sheet",
            sheet.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["latent_seam_ratio", "video_seam_ratio", "seam_z_max"] {
        let r = json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {json}"));
        assert!(r.is_finite(), "{key} = {r}");
    }
    assert!(json["latent_seam_ratio"].as_f64().unwrap() > 0.0);
    // 97 frames at 16 fps: 7 seconds of colour statistics, each a CIELAB triple.
    let lab = json["lab_per_second"].as_array().unwrap();
    assert_eq!(lab.len(), 7);
    assert!((0.0..=100.0).contains(&lab[0][0].as_f64().unwrap()));
    assert!(json["drift_de2000"].as_f64().unwrap() >= 0.0);
    assert_eq!(json["changes"].as_array().unwrap().len(), 96);
    assert!(json["scene"].is_null());
    let png = std::fs::read(&sheet).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // A demo-world prompt gets the scene measures (the smoke model draws noise, so only their
    // presence and ranges are checked here).
    let dir = render(
        &[
            "--prompt",
            "a red circle moves left on a blue background",
            "--num-frames",
            "33",
            "--seed",
            "2",
        ],
        tmp.path(),
    );
    let o = longtake(&["analyze", dir.to_str().unwrap(), "--json"], tmp.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let scene = &json["scene"];
    for key in ["background_frac", "object_frac", "motion_frac"] {
        let v = scene[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {json}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(scene["track"].as_array().unwrap().len(), 33);

    let o = longtake(&["analyze", tmp.path().to_str().unwrap()], tmp.path());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("manifest.json"));
}

#[test]
fn compare_renders_every_strategy() {
    let tmp = tempfile::tempdir().unwrap();
    let o = longtake(
        &[
            "compare",
            "--model",
            "builtin:smoke",
            "--prompt",
            "waves",
            "--num-frames",
            "49",
            "--window",
            "7",
            "--overlap",
            "2",
            "--seed",
            "3",
            "--json",
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs = json.as_array().unwrap();
    let names: Vec<&str> = runs
        .iter()
        .map(|r| r["stitching"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["codenoise", "independent", "autoregressive"]);
    for r in runs {
        assert_eq!(r["windows"], 3);
        assert_eq!(r["video_frames"], 49);
    }
    // The same seed: the strategies start from the same noise, so they differ but not wildly;
    // codenoise and independent differ somewhere (the fusion acts every step).
    assert_ne!(runs[0]["changes"], runs[1]["changes"]);
}
