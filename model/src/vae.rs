//! The Wan2.1 video autoencoder (diffusers `AutoencoderKLWan`, wan21.md §4): the causal decoder,
//! run as a stream over latent-frame chunks with a two-frame cache per causal convolution, so that
//! memory stays bounded however long the video, and the output equals a one-shot decode.

use std::path::Path;

use crate::backend::video_ops::VideoOps;
use crate::backend::{Backend, Tensor};
use crate::config::ConfigReader;
use crate::error::{Error, Result};
use crate::io::{Checkpoint, WeightLoader};

/// `vae/config.json`, validated for the Wan 2.1 architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub base_dim: usize,
    pub decoder_base_dim: usize,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub temperal_downsample: Vec<bool>,
    pub out_channels: usize,
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
}

const DEFAULT_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const DEFAULT_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let c = ConfigReader::open(path)?;
        c.expect_class(&["AutoencoderKLWan"])?;
        let positive = |key: &str, default: usize| -> Result<usize> {
            match c.usize_or(key, default)? {
                0 => Err(c.error(key, "must be at least 1")),
                v => Ok(v),
            }
        };
        let base_dim = positive("base_dim", 96)?;
        let decoder_base_dim = match c.opt_usize("decoder_base_dim")? {
            Some(0) => return Err(c.error("decoder_base_dim", "must be at least 1")),
            Some(v) => v,
            None => base_dim,
        };
        let z_dim = positive("z_dim", 16)?;
        let dim_mult = c.usize_list_or("dim_mult", &[1, 2, 4, 4])?;
        if dim_mult.len() < 2 || dim_mult.contains(&0) {
            return Err(c.error(
                "dim_mult",
                format!("must be at least two positive integers, found {dim_mult:?}"),
            ));
        }
        let td: Vec<bool> = match c.raw("temperal_downsample") {
            None => vec![false, true, true],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_bool()
                        .ok_or_else(|| c.error("temperal_downsample", "must be a list of booleans"))
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(c.error(
                    "temperal_downsample",
                    format!("must be a list of booleans, found {v}"),
                ));
            }
        };
        if td.len() != dim_mult.len() - 1 {
            return Err(c.error(
                "temperal_downsample",
                format!(
                    "has {} entries; must have len(dim_mult) − 1 = {}",
                    td.len(),
                    dim_mult.len() - 1
                ),
            ));
        }
        if c.bool_or("is_residual", false)? {
            return Err(c.error(
                "is_residual",
                "true (the Wan 2.2 VAE) is not supported; allowed: false",
            ));
        }
        if c.raw("patch_size").is_some() {
            return Err(c.error(
                "patch_size",
                "is set (the Wan 2.2 VAE); only null is supported",
            ));
        }
        match c.raw("attn_scales") {
            None => {}
            Some(serde_json::Value::Array(a)) if a.is_empty() => {}
            Some(v) => {
                return Err(c.error("attn_scales", format!("{v} is not supported; allowed: []")));
            }
        }
        for (i, m) in dim_mult.iter().enumerate().skip(1) {
            if (decoder_base_dim * m) % 2 != 0 {
                return Err(c.error(
                    "dim_mult",
                    format!("decoder_base_dim × dim_mult[{i}] = {} must be even (the upsamplers halve it)", decoder_base_dim * m),
                ));
            }
        }
        let floats = |key: &str, default: &[f32]| -> Result<Vec<f32>> {
            let v: Vec<f32> = match c.raw(key) {
                None => default.to_vec(),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_f64()
                            .map(|f| f as f32)
                            .ok_or_else(|| c.error(key, "must be a list of numbers"))
                    })
                    .collect::<Result<_>>()?,
                Some(v) => {
                    return Err(c.error(key, format!("must be a list of numbers, found {v}")));
                }
            };
            if v.len() != z_dim {
                return Err(c.error(
                    key,
                    format!("has {} entries; must have z_dim = {z_dim}", v.len()),
                ));
            }
            Ok(v)
        };
        let latents_mean = floats("latents_mean", &DEFAULT_MEAN)?;
        let latents_std = floats("latents_std", &DEFAULT_STD)?;
        if let Some(s) = latents_std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(c.error("latents_std", format!("{s} must be a positive number")));
        }
        Ok(VaeConfig {
            base_dim,
            decoder_base_dim,
            z_dim,
            dim_mult,
            num_res_blocks: c.usize_or("num_res_blocks", 2)?,
            temperal_downsample: td,
            out_channels: positive("out_channels", 3)?,
            latents_mean,
            latents_std,
        })
    }

    /// Pixel frames decoded from `t` latent frames.
    pub fn frames_for(&self, t: usize) -> usize {
        let up = 1usize << self.temperal_downsample.iter().filter(|b| **b).count();
        if t == 0 { 0 } else { 1 + up * (t - 1) }
    }

    /// Spatial upsampling factor of the decoder.
    pub fn spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Temporal upsampling factor of the decoder: pixel frames per latent frame after the first.
    pub fn temporal_factor(&self) -> usize {
        1 << self.temperal_downsample.iter().filter(|b| **b).count()
    }
}

/// A convolution's weights; `slot` indexes its frame cache in [`StreamState`] when it is causal
/// in time (temporal kernel > 1).
struct Conv<B: Backend> {
    w: Tensor<B>,
    b: Tensor<B>,
    slot: Option<usize>,
}

struct Res<B: Backend> {
    norm1: Tensor<B>,
    conv1: Conv<B>,
    norm2: Tensor<B>,
    conv2: Conv<B>,
    shortcut: Option<Conv<B>>,
}

struct Attn<B: Backend> {
    norm: Tensor<B>,
    qkv: Conv<B>,
    proj: Conv<B>,
}

struct Upsample<B: Backend> {
    conv: Conv<B>,
    /// upsample3d: the temporal convolution doubling the frame count, and the slot of its
    /// "first frame seen" flag.
    time: Option<(Conv<B>, usize)>,
}

struct UpBlock<B: Backend> {
    resnets: Vec<Res<B>>,
    upsample: Option<Upsample<B>>,
}

/// Per-stream state of an encoder or decoder: each causal convolution's last input frames,
/// whether each temporal upsampler has passed the first frame through, and each temporal
/// downsampler's last input frame.
pub struct StreamState<B: Backend> {
    history: Vec<Option<Tensor<B>>>,
    seen_first: Vec<bool>,
    down_last: Vec<Option<Tensor<B>>>,
}

/// The decoder half of `AutoencoderKLWan` (plus `post_quant_conv`).
pub struct WanVaeDecoder<B: Backend> {
    cfg: VaeConfig,
    backend: B,
    post_quant: Conv<B>,
    conv_in: Conv<B>,
    mid: (Res<B>, Attn<B>, Res<B>),
    ups: Vec<UpBlock<B>>,
    norm_out: Tensor<B>,
    conv_out: Conv<B>,
    slots: usize,
    up_slots: usize,
}

struct Builder<'a, B: Backend> {
    ld: WeightLoader<'a, B>,
    backend: &'a B,
    slots: usize,
    up_slots: usize,
}

impl<'a, B: Backend> Builder<'a, B> {
    fn new(ckpt: &'a Checkpoint, backend: &'a B) -> Self {
        Builder {
            ld: WeightLoader::new(ckpt, backend, 0, 1),
            backend,
            slots: 0,
            up_slots: 0,
        }
    }

    /// Load a weight as f32 (convolutions run in f32 whatever the file holds).
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Tensor<B>> {
        let t = self.ld.get(name, shape)?;
        if self.backend.dtype(&t) == crate::dtype::DType::F32 {
            return Ok(t);
        }
        self.backend.upload_f32(shape, self.backend.download(&t)?)
    }

    fn gamma(&self, name: &str, c: usize, trailing: usize) -> Result<Tensor<B>> {
        let mut shape = vec![c];
        shape.extend(std::iter::repeat_n(1, trailing));
        self.f32(&format!("{name}.gamma"), &shape)?.reshape(&[c])
    }

    /// A convolution `[cout, cin, k...]`; temporal kernels > 1 get a cache slot.
    fn conv(&mut self, name: &str, cout: usize, cin: usize, kernel: &[usize]) -> Result<Conv<B>> {
        let mut shape = vec![cout, cin];
        shape.extend_from_slice(kernel);
        let w = self.f32(&format!("{name}.weight"), &shape)?;
        let k3 = match kernel {
            [t, h, w] => [*t, *h, *w],
            [h, w] => [1, *h, *w],
            _ => unreachable!("kernels are 2-D or 3-D"),
        };
        let w = w.reshape(&[cout, cin, k3[0], k3[1], k3[2]])?;
        let slot = (k3[0] > 1).then(|| {
            self.slots += 1;
            self.slots - 1
        });
        Ok(Conv {
            w,
            b: self.f32(&format!("{name}.bias"), &[cout])?,
            slot,
        })
    }

    /// The mid block (`<side>.mid_block`): resnet, single-head spatial attention, resnet.
    fn mid(&mut self, side: &str, c: usize) -> Result<(Res<B>, Attn<B>, Res<B>)> {
        let p = format!("{side}.mid_block");
        Ok((
            self.res(&format!("{p}.resnets.0"), c, c)?,
            Attn {
                norm: self.gamma(&format!("{p}.attentions.0.norm"), c, 2)?,
                qkv: self.conv(&format!("{p}.attentions.0.to_qkv"), 3 * c, c, &[1, 1])?,
                proj: self.conv(&format!("{p}.attentions.0.proj"), c, c, &[1, 1])?,
            },
            self.res(&format!("{p}.resnets.1"), c, c)?,
        ))
    }

    fn res(&mut self, p: &str, cin: usize, cout: usize) -> Result<Res<B>> {
        Ok(Res {
            norm1: self.gamma(&format!("{p}.norm1"), cin, 3)?,
            conv1: self.conv(&format!("{p}.conv1"), cout, cin, &[3, 3, 3])?,
            norm2: self.gamma(&format!("{p}.norm2"), cout, 3)?,
            conv2: self.conv(&format!("{p}.conv2"), cout, cout, &[3, 3, 3])?,
            shortcut: if cin != cout {
                Some(self.conv(&format!("{p}.conv_shortcut"), cout, cin, &[1, 1, 1])?)
            } else {
                None
            },
        })
    }
}

/// A causal convolution on a chunk, updating its frame cache.
fn conv<B: VideoOps>(
    be: &B,
    c: &Conv<B>,
    x: &Tensor<B>,
    st: &mut StreamState<B>,
) -> Result<Tensor<B>> {
    let Some(slot) = c.slot else {
        return be.conv3d_causal(x, None, &c.w, Some(&c.b));
    };
    let out = be.conv3d_causal(x, st.history[slot].as_ref(), &c.w, Some(&c.b))?;
    let keep = c.w.shape()[2] - 1;
    let t = x.shape()[0];
    let new_hist = if t >= keep {
        be.slice_rows(x, t - keep, keep)?
    } else {
        let mut parts = Vec::new();
        if let Some(h) = st.history[slot].take() {
            let ht = h.shape()[0];
            let from_old = (keep - t).min(ht);
            parts.push(be.slice_rows(&h, ht - from_old, from_old)?);
        }
        parts.push(be.slice_rows(x, 0, t)?);
        be.concat_rows(&parts)?
    };
    st.history[slot] = Some(new_hist);
    Ok(out)
}

fn res<B: VideoOps>(
    be: &B,
    r: &Res<B>,
    x: &Tensor<B>,
    st: &mut StreamState<B>,
) -> Result<Tensor<B>> {
    let h = be.channel_rms_norm(x, &r.norm1, true)?;
    let h = conv(be, &r.conv1, &h, st)?;
    let h = be.channel_rms_norm(&h, &r.norm2, true)?;
    let mut h = conv(be, &r.conv2, &h, st)?;
    match &r.shortcut {
        Some(s) => {
            let sc = conv(be, s, x, st)?;
            be.add_gated(&mut h, &sc, None)?;
        }
        None => be.add_gated(&mut h, x, None)?,
    }
    Ok(h)
}

fn attn<B: VideoOps>(
    be: &B,
    a: &Attn<B>,
    x: &Tensor<B>,
    st: &mut StreamState<B>,
) -> Result<Tensor<B>> {
    let n = be.channel_rms_norm(x, &a.norm, false)?;
    let qkv = conv(be, &a.qkv, &n, st)?;
    let o = be.spatial_attention(&qkv)?;
    let mut o = conv(be, &a.proj, &o, st)?;
    be.add_gated(&mut o, x, None)?;
    Ok(o)
}

impl<B: VideoOps> WanVaeDecoder<B> {
    /// Load the decoder from a diffusers `vae/` directory. Encoder tensors are not loaded.
    pub fn load(dir: &Path, backend: &B) -> Result<Self> {
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir, "diffusion_pytorch_model")?;
        let mut bd = Builder::new(&ckpt, backend);
        let z = cfg.z_dim;
        let base = cfg.decoder_base_dim;
        let n = cfg.dim_mult.len();
        let mut dims: Vec<usize> = vec![base * cfg.dim_mult[n - 1]];
        dims.extend(cfg.dim_mult.iter().rev().map(|m| base * m));
        let post_quant = bd.conv("post_quant_conv", z, z, &[1, 1, 1])?;
        let conv_in = bd.conv("decoder.conv_in", dims[0], z, &[3, 3, 3])?;
        let c0 = dims[0];
        let mid = bd.mid("decoder", c0)?;
        let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut ups = Vec::with_capacity(n);
        for i in 0..n {
            let mut cin = if i > 0 { dims[i] / 2 } else { dims[i] };
            let cout = dims[i + 1];
            let p = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                resnets.push(bd.res(&format!("{p}.resnets.{j}"), cin, cout)?);
                cin = cout;
            }
            let upsample = if i + 1 < n {
                let u = format!("{p}.upsamplers.0");
                let time = if temporal_up[i] {
                    let conv = bd.conv(&format!("{u}.time_conv"), 2 * cout, cout, &[3, 1, 1])?;
                    bd.up_slots += 1;
                    Some((conv, bd.up_slots - 1))
                } else {
                    None
                };
                Some(Upsample {
                    conv: bd.conv(&format!("{u}.resample.1"), cout / 2, cout, &[3, 3])?,
                    time,
                })
            } else {
                None
            };
            ups.push(UpBlock { resnets, upsample });
        }
        let last = dims[n];
        let norm_out = bd.gamma("decoder.norm_out", last, 3)?;
        let conv_out = bd.conv("decoder.conv_out", cfg.out_channels, last, &[3, 3, 3])?;
        let (slots, up_slots) = (bd.slots, bd.up_slots);
        bd.ld.finish(&["encoder.", "quant_conv."])?;
        Ok(WanVaeDecoder {
            cfg,
            backend: backend.clone(),
            post_quant,
            conv_in,
            mid,
            ups,
            norm_out,
            conv_out,
            slots,
            up_slots,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// A fresh stream state (one per video being decoded).
    pub fn new_state(&self) -> StreamState<B> {
        StreamState {
            history: (0..self.slots).map(|_| None).collect(),
            seen_first: vec![false; self.up_slots],
            down_last: Vec::new(),
        }
    }

    fn upsample(
        &self,
        u: &Upsample<B>,
        x: Tensor<B>,
        st: &mut StreamState<B>,
    ) -> Result<Tensor<B>> {
        let be = &self.backend;
        let x = match &u.time {
            None => x,
            Some((tc, flag)) => {
                let [t, c, h, w] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
                // The very first frame is not upsampled in time; every later frame becomes two
                // (channels [0:C] then [C:2C] of the temporal convolution's output).
                let (first, rest) = if st.seen_first[*flag] {
                    (None, Some(x))
                } else {
                    st.seen_first[*flag] = true;
                    let first = be.slice_rows(&x, 0, 1)?;
                    let rest = (t > 1).then(|| be.slice_rows(&x, 1, t - 1)).transpose()?;
                    (Some(first), rest)
                };
                let rest = match rest {
                    Some(r) => {
                        let rt = r.shape()[0];
                        Some(conv(&self.backend, tc, &r, st)?.reshape(&[2 * rt, c, h, w])?)
                    }
                    None => None,
                };
                match (first, rest) {
                    (Some(f), Some(r)) => be.concat_rows(&[f, r])?,
                    (Some(f), None) => f,
                    (None, Some(r)) => r,
                    (None, None) => unreachable!("a chunk has at least one frame"),
                }
            }
        };
        let x = be.upsample2x(&x)?;
        conv(&self.backend, &u.conv, &x, st)
    }

    /// Decode one chunk of consecutive latent frames `[t, z_dim, h, w]` (frame-major) of a
    /// stream; returns its pixel frames `[t', 3, 8h, 8w]` clamped to [−1, 1]. Chunks must come in
    /// order; any chunking gives the same frames as one chunk holding everything.
    pub fn decode_chunk(&self, z: &Tensor<B>, st: &mut StreamState<B>) -> Result<Tensor<B>> {
        let be = &self.backend;
        let s = z.shape();
        if s.len() != 4 || s[1] != self.cfg.z_dim || s[0] == 0 {
            return Err(Error::input(
                "latents",
                format!(
                    "chunk shape {s:?}; expected [frames ≥ 1, {}, height, width]",
                    self.cfg.z_dim
                ),
            ));
        }
        let x = conv(&self.backend, &self.post_quant, z, st)?;
        let mut x = conv(&self.backend, &self.conv_in, &x, st)?;
        x = res(&self.backend, &self.mid.0, &x, st)?;
        x = attn(&self.backend, &self.mid.1, &x, st)?;
        x = res(&self.backend, &self.mid.2, &x, st)?;
        for up in &self.ups {
            for r in &up.resnets {
                x = res(&self.backend, r, &x, st)?;
            }
            if let Some(u) = &up.upsample {
                x = self.upsample(u, x, st)?;
            }
        }
        let x = be.channel_rms_norm(&x, &self.norm_out, true)?;
        let mut x = conv(&self.backend, &self.conv_out, &x, st)?;
        be.clamp(&mut x, -1.0, 1.0)?;
        Ok(x)
    }

    /// Decode a whole latent video `[z_dim, T, h, w]` (one batch item, diffusers layout, host
    /// f32) in chunks of `chunk` latent frames, handing each chunk's pixel frames
    /// (`[t', 3, H, W]`, frame-major) to `sink` as soon as they exist.
    pub fn decode_stream(
        &self,
        latents: &[f32],
        shape: [usize; 4],
        chunk: usize,
        mut sink: impl FnMut(Tensor<B>) -> Result<()>,
    ) -> Result<()> {
        let [c, t, h, w] = shape;
        if c != self.cfg.z_dim || latents.len() != c * t * h * w || t == 0 || h == 0 || w == 0 {
            return Err(Error::input(
                "latents",
                format!(
                    "shape [{c}, {t}, {h}, {w}] ({} values); expected [{}, frames ≥ 1, height ≥ 1, width ≥ 1]",
                    latents.len(),
                    self.cfg.z_dim
                ),
            ));
        }
        if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
            return Err(Error::input(
                "latents",
                format!("value {i} is {}; all values must be finite", latents[i]),
            ));
        }
        let chunk = chunk.max(1);
        let mut st = self.new_state();
        let hw = h * w;
        for t0 in (0..t).step_by(chunk) {
            let n = chunk.min(t - t0);
            let mut fm = Vec::with_capacity(n * c * hw);
            for f in t0..t0 + n {
                for ch in 0..c {
                    fm.extend_from_slice(&latents[(ch * t + f) * hw..(ch * t + f + 1) * hw]);
                }
            }
            let z = self.backend.upload_f32(&[n, c, h, w], fm)?;
            sink(self.decode_chunk(&z, &mut st)?)?;
        }
        Ok(())
    }

    /// Decode latents `[B, z_dim, T, h, w]` (diffusers layout, host f32) to host f32 video
    /// `[B, 3, F, H, W]` in [−1, 1], streaming `chunk` latent frames at a time.
    pub fn decode_all(
        &self,
        latents: &[f32],
        shape: [usize; 5],
        chunk: usize,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let [b, c, t, h, w] = shape;
        if b == 0 {
            return Err(Error::input("latents", "batch size is 0"));
        }
        let frames = self.cfg.frames_for(t);
        let (oh, ow) = (h * self.cfg.spatial_factor(), w * self.cfg.spatial_factor());
        let oc = self.cfg.out_channels;
        let plane = oh * ow;
        let mut out = vec![0.0f32; b * oc * frames * plane];
        let per_item = c * t * h * w;
        for bi in 0..b {
            let mut f0 = 0;
            self.decode_stream(
                latents
                    .get(bi * per_item..(bi + 1) * per_item)
                    .unwrap_or(&[]),
                [c, t, h, w],
                chunk,
                |px| {
                    let data = self.backend.download(&px)?;
                    let nf = px.shape()[0];
                    for f in 0..nf {
                        for ch in 0..oc {
                            let src = &data[(f * oc + ch) * plane..(f * oc + ch + 1) * plane];
                            let dst = ((bi * oc + ch) * frames + f0 + f) * plane;
                            out[dst..dst + plane].copy_from_slice(src);
                        }
                    }
                    f0 += nf;
                    Ok(())
                },
            )?;
        }
        Ok((vec![b, oc, frames, oh, ow], out))
    }
}

struct Downsample<B: Backend> {
    /// Spatial stride-2 convolution `[C, C, 3, 3]`.
    w: Tensor<B>,
    b: Tensor<B>,
    /// downsample3d: the stride-2 temporal convolution and the slot of its last-frame cache.
    time: Option<(Tensor<B>, Tensor<B>, usize)>,
}

enum DownItem<B: Backend> {
    Res(Res<B>),
    Down(Downsample<B>),
}

/// The encoder half of `AutoencoderKLWan` (plus `quant_conv`): video in [−1, 1] to the
/// posterior's mean and log-variance.
pub struct WanVaeEncoder<B: Backend> {
    cfg: VaeConfig,
    backend: B,
    conv_in: Conv<B>,
    down: Vec<DownItem<B>>,
    mid: (Res<B>, Attn<B>, Res<B>),
    norm_out: Tensor<B>,
    conv_out: Conv<B>,
    quant: Conv<B>,
    slots: usize,
    down_slots: usize,
}

/// The posterior of an encoded video: `[z_dim, T, h, w]` mean and log-variance (clamped to
/// [−30, 20] as the reference does).
pub struct Posterior {
    pub shape: [usize; 4],
    pub mean: Vec<f32>,
    pub logvar: Vec<f32>,
}

impl<B: VideoOps> WanVaeEncoder<B> {
    /// Load the encoder from a diffusers `vae/` directory. Decoder tensors are not loaded.
    pub fn load(dir: &Path, backend: &B) -> Result<Self> {
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir, "diffusion_pytorch_model")?;
        let mut bd = Builder::new(&ckpt, backend);
        let base = cfg.base_dim;
        let mut dims = vec![base];
        dims.extend(cfg.dim_mult.iter().map(|m| base * m));
        let conv_in = bd.conv("encoder.conv_in", dims[0], 3, &[3, 3, 3])?;
        let mut down = Vec::new();
        let mut idx = 0;
        let mut down_slots = 0;
        let n = cfg.dim_mult.len();
        for i in 0..n {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                down.push(DownItem::Res(bd.res(
                    &format!("encoder.down_blocks.{idx}"),
                    cin,
                    cout,
                )?));
                idx += 1;
                cin = cout;
            }
            if i + 1 < n {
                let p = format!("encoder.down_blocks.{idx}");
                let time = if cfg.temperal_downsample[i] {
                    let w = bd.f32(&format!("{p}.time_conv.weight"), &[cout, cout, 3, 1, 1])?;
                    let b = bd.f32(&format!("{p}.time_conv.bias"), &[cout])?;
                    down_slots += 1;
                    Some((w, b, down_slots - 1))
                } else {
                    None
                };
                down.push(DownItem::Down(Downsample {
                    w: bd.f32(&format!("{p}.resample.1.weight"), &[cout, cout, 3, 3])?,
                    b: bd.f32(&format!("{p}.resample.1.bias"), &[cout])?,
                    time,
                }));
                idx += 1;
            }
        }
        let c = dims[n];
        let mid = bd.mid("encoder", c)?;
        let norm_out = bd.gamma("encoder.norm_out", c, 3)?;
        let z2 = 2 * cfg.z_dim;
        let conv_out = bd.conv("encoder.conv_out", z2, c, &[3, 3, 3])?;
        let quant = bd.conv("quant_conv", z2, z2, &[1, 1, 1])?;
        let slots = bd.slots;
        bd.ld.finish(&["decoder.", "post_quant_conv."])?;
        Ok(WanVaeEncoder {
            cfg,
            backend: backend.clone(),
            conv_in,
            down,
            mid,
            norm_out,
            conv_out,
            quant,
            slots,
            down_slots,
        })
    }

    /// Pixel frames per latent frame after the first.
    fn temporal_factor(&self) -> usize {
        1 << self.cfg.temperal_downsample.iter().filter(|b| **b).count()
    }

    fn encode_chunk(&self, x: &Tensor<B>, st: &mut StreamState<B>) -> Result<Tensor<B>> {
        let be = &self.backend;
        let mut x = conv(be, &self.conv_in, x, st)?;
        for item in &self.down {
            x = match item {
                DownItem::Res(r) => res(be, r, &x, st)?,
                DownItem::Down(d) => {
                    let y = be.conv2d_down2(&x, &d.w, Some(&d.b))?;
                    match &d.time {
                        None => y,
                        Some((tw, tb, slot)) => {
                            let t = y.shape()[0];
                            let last = be.slice_rows(&y, t - 1, 1)?;
                            match st.down_last[*slot].replace(last) {
                                // The first chunk passes through; later ones see the previous
                                // chunk's last frame first.
                                None => y,
                                Some(prev) => {
                                    be.conv_time_down2(&be.concat_rows(&[prev, y])?, tw, Some(tb))?
                                }
                            }
                        }
                    }
                }
            };
        }
        x = res(be, &self.mid.0, &x, st)?;
        x = attn(be, &self.mid.1, &x, st)?;
        x = res(be, &self.mid.2, &x, st)?;
        let x = be.channel_rms_norm(&x, &self.norm_out, true)?;
        let x = conv(be, &self.conv_out, &x, st)?;
        conv(be, &self.quant, &x, st)
    }

    /// Encode one video `[3, F, H, W]` (diffusers layout, host f32 in [−1, 1]; F = 1 + 4k, H and
    /// W multiples of 8) chunk by chunk as the reference does: the first frame, then four at a
    /// time.
    pub fn encode(&self, video: &[f32], shape: [usize; 4]) -> Result<Posterior> {
        let [c, f, h, w] = shape;
        let tf = self.temporal_factor();
        let sf = self.cfg.spatial_factor();
        if c != 3
            || video.len() != c * f * h * w
            || f == 0
            || (f - 1) % tf != 0
            || h % sf != 0
            || w % sf != 0
            || h == 0
            || w == 0
        {
            return Err(Error::input(
                "video",
                format!(
                    "shape [{c}, {f}, {h}, {w}]; expected [3, 1 + {tf}k frames, height and width multiples of {sf}]"
                ),
            ));
        }
        let mut st = StreamState {
            history: (0..self.slots).map(|_| None).collect(),
            seen_first: Vec::new(),
            down_last: (0..self.down_slots).map(|_| None).collect(),
        };
        let hw = h * w;
        let z = self.cfg.z_dim;
        let (t, lh, lw) = (1 + (f - 1) / tf, h / sf, w / sf);
        let lplane = lh * lw;
        let mut mean = vec![0.0f32; z * t * lplane];
        let mut logvar = vec![0.0f32; z * t * lplane];
        let mut t0 = 0;
        let mut f0 = 0;
        while f0 < f {
            let n = if f0 == 0 { 1 } else { tf };
            let mut fm = Vec::with_capacity(n * c * hw);
            for fr in f0..f0 + n {
                for ch in 0..c {
                    fm.extend_from_slice(&video[(ch * f + fr) * hw..(ch * f + fr + 1) * hw]);
                }
            }
            let x = self.backend.upload_f32(&[n, c, h, w], fm)?;
            let out = self.encode_chunk(&x, &mut st)?;
            let nt = out.shape()[0];
            let data = self.backend.download(&out)?;
            for j in 0..nt {
                for ch in 0..2 * z {
                    let src = &data[(j * 2 * z + ch) * lplane..(j * 2 * z + ch + 1) * lplane];
                    let (dst, c2) = if ch < z {
                        (&mut mean, ch)
                    } else {
                        (&mut logvar, ch - z)
                    };
                    let off = (c2 * t + t0 + j) * lplane;
                    dst[off..off + lplane].copy_from_slice(src);
                }
            }
            t0 += nt;
            f0 += n;
        }
        logvar.iter_mut().for_each(|v| *v = v.clamp(-30.0, 20.0));
        Ok(Posterior {
            shape: [z, t, lh, lw],
            mean,
            logvar,
        })
    }
}
