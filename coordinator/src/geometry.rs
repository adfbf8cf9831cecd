//! What the coordinator needs to know about a model to validate and plan a render: its latent
//! geometry (channels, spatial and temporal scale factors, the pixel-size multiple), its native
//! clip length, and the request defaults it was made for. The coordinator does not read model
//! files itself: a [`ModelCatalog`] given in its configuration answers for a model name. The
//! `longtake` binary's catalog reads the model directory's configuration (`vae/config.json`,
//! `transformer/config.json`, and `longtake.json` for the defaults) with the same code that loads
//! the model; [`Wan21Catalog`] answers with Wan2.1's published geometry, for embedding and tests.

use crate::validate::{NoiseMode, StitchingMode};
use serde::{Deserialize, Serialize};

/// The model a request without one gets: the demo model compiled into the binary.
pub const DEFAULT_MODEL: &str = "builtin:demo";
/// The random-weight smoke-test model compiled into the binary.
pub const SMOKE_MODEL: &str = "builtin:smoke";

/// A model's latent geometry: how pixels map to latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatentGeometry {
    /// Latent channels (the VAE's `z_dim`).
    pub channels: u32,
    /// Pixels per latent row and column.
    pub spatial_factor: u32,
    /// Pixel frames per latent frame after the first (the causal VAE's first latent frame is one
    /// pixel frame).
    pub temporal_factor: u32,
    /// Pixel width and height must be multiples of this (scale factor × patch size).
    pub size_multiple: u32,
}

impl LatentGeometry {
    /// Wan2.1's VAE (16 channels, 8× spatial, 4× temporal) with its transformer's 2×2 patches.
    pub const WAN21: LatentGeometry = LatentGeometry {
        channels: 16,
        spatial_factor: 8,
        temporal_factor: 4,
        size_multiple: 16,
    };

    pub fn is_wan21(&self) -> bool {
        *self == Self::WAN21
    }

    /// Pixel frames → latent frames.
    pub fn latent_frames(&self, pixel_frames: u32) -> u32 {
        if pixel_frames == 0 {
            0
        } else {
            (pixel_frames - 1) / self.temporal_factor.max(1) + 1
        }
    }
}

impl Default for LatentGeometry {
    fn default() -> Self {
        Self::WAN21
    }
}

/// The request defaults a model was made for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelDefaults {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub steps: u32,
    pub guidance: f32,
    /// Window length in latent frames.
    pub window: u32,
    /// Window overlap in latent frames.
    pub overlap: u32,
    /// How windows are joined when a request leaves it unset.
    pub stitching: StitchingMode,
    /// How the initial noise is laid out when a request leaves it unset.
    #[serde(default)]
    pub noise_layout: NoiseMode,
    /// The share of a step's noise level that autoregressive windows re-noise their held frames
    /// to, when a request leaves it unset (0..=1).
    #[serde(default = "crate::validate::full_hold_noise")]
    pub hold_noise: f32,
    /// The noise level (0..=1) at and below which autoregressive windows release their held
    /// frames, when a request leaves it unset (0: held to the end).
    #[serde(default)]
    pub hold_release: f32,
}

impl ModelDefaults {
    /// Wan2.1's published settings: 832×480 at 16 fps, 50 steps, guidance 5, 81-frame clips;
    /// codenoise with an overlap of 4 latent frames.
    pub const WAN21: ModelDefaults = ModelDefaults {
        width: 832,
        height: 480,
        fps: 16,
        steps: 50,
        guidance: 5.0,
        window: 21,
        overlap: 4,
        stitching: StitchingMode::Codenoise,
        noise_layout: NoiseMode::Independent,
        hold_noise: 1.0,
        hold_release: 0.0,
    };
}

/// Everything about a model that validation and planning use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInfo {
    pub latent: LatentGeometry,
    /// The model's native clip, in latent frames: the longest window.
    pub native_window: u32,
    pub defaults: ModelDefaults,
}

impl ModelInfo {
    pub const WAN21: ModelInfo = ModelInfo {
        latent: LatentGeometry::WAN21,
        native_window: 21,
        defaults: ModelDefaults::WAN21,
    };
}

/// Answers what a model is, by the name a request gives (`RenderSpec.model`: empty for the
/// built-in default, else a model directory).
pub trait ModelCatalog: Send + Sync + std::fmt::Debug {
    /// The model's geometry and defaults, or why it cannot be used (shown to the user under the
    /// `model` field).
    fn model_info(&self, model: &str) -> Result<ModelInfo, String>;

    /// What the workers load for the model a request names: a built-in model's name as it is,
    /// a catalogue name as its directory, and a directory path as it is when `allow_paths`
    /// (else refused: clients do not choose server paths). The error is shown under `model`.
    fn location(&self, model: &str, allow_paths: bool) -> Result<String, String> {
        if model.is_empty() || model.starts_with("builtin:") || allow_paths {
            Ok(model.to_string())
        } else {
            Err(format!(
                "{model:?} is not a model of this coordinator's catalogue; allowed: \
                 builtin:demo, builtin:smoke"
            ))
        }
    }
}

/// Wan2.1's geometry for every model name, with the built-in models' small defaults for their
/// names (and the empty name): for a coordinator embedded without model files, and for tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wan21Catalog;

impl Wan21Catalog {
    /// The built-in smoke model: 64×64, 4 steps.
    pub const SMOKE: ModelInfo = ModelInfo {
        latent: LatentGeometry::WAN21,
        native_window: 21,
        defaults: ModelDefaults {
            width: 64,
            height: 64,
            fps: 16,
            steps: 4,
            guidance: 5.0,
            window: 21,
            overlap: 4,
            stitching: StitchingMode::Codenoise,
            noise_layout: NoiseMode::Independent,
            hold_noise: 1.0,
            hold_release: 0.0,
        },
    };
}

impl ModelCatalog for Wan21Catalog {
    fn model_info(&self, model: &str) -> Result<ModelInfo, String> {
        Ok(if model.is_empty() || model.starts_with("builtin:") {
            Self::SMOKE
        } else {
            ModelInfo::WAN21
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_frames_follow_the_temporal_factor() {
        let g = LatentGeometry::WAN21;
        assert_eq!(g.latent_frames(0), 0);
        assert_eq!(g.latent_frames(1), 1);
        assert_eq!(g.latent_frames(81), 21);
        assert_eq!(g.latent_frames(961), 241);
        let g2 = LatentGeometry {
            temporal_factor: 2,
            ..g
        };
        assert_eq!(g2.latent_frames(81), 41);
    }
}
