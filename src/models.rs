//! The coordinator's model catalog for this binary: what a model is (latent geometry, native
//! clip, request defaults) is read from its directory with the same code that loads it, so the
//! coordinator never assumes a model's shape.

use std::path::PathBuf;

use longtake_coordinator::geometry::{LatentGeometry, ModelCatalog, ModelDefaults, ModelInfo};
use longtake_model::builtin::Builtin;
use longtake_model::pipeline::ModelDir;

/// Reads `vae/config.json`, `transformer/config.json` and `longtake.json` of the model named by a
/// request: a directory path, or a built-in model's name (the empty name: `builtin:demo`). In a farm the model
/// directory must be readable at the same path on the coordinator as on the workers (the
/// coordinator reads only these small JSON files).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalModels;

impl ModelCatalog for LocalModels {
    fn model_info(&self, model: &str) -> Result<ModelInfo, String> {
        let root = match Builtin::lookup(model) {
            Some(b) => b.model_dir().map_err(|e| e.to_string())?,
            None => PathBuf::from(model),
        };
        let dir = ModelDir::open(&root).map_err(|e| {
            format!(
                "{e} (the coordinator reads the model's configuration from {}; in a farm the \
                 model directory must be readable at the same path there as on the workers)",
                root.display()
            )
        })?;
        Ok(info(&dir))
    }
}

/// The coordinator's view of an opened model directory.
pub fn info(dir: &ModelDir) -> ModelInfo {
    let d = &dir.defaults;
    let w = ModelDefaults::WAN21;
    let native_window = d.native_window.map_or(21, |n| n as u32);
    ModelInfo {
        latent: LatentGeometry {
            channels: dir.vae.z_dim as u32,
            spatial_factor: dir.vae.spatial_factor() as u32,
            temporal_factor: dir.vae.temporal_factor() as u32,
            size_multiple: dir.size_multiple() as u32,
        },
        native_window,
        defaults: ModelDefaults {
            width: d.width.map_or(w.width, |v| v as u32),
            height: d.height.map_or(w.height, |v| v as u32),
            fps: d.fps.map_or(w.fps, |v| v as u32),
            steps: d.steps.map_or(w.steps, |v| v as u32),
            guidance: d.guidance.map_or(w.guidance, |v| v as f32),
            window: native_window.min(w.window),
            overlap: w.overlap.min(native_window.saturating_sub(1)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_model_geometry_comes_from_its_files() {
        let info = LocalModels.model_info("builtin:smoke").unwrap();
        assert_eq!(info.latent, LatentGeometry::WAN21);
        assert_eq!(info.native_window, 21);
        assert_eq!((info.defaults.width, info.defaults.height), (64, 64));
        assert_eq!(info.defaults.steps, 4);
        // The default is the demo model, at its own size.
        let demo = LocalModels.model_info("").unwrap();
        assert_eq!(demo, LocalModels.model_info("builtin:demo").unwrap());
        assert_eq!((demo.defaults.width, demo.defaults.height), (64, 64));
    }

    #[test]
    fn an_unreadable_model_is_named() {
        let e = LocalModels.model_info("/nonexistent/model").unwrap_err();
        assert!(e.contains("/nonexistent/model"), "{e}");
    }
}
