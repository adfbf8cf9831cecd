//! `longtake analyze` on renders whose content is known: a synthetic render directory (a yellow
//! 24-px square moving right at 2 px/frame over a green background, wrapping at the edge, encoded
//! with the same H.264 writer as real renders, and a plan of three windows) must read as 100 % of
//! the named colours, motion to the right at 2 px/frame and a continuous track; the same video
//! with the object displaced by 20 px at one window boundary must read as a jump there, with a
//! large seam z-score, and displaced inside a latent frame as a continuous track.

use std::path::Path;
use std::process::Command;

use longtake_worker::media::Mp4Writer;

const W: usize = 64;
const H: usize = 64;
const FRAMES: usize = 161;
const GREEN: [u8; 3] = [0, 255, 0];
const YELLOW: [u8; 3] = [255, 255, 0];

/// Frame `f` with the square's left edge at `x0 + 2 f + jump(f)`.
fn frame(f: usize, jump: impl Fn(usize) -> usize) -> Vec<u8> {
    let left = (10 + 2 * f + jump(f)) % W;
    let mut px = Vec::with_capacity(W * H * 3);
    for y in 0..H {
        for x in 0..W {
            let inside = (x + W - left) % W < 24 && (20..44).contains(&y);
            px.extend_from_slice(if inside { &YELLOW } else { &GREEN });
        }
    }
    px
}

/// A render directory as `longtake render` writes one: manifest.json (plan: 41 latent frames in
/// windows 0..21, 17..38, 20..41), latents.safetensors and video.mp4.
fn synthetic_render(dir: &Path, jump: impl Fn(usize) -> usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut mp4 = Mp4Writer::new(W, H, 16).unwrap();
    for f in 0..FRAMES {
        mp4.push_rgb(&frame(f, &jump)).unwrap();
    }
    std::fs::write(dir.join("video.mp4"), mp4.finish().unwrap()).unwrap();
    let t = 41;
    let latents = vec![0.0f32; 16 * t * 8 * 8];
    let file = longtake_model::io::f32_safetensors(
        &[("latents", &[1, 16, t, 8, 8], &latents)],
        Default::default(),
    )
    .unwrap();
    std::fs::write(dir.join("latents.safetensors"), file).unwrap();
    let manifest = serde_json::json!({
        "request": {"prompt": "a yellow square moves right on a green background"},
        "video": {"num_frames": FRAMES, "fps": 16, "width": W, "height": H},
        "plan": {
            "latent_frames": t,
            "stitching": "codenoise",
            "windows": [
                {"index": 0, "start": 0, "len": 21},
                {"index": 1, "start": 17, "len": 21},
                {"index": 2, "start": 20, "len": 21},
            ],
        },
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

fn analyze(dir: &Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args(["analyze", dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_known_scene_reads_as_what_it_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let smooth = tmp.path().join("smooth");
    synthetic_render(&smooth, |_| 0);
    let r = analyze(&smooth);
    let s = &r["scene"];
    assert_eq!(s["background_frac"], 1.0, "{s}");
    assert_eq!(s["object_frac"], 1.0, "{s}");
    // The 24-px square (H.264 may blur an edge by a pixel).
    for e in s["median_extent"].as_array().unwrap() {
        assert!((23.0..=26.0).contains(&e.as_f64().unwrap()), "{s}");
    }
    assert!(s["motion_frac"].as_f64().unwrap() >= 0.99, "{s}");
    let step = s["median_step"].as_array().unwrap();
    assert!((step[0].as_f64().unwrap() - 2.0).abs() < 0.25, "{s}");
    assert!(step[1].as_f64().unwrap().abs() < 0.25, "{s}");
    assert_eq!(s["continuous"], true, "{s}");
    // One flat colour with a small moving square: the mean colour barely moves.
    assert!(r["drift_de2000"].as_f64().unwrap() < 1.0, "{r}");
    assert_eq!(r["lab_per_second"].as_array().unwrap().len(), 11);
    // The window boundaries in pixel frames: the coverage changes at latent frames 17, 20, 21
    // and 38, i.e. the steps 64→65, 76→77, 80→81 and 148→149.
    let boundaries: Vec<usize> = r["boundary_steps"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, b)| b.as_bool().unwrap())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(boundaries, [64, 76, 80, 148]);

    // The object jumps 20 px at the boundary step 76 → 77 (and stays displaced).
    let jumpy = tmp.path().join("jumpy");
    synthetic_render(&jumpy, |f| if f >= 77 { 20 } else { 0 });
    let r = analyze(&jumpy);
    let s = &r["scene"];
    assert_eq!(s["continuous"], false, "{s}");
    let jump = s["max_boundary_jump"].as_f64().unwrap();
    assert!((jump - 20.0).abs() < 2.0, "{s}");
    assert!(s["max_inside_jump"].as_f64().unwrap() < 2.0, "{s}");
    assert!(r["seam_z_max"].as_f64().unwrap() > 5.0, "{r}");
    // The largest step joins latent frames 20 and 21 (pixel frames 76 → 77); 4 of the 40 steps
    // that join two latent frames are boundary steps, so seamless hand-overs would land the
    // largest step on a boundary about one time in ten.
    assert!(
        (s["jump_chance"].as_f64().unwrap() - 0.1).abs() < 1e-9,
        "{s}"
    );

    // The same jump two pixel frames later (78 → 79), inside latent frame 21: no boundary step
    // can be the largest, and the track reads as continuous.
    let inside = tmp.path().join("inside");
    synthetic_render(&inside, |f| if f >= 79 { 20 } else { 0 });
    let s = analyze(&inside)["scene"].clone();
    assert_eq!(s["continuous"], true, "{s}");
    assert!(s["max_inside_jump"].as_f64().unwrap() > 18.0, "{s}");
    assert_eq!(s["jump_chance"], 0.0, "{s}");
}
