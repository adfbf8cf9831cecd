//! The window plan: how a latent sequence of T frames is covered by overlapping windows of the
//! model's native length, and the fusion weights that blend the windows' predictions per frame.
//!
//! Pure functions of (T, L, O); the coordinator computes the plan and sends it to workers, which
//! never plan themselves.

use std::fmt;

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    NoFrames,
    WindowTooShort,
    OverlapTooLarge { overlap: usize, window: usize },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::NoFrames => write!(f, "the video has no latent frames"),
            PlanError::WindowTooShort => write!(f, "window must be at least 1 latent frame"),
            PlanError::OverlapTooLarge { overlap, window } => write!(
                f,
                "overlap {overlap} must be smaller than the window {window} (allowed: 0..={})",
                window - 1
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// One window: latent frames `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
}

impl Window {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// Windows covering `0..latent_frames` and, per window, the normalised fusion weight of each of
/// its frames.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPlan {
    pub latent_frames: usize,
    pub window: usize,
    pub overlap: usize,
    pub windows: Vec<Window>,
    /// `weights[w][j]`: the share of window `w`'s prediction in latent frame `start_w + j`;
    /// over all windows covering a frame the shares sum to 1.
    pub weights: Vec<Vec<f32>>,
}

/// Plan `latent_frames` frames into windows of `window` frames overlapping by `overlap`: stride
/// `window − overlap`, starts 0, S, 2S, … and a last window aligned to the end (one window when
/// the video fits in one).
pub fn plan(latent_frames: usize, window: usize, overlap: usize) -> Result<WindowPlan, PlanError> {
    if latent_frames == 0 {
        return Err(PlanError::NoFrames);
    }
    if window == 0 {
        return Err(PlanError::WindowTooShort);
    }
    if overlap >= window {
        return Err(PlanError::OverlapTooLarge { overlap, window });
    }
    let windows: Vec<Window> = if latent_frames <= window {
        vec![Window {
            start: 0,
            len: latent_frames,
        }]
    } else {
        let stride = window - overlap;
        let mut starts: Vec<usize> = (0..)
            .map(|k| k * stride)
            .take_while(|s| s + window < latent_frames)
            .collect();
        starts.push(latent_frames - window);
        starts.dedup();
        starts
            .into_iter()
            .map(|start| Window { start, len: window })
            .collect()
    };
    // Linear ramps over the overlaps, then normalised per frame.
    let raw: Vec<Vec<f64>> = windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let left = i
                .checked_sub(1)
                .map(|p| windows[p].end().saturating_sub(w.start))
                .unwrap_or(0);
            let right = windows
                .get(i + 1)
                .map(|n| w.end().saturating_sub(n.start))
                .unwrap_or(0);
            (0..w.len)
                .map(|j| {
                    let mut v = 1.0f64;
                    if j < left {
                        v = v.min((j + 1) as f64 / (left + 1) as f64);
                    }
                    if right > 0 && j >= w.len - right {
                        v = v.min((w.len - j) as f64 / (right + 1) as f64);
                    }
                    v
                })
                .collect()
        })
        .collect();
    let mut total = vec![0.0f64; latent_frames];
    for (w, r) in windows.iter().zip(&raw) {
        for (j, v) in r.iter().enumerate() {
            total[w.start + j] += v;
        }
    }
    let weights = windows
        .iter()
        .zip(&raw)
        .map(|(w, r)| {
            r.iter()
                .enumerate()
                .map(|(j, v)| (v / total[w.start + j]) as f32)
                .collect()
        })
        .collect();
    Ok(WindowPlan {
        latent_frames,
        window,
        overlap,
        windows,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_minute_at_16_fps() {
        let t = crate::geometry::LatentGeometry::WAN21.latent_frames(961) as usize;
        assert_eq!(t, 241);
        let p = plan(t, 21, 4).unwrap();
        assert_eq!(p.windows.first().unwrap().start, 0);
        assert_eq!(p.windows.last().unwrap().end(), 241);
        assert_eq!(p.windows[1].start, 17);
        assert_eq!(p.windows.len(), 14);
    }

    #[test]
    fn short_video_is_one_window() {
        let p = plan(5, 21, 4).unwrap();
        assert_eq!(p.windows, vec![Window { start: 0, len: 5 }]);
        assert!(p.weights[0].iter().all(|w| *w == 1.0));
    }

    #[test]
    fn ramp_values_for_overlap_4() {
        // T = 38, L = 21, O = 4: windows at 0 and 17, overlap frames 17..21.
        let p = plan(38, 21, 4).unwrap();
        assert_eq!(p.windows.len(), 2);
        let first = &p.weights[0];
        let second = &p.weights[1];
        // Raw ramps: first window 4/5, 3/5, 2/5, 1/5; second 1/5 .. 4/5: already sum to 1.
        for k in 0..4 {
            assert!((first[17 + k] - (4 - k) as f32 / 5.0).abs() < 1e-6);
            assert!((second[k] - (k + 1) as f32 / 5.0).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        assert_eq!(plan(0, 21, 4), Err(PlanError::NoFrames));
        assert_eq!(plan(10, 0, 0), Err(PlanError::WindowTooShort));
        assert!(
            plan(10, 4, 4)
                .unwrap_err()
                .to_string()
                .contains("allowed: 0..=3")
        );
    }

    proptest! {
        #[test]
        fn plans_cover_and_weights_sum_to_one(t in 1usize..400, l in 1usize..40, o_frac in 0.0f64..1.0) {
            let o = ((l as f64) * o_frac) as usize;
            prop_assume!(o < l);
            let p = plan(t, l, o).unwrap();
            prop_assert_eq!(p.windows[0].start, 0);
            prop_assert_eq!(p.windows.last().unwrap().end(), t);
            let mut sum = vec![0.0f64; t];
            for (w, ws) in p.windows.iter().zip(&p.weights) {
                prop_assert!(w.len == l.min(t));
                prop_assert!(w.end() <= t);
                prop_assert_eq!(ws.len(), w.len);
                for (j, v) in ws.iter().enumerate() {
                    prop_assert!(*v > 0.0 && *v <= 1.0);
                    sum[w.start + j] += *v as f64;
                }
            }
            for s in sum {
                prop_assert!((s - 1.0).abs() < 1e-5);
            }
            for pair in p.windows.windows(2) {
                prop_assert!(pair[0].start < pair[1].start);
                prop_assert!(pair[1].start <= pair[0].end(), "windows leave a gap");
                prop_assert!(pair[1].start - pair[0].start <= l - o, "stride larger than window − overlap");
            }
        }
    }
}
