//! The UMT5 text encoder (transformers `UMT5EncoderModel`, wan21.md §5).
//!
//! Only the real tokens are encoded: the pipeline masks the padded keys and then throws the padded
//! positions' outputs away, and the relative bias depends only on distances, so the real
//! positions' outputs are the same as with padding and a mask (§5.4).

use std::path::Path;

use crate::backend::text_ops::TextOps;
use crate::backend::{Activation, Tensor};
use crate::config::ConfigReader;
use crate::error::{Error, Result};
use crate::io::{Checkpoint, SafetensorsFile, WeightLoader, read_json};

/// `text_encoder/config.json` of a `UMT5EncoderModel`, validated. Missing keys take
/// transformers' `UMT5Config` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub num_heads: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f32,
}

impl Umt5Config {
    /// Attention width: heads × d_kv.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let c = ConfigReader::open(path)?;
        if let Some(v) = c.raw("model_type")
            && v.as_str() != Some("umt5")
        {
            return Err(c.error("model_type", format!("{v} is not supported; use \"umt5\"")));
        }
        let ffp = c.str_or("feed_forward_proj", "gated-gelu")?;
        if ffp != "gated-gelu" {
            return Err(c.error(
                "feed_forward_proj",
                format!("\"{ffp}\" is not supported; only \"gated-gelu\" (UMT5) is"),
            ));
        }
        if !c.bool_or("is_gated_act", true)? {
            return Err(c.error(
                "is_gated_act",
                "must be true for feed_forward_proj \"gated-gelu\"",
            ));
        }
        let act = c.str_or("dense_act_fn", "gelu_new")?;
        if act != "gelu_new" {
            return Err(c.error(
                "dense_act_fn",
                format!("\"{act}\" is not supported; gated-gelu uses \"gelu_new\""),
            ));
        }
        let positive = |key: &str, default: usize| -> Result<usize> {
            let v = c.usize_or(key, default)?;
            if v == 0 {
                return Err(c.error(key, "must be at least 1"));
            }
            Ok(v)
        };
        let cfg = Umt5Config {
            vocab_size: positive("vocab_size", 250_112)?,
            d_model: positive("d_model", 512)?,
            d_kv: positive("d_kv", 64)?,
            num_heads: positive("num_heads", 6)?,
            d_ff: positive("d_ff", 1024)?,
            num_layers: positive("num_layers", 8)?,
            relative_attention_num_buckets: positive("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: positive("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: c.f64_or("layer_norm_epsilon", 1e-6)? as f32,
        };
        let nb = cfg.relative_attention_num_buckets;
        if nb < 4 || !nb.is_multiple_of(2) {
            return Err(c.error(
                "relative_attention_num_buckets",
                format!("must be even and at least 4 (half per direction), found {nb}"),
            ));
        }
        if cfg.relative_attention_max_distance <= nb / 4 {
            return Err(c.error(
                "relative_attention_max_distance",
                format!(
                    "must exceed the exact-bucket range ({}), found {}",
                    nb / 4,
                    cfg.relative_attention_max_distance
                ),
            ));
        }
        let eps = cfg.layer_norm_epsilon;
        if eps.is_nan() || eps <= 0.0 {
            return Err(c.error("layer_norm_epsilon", "must be a positive number"));
        }
        Ok(cfg)
    }
}

/// The bidirectional relative-position bucket of `rel = key − query` (transformers'
/// `_relative_position_bucket`, computed in f32 and truncated as there; wan21.md §5.3).
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let nb = num_buckets / 2;
    let offset = if rel > 0 { nb } else { 0 };
    let n = rel.unsigned_abs() as usize;
    let max_exact = nb / 2;
    if n < max_exact {
        return offset + n;
    }
    let ratio = (n as f32 / max_exact as f32).ln();
    let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (ratio / denom * (nb - max_exact) as f32) as usize;
    offset + large.min(nb - 1)
}

struct Layer<B: TextOps> {
    ln0: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    o: Tensor<B>,
    /// `relative_attention_bias.weight` `[buckets, H]`, on the host: it is gathered into a
    /// per-distance table for each input length.
    rel_table: Vec<f32>,
    ln1: Tensor<B>,
    wi_0: Tensor<B>,
    wi_1: Tensor<B>,
    wo: Tensor<B>,
}

/// The UMT5 encoder stack: embedding, pre-norm self-attention + gated-GELU blocks, final norm.
pub struct Umt5Encoder<B: TextOps> {
    cfg: Umt5Config,
    backend: B,
    embed: Tensor<B>,
    layers: Vec<Layer<B>>,
    final_ln: Tensor<B>,
}

/// The shape of tensor `name` as stored, read from the safetensors headers only.
fn stored_shape(dir: &Path, stem: &str, name: &str) -> Result<Option<Vec<usize>>> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    let file = if index.exists() {
        match read_json(&index)?
            .get("weight_map")
            .and_then(|m| m.get(name))
            .and_then(|f| f.as_str())
        {
            Some(f) => dir.join(f),
            None => return Ok(None),
        }
    } else {
        dir.join(format!("{stem}.safetensors"))
    };
    Ok(SafetensorsFile::open(&file)?
        .info(name)
        .map(|i| i.shape.clone()))
}

impl<B: TextOps> Umt5Encoder<B> {
    /// Load a transformers `text_encoder/` directory: `config.json` plus `model.safetensors` or
    /// sharded files listed in `model.safetensors.index.json`. Every tensor must be used.
    pub fn load(dir: &Path, backend: &B) -> Result<Self> {
        let cfg = Umt5Config::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir, "model")?;
        let ld = WeightLoader::new(&ckpt, backend, 0, 1);
        let (d, inner, ff, h) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff, cfg.num_heads);
        let names = ckpt.names();
        let (shared, tied) = ("shared.weight", "encoder.embed_tokens.weight");
        let mut ignored = Vec::new();
        let embed_name = match (names.contains(shared), names.contains(tied)) {
            (true, true) => {
                // Tied copies: use `shared`, after checking that the other has the same shape.
                let a = stored_shape(dir, "model", shared)?;
                let b = stored_shape(dir, "model", tied)?;
                if a != b {
                    return Err(Error::TensorShape {
                        dir: dir.to_path_buf(),
                        name: tied.into(),
                        expected: a.unwrap_or_default(),
                        found: b.unwrap_or_default(),
                    });
                }
                ignored.push(tied);
                shared
            }
            (false, true) => tied,
            _ => shared,
        };
        let embed = ld.get(embed_name, &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let a = format!("{p}.0.SelfAttention");
            let f = format!("{p}.1.DenseReluDense");
            let rel = ld.get(
                &format!("{a}.relative_attention_bias.weight"),
                &[cfg.relative_attention_num_buckets, h],
            )?;
            layers.push(Layer {
                ln0: ld.get(&format!("{p}.0.layer_norm.weight"), &[d])?,
                q: ld.get(&format!("{a}.q.weight"), &[inner, d])?,
                k: ld.get(&format!("{a}.k.weight"), &[inner, d])?,
                v: ld.get(&format!("{a}.v.weight"), &[inner, d])?,
                o: ld.get(&format!("{a}.o.weight"), &[d, inner])?,
                rel_table: backend.download(&rel)?,
                ln1: ld.get(&format!("{p}.1.layer_norm.weight"), &[d])?,
                wi_0: ld.get(&format!("{f}.wi_0.weight"), &[ff, d])?,
                wi_1: ld.get(&format!("{f}.wi_1.weight"), &[ff, d])?,
                wo: ld.get(&format!("{f}.wo.weight"), &[d, ff])?,
            });
        }
        let final_ln = ld.get("encoder.final_layer_norm.weight", &[d])?;
        ld.finish(&ignored)?;
        Ok(Umt5Encoder {
            cfg,
            backend: backend.clone(),
            embed,
            layers,
            final_ln,
        })
    }

    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    /// Bucket of every key-minus-query distance `t − (n − 1)`, `t = 0..2n − 1`.
    fn distance_buckets(&self, n: usize) -> Vec<usize> {
        (0..2 * n - 1)
            .map(|t| {
                relative_position_bucket(
                    t as i64 - (n as i64 - 1),
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                )
            })
            .collect()
    }

    /// x ← RMS(x)·w as a new tensor (T5 layer norm: no mean, no bias).
    fn rms_norm(&self, x: &Tensor<B>, w: &Tensor<B>) -> Result<Tensor<B>> {
        let be = &self.backend;
        let mut n = be.slice_rows(x, 0, x.shape()[0])?;
        let ss = be.sum_squares(&n)?;
        be.rms_apply(
            &mut n,
            &ss,
            self.cfg.d_model,
            self.cfg.layer_norm_epsilon,
            w,
        )?;
        Ok(n)
    }

    /// `last_hidden_state` `[1, n, d_model]` of the token ids (the real tokens, `</s>` included).
    pub fn encode(&self, ids: &[u32]) -> Result<Tensor<B>> {
        self.encode_until(ids, &|| false)
    }

    /// [`Self::encode`], giving up with [`Error::Cancelled`] before any layer once `stop`
    /// returns true (a large encoder runs for seconds on a CPU).
    pub fn encode_until(&self, ids: &[u32], stop: &dyn Fn() -> bool) -> Result<Tensor<B>> {
        let n = ids.len();
        if n == 0 {
            return Err(Error::input(
                "input_ids",
                "is empty; a prompt has at least the end-of-sequence token",
            ));
        }
        let be = &self.backend;
        let (h, dk, d) = (self.cfg.num_heads, self.cfg.d_kv, self.cfg.d_model);
        let buckets = self.distance_buckets(n);
        let mut x = be.embedding(&self.embed, ids)?;
        for layer in &self.layers {
            if stop() {
                return Err(Error::Cancelled("text encoding".into()));
            }
            // Self-attention: unscaled logits plus this layer's own relative bias.
            let nx = self.rms_norm(&x, &layer.ln0)?;
            let q = be.linear(&nx, &layer.q, None, Activation::Identity)?;
            let k = be.linear(&nx, &layer.k, None, Activation::Identity)?;
            let v = be.linear(&nx, &layer.v, None, Activation::Identity)?;
            drop(nx);
            let mut rel = Vec::with_capacity(h * buckets.len());
            for hi in 0..h {
                rel.extend(buckets.iter().map(|&bk| layer.rel_table[bk * h + hi]));
            }
            let rel = be.upload_f32(&[h, 2 * n - 1], rel)?;
            let o = be.attention_rel_bias(
                &q.reshape(&[1, n, h, dk])?,
                &k.reshape(&[1, n, h, dk])?,
                &v.reshape(&[1, n, h, dk])?,
                &rel,
                1.0,
            )?;
            let a = be.linear(
                &o.reshape(&[n, h * dk])?,
                &layer.o,
                None,
                Activation::Identity,
            )?;
            be.add_gated(&mut x, &a, None)?;
            drop(a);

            // Gated-GELU feed-forward: wo(gelu_new(n·wi_0) ⊙ n·wi_1).
            let nx = self.rms_norm(&x, &layer.ln1)?;
            let mut g = be.linear(&nx, &layer.wi_0, None, Activation::GeluTanh)?;
            let u = be.linear(&nx, &layer.wi_1, None, Activation::Identity)?;
            drop(nx);
            be.mul_assign(&mut g, &u)?;
            drop(u);
            let f = be.linear(&g, &layer.wo, None, Activation::Identity)?;
            be.add_gated(&mut x, &f, None)?;
        }
        let ss = be.sum_squares(&x)?;
        be.rms_apply(
            &mut x,
            &ss,
            self.cfg.d_model,
            self.cfg.layer_norm_epsilon,
            &self.final_ln,
        )?;
        x.reshape(&[1, n, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_the_reference_table() {
        // wan21.md §5.3: n → bucket, +16 when the key is after the query.
        let table = [
            (0, 0),
            (7, 7),
            (8, 8),
            (11, 8),
            (12, 9),
            (15, 9),
            (16, 10),
            (22, 10),
            (23, 11),
            (31, 11),
            (32, 12),
            (45, 12),
            (46, 13),
            (63, 13),
            (64, 14),
            (90, 14),
            (91, 15),
            (511, 15),
        ];
        for (n, want) in table {
            assert_eq!(relative_position_bucket(-(n as i64), 32, 128), want, "-{n}");
            let pos = if n == 0 { 0 } else { want + 16 };
            assert_eq!(relative_position_bucket(n as i64, 32, 128), pos, "+{n}");
        }
    }
}
