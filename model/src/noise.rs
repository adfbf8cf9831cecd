//! Initial noise from a counter-based generator: each latent element's value depends only on
//! (seed, latent frame, channel, row, column), so a render's noise does not depend on how it is
//! split into windows or spread over workers.

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

/// Noise for latent frames `frames` of a `[channels, T, height, width]` latent (diffusers layout
/// for one batch item), as `[channels, frames.len(), height, width]`.
pub fn latent_noise(
    seed: u64,
    channels: usize,
    frames: std::ops::Range<usize>,
    height: usize,
    width: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(channels * frames.len() * height * width);
    for c in 0..channels {
        for f in frames.clone() {
            for y in 0..height {
                for x in 0..width {
                    out.push(gaussian(seed, f, c, y, x));
                }
            }
        }
    }
    out
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
}
