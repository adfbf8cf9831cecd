//! `longtake analyze RENDER_DIR`: how visible the window seams are. From the final latents and
//! the decoded video it measures the mean frame-to-frame change between frames covered by the
//! same windows ("inside") and between frames whose covering windows differ ("boundary"); the
//! seam ratio is boundary / inside (about 1 when seams are invisible). Comparable across
//! stitching strategies for the same request.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use longtake_model::io::SafetensorsFile;

#[derive(Args)]
pub struct AnalyzeArgs {
    /// A finished render's directory (with manifest.json, latents.safetensors, video.mp4).
    render_dir: PathBuf,
}

/// Mean change inside windows and across boundaries.
#[derive(Debug, Default)]
struct Seams {
    inside: (f64, usize),
    boundary: (f64, usize),
}

impl Seams {
    fn add(&mut self, boundary: bool, v: f64) {
        let slot = if boundary {
            &mut self.boundary
        } else {
            &mut self.inside
        };
        slot.0 += v;
        slot.1 += 1;
    }

    fn means(&self) -> (f64, f64, Option<f64>) {
        let m = |(s, n): (f64, usize)| if n == 0 { f64::NAN } else { s / n as f64 };
        let (i, b) = (m(self.inside), m(self.boundary));
        (
            i,
            b,
            (self.boundary.1 > 0 && self.inside.1 > 0 && i > 0.0).then(|| b / i),
        )
    }

    fn line(&self, what: &str) -> String {
        let (i, b, r) = self.means();
        match r {
            Some(r) => format!(
                "{what}: inside {i:.5} ({} transitions), boundary {b:.5} ({}), seam ratio {r:.3}",
                self.inside.1, self.boundary.1
            ),
            None => format!(
                "{what}: inside {i:.5} ({} transitions); no window boundaries",
                self.inside.1
            ),
        }
    }
}

pub fn run(a: &AnalyzeArgs) -> Result<()> {
    let dir = &a.render_dir;
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).with_context(|| {
            format!(
                "{}: not a finished render (no manifest.json)",
                dir.display()
            )
        })?,
    )
    .context("manifest.json")?;
    let windows: Vec<(usize, usize)> = manifest["plan"]["windows"]
        .as_array()
        .context("manifest.json: plan.windows missing")?
        .iter()
        .map(|w| Some((w["start"].as_u64()? as usize, w["len"].as_u64()? as usize)))
        .collect::<Option<_>>()
        .context("manifest.json: plan.windows entries need start and len")?;
    let (shape, lat) =
        SafetensorsFile::open(&dir.join("latents.safetensors"))?.read_f32("latents")?;
    let [_, c, t, h, w] = <[usize; 5]>::try_from(shape.as_slice())
        .map_err(|_| anyhow::anyhow!("latents: shape {shape:?}"))?;
    let covering = |f: usize| -> BTreeSet<usize> {
        windows
            .iter()
            .enumerate()
            .filter(|(_, (s, l))| f >= *s && f < s + l)
            .map(|(i, _)| i)
            .collect()
    };
    let hw = h * w;
    let mut latent = Seams::default();
    for f in 0..t.saturating_sub(1) {
        let mut d = 0.0f64;
        for ch in 0..c {
            let a = &lat[(ch * t + f) * hw..(ch * t + f + 1) * hw];
            let b = &lat[(ch * t + f + 1) * hw..(ch * t + f + 2) * hw];
            d += a
                .iter()
                .zip(b)
                .map(|(x, y)| (*x - *y).abs() as f64)
                .sum::<f64>();
        }
        latent.add(covering(f) != covering(f + 1), d / (c * hw) as f64);
    }
    let video = std::fs::read(dir.join("video.mp4"))
        .with_context(|| format!("{}/video.mp4", dir.display()))?;
    let (_, _, frames) = longtake_worker::media::decode_mp4(&video)?;
    if frames.is_empty() {
        bail!("video.mp4 has no frames");
    }
    let lat_of = |p: usize| if p == 0 { 0 } else { (p - 1) / 4 + 1 };
    let mut pixel = Seams::default();
    for p in 0..frames.len() - 1 {
        let d = frames[p]
            .iter()
            .zip(&frames[p + 1])
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / (255.0 * frames[p].len() as f64);
        pixel.add(covering(lat_of(p)) != covering(lat_of(p + 1)), d);
    }
    println!(
        "render {}: stitching {}, {} windows, {t} latent frames, {} video frames",
        dir.display(),
        manifest["plan"]["stitching"].as_str().unwrap_or("?"),
        windows.len(),
        frames.len()
    );
    println!("{}", latent.line("latents"));
    println!("{}", pixel.line("video"));
    let json = serde_json::json!({
        "latent_inside": latent.means().0, "latent_boundary": latent.means().1, "latent_seam_ratio": latent.means().2,
        "video_inside": pixel.means().0, "video_boundary": pixel.means().1, "video_seam_ratio": pixel.means().2,
    });
    println!("{json}");
    Ok(())
}
