//! The measures `analyze` reports, as pure functions of decoded RGB8 frames and the window plan:
//! frame-to-frame change and the seam z-score, CIELAB colour statistics and ΔE2000 drift, and for
//! scenes of the demo world the object's track (wrap-aware centroid) and its continuity.

/// The demo world's palette (`tools/scenes.py` `COLOURS`).
pub const PALETTE: [(&str, [u8; 3]); 6] = [
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("white", [255, 255, 255]),
    ("black", [0, 0, 0]),
];

/// A pixel farther than this from the frame's median colour (RGB in [0, 1], Euclidean) belongs
/// to the object.
const OBJECT_DISTANCE: f32 = 0.35;
/// Fewer object pixels than this: no object in the frame.
const MIN_OBJECT_PIXELS: usize = 4;
/// Below this speed (px/frame) an object stays still.
pub const STILL_SPEED: f64 = 0.25;

/// Index of the palette colour nearest to `rgb` (floats in [0, 1]).
pub fn nearest_colour(rgb: [f32; 3]) -> usize {
    let d = |c: [u8; 3]| {
        (0..3)
            .map(|i| (c[i] as f32 / 255.0 - rgb[i]).powi(2))
            .sum::<f32>()
    };
    (0..PALETTE.len())
        .min_by(|&a, &b| d(PALETTE[a].1).total_cmp(&d(PALETTE[b].1)))
        .unwrap_or(0)
}

fn median(v: &mut [f32]) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    let mid = v.len() / 2;
    v.select_nth_unstable_by(mid, f32::total_cmp);
    let hi = v[mid];
    if v.len() % 2 == 1 {
        hi
    } else {
        let lo = v[..mid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lo + hi) / 2.0
    }
}

/// Per-channel median colour of some pixels of a packed RGB8 frame, in [0, 1].
fn median_rgb(frame: &[u8], pixels: impl Iterator<Item = usize> + Clone) -> [f32; 3] {
    let mut out = [0.0; 3];
    for (ch, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f32> = pixels
            .clone()
            .map(|p| frame[3 * p + ch] as f32 / 255.0)
            .collect();
        *o = median(&mut v);
    }
    out
}

/// Circular mean of coordinates with period `period`.
fn circular_mean(coords: impl Iterator<Item = f64>, period: f64) -> f64 {
    let (mut s, mut c) = (0.0, 0.0);
    for x in coords {
        let a = std::f64::consts::TAU * x / period;
        s += a.sin();
        c += a.cos();
    }
    (s.atan2(c) / std::f64::consts::TAU * period).rem_euclid(period)
}

/// `d` wrapped into [−period/2, period/2).
pub fn wrap(d: f64, period: f64) -> f64 {
    (d + period / 2.0).rem_euclid(period) - period / 2.0
}

/// What one frame of a demo-world scene shows.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameObject {
    /// Palette index of the background (the colour nearest the frame's median).
    pub background: usize,
    /// The object; `None` when fewer than 4 pixels differ from the background.
    pub object: Option<Blob>,
}

/// The pixels of a frame that differ from its background.
#[derive(Debug, Clone, PartialEq)]
pub struct Blob {
    /// Palette index of their median colour.
    pub colour: usize,
    /// Wrap-aware centroid (x, y), px.
    pub centre: [f64; 2],
    /// Pixel count.
    pub area: usize,
    /// Wrap-aware extent (columns, rows): the shortest arc of the frame's width (height) that
    /// holds every column (row) they occupy.
    pub extent: [usize; 2],
}

/// Shortest arc of `0..period` (wrapping) that holds every occupied coordinate: `period` minus
/// the longest circular run of unoccupied ones.
fn circular_extent(occupied: &[bool]) -> usize {
    let n = occupied.len();
    if !occupied.iter().any(|o| *o) {
        return 0;
    }
    let (mut longest, mut run) = (0, 0);
    // Twice round, so that a gap across the edge counts as one run.
    for i in 0..2 * n {
        if occupied[i % n] {
            run = 0;
        } else {
            run += 1;
            longest = longest.max(run.min(n));
        }
    }
    n - longest
}

/// Find the background and the object of a packed RGB8 frame.
pub fn frame_object(frame: &[u8], width: usize, height: usize) -> FrameObject {
    let n = width * height;
    let med = median_rgb(frame, 0..n);
    let background = nearest_colour(med);
    let mask: Vec<usize> = (0..n)
        .filter(|&p| {
            let d: f32 = (0..3)
                .map(|ch| (frame[3 * p + ch] as f32 / 255.0 - med[ch]).powi(2))
                .sum();
            d.sqrt() > OBJECT_DISTANCE
        })
        .collect();
    if mask.len() < MIN_OBJECT_PIXELS {
        return FrameObject {
            background,
            object: None,
        };
    }
    let colour = nearest_colour(median_rgb(frame, mask.iter().copied()));
    let cx = circular_mean(mask.iter().map(|p| (p % width) as f64), width as f64);
    let cy = circular_mean(mask.iter().map(|p| (p / width) as f64), height as f64);
    let (mut cols, mut rows) = (vec![false; width], vec![false; height]);
    for p in &mask {
        cols[p % width] = true;
        rows[p / width] = true;
    }
    FrameObject {
        background,
        object: Some(Blob {
            colour,
            centre: [cx, cy],
            area: mask.len(),
            extent: [circular_extent(&cols), circular_extent(&rows)],
        }),
    }
}

/// Mean absolute change between consecutive frames, per step, in [0, 1].
pub fn frame_changes(frames: &[Vec<u8>]) -> Vec<f64> {
    frames
        .windows(2)
        .map(|p| {
            p[0].iter()
                .zip(&p[1])
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .sum::<f64>()
                / (255.0 * p[0].len().max(1) as f64)
        })
        .collect()
}

/// Mean and population standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

/// The seam z-scores: the change at each boundary step against the distribution of the change at
/// steps inside windows. `boundary[i]`: whether step i (frame i → i+1) crosses a boundary.
pub fn seam_z(changes: &[f64], boundary: &[bool]) -> Vec<f64> {
    let inside: Vec<f64> = changes
        .iter()
        .zip(boundary)
        .filter(|(_, b)| !**b)
        .map(|(c, _)| *c)
        .collect();
    let (m, s) = mean_std(&inside);
    changes
        .iter()
        .zip(boundary)
        .filter(|(_, b)| **b)
        .map(|(c, _)| if s > 0.0 { (c - m) / s } else { f64::NAN })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Colour

fn srgb_to_linear(c: f64) -> f64 {
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

fn linear_to_srgb(c: f64) -> f64 {
    let c = c.clamp(0.0, 1.0);
    if c <= 0.003_130_8 {
        12.92 * c
    } else {
        1.055 * c.powf(1.0 / 2.4) - 0.055
    }
}

// D65 reference white.
const WHITE: [f64; 3] = [0.950_47, 1.0, 1.088_83];

/// sRGB (8-bit) → CIELAB (D65).
pub fn rgb_to_lab(rgb: [u8; 3]) -> [f64; 3] {
    let [r, g, b] = rgb.map(|c| srgb_to_linear(c as f64 / 255.0));
    let x = 0.412_456_4 * r + 0.357_576_1 * g + 0.180_437_5 * b;
    let y = 0.212_672_9 * r + 0.715_152_2 * g + 0.072_175 * b;
    let z = 0.019_333_9 * r + 0.119_192 * g + 0.950_304_1 * b;
    let f = |t: f64| {
        if t > 216.0 / 24389.0 {
            t.cbrt()
        } else {
            (24389.0 / 27.0 * t + 16.0) / 116.0
        }
    };
    let (fx, fy, fz) = (f(x / WHITE[0]), f(y / WHITE[1]), f(z / WHITE[2]));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// CIELAB (D65) → sRGB (8-bit), clipped.
pub fn lab_to_rgb(lab: [f64; 3]) -> [u8; 3] {
    let fy = (lab[0] + 16.0) / 116.0;
    let fx = fy + lab[1] / 500.0;
    let fz = fy - lab[2] / 200.0;
    let inv = |f: f64| {
        let t = f * f * f;
        if t > 216.0 / 24389.0 {
            t
        } else {
            (116.0 * f - 16.0) * 27.0 / 24389.0
        }
    };
    let (x, y, z) = (inv(fx) * WHITE[0], inv(fy) * WHITE[1], inv(fz) * WHITE[2]);
    let r = 3.240_454_2 * x - 1.537_138_5 * y - 0.498_531_4 * z;
    let g = -0.969_266 * x + 1.876_010_8 * y + 0.041_556 * z;
    let b = 0.055_643_4 * x - 0.204_025_9 * y + 1.057_225_2 * z;
    [r, g, b].map(|c| (linear_to_srgb(c) * 255.0).round() as u8)
}

/// Mean CIELAB colour of a packed RGB8 frame (every `stride`-th pixel).
pub fn mean_lab(frame: &[u8], stride: usize) -> [f64; 3] {
    let mut sum = [0.0; 3];
    let mut n = 0usize;
    for px in frame.chunks_exact(3).step_by(stride.max(1)) {
        let lab = rgb_to_lab([px[0], px[1], px[2]]);
        for i in 0..3 {
            sum[i] += lab[i];
        }
        n += 1;
    }
    sum.map(|s| s / n.max(1) as f64)
}

/// CIEDE2000 colour difference (Sharma, Wu and Dalal 2005; kL = kC = kH = 1).
pub fn delta_e2000(lab1: [f64; 3], lab2: [f64; 3]) -> f64 {
    use std::f64::consts::PI;
    let [l1, a1, b1] = lab1;
    let [l2, a2, b2] = lab2;
    let c1 = a1.hypot(b1);
    let c2 = a2.hypot(b2);
    let cm = (c1 + c2) / 2.0;
    let g = 0.5 * (1.0 - (cm.powi(7) / (cm.powi(7) + 25f64.powi(7))).sqrt());
    let (a1p, a2p) = ((1.0 + g) * a1, (1.0 + g) * a2);
    let (c1p, c2p) = (a1p.hypot(b1), a2p.hypot(b2));
    let hue = |b: f64, a: f64| {
        if a == 0.0 && b == 0.0 {
            0.0
        } else {
            b.atan2(a).rem_euclid(2.0 * PI)
        }
    };
    let (h1p, h2p) = (hue(b1, a1p), hue(b2, a2p));
    let dl = l2 - l1;
    let dc = c2p - c1p;
    let dh = if c1p * c2p == 0.0 {
        0.0
    } else {
        let d = h2p - h1p;
        if d.abs() <= PI {
            d
        } else if d > PI {
            d - 2.0 * PI
        } else {
            d + 2.0 * PI
        }
    };
    let dhh = 2.0 * (c1p * c2p).sqrt() * (dh / 2.0).sin();
    let lm = (l1 + l2) / 2.0;
    let cmp = (c1p + c2p) / 2.0;
    let hm = if c1p * c2p == 0.0 {
        h1p + h2p
    } else if (h1p - h2p).abs() <= PI {
        (h1p + h2p) / 2.0
    } else if h1p + h2p < 2.0 * PI {
        (h1p + h2p + 2.0 * PI) / 2.0
    } else {
        (h1p + h2p - 2.0 * PI) / 2.0
    };
    let t = 1.0 - 0.17 * (hm - PI / 6.0).cos()
        + 0.24 * (2.0 * hm).cos()
        + 0.32 * (3.0 * hm + PI / 30.0).cos()
        - 0.20 * (4.0 * hm - 63.0 * PI / 180.0).cos();
    let dtheta = 30.0 * (-((hm.to_degrees() - 275.0) / 25.0).powi(2)).exp();
    let rc = 2.0 * (cmp.powi(7) / (cmp.powi(7) + 25f64.powi(7))).sqrt();
    let sl = 1.0 + 0.015 * (lm - 50.0).powi(2) / (20.0 + (lm - 50.0).powi(2)).sqrt();
    let sc = 1.0 + 0.045 * cmp;
    let sh = 1.0 + 0.015 * cmp * t;
    let rt = -(2.0 * dtheta.to_radians()).sin() * rc;
    ((dl / sl).powi(2) + (dc / sc).powi(2) + (dhh / sh).powi(2) + rt * (dc / sc) * (dhh / sh))
        .sqrt()
}

// ---------------------------------------------------------------------------------------------
// The demo world's captions

/// What a demo-world caption names: "a red circle moves left on a blue background" or "... stays
/// still ...".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    pub object: usize,
    pub shape: String,
    /// "left", "right", "up", "down" or "still".
    pub motion: String,
    pub background: usize,
}

fn colour_index(name: &str) -> Option<usize> {
    PALETTE.iter().position(|(n, _)| *n == name)
}

/// Parse a caption of the demo world's grammar; `None` for any other text.
pub fn parse_caption(text: &str) -> Option<Caption> {
    let words: Vec<&str> = text
        .trim()
        .trim_end_matches('.')
        .split_whitespace()
        .map(|w| w.trim())
        .collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let w: Vec<&str> = lower.iter().map(String::as_str).collect();
    // a C S (moves D | stays still) on a C background
    if w.len() != 9 || w[0] != "a" || w[5] != "on" || w[6] != "a" || w[8] != "background" {
        return None;
    }
    let object = colour_index(w[1])?;
    let background = colour_index(w[7])?;
    if !matches!(w[2], "circle" | "square") {
        return None;
    }
    let motion = match (w[3], w[4]) {
        ("moves", d @ ("left" | "right" | "up" | "down")) => d,
        ("stays", "still") => "still",
        _ => return None,
    };
    Some(Caption {
        object,
        shape: w[2].to_string(),
        motion: motion.to_string(),
        background,
    })
}

/// Unit direction (dx, dy) of a motion word, image coordinates (y down).
pub fn direction(motion: &str) -> (f64, f64) {
    match motion {
        "left" => (-1.0, 0.0),
        "right" => (1.0, 0.0),
        "up" => (0.0, -1.0),
        "down" => (0.0, 1.0),
        _ => (0.0, 0.0),
    }
}

/// Whether one step's displacement moves in `motion`'s direction (for "still": slower than
/// twice the still speed).
pub fn step_agrees(motion: &str, dx: f64, dy: f64) -> bool {
    let (ux, uy) = direction(motion);
    if motion == "still" {
        return dx.hypot(dy) < 2.0 * STILL_SPEED;
    }
    let along = dx * ux + dy * uy;
    let across = (dx * uy - dy * ux).abs();
    along > 0.0 && along >= across
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciede2000_matches_the_published_pairs() {
        // Sharma, Wu and Dalal (2005), table 1: pairs 1, 7, 13, 19, 25 and 34.
        let pairs = [
            ([50.0, 2.6772, -79.7751], [50.0, 0.0, -82.7485], 2.0425),
            ([50.0, 0.0, 0.0], [50.0, -1.0, 2.0], 2.3669),
            ([50.0, 2.4900, -0.0010], [50.0, -2.4900, 0.0011], 7.2195),
            ([50.0, 2.5, 0.0], [50.0, 0.0, -2.5], 4.3065),
            (
                [60.2574, -34.0099, 36.2677],
                [60.4626, -34.1751, 39.4387],
                1.2644,
            ),
            (
                [2.0776, 0.0795, -1.1350],
                [0.9033, -0.0636, -0.5514],
                0.9082,
            ),
        ];
        for (a, b, want) in pairs {
            let got = delta_e2000(a, b);
            assert!((got - want).abs() < 1e-4, "{a:?} {b:?}: {got} != {want}");
        }
    }

    #[test]
    fn lab_round_trips_and_knows_white() {
        let white = rgb_to_lab([255, 255, 255]);
        assert!((white[0] - 100.0).abs() < 1e-3 && white[1].abs() < 1e-2 && white[2].abs() < 1e-2);
        for rgb in [[255, 0, 0], [0, 255, 0], [12, 200, 99], [0, 0, 0]] {
            assert_eq!(lab_to_rgb(rgb_to_lab(rgb)), rgb);
        }
    }

    /// A 16×12 frame of one colour with a 3×3 square of another at (x, y) (wrapping).
    fn frame(bg: [u8; 3], obj: [u8; 3], x: usize, y: usize) -> Vec<u8> {
        let (w, h) = (16, 12);
        let mut f = Vec::new();
        for py in 0..h {
            for px in 0..w {
                let inside = (px + w - x) % w < 3 && (py + h - y) % h < 3;
                f.extend_from_slice(if inside { &obj } else { &bg });
            }
        }
        f
    }

    #[test]
    fn the_object_is_found_across_the_edge() {
        let f = frame([0, 0, 255], [255, 0, 0], 15, 4);
        let o = frame_object(&f, 16, 12);
        assert_eq!(PALETTE[o.background].0, "blue");
        let b = o.object.unwrap();
        assert_eq!(PALETTE[b.colour].0, "red");
        assert_eq!(b.area, 9);
        // Columns 15, 0, 1: centred on 0 (wrap-aware), rows 4..=6.
        assert!(wrap(b.centre[0], 16.0).abs() < 1e-9, "{:?}", b.centre);
        assert!((b.centre[1] - 5.0).abs() < 1e-9);
        assert_eq!(b.extent, [3, 3]);
        let plain = frame_object(&frame([0, 0, 0], [0, 0, 0], 0, 0), 16, 12);
        assert_eq!(plain.object, None);
    }

    #[test]
    fn a_band_spans_the_frame() {
        // Rows 2..=4 white across the whole width of a red frame: a band, not an object.
        let (w, h) = (16, 12);
        let f: Vec<u8> = (0..w * h)
            .flat_map(|p| {
                if (2..=4).contains(&(p / w)) {
                    [255, 255, 255]
                } else {
                    [255, 0, 0]
                }
            })
            .collect();
        let b = frame_object(&f, w, h).object.unwrap();
        assert_eq!(PALETTE[b.colour].0, "white");
        assert_eq!(b.extent, [16, 3]);
    }

    #[test]
    fn circular_extents() {
        let occ = |s: &str| s.chars().map(|c| c == '#').collect::<Vec<_>>();
        assert_eq!(circular_extent(&occ("........")), 0);
        assert_eq!(circular_extent(&occ("..##....")), 2);
        // Across the edge: columns 7, 0, 1.
        assert_eq!(circular_extent(&occ("##.....#")), 3);
        // Two pieces: the longest gap (4) is left out.
        assert_eq!(circular_extent(&occ("#..#....")), 4);
        assert_eq!(circular_extent(&occ("########")), 8);
    }

    #[test]
    fn captions_and_directions() {
        let c = parse_caption("a yellow square moves right on a green background").unwrap();
        assert_eq!(
            (
                PALETTE[c.object].0,
                c.shape.as_str(),
                c.motion.as_str(),
                PALETTE[c.background].0
            ),
            ("yellow", "square", "right", "green")
        );
        assert_eq!(
            parse_caption("A red circle stays still on a white background.")
                .unwrap()
                .motion,
            "still"
        );
        assert!(parse_caption("a lighthouse at dusk").is_none());
        assert!(parse_caption("a purple circle moves left on a blue background").is_none());
        assert!(step_agrees("right", 2.0, 0.3));
        assert!(!step_agrees("right", -2.0, 0.0));
        assert!(!step_agrees("up", 0.0, 2.0));
        assert!(step_agrees("still", 0.1, 0.0));
    }

    #[test]
    fn seam_z_scores() {
        let changes = [1.0, 1.2, 0.8, 1.0, 5.0, 1.0];
        let boundary = [false, false, false, false, true, false];
        let z = seam_z(&changes, &boundary);
        assert_eq!(z.len(), 1);
        let (m, s) = mean_std(&[1.0, 1.2, 0.8, 1.0, 1.0]);
        assert!((z[0] - (5.0 - m) / s).abs() < 1e-12);
    }
}
