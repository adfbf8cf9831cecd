//! The contact sheet of `analyze --sheet`: one PNG, top to bottom,
//!
//! 1. sixteen frames sampled evenly across the video (two rows of eight), each with a bar under
//!    it: grey where one window covers the frame (two shades alternating by window), orange in an
//!    overlap of two windows;
//! 2. the windows over time (three rows in turn), on the same time axis as every panel below;
//! 3. the frame-to-frame change (black line, scaled to its maximum) with the window boundaries
//!    as red lines;
//! 4. the mean colour of every second (CIELAB means shown in sRGB);
//! 5. for demo-world prompts, the object's track: x (red) and y (blue) of its centroid per
//!    frame, from 0 (bottom) to the frame's width or height (top), boundaries in light red.

use anyhow::Result;

use super::Report;
use super::measures::lab_to_rgb;

const THUMBS_PER_ROW: usize = 8;
const THUMB_ROWS: usize = 2;
const GAP: usize = 8;

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = 3 * (y * self.w + x);
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            if x >= 0 && y >= 0 {
                self.set(x as usize, y as usize, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// A light frame around a panel.
    fn frame(&mut self, x: usize, y: usize, w: usize, h: usize) {
        let c = [200, 200, 200];
        self.rect(x, y, w, 1, c);
        self.rect(x, y + h - 1, w, 1, c);
        self.rect(x, y, 1, h, c);
        self.rect(x + w - 1, y, 1, h, c);
    }
}

/// Draw the sheet of `report` over the decoded `frames` (packed RGB8) and encode it as PNG.
pub fn draw(report: &Report, frames: &[Vec<u8>]) -> Result<Vec<u8>> {
    let (fw, fh) = (report.width, report.height);
    // Thumbnails about 128 px wide: enlarge small videos by an integer factor, shrink large ones.
    let (num, den) = if fw <= 128 {
        ((128 / fw).max(1), 1)
    } else {
        (1, fw.div_ceil(160))
    };
    let (tw, th) = (fw * num / den, fh * num / den);
    let width = THUMBS_PER_ROW * (tw + GAP) + GAP;
    let n = frames.len();
    let cover = |f: usize| {
        report
            .window_frames
            .iter()
            .enumerate()
            .filter(|(_, w)| f >= w[0] && f <= w[1])
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let cover_colour = |f: usize| match cover(f).as_slice() {
        [] => [255, 255, 255],
        [i] if i % 2 == 0 => [120, 120, 120],
        [_] => [180, 180, 180],
        _ => [245, 140, 30],
    };
    let bar = 6;
    let thumbs_h = THUMB_ROWS * (th + bar + GAP) + GAP;
    let windows_h = 24;
    let plot_h = 80;
    let colour_h = 24;
    let track_h = if report.scene.is_some() { plot_h } else { 0 };
    let height = thumbs_h + windows_h + GAP + plot_h + GAP + colour_h + GAP + track_h + GAP;
    let mut c = Canvas::new(width, height);

    // 1. Thumbnails.
    let count = THUMBS_PER_ROW * THUMB_ROWS;
    for k in 0..count {
        let f = if count > 1 {
            k * (n - 1) / (count - 1)
        } else {
            0
        };
        let (col, row) = (k % THUMBS_PER_ROW, k / THUMBS_PER_ROW);
        let (x0, y0) = (GAP + col * (tw + GAP), GAP + row * (th + bar + GAP));
        for y in 0..th {
            for x in 0..tw {
                let (sx, sy) = (x * den / num, y * den / num);
                let i = 3 * (sy.min(fh - 1) * fw + sx.min(fw - 1));
                let p = &frames[f][i..i + 3];
                c.set(x0 + x, y0 + y, [p[0], p[1], p[2]]);
            }
        }
        c.rect(x0, y0 + th + 1, tw, bar - 1, cover_colour(f));
    }

    // The time axis of the panels.
    let (px0, pw) = (GAP, width - 2 * GAP);
    let x_of = |f: f64| px0 as f64 + f / (n.max(2) - 1) as f64 * (pw - 1) as f64;
    let mut y = thumbs_h;

    // 2. Windows.
    let row_h = windows_h / 3;
    for (i, w) in report.window_frames.iter().enumerate() {
        let (a, b) = (x_of(w[0] as f64) as usize, x_of(w[1] as f64) as usize);
        let colour = [[50, 90, 190], [110, 160, 235], [30, 150, 150]][i % 3];
        c.rect(
            a,
            y + (i % 3) * row_h + 1,
            (b - a).max(1),
            row_h - 2,
            colour,
        );
    }
    y += windows_h + GAP;

    // 3. Frame-to-frame change, boundaries in red.
    c.frame(px0, y, pw, plot_h);
    for (s, b) in report.boundary_steps.iter().enumerate() {
        if *b {
            let x = x_of(s as f64 + 0.5) as usize;
            c.rect(x, y + 1, 1, plot_h - 2, [230, 60, 60]);
        }
    }
    let max = report.changes.iter().copied().fold(0.0f64, f64::max);
    if max > 0.0 {
        let point = |s: usize| {
            let v = report.changes[s] / max;
            (
                x_of(s as f64 + 0.5) as i64,
                (y + plot_h - 2) as i64 - (v * (plot_h - 4) as f64) as i64,
            )
        };
        for s in 1..report.changes.len() {
            c.line(point(s - 1), point(s), [0, 0, 0]);
        }
    }
    y += plot_h + GAP;

    // 4. The mean colour of every second.
    let secs = report.lab_per_second.len();
    for (s, lab) in report.lab_per_second.iter().enumerate() {
        let fps = report.fps as f64;
        let a = x_of(s as f64 * fps) as usize;
        let b = if s + 1 == secs {
            px0 + pw
        } else {
            x_of((s + 1) as f64 * fps) as usize
        };
        c.rect(a, y, (b - a).max(1), colour_h, lab_to_rgb(*lab));
    }
    y += colour_h + GAP;

    // 5. The object's track.
    if let Some(scene) = &report.scene {
        c.frame(px0, y, pw, plot_h);
        for (s, b) in report.boundary_steps.iter().enumerate() {
            if *b {
                let x = x_of(s as f64 + 0.5) as usize;
                c.rect(x, y + 1, 1, plot_h - 2, [250, 190, 190]);
            }
        }
        for (f, p) in scene.track.iter().enumerate() {
            if let Some([cx, cy]) = p {
                let x = x_of(f as f64) as usize;
                let yx = y + plot_h - 2 - (cx / fw as f64 * (plot_h - 4) as f64) as usize;
                let yy = y + plot_h - 2 - (cy / fh as f64 * (plot_h - 4) as f64) as usize;
                c.rect(x, yx, 2, 2, [220, 30, 30]);
                c.rect(x, yy, 2, 2, [30, 60, 220]);
            }
        }
    }

    longtake_worker::media::png(&c.px, c.w, c.h).map_err(|e| anyhow::anyhow!("PNG: {e}"))
}
