//! `WanTransformer3DModel` (wan21.md §1.4–1.6), tensor-parallel over a [`Comm`] group.
//!
//! Sharding is Megatron style: q/k/v and the FFN up-projection are split by heads / features
//! (column-parallel), the attention output projection and the FFN down-projection by input
//! features (row-parallel) followed by an all-reduce. The q/k RMS norm spans all heads, so its
//! per-row sum of squares is all-reduced before it is applied. Embeddings, modulation and the
//! output head are small and replicated. With one rank every collective is a no-op.

use std::path::Path;

use super::config::WanConfig;
use super::rope::RopeTables;
use crate::backend::{Activation, Backend, ModRow, Modulation, Tensor};
use crate::comm::Comm;
use crate::error::{Error, Result};
use crate::io::{Checkpoint, WeightLoader};

/// Text conditioning for one forward: `embeds[B, Lc, text_dim]` and how many of the
/// reference's 512 positions each row stands for (`multiplicity[B, Lc]`).
///
/// The pipeline pads prompt embeddings with exact zero rows, which the transformer attends to.
/// Identical rows give identical keys and values, so a run of zero rows is kept once with its
/// count as multiplicity: the attention result is the same, without projecting or attending the
/// repeated rows.
pub struct TextContext<B: Backend> {
    embeds: Tensor<B>,
    multiplicity: Tensor<B>,
    /// The uncompressed sequence length (the reference's S).
    seq_len: usize,
}

impl<B: Backend> TextContext<B> {
    /// From host data `[batch, seq_len, dim]`, compressing each item's trailing zero rows.
    pub fn from_host(
        backend: &B,
        batch: usize,
        seq_len: usize,
        dim: usize,
        data: &[f32],
    ) -> Result<Self> {
        if data.len() != batch * seq_len * dim || batch == 0 || seq_len == 0 || dim == 0 {
            return Err(Error::input(
                "encoder_hidden_states",
                format!(
                    "{} values for [batch {batch}, seq {seq_len}, dim {dim}]",
                    data.len()
                ),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::input(
                "encoder_hidden_states",
                format!("value {i} is {}; all values must be finite", data[i]),
            ));
        }
        // Real rows per item: everything up to the last non-zero row.
        let real: Vec<usize> = (0..batch)
            .map(|b| {
                let item = &data[b * seq_len * dim..(b + 1) * seq_len * dim];
                item.chunks_exact(dim)
                    .rposition(|row| row.iter().any(|v| *v != 0.0))
                    .map_or(0, |i| i + 1)
            })
            .collect();
        let kept = |r: usize| r + usize::from(r < seq_len);
        let lc = real.iter().map(|&r| kept(r)).max().unwrap_or(1);
        let mut embeds = vec![0.0f32; batch * lc * dim];
        let mut mult = vec![0.0f32; batch * lc];
        for (b, &r) in real.iter().enumerate() {
            let src = &data[b * seq_len * dim..(b * seq_len + r) * dim];
            embeds[b * lc * dim..b * lc * dim + src.len()].copy_from_slice(src);
            mult[b * lc..b * lc + r].iter_mut().for_each(|m| *m = 1.0);
            if r < seq_len {
                // One zero row standing for all the padding.
                mult[b * lc + r] = (seq_len - r) as f32;
            }
        }
        Ok(TextContext {
            embeds: backend.upload_f32(&[batch, lc, dim], embeds)?,
            multiplicity: backend.upload_f32(&[batch, lc], mult)?,
            seq_len,
        })
    }

    pub fn batch(&self) -> usize {
        self.embeds.shape()[0]
    }

    pub fn dim(&self) -> usize {
        self.embeds.shape()[2]
    }

    /// The sequence length the context stands for.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Rows actually computed (after compression).
    pub fn compressed_len(&self) -> usize {
        self.embeds.shape()[1]
    }
}

/// One forward's inputs, with diffusers' meaning: `latents[B, C_in, F, H, W]`, one timestep per
/// batch item, and the text context.
pub struct DitInputs<'a, B: Backend> {
    pub latents: &'a Tensor<B>,
    pub timesteps: &'a [f32],
    pub context: &'a TextContext<B>,
}

struct Linear<B: Backend> {
    w: Tensor<B>,
    b: Option<Tensor<B>>,
}

impl<B: Backend> Linear<B> {
    fn forward(&self, be: &B, x: &Tensor<B>, act: Activation) -> Result<Tensor<B>> {
        be.linear(x, &self.w, self.b.as_ref(), act)
    }
}

/// Attention weights of one rank: `heads` of the model's heads.
struct Attention<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    /// Row-parallel output projection; its bias is held by rank 0 only, so that the all-reduce
    /// adds it exactly once.
    out: Linear<B>,
    norm_q: Tensor<B>,
    norm_k: Tensor<B>,
    heads: usize,
}

struct Block<B: Backend> {
    /// `scale_shift_table` as `[6, D]`.
    modulation: Tensor<B>,
    attn1: Attention<B>,
    attn2: Attention<B>,
    norm2: Option<(Tensor<B>, Tensor<B>)>,
    ffn_up: Linear<B>,
    /// Row-parallel; bias on rank 0 only.
    ffn_down: Linear<B>,
}

/// The Wan2.1 diffusion transformer: one tensor-parallel rank's share of it.
pub struct WanTransformer<B: Backend> {
    cfg: WanConfig,
    backend: B,
    rank: usize,
    world: usize,
    patch_embedding: Linear<B>,
    time_1: Linear<B>,
    time_2: Linear<B>,
    time_proj: Linear<B>,
    text_1: Linear<B>,
    text_2: Linear<B>,
    /// Head `scale_shift_table` as `[2, D]`.
    head_modulation: Tensor<B>,
    proj_out: Linear<B>,
    blocks: Vec<Block<B>>,
    rope: RopeTables,
}

/// diffusers' sinusoidal timestep embedding (`flip_sin_to_cos=True`, shift 0): `[cos | sin]`,
/// computed in f32 as the reference does.
pub fn timestep_embedding(timesteps: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
    }
    out
}

impl<B: Backend> WanTransformer<B> {
    /// Load rank `rank` of a `world`-way tensor-parallel split of a diffusers `transformer/`
    /// directory (`config.json` plus safetensors weights, single or sharded).
    pub fn load(dir: &Path, backend: &B, rank: usize, world: usize) -> Result<Self> {
        let cfg = WanConfig::from_file(&dir.join("config.json"))?;
        Self::check_parallelism(&cfg, world)?;
        if rank >= world {
            return Err(Error::Parallel(format!(
                "rank {rank} of a group of {world}"
            )));
        }
        let ckpt = Checkpoint::open(dir, "diffusion_pytorch_model")?;
        let ld = WeightLoader::new(&ckpt, backend, rank, world);
        let d = cfg.inner_dim();
        let [pt, ph, pw] = cfg.patch_size;
        let patch_in = cfg.in_channels * pt * ph * pw;
        let full = |name: &str, n: usize, k: usize| -> Result<Linear<B>> {
            Ok(Linear {
                w: ld.get(&format!("{name}.weight"), &[n, k])?,
                b: Some(ld.get(&format!("{name}.bias"), &[n])?),
            })
        };
        let column = |name: &str, n: usize, k: usize| -> Result<Linear<B>> {
            Ok(Linear {
                w: ld.get_split(&format!("{name}.weight"), &[n, k], 0)?,
                b: Some(ld.get_split(&format!("{name}.bias"), &[n], 0)?),
            })
        };
        let row = |name: &str, n: usize, k: usize| -> Result<Linear<B>> {
            let w = ld.get_split(&format!("{name}.weight"), &[n, k], 1)?;
            // Every rank reads the bias (so the checkpoint is checked everywhere); rank 0 keeps it.
            let b = ld.get(&format!("{name}.bias"), &[n])?;
            Ok(Linear {
                w,
                b: (rank == 0).then_some(b),
            })
        };
        let attention = |p: &str| -> Result<Attention<B>> {
            Ok(Attention {
                q: column(&format!("{p}.to_q"), d, d)?,
                k: column(&format!("{p}.to_k"), d, d)?,
                v: column(&format!("{p}.to_v"), d, d)?,
                out: row(&format!("{p}.to_out.0"), d, d)?,
                norm_q: ld.get_split(&format!("{p}.norm_q.weight"), &[d], 0)?,
                norm_k: ld.get_split(&format!("{p}.norm_k.weight"), &[d], 0)?,
                heads: cfg.num_attention_heads / world,
            })
        };
        let patch_w = ld
            .get("patch_embedding.weight", &[d, cfg.in_channels, pt, ph, pw])?
            .reshape(&[d, patch_in])?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blocks.{i}");
            blocks.push(Block {
                modulation: ld
                    .get(&format!("{p}.scale_shift_table"), &[1, 6, d])?
                    .reshape(&[6, d])?,
                attn1: attention(&format!("{p}.attn1"))?,
                attn2: attention(&format!("{p}.attn2"))?,
                norm2: if cfg.cross_attn_norm {
                    Some((
                        ld.get(&format!("{p}.norm2.weight"), &[d])?,
                        ld.get(&format!("{p}.norm2.bias"), &[d])?,
                    ))
                } else {
                    None
                },
                ffn_up: column(&format!("{p}.ffn.net.0.proj"), cfg.ffn_dim, d)?,
                ffn_down: row(&format!("{p}.ffn.net.2"), d, cfg.ffn_dim)?,
            });
        }
        let out_features = pt * ph * pw * cfg.out_channels;
        let model = WanTransformer {
            patch_embedding: Linear {
                w: patch_w,
                b: Some(ld.get("patch_embedding.bias", &[d])?),
            },
            time_1: full("condition_embedder.time_embedder.linear_1", d, cfg.freq_dim)?,
            time_2: full("condition_embedder.time_embedder.linear_2", d, d)?,
            time_proj: full("condition_embedder.time_proj", 6 * d, d)?,
            text_1: full("condition_embedder.text_embedder.linear_1", d, cfg.text_dim)?,
            text_2: full("condition_embedder.text_embedder.linear_2", d, d)?,
            head_modulation: ld.get("scale_shift_table", &[1, 2, d])?.reshape(&[2, d])?,
            proj_out: full("proj_out", out_features, d)?,
            blocks,
            rope: RopeTables::new(cfg.attention_head_dim, cfg.rope_max_seq_len),
            backend: backend.clone(),
            rank,
            world,
            cfg,
        };
        // diffusers skips `norm_added_q` on load; anything else unused means a different model.
        ld.finish(&["norm_added_q"])?;
        Ok(model)
    }

    /// Check that a `world`-way split of this config is possible, naming the allowed sizes.
    pub fn check_parallelism(cfg: &WanConfig, world: usize) -> Result<()> {
        let heads = cfg.num_attention_heads;
        let allowed: Vec<String> = (1..=heads)
            .filter(|t| heads.is_multiple_of(*t))
            .map(|t| t.to_string())
            .collect();
        if world == 0 || !heads.is_multiple_of(world) {
            return Err(Error::Parallel(format!(
                "tp = {world} must divide num_attention_heads ({heads}); allowed: {}",
                allowed.join(", ")
            )));
        }
        Ok(())
    }

    pub fn config(&self) -> &WanConfig {
        &self.cfg
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Multiply-adds ×2 of one forward for `tokens` video tokens, `text` context rows and batch 1
    /// (all ranks together); the figure `bench dit` reports rates against.
    pub fn flops(cfg: &WanConfig, tokens: usize, text: usize) -> f64 {
        let (d, l, s) = (cfg.inner_dim() as f64, tokens as f64, text as f64);
        let [pt, ph, pw] = cfg.patch_size;
        let patch = (cfg.in_channels * pt * ph * pw) as f64;
        let out = (cfg.out_channels * pt * ph * pw) as f64;
        let per_block = 2.0 * l * d * d * 4.0 // self q, k, v, out
            + 2.0 * 2.0 * l * l * d // self scores + weighted sum
            + 2.0 * l * d * d * 2.0 // cross q, out
            + 2.0 * s * d * d * 2.0 // cross k, v
            + 2.0 * 2.0 * l * s * d // cross scores + weighted sum
            + 2.0 * 2.0 * l * d * cfg.ffn_dim as f64; // ffn
        2.0 * l * patch * d
            + 2.0 * s * (cfg.text_dim as f64 * d + d * d)
            + cfg.num_layers as f64 * per_block
            + 2.0 * l * d * out
    }

    fn validate(&self, inputs: &DitInputs<'_, B>) -> Result<[usize; 3]> {
        let s = inputs.latents.shape();
        let [pt, ph, pw] = self.cfg.patch_size;
        if s.len() != 5 || s[1] != self.cfg.in_channels {
            return Err(Error::input(
                "hidden_states",
                format!(
                    "shape {s:?}; expected [batch, {}, frames, height, width]",
                    self.cfg.in_channels
                ),
            ));
        }
        if s[0] == 0 || s[2] == 0 || s[3] == 0 || s[4] == 0 {
            return Err(Error::input(
                "hidden_states",
                format!("shape {s:?} has an empty dimension"),
            ));
        }
        for (axis, (&n, p)) in ["frames", "height", "width"]
            .iter()
            .zip(s[2..].iter().zip([pt, ph, pw]))
        {
            if n % p != 0 {
                return Err(Error::input(
                    "hidden_states",
                    format!(
                        "{axis} {n} is not a multiple of the patch size {p} (patch_size {:?})",
                        self.cfg.patch_size
                    ),
                ));
            }
        }
        if inputs.timesteps.len() != s[0] {
            return Err(Error::input(
                "timestep",
                format!(
                    "has {} values; expected one per batch item ({})",
                    inputs.timesteps.len(),
                    s[0]
                ),
            ));
        }
        if let Some(t) = inputs.timesteps.iter().find(|t| !t.is_finite()) {
            return Err(Error::input(
                "timestep",
                format!("{t} is not a finite number"),
            ));
        }
        let ctx = inputs.context;
        if ctx.batch() != s[0] || ctx.dim() != self.cfg.text_dim {
            return Err(Error::input(
                "encoder_hidden_states",
                format!(
                    "batch {} × width {}; expected batch {} (as hidden_states) × text_dim {}",
                    ctx.batch(),
                    ctx.dim(),
                    s[0],
                    self.cfg.text_dim
                ),
            ));
        }
        Ok([s[2] / pt, s[3] / ph, s[4] / pw])
    }

    /// Predict the flow velocity `[B, C_out, F, H, W]`. Every rank of the group must call this
    /// with the same inputs; every rank returns the full result.
    pub fn forward(&self, comm: &dyn Comm<B>, inputs: &DitInputs<'_, B>) -> Result<Tensor<B>> {
        if comm.world_size() != self.world || comm.rank() != self.rank {
            return Err(Error::Parallel(format!(
                "model loaded as rank {} of {}, called with rank {} of {}",
                self.rank,
                self.world,
                comm.rank(),
                comm.world_size()
            )));
        }
        let grid = self.validate(inputs)?;
        let be = &self.backend;
        let cfg = &self.cfg;
        let b = inputs.latents.shape()[0];

        // Patch embedding: a Conv3d with kernel = stride, as patches × weight.
        let patches = be.patchify(inputs.latents, cfg.patch_size)?;
        let mut x = self
            .patch_embedding
            .forward(be, &patches, Activation::Identity)?;
        drop(patches);

        // Time conditioning.
        let sinus = be.upload_f32(
            &[b, cfg.freq_dim],
            timestep_embedding(inputs.timesteps, cfg.freq_dim),
        )?;
        let h = self.time_1.forward(be, &sinus, Activation::Silu)?;
        let temb = self.time_2.forward(be, &h, Activation::Identity)?;
        let mut temb_act = be.slice_rows(&temb, 0, b)?;
        be.activate(&mut temb_act, Activation::Silu)?;
        let tproj = self
            .time_proj
            .forward(be, &temb_act, Activation::Identity)?;

        // Text conditioning.
        let h = self
            .text_1
            .forward(be, &inputs.context.embeds, Activation::GeluTanh)?;
        let ctx = self.text_2.forward(be, &h, Activation::Identity)?;
        drop(h);

        let (cos, sin) = self.rope.for_grid(be, grid)?;
        for block in &self.blocks {
            self.block(
                comm,
                block,
                &mut x,
                &ctx,
                &inputs.context.multiplicity,
                &tproj,
                (&cos, &sin),
            )?;
        }

        // Output head: modulation from temb (not timestep_proj).
        let head_mod = be.modulation_table(&self.head_modulation, &temb)?;
        let n = be.layer_norm(
            &x,
            cfg.eps,
            None,
            Some(Modulation {
                shift: ModRow {
                    table: &head_mod,
                    index: 0,
                },
                scale: ModRow {
                    table: &head_mod,
                    index: 1,
                },
            }),
        )?;
        let out = self.proj_out.forward(be, &n, Activation::Identity)?;
        be.unpatchify(&out, grid, cfg.patch_size, cfg.out_channels)
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        comm: &dyn Comm<B>,
        blk: &Block<B>,
        x: &mut Tensor<B>,
        ctx: &Tensor<B>,
        ctx_mult: &Tensor<B>,
        tproj: &Tensor<B>,
        rope: (&Tensor<B>, &Tensor<B>),
    ) -> Result<()> {
        let be = &self.backend;
        let eps = self.cfg.eps;
        // [B, 6, D]: shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate.
        let m = be.modulation_table(&blk.modulation, tproj)?;
        let row = |index| ModRow { table: &m, index };

        let n = be.layer_norm(
            x,
            eps,
            None,
            Some(Modulation {
                shift: row(0),
                scale: row(1),
            }),
        )?;
        let a = self.attention(comm, &blk.attn1, &n, &n, None, Some(rope))?;
        be.add_gated(x, &a, Some(row(2)))?;

        // Cross-attention: affine layer norm first when `cross_attn_norm`, else no norm at all.
        let a = match &blk.norm2 {
            Some((w, bb)) => {
                let n = be.layer_norm(x, eps, Some((w, bb)), None)?;
                self.attention(comm, &blk.attn2, &n, ctx, Some(ctx_mult), None)?
            }
            None => self.attention(comm, &blk.attn2, x, ctx, Some(ctx_mult), None)?,
        };
        be.add_gated(x, &a, None)?;

        let n = be.layer_norm(
            x,
            eps,
            None,
            Some(Modulation {
                shift: row(3),
                scale: row(4),
            }),
        )?;
        let h = blk.ffn_up.forward(be, &n, Activation::GeluTanh)?;
        drop(n);
        let mut f = blk.ffn_down.forward(be, &h, Activation::Identity)?;
        drop(h);
        comm.all_reduce_sum(&mut f)?;
        be.add_gated(x, &f, Some(row(5)))
    }

    /// q/k/v projections, q/k RMS norm across all heads (sum of squares all-reduced), RoPE when
    /// given, attention, and the all-reduced output projection.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        comm: &dyn Comm<B>,
        attn: &Attention<B>,
        x: &Tensor<B>,
        src: &Tensor<B>,
        key_multiplicity: Option<&Tensor<B>>,
        rope: Option<(&Tensor<B>, &Tensor<B>)>,
    ) -> Result<Tensor<B>> {
        let be = &self.backend;
        let d_full = self.cfg.inner_dim();
        let hd = self.cfg.attention_head_dim;
        let (b, lq, lk) = (x.shape()[0], x.shape()[1], src.shape()[1]);
        let mut q = attn.q.forward(be, x, Activation::Identity)?;
        let mut k = attn.k.forward(be, src, Activation::Identity)?;
        let v = attn.v.forward(be, src, Activation::Identity)?;
        for (t, w) in [(&mut q, &attn.norm_q), (&mut k, &attn.norm_k)] {
            let mut ss = be.sum_squares(t)?;
            comm.all_reduce_sum(&mut ss)?;
            be.rms_apply(t, &ss, d_full, self.cfg.eps, w)?;
        }
        let mut q = q.reshape(&[b, lq, attn.heads, hd])?;
        let mut k = k.reshape(&[b, lk, attn.heads, hd])?;
        let v = v.reshape(&[b, lk, attn.heads, hd])?;
        if let Some((cos, sin)) = rope {
            be.rope(&mut q, cos, sin)?;
            be.rope(&mut k, cos, sin)?;
        }
        let o = be.attention(&q, &k, &v, key_multiplicity)?;
        drop((q, k, v));
        let o = o.reshape(&[b, lq, attn.heads * hd])?;
        let mut out = attn.out.forward(be, &o, Activation::Identity)?;
        comm.all_reduce_sum(&mut out)?;
        Ok(out)
    }
}
