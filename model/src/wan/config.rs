//! `transformer/config.json` of a diffusers `WanTransformer3DModel`.

use std::path::Path;

use crate::config::ConfigReader;
use crate::error::Result;

/// The transformer hyper-parameters (wan21.md §1.1), validated.
#[derive(Debug, Clone, PartialEq)]
pub struct WanConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub eps: f32,
    pub rope_max_seq_len: usize,
}

impl WanConfig {
    /// D = heads × head_dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let c = ConfigReader::open(path)?;
        c.expect_class(&["WanTransformer3DModel"])?;
        let patch = c.usize_list_or("patch_size", &[1, 2, 2])?;
        let patch_size: [usize; 3] = match patch.as_slice() {
            [a, b, cc] if *a > 0 && *b > 0 && *cc > 0 => [*a, *b, *cc],
            _ => {
                return Err(c.error(
                    "patch_size",
                    format!("must be three positive integers [t, h, w], found {patch:?}"),
                ));
            }
        };
        let positive = |key: &str, default: usize| -> Result<usize> {
            let v = c.usize_or(key, default)?;
            if v == 0 {
                return Err(c.error(key, "must be at least 1"));
            }
            Ok(v)
        };
        let in_channels = positive("in_channels", 16)?;
        let head_dim = positive("attention_head_dim", 128)?;
        if head_dim % 2 != 0 {
            return Err(c.error(
                "attention_head_dim",
                format!("must be even (rotary embedding pairs), found {head_dim}"),
            ));
        }
        let freq_dim = positive("freq_dim", 256)?;
        if freq_dim % 2 != 0 {
            return Err(c.error("freq_dim", format!("must be even, found {freq_dim}")));
        }
        for key in ["image_dim", "added_kv_proj_dim", "pos_embed_seq_len"] {
            if let Some(v) = c.raw(key) {
                return Err(c.error(
                    key,
                    format!(
                        "is {v}: image-conditioned models (I2V/FLF2V) are not supported; \
                         only text-to-video configs with {key} = null"
                    ),
                ));
            }
        }
        let eps = c.f64_or("eps", 1e-6)?;
        if !(eps > 0.0 && eps < 1.0) {
            return Err(c.error("eps", format!("must be in (0, 1), found {eps}")));
        }
        Ok(WanConfig {
            patch_size,
            num_attention_heads: positive("num_attention_heads", 40)?,
            attention_head_dim: head_dim,
            in_channels,
            out_channels: match c.opt_usize("out_channels")? {
                Some(0) => return Err(c.error("out_channels", "must be at least 1")),
                Some(v) => v,
                None => in_channels,
            },
            text_dim: positive("text_dim", 4096)?,
            freq_dim,
            ffn_dim: positive("ffn_dim", 13824)?,
            num_layers: c.usize_or("num_layers", 40)?,
            cross_attn_norm: c.bool_or("cross_attn_norm", true)?,
            eps: eps as f32,
            rope_max_seq_len: positive("rope_max_seq_len", 1024)?,
        })
    }
}
