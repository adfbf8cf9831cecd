//! Initial noise from a counter-based generator: each latent element's value depends only on
//! (seed, latent frame, channel, row, column), so a render's noise does not depend on how it is
//! split into windows or spread over workers.
//!
//! [`NoiseLayout::Rescheduled`] reschedules a long render's noise in the manner of FreeNoise (Qiu
//! et al., "FreeNoise: Tuning-Free Longer Video Diffusion via Noise Rescheduling"): the frames
//! after the first window reuse the first window's noise frames in shuffled orders, so that every
//! window starts from the same noise. (FreeNoise shuffles the run of frames one window back, in
//! the end copies of the first window's too; each run here draws from the whole first window.)

/// SplitMix64's finaliser: a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform in (0, 1) from 53 random bits (never 0, so its logarithm is finite).
fn uniform(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// The standard-normal value of one latent element.
pub fn gaussian(seed: u64, frame: usize, channel: usize, row: usize, col: usize) -> f32 {
    let mut h = mix(seed ^ 0x6c6f_6e67_7461_6b65);
    for v in [frame, channel, row, col] {
        h = mix(h ^ (v as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    let u1 = uniform(mix(h ^ 1));
    let u2 = uniform(mix(h ^ 2));
    // Box–Muller, cosine branch.
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// How a render's initial noise is laid out over its latent frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NoiseLayout {
    /// Every latent frame draws its own noise.
    #[default]
    Independent,
    /// The first window's frames draw their own noise; after them, each run of (window −
    /// overlap) frames takes that many of the first window's noise frames in an order drawn from
    /// the seed (a fresh shuffle for each run).
    Rescheduled,
}

impl NoiseLayout {
    const ALL: [NoiseLayout; 2] = [NoiseLayout::Independent, NoiseLayout::Rescheduled];

    pub fn parse(name: &str) -> Option<NoiseLayout> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            NoiseLayout::Independent => "independent",
            NoiseLayout::Rescheduled => "rescheduled",
        }
    }

    /// The layouts' names, for error messages: "independent, rescheduled".
    pub fn allowed() -> String {
        Self::ALL.map(NoiseLayout::name).join(", ")
    }
}

/// A layout with the window plan it follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoisePlan {
    pub layout: NoiseLayout,
    /// Window length in latent frames.
    pub window: usize,
    /// Overlap of consecutive windows in latent frames.
    pub overlap: usize,
}

impl NoisePlan {
    /// The latent frame whose noise frame `frame` takes.
    pub fn source_frame(&self, seed: u64, frame: usize) -> usize {
        self.source_frames(seed, frame..frame + 1)[0]
    }

    /// The latent frames whose noise frames `frames` take, one per frame; each run's shuffle is
    /// drawn once.
    pub fn source_frames(&self, seed: u64, frames: std::ops::Range<usize>) -> Vec<usize> {
        let window = self.window;
        if self.layout == NoiseLayout::Independent || window == 0 {
            return frames.collect();
        }
        let stride = window.saturating_sub(self.overlap).clamp(1, window);
        let (mut drawn, mut order) = (None, Vec::new());
        frames
            .map(|frame| {
                if frame < window {
                    return frame;
                }
                let run = (frame - window) / stride;
                if drawn != Some(run) {
                    order = run_order(seed, run, window);
                    drawn = Some(run);
                }
                order[(frame - window) % stride]
            })
            .collect()
    }
}

/// Run `run`'s order of the first window's frames: Fisher–Yates over 0..window, from the run's
/// own stream.
fn run_order(seed: u64, run: usize, window: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..window).collect();
    let mut h = mix(seed ^ 0x7265_7363_6865_6475 ^ mix(run as u64 + 1));
    for i in (1..window).rev() {
        h = mix(h.wrapping_add(0x9e37_79b9_7f4a_7c15));
        order.swap(i, (h % (i as u64 + 1)) as usize);
    }
    order
}

/// Noise for latent frames `frames` laid out by `layout` (see [`latent_noise`] for the layout of
/// the result).
pub fn laid_out_noise(
    seed: u64,
    plan: NoisePlan,
    channels: usize,
    frames: std::ops::Range<usize>,
    height: usize,
    width: usize,
) -> Vec<f32> {
    let sources = plan.source_frames(seed, frames);
    let mut out = Vec::with_capacity(channels * sources.len() * height * width);
    for c in 0..channels {
        for &f in &sources {
            for y in 0..height {
                for x in 0..width {
                    out.push(gaussian(seed, f, c, y, x));
                }
            }
        }
    }
    out
}

/// Noise for latent frames `frames` of a `[channels, T, height, width]` latent (diffusers layout
/// for one batch item), as `[channels, frames.len(), height, width]`.
pub fn latent_noise(
    seed: u64,
    channels: usize,
    frames: std::ops::Range<usize>,
    height: usize,
    width: usize,
) -> Vec<f32> {
    let plan = NoisePlan {
        layout: NoiseLayout::Independent,
        window: 0,
        overlap: 0,
    };
    laid_out_noise(seed, plan, channels, frames, height, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_standard_normal() {
        let v = latent_noise(7, 16, 0..8, 16, 16);
        let n = v.len() as f64;
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn a_frame_range_is_a_slice_of_the_whole() {
        let all = latent_noise(3, 2, 0..5, 3, 4);
        let part = latent_noise(3, 2, 2..4, 3, 4);
        for c in 0..2 {
            for (i, f) in (2..4).enumerate() {
                assert_eq!(
                    all[(c * 5 + f) * 12..(c * 5 + f + 1) * 12],
                    part[(c * 2 + i) * 12..(c * 2 + i + 1) * 12]
                );
            }
        }
        assert_ne!(latent_noise(4, 2, 0..5, 3, 4), all, "the seed matters");
    }

    #[test]
    fn independent_layout_is_the_plain_noise() {
        let plan = NoisePlan {
            layout: NoiseLayout::Independent,
            window: 3,
            overlap: 1,
        };
        assert_eq!(
            laid_out_noise(5, plan, 2, 0..7, 3, 4),
            latent_noise(5, 2, 0..7, 3, 4)
        );
    }

    #[test]
    fn rescheduled_runs_are_shuffles_of_the_first_window() {
        let layout = NoisePlan {
            layout: NoiseLayout::parse("rescheduled").unwrap(),
            window: 21,
            overlap: 8,
        };
        let frames = 241;
        let src: Vec<usize> = (0..frames).map(|f| layout.source_frame(9, f)).collect();
        assert_eq!(src[..21], (0..21).collect::<Vec<_>>()[..]);
        let mut runs = Vec::new();
        for run in src[21..].chunks(13) {
            // Each run takes distinct frames of the first window.
            let mut seen = run.to_vec();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), run.len(), "a run repeats a frame: {run:?}");
            assert!(run.iter().all(|&f| f < 21), "{run:?}");
            runs.push(run.to_vec());
        }
        runs.dedup();
        assert!(runs.len() > 10, "the runs are shuffled anew: {runs:?}");
        // The layout depends on the seed, and a range is a slice of the whole.
        let other: Vec<usize> = (0..frames).map(|f| layout.source_frame(10, f)).collect();
        assert_ne!(src, other);
        let all = laid_out_noise(9, layout, 2, 0..frames, 2, 2);
        let part = laid_out_noise(9, layout, 2, 30..40, 2, 2);
        for c in 0..2 {
            for (i, f) in (30..40).enumerate() {
                assert_eq!(
                    all[(c * frames + f) * 4..(c * frames + f + 1) * 4],
                    part[(c * 10 + i) * 4..(c * 10 + i + 1) * 4]
                );
                // Frame f holds the noise of its source frame.
                let s = src[f];
                assert_eq!(
                    all[(c * frames + f) * 4..(c * frames + f + 1) * 4],
                    all[(c * frames + s) * 4..(c * frames + s + 1) * 4]
                );
            }
        }
        assert_eq!(NoiseLayout::parse("zigzag"), None);
        assert_eq!(NoiseLayout::allowed(), "independent, rescheduled");
    }
}
