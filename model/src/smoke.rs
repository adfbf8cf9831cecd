//! The built-in smoke-test model: a small random-weight Wan2.1 pipeline directory compiled into
//! the binary (`model/assets/smoke-model`), unpacked to a cache directory on first use and then
//! loaded like any diffusers directory. Its output is noise-like video that exercises every part
//! of a render; it is not a picture.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

macro_rules! asset {
    ($p:literal) => {
        (
            $p,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/assets/smoke-model/",
                $p
            ))
            .as_slice(),
        )
    };
}

const FILES: [(&str, &[u8]); 13] = [
    asset!("README.md"),
    asset!("longtake.json"),
    asset!("model_index.json"),
    asset!("scheduler/scheduler_config.json"),
    asset!("text_encoder/config.json"),
    asset!("text_encoder/model.safetensors"),
    asset!("tokenizer/special_tokens_map.json"),
    asset!("tokenizer/tokenizer.json"),
    asset!("tokenizer/tokenizer_config.json"),
    asset!("transformer/config.json"),
    asset!("transformer/diffusion_pytorch_model.safetensors"),
    asset!("vae/config.json"),
    asset!("vae/diffusion_pytorch_model.safetensors"),
];

/// The name manifests and logs use for the built-in model.
pub const NAME: &str = "builtin:smoke (random weights, not a real model)";

/// A short content hash of the built-in model (FNV-1a over names and bytes).
pub fn fingerprint() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.as_bytes().iter().chain(bytes) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("longtake")
}

/// The directory of the built-in model, unpacking it if needed (atomically: a half-written
/// directory is never used).
pub fn model_dir() -> Result<PathBuf> {
    let dir = cache_root().join(format!("smoke-model-{}", fingerprint()));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let parent = dir.parent().expect("cache dir has a parent");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(
        ".smoke-model-{}-{}",
        fingerprint(),
        std::process::id()
    ));
    let write = |tmp: &Path| -> Result<()> {
        for (name, bytes) in FILES {
            let p = tmp.join(name);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    };
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process unpacked it first.
        Err(_) if dir.join("model_index.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(Error::io(&dir, e)),
    }
}
