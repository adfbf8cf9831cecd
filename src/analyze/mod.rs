//! `longtake analyze RENDER_DIR`: how coherent a finished render is, from its final latents, its
//! decoded video and its window plan.
//!
//! - Seams: the mean frame-to-frame change between frames covered by the same windows
//!   ("inside") and between frames whose covering windows differ ("boundary"), in the latents and
//!   in the video; the seam ratio is boundary / inside (about 1 when seams are invisible), and the
//!   seam z-score puts each boundary step's change against the distribution of the steps inside.
//! - Colour: the mean CIELAB colour of every second, and the drift between the first and the last
//!   five seconds (CIEDE2000).
//! - For prompts of the demo world ("a red circle moves left on a blue background"): per frame
//!   the background and object colours and the object's wrap-aware centroid; the fractions of
//!   frames that show the named colours, the fraction of steps that move in the named direction,
//!   the object's median extent (a band across the frame spans all of it), and whether the
//!   track stays continuous across window boundaries (no jump there larger than the largest
//!   inside a window), with how often seamless hand-overs would fail that test by chance.
//!
//! `--sheet PNG` draws it (see [`sheet`]); `--json` prints one JSON object instead of the table.

mod measures;
mod sheet;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use longtake_model::io::SafetensorsFile;
use serde::Serialize;

pub use measures::parse_caption;
use measures::{PALETTE, frame_object, wrap};

#[derive(Args)]
pub struct AnalyzeArgs {
    /// A finished render's directory (with manifest.json, latents.safetensors, video.mp4).
    render_dir: PathBuf,
    /// Also draw a contact sheet to this PNG file: frames sampled across the video with the window
    /// boundaries marked, and the measures plotted over time.
    #[arg(long, value_name = "PNG")]
    sheet: Option<PathBuf>,
    /// Print the measures as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// What a demo-world scene's frames show against what its caption names.
#[derive(Debug, Clone, Serialize)]
pub struct SceneReport {
    pub caption: String,
    /// Frames whose background is the named colour.
    pub background_frac: f64,
    /// Frames that show an object of the named colour.
    pub object_frac: f64,
    /// Median wrap-aware extent (width, height) of the object over the frames that show one, px:
    /// the demo world draws 24 px at 64 × 64; a band across the frame spans all of it.
    pub median_extent: [f64; 2],
    /// Steps (frame to frame) whose object moves in the named direction (a frame without the
    /// object counts against it).
    pub motion_frac: f64,
    /// Median displacement per frame, px (x right, y down).
    pub median_step: [f64; 2],
    /// Largest deviation from the median step at a window boundary, and inside windows, px.
    pub max_boundary_jump: f64,
    pub max_inside_jump: f64,
    /// No boundary jump larger than the largest inside a window.
    pub continuous: bool,
    /// How often hand-overs exactly as rough as the inside of a window would still fail
    /// `continuous`: a decoded track steps furthest from one latent frame to the next (within a
    /// latent frame's pixel frames the decoder interpolates), every boundary step is such a step,
    /// so with seamless hand-overs the largest step lands on a boundary about as often as the
    /// boundary steps' share of them. That share when the largest step joins two latent frames,
    /// else 0.
    pub jump_chance: f64,
    /// Per frame: the object's centroid (x, y), or null.
    pub track: Vec<Option<[f64; 2]>>,
    /// Per frame: the background's palette name.
    pub backgrounds: Vec<&'static str>,
}

/// Every measure of one render.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub render: String,
    pub prompt: String,
    pub stitching: String,
    pub windows: usize,
    pub latent_frames: usize,
    pub video_frames: usize,
    pub fps: u32,
    pub width: usize,
    pub height: usize,
    pub latent_inside: f64,
    pub latent_boundary: f64,
    pub latent_seam_ratio: Option<f64>,
    pub video_inside: f64,
    pub video_boundary: f64,
    pub video_seam_ratio: Option<f64>,
    /// Largest and mean seam z-score over the boundary steps (null without boundaries).
    pub seam_z_max: Option<f64>,
    pub seam_z_mean: Option<f64>,
    /// Mean CIELAB colour of each second.
    pub lab_per_second: Vec<[f64; 3]>,
    /// CIEDE2000 between the mean colours of the first and the last five seconds (halves of a
    /// video shorter than ten seconds).
    pub drift_de2000: f64,
    pub scene: Option<SceneReport>,
    /// Per step: the mean absolute frame-to-frame change (0..1) and whether it crosses a boundary.
    pub changes: Vec<f64>,
    pub boundary_steps: Vec<bool>,
    /// The windows in pixel frames: [first, last].
    pub window_frames: Vec<[usize; 2]>,
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
}

/// Analyze a finished render directory.
pub fn analyze(dir: &Path) -> Result<(Report, Vec<Vec<u8>>)> {
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
    let (width, height, frames) = longtake_worker::media::decode_mp4(&video)?;
    if frames.is_empty() {
        bail!("video.mp4 has no frames");
    }
    // Pixel frames per latent frame after the first (4 for Wan2.1).
    let temporal = if t > 1 {
        ((frames.len() - 1) / (t - 1)).max(1)
    } else {
        4
    };
    let lat_of = |p: usize| if p == 0 { 0 } else { (p - 1) / temporal + 1 };
    let pix_of = |l: usize| if l == 0 { 0 } else { (l - 1) * temporal + 1 };
    let changes = measures::frame_changes(&frames);
    let boundary_steps: Vec<bool> = (0..changes.len())
        .map(|p| covering(lat_of(p)) != covering(lat_of(p + 1)))
        .collect();
    let mut pixel = Seams::default();
    for (c, b) in changes.iter().zip(&boundary_steps) {
        pixel.add(*b, *c);
    }
    let z = measures::seam_z(&changes, &boundary_steps);
    let z_ok: Vec<f64> = z.iter().copied().filter(|v| v.is_finite()).collect();

    let fps = manifest["video"]["fps"].as_u64().unwrap_or(16).max(1) as u32;
    let stride = (width * height / 16_384).max(1);
    let frame_lab: Vec<[f64; 3]> = frames
        .iter()
        .map(|f| measures::mean_lab(f, stride))
        .collect();
    let mean_of = |r: std::ops::Range<usize>| -> [f64; 3] {
        let n = r.len().max(1) as f64;
        let mut s = [0.0; 3];
        for l in &frame_lab[r] {
            for i in 0..3 {
                s[i] += l[i];
            }
        }
        s.map(|v| v / n)
    };
    let per = fps as usize;
    let lab_per_second: Vec<[f64; 3]> = (0..frames.len().div_ceil(per))
        .map(|s| mean_of(s * per..((s + 1) * per).min(frames.len())))
        .collect();
    let span = (5 * per).min(frames.len() / 2).max(1);
    let drift_de2000 =
        measures::delta_e2000(mean_of(0..span), mean_of(frames.len() - span..frames.len()));

    let prompt = manifest["request"]["prompt"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let scene = parse_caption(&prompt).map(|cap| {
        let steps = Steps {
            boundary: &boundary_steps,
            temporal,
        };
        scene_report(&prompt, &cap, &frames, width, height, steps)
    });
    let (li, lb, lr) = latent.means();
    let (vi, vb, vr) = pixel.means();
    let report = Report {
        render: dir.display().to_string(),
        prompt,
        stitching: manifest["plan"]["stitching"]
            .as_str()
            .unwrap_or("?")
            .to_string(),
        windows: windows.len(),
        latent_frames: t,
        video_frames: frames.len(),
        fps,
        width,
        height,
        latent_inside: li,
        latent_boundary: lb,
        latent_seam_ratio: lr,
        video_inside: vi,
        video_boundary: vb,
        video_seam_ratio: vr,
        seam_z_max: z_ok.iter().copied().reduce(f64::max),
        seam_z_mean: (!z_ok.is_empty()).then(|| z_ok.iter().sum::<f64>() / z_ok.len() as f64),
        lab_per_second,
        drift_de2000,
        scene,
        changes,
        boundary_steps,
        window_frames: windows
            .iter()
            .map(|(s, l)| {
                [
                    pix_of(*s),
                    (pix_of(s + l - 1) + temporal - 1).min(frames.len() - 1),
                ]
            })
            .collect(),
    };
    Ok((report, frames))
}

/// The video's frame-to-frame steps: whether each crosses a window boundary, and the pixel frames
/// per latent frame after the first (step `p` joins two latent frames when `p % temporal == 0`).
struct Steps<'a> {
    boundary: &'a [bool],
    temporal: usize,
}

fn scene_report(
    caption: &str,
    cap: &measures::Caption,
    frames: &[Vec<u8>],
    width: usize,
    height: usize,
    kinds: Steps,
) -> SceneReport {
    let objs: Vec<_> = frames
        .iter()
        .map(|f| frame_object(f, width, height))
        .collect();
    let n = frames.len() as f64;
    let background_frac = objs
        .iter()
        .filter(|o| o.background == cap.background)
        .count() as f64
        / n;
    let object_frac = objs
        .iter()
        .filter(|o| o.object.as_ref().is_some_and(|b| b.colour == cap.object))
        .count() as f64
        / n;
    let track: Vec<Option<[f64; 2]>> = objs
        .iter()
        .map(|o| o.object.as_ref().map(|b| b.centre))
        .collect();
    let steps: Vec<Option<(f64, f64)>> = track
        .windows(2)
        .map(|p| match (p[0], p[1]) {
            (Some(a), Some(b)) => Some((
                wrap(b[0] - a[0], width as f64),
                wrap(b[1] - a[1], height as f64),
            )),
            _ => None,
        })
        .collect();
    let agree = steps
        .iter()
        .filter(|s| s.is_some_and(|(dx, dy)| measures::step_agrees(&cap.motion, dx, dy)))
        .count();
    let motion_frac = agree as f64 / steps.len().max(1) as f64;
    let med = |mut v: Vec<f64>| {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let valid: Vec<(f64, f64)> = steps.iter().flatten().copied().collect();
    let mdx = med(valid.iter().map(|s| s.0).collect());
    let mdy = med(valid.iter().map(|s| s.1).collect());
    let (mut max_b, mut max_i) = (0.0f64, 0.0f64);
    // The largest step (its size, and whether it joins two latent frames), and how many steps
    // join latent frames, at boundaries and in all.
    let mut largest = (f64::NEG_INFINITY, false);
    let (mut latent_b, mut latent_all) = (0usize, 0usize);
    for (p, (s, b)) in steps.iter().zip(kinds.boundary).enumerate() {
        let l = p % kinds.temporal == 0;
        if let Some((dx, dy)) = s {
            let j = (dx - mdx).hypot(dy - mdy);
            if *b {
                max_b = max_b.max(j);
            } else {
                max_i = max_i.max(j);
            }
            if j > largest.0 {
                largest = (j, l);
            }
            latent_all += usize::from(l);
            latent_b += usize::from(l && *b);
        }
    }
    let jump_chance = if largest.1 {
        latent_b as f64 / latent_all as f64
    } else {
        0.0
    };
    SceneReport {
        caption: caption.to_string(),
        background_frac,
        object_frac,
        median_extent: [0, 1].map(|k| {
            med(objs
                .iter()
                .filter_map(|o| o.object.as_ref().map(|b| b.extent[k] as f64))
                .collect())
        }),
        motion_frac,
        median_step: [mdx, mdy],
        max_boundary_jump: max_b,
        max_inside_jump: max_i,
        continuous: max_b <= max_i,
        jump_chance,
        track,
        backgrounds: objs.iter().map(|o| PALETTE[o.background].0).collect(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or("-".to_string(), |x| format!("{x:.digits$}"))
}

/// The report's rows: (measure, value).
pub fn rows(r: &Report) -> Vec<(String, String)> {
    let mut rows = vec![
        ("stitching".to_string(), r.stitching.clone()),
        (
            "windows / latent frames / video frames".to_string(),
            format!("{} / {} / {}", r.windows, r.latent_frames, r.video_frames),
        ),
        (
            "latent seam ratio (boundary / inside change)".to_string(),
            opt(r.latent_seam_ratio, 3),
        ),
        ("video seam ratio".to_string(), opt(r.video_seam_ratio, 3)),
        (
            "seam z-score, max / mean over boundaries".to_string(),
            format!("{} / {}", opt(r.seam_z_max, 2), opt(r.seam_z_mean, 2)),
        ),
        (
            "colour drift, first vs last 5 s (ΔE2000)".to_string(),
            format!("{:.2}", r.drift_de2000),
        ),
    ];
    if let (Some(first), Some(last)) = (r.lab_per_second.first(), r.lab_per_second.last()) {
        rows.push((
            "mean CIELAB, first / last second".to_string(),
            format!(
                "({:.1}, {:.1}, {:.1}) / ({:.1}, {:.1}, {:.1})",
                first[0], first[1], first[2], last[0], last[1], last[2]
            ),
        ));
    }
    if let Some(s) = &r.scene {
        rows.extend([
            (
                "frames with the named background".to_string(),
                format!("{:.1} %", 100.0 * s.background_frac),
            ),
            (
                "frames with an object of the named colour".to_string(),
                format!("{:.1} %", 100.0 * s.object_frac),
            ),
            (
                "object extent, median (w × h px)".to_string(),
                format!("{:.0} × {:.0}", s.median_extent[0], s.median_extent[1]),
            ),
            (
                "steps moving in the named direction".to_string(),
                format!("{:.1} %", 100.0 * s.motion_frac),
            ),
            (
                "median step (x, y px/frame)".to_string(),
                format!("({:.2}, {:.2})", s.median_step[0], s.median_step[1]),
            ),
            (
                "largest track jump at a boundary / inside (px)".to_string(),
                format!(
                    "{:.2} / {:.2} ({})",
                    s.max_boundary_jump,
                    s.max_inside_jump,
                    if s.continuous { "continuous" } else { "jumps" }
                ),
            ),
            (
                "chance of such a boundary jump with seamless hand-overs".to_string(),
                format!("{:.1} %", 100.0 * s.jump_chance),
            ),
        ]);
    }
    rows
}

/// A two-or-more column table, the first column left-aligned.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        let mut s = String::from("|");
        for (c, cell) in cells.iter().enumerate() {
            let pad = width[c] - cell.chars().count();
            s += &format!(" {cell}{} |", " ".repeat(pad));
        }
        s
    };
    let mut out = line(header) + "\n|";
    for w in &width {
        out += &format!("{}|", "-".repeat(w + 2));
    }
    out += "\n";
    for r in rows {
        out += &(line(r) + "\n");
    }
    out
}

/// The report as JSON, per-frame series included.
pub fn json(r: &Report) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or(serde_json::Value::Null)
}

/// The contact sheet of a report, as PNG bytes.
pub fn sheet_png(report: &Report, frames: &[Vec<u8>]) -> Result<Vec<u8>> {
    sheet::draw(report, frames)
}

pub fn run(a: &AnalyzeArgs) -> Result<()> {
    let (report, frames) = analyze(&a.render_dir)?;
    if let Some(path) = &a.sheet {
        let png = sheet_png(&report, &frames)?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    let written = if a.json {
        writeln!(out, "{}", json(&report))
    } else {
        let rows: Vec<Vec<String>> = rows(&report).into_iter().map(|(k, v)| vec![k, v]).collect();
        writeln!(
            out,
            "{}: {}\n\n{}",
            report.render,
            report.prompt,
            table(&["measure".to_string(), "value".to_string()], &rows)
        )
    };
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }?;
    if let Some(path) = &a.sheet
        && !a.json
    {
        eprintln!("contact sheet: {}", path.display());
    }
    Ok(())
}
