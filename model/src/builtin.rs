//! The models compiled into the binary, unpacked to a cache directory on first use and then
//! loaded like any diffusers directory:
//!
//! - `builtin:demo` (the default, also the empty name): a small Wan2.1 model trained on the
//!   procedural scenes of `tools/scenes.py` (`model/assets/demo-model`), 64×64, whose renders
//!   show what a prompt of its grammar says ("a yellow square moves right on a green
//!   background").
//! - `builtin:smoke`: a small random-weight Wan2.1 pipeline (`model/assets/smoke-model`). Its
//!   output is noise-like video that exercises every part of a render in seconds; for tests.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The name requests use for the default model.
pub const DEMO: &str = "builtin:demo";
/// The name requests use for the smoke-test model.
pub const SMOKE: &str = "builtin:smoke";

macro_rules! assets {
    ($dir:literal: $($p:literal),* $(,)?) => {
        &[$(
            (
                $p,
                include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $dir, "/", $p))
                    .as_slice(),
            ),
        )*]
    };
}

/// Every file of a built-in model directory (both have the same layout), and the extra files
/// of one of them.
macro_rules! model_files {
    ($dir:literal $(, $extra:literal)* $(,)?) => {
        assets!($dir:
            "README.md",
            $($extra,)*
            "longtake.json",
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        )
    };
}

const SMOKE_FILES: &[(&str, &[u8])] = model_files!("smoke-model");
// The demo model's README links to the measurements behind its figures.
const DEMO_FILES: &[(&str, &[u8])] = model_files!("demo-model", "MEASUREMENTS.md");

/// A model compiled into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Demo,
    Smoke,
}

impl Builtin {
    /// The built-in model a request's model name means: the empty name and `builtin:demo` are
    /// the demo model, `builtin:smoke` the smoke model; anything else is a directory (`None`).
    pub fn lookup(name: &str) -> Option<Builtin> {
        match name.trim() {
            "" | DEMO => Some(Builtin::Demo),
            SMOKE => Some(Builtin::Smoke),
            _ => None,
        }
    }

    /// Its name in requests and manifests.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Demo => DEMO,
            Builtin::Smoke => SMOKE,
        }
    }

    /// What manifests and logs say about it.
    pub fn description(self) -> &'static str {
        match self {
            Builtin::Demo => "builtin:demo (small model trained on the demo scenes)",
            Builtin::Smoke => "builtin:smoke (random weights, not a real model)",
        }
    }

    fn files(self) -> &'static [(&'static str, &'static [u8])] {
        match self {
            Builtin::Demo => DEMO_FILES,
            Builtin::Smoke => SMOKE_FILES,
        }
    }

    /// A short content hash of the model (FNV-1a over names and bytes).
    pub fn fingerprint(self) -> String {
        // Hashed once per process (the demo model is megabytes).
        static DONE: [std::sync::OnceLock<String>; 2] =
            [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
        let slot = match self {
            Builtin::Demo => &DONE[0],
            Builtin::Smoke => &DONE[1],
        };
        slot.get_or_init(|| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for (name, bytes) in self.files() {
                for b in name.as_bytes().iter().chain(*bytes) {
                    h ^= *b as u64;
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            format!("{h:016x}")
        })
        .clone()
    }

    /// Its directory's name under `model/assets` and in the cache.
    fn stem(self) -> &'static str {
        match self {
            Builtin::Demo => "demo-model",
            Builtin::Smoke => "smoke-model",
        }
    }

    /// The model's directory, unpacking it if needed (atomically: a half-written directory is
    /// never used).
    pub fn model_dir(self) -> Result<PathBuf> {
        self.unpack_under(&cache_root())
    }

    /// Unpacks the model under `root` unless it is already there. Each call writes its own
    /// temporary directory (`io::temp_sibling`: threads of one process unpack at once when tests
    /// or workers start together) and renames it into place; the first rename wins and the
    /// others remove theirs.
    fn unpack_under(self, root: &Path) -> Result<PathBuf> {
        let dir = root.join(format!("{}-{}", self.stem(), self.fingerprint()));
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let tmp = crate::io::temp_sibling(&dir);
        let write = |tmp: &Path| -> Result<()> {
            for (name, bytes) in self.files() {
                let p = tmp.join(name);
                if let Some(d) = p.parent() {
                    std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
                }
                std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
            }
            Ok(())
        };
        // A leftover of a process that died mid-write with the same id and count.
        let _ = std::fs::remove_dir_all(&tmp);
        if let Err(e) = write(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(dir),
            // Another process or thread unpacked it first.
            Err(_) if dir.join("model_index.json").is_file() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(dir)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(Error::io(&dir, e))
            }
        }
    }
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("longtake")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files_under(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }

    #[test]
    fn every_file_of_an_asset_directory_is_compiled_in() {
        for model in [Builtin::Demo, Builtin::Smoke] {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("assets")
                .join(model.stem());
            let mut on_disk = Vec::new();
            files_under(&root, &root, &mut on_disk);
            on_disk.sort();
            let mut embedded: Vec<String> =
                model.files().iter().map(|(n, _)| n.to_string()).collect();
            embedded.sort();
            assert_eq!(
                embedded,
                on_disk,
                "{}: the files compiled in (left) differ from {}",
                model.name(),
                root.display()
            );
        }
    }

    #[test]
    fn threads_unpacking_at_once_all_get_the_whole_model() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Builtin::Smoke.unpack_under(root.path())))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        for dir in &dirs {
            assert_eq!(dir, &dirs[0]);
        }
        for (name, bytes) in Builtin::Smoke.files() {
            let on_disk = std::fs::read(dirs[0].join(name)).unwrap();
            assert_eq!(&on_disk, bytes, "{name} differs after unpacking");
        }
        // Only the model's directory is left: every temporary one was renamed or removed.
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![dirs[0].file_name().unwrap().to_owned()]);
    }
}
