//! The coordinator's model catalog for this binary: what a model is (latent geometry, native
//! clip, request defaults) is read from its directory with the same code that loads it, so the
//! coordinator never assumes a model's shape.

use std::collections::BTreeMap;
use std::path::PathBuf;

use longtake_coordinator::geometry::{LatentGeometry, ModelCatalog, ModelDefaults, ModelInfo};
use longtake_coordinator::validate::{NoiseMode, StitchingMode};
use longtake_model::builtin::Builtin;
use longtake_model::noise::NoiseLayout;
use longtake_model::pipeline::{ModelDir, WAN21_NATIVE_WINDOW};

/// Reads `vae/config.json`, `transformer/config.json` and `longtake.json` of the model named by a
/// request: a built-in model's name (the empty name: `builtin:demo`), a name of the catalogue
/// (`--model NAME=DIR`), or, where the coordinator allows client paths, a directory path. In a
/// farm the model directory must be readable at the same path on the coordinator as on the
/// workers (the coordinator reads only these small JSON files).
#[derive(Debug, Default, Clone)]
pub struct LocalModels {
    catalogue: BTreeMap<String, PathBuf>,
    /// What the built-in and catalogue models are, read once (a directory named by a request
    /// is read every time: it may change).
    known: std::sync::Arc<std::sync::Mutex<BTreeMap<String, ModelInfo>>>,
}

impl LocalModels {
    /// A catalogue from `NAME=DIR` entries; every directory is opened now, so that a bad entry
    /// stops the coordinator at start with its name.
    pub fn with_catalogue(entries: &[String]) -> anyhow::Result<LocalModels> {
        let mut catalogue = BTreeMap::new();
        for e in entries {
            let Some((name, dir)) = e.split_once('=') else {
                anyhow::bail!("model: {e:?} is not NAME=DIR");
            };
            let name = name.trim();
            let ok = !name.is_empty()
                && name.len() <= 128
                && !name.starts_with("builtin:")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !ok {
                anyhow::bail!(
                    "model: {name:?} is not a model name; allowed: 1 to 128 characters of a-z, \
                     A-Z, 0-9, '-', '_', '.', ':', not starting with builtin:"
                );
            }
            ModelDir::open(std::path::Path::new(dir))
                .map_err(|err| anyhow::anyhow!("model {name}: {dir}: {err}"))?;
            if catalogue
                .insert(name.to_string(), PathBuf::from(dir))
                .is_some()
            {
                anyhow::bail!("model: {name:?} is given twice");
            }
        }
        Ok(LocalModels {
            catalogue,
            ..LocalModels::default()
        })
    }
}

impl ModelCatalog for LocalModels {
    fn location(&self, model: &str, allow_paths: bool) -> Result<String, String> {
        if model.is_empty() || Builtin::lookup(model).is_some() {
            return Ok(model.to_string());
        }
        if let Some(dir) = self.catalogue.get(model) {
            return Ok(dir.display().to_string());
        }
        if allow_paths {
            return Ok(model.to_string());
        }
        let mut names = vec!["builtin:demo".to_string(), "builtin:smoke".to_string()];
        names.extend(self.catalogue.keys().cloned());
        Err(format!(
            "{model:?} is not a model of this coordinator's catalogue; allowed: {}",
            names.join(", ")
        ))
    }

    fn model_info(&self, model: &str) -> Result<ModelInfo, String> {
        let fixed = Builtin::lookup(model).is_some()
            || self.catalogue.values().any(|d| d.as_os_str() == model);
        let known = |m: &BTreeMap<String, ModelInfo>| m.get(model).copied();
        if fixed && let Some(info) = known(&self.known.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(info);
        }
        let info = read_info(model)?;
        if fixed {
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(model.to_string(), info);
        }
        Ok(info)
    }
}

/// Opens the model's directory (a built-in model's name, or a path) and reads what it is.
fn read_info(model: &str) -> Result<ModelInfo, String> {
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

/// The coordinator's view of an opened model directory.
pub fn info(dir: &ModelDir) -> ModelInfo {
    let d = &dir.defaults;
    let w = ModelDefaults::WAN21;
    let native_window = d.native_window.unwrap_or(WAN21_NATIVE_WINDOW) as u32;
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
            overlap: d
                .overlap
                .map_or(w.overlap, |v| v as u32)
                .min(native_window.saturating_sub(1)),
            stitching: d
                .stitching
                .and_then(|s| StitchingMode::from_proto(longtake_worker::stitching_to_pb(s)))
                .unwrap_or(w.stitching),
            noise_layout: match d.noise_layout {
                Some(NoiseLayout::Independent) => NoiseMode::Independent,
                Some(NoiseLayout::Rescheduled) => NoiseMode::Rescheduled,
                None => w.noise_layout,
            },
            hold_noise: d.hold_noise.map_or(w.hold_noise, |h| h as f32),
            hold_release: d.hold_release.map_or(w.hold_release, |h| h as f32),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_model_geometry_comes_from_its_files() {
        let info = LocalModels::default().model_info("builtin:smoke").unwrap();
        assert_eq!(info.latent, LatentGeometry::WAN21);
        assert_eq!(info.native_window, 21);
        assert_eq!((info.defaults.width, info.defaults.height), (64, 64));
        assert_eq!(info.defaults.steps, 4);
        // The default is the demo model, at its own size.
        let demo = LocalModels::default().model_info("").unwrap();
        assert_eq!(
            demo,
            LocalModels::default().model_info("builtin:demo").unwrap()
        );
        assert_eq!((demo.defaults.width, demo.defaults.height), (64, 64));
        // The demo model's longtake.json names its sampler and stitching settings.
        assert_eq!((demo.defaults.steps, demo.defaults.guidance), (20, 2.0));
        assert_eq!(
            (demo.defaults.stitching, demo.defaults.overlap),
            (StitchingMode::Autoregressive, 8)
        );
        assert_eq!(
            (demo.defaults.hold_noise, demo.defaults.hold_release),
            (0.7, 0.4)
        );
        assert_eq!(info.defaults.stitching, StitchingMode::Codenoise);
    }

    #[test]
    fn the_catalogue_names_models_and_refuses_paths() {
        let dir = Builtin::Smoke.model_dir().unwrap();
        let m = LocalModels::with_catalogue(&[format!("tiny={}", dir.display())]).unwrap();
        assert_eq!(
            m.location("tiny", false).unwrap(),
            dir.display().to_string()
        );
        assert_eq!(m.location("builtin:smoke", false).unwrap(), "builtin:smoke");
        let e = m.location("/models/x", false).unwrap_err();
        assert!(
            e.contains("allowed: builtin:demo, builtin:smoke, tiny"),
            "{e}"
        );
        assert_eq!(m.location("/models/x", true).unwrap(), "/models/x");
        for bad in ["tiny", "a b=/x", "builtin:x=/x"] {
            assert!(LocalModels::with_catalogue(&[bad.into()]).is_err(), "{bad}");
        }
        let e = LocalModels::with_catalogue(&["m=/nonexistent/model".into()]).unwrap_err();
        assert!(e.to_string().contains("model m: /nonexistent/model"), "{e}");
    }

    #[test]
    fn an_unreadable_model_is_named() {
        let e = LocalModels::default()
            .model_info("/nonexistent/model")
            .unwrap_err();
        assert!(e.contains("/nonexistent/model"), "{e}");
    }
}
