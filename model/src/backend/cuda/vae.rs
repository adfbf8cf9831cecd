//! Video-autoencoder kernels: causal 3-D convolution, the downsampling convolutions, channel
//! RMS norm, nearest upsampling and per-frame spatial attention.
//!
//! The three convolutions share one implicit-GEMM kernel (`kernels/vae.cu`): output channels ×
//! output pixels of all frames, reduced over taps × input channels, with the causal time padding
//! (history frames, then zeros), the spatial zero padding and the strides resolved while the
//! input is staged into shared memory. The weight, of any storage type, is first rearranged into
//! f32 `[taps·Cin, Cout]` rows (one small pass per call) so that the kernel's weight loads are
//! aligned and coalesced. Products and sums are f32 (SIMT FMA), like the CPU reference.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{Cuda, CudaBuffer, Tensor, dim, grid_1d, push_buf, suffix};
use crate::backend::shapes::{self, dims4};
use crate::error::{Error, Result};

/// Elements a flat kernel's grid covers before its grid-stride loop takes over.
const MAX_FLAT_ELEMENTS: usize = 1 << 24;

/// Threads of a convolution block.
const CONV_THREADS: u32 = 256;

/// Input channels per reduction chunk of the convolution kernels (`CONV_BK`).
const CONV_BK: usize = 16;

/// A convolution kernel and its tile: output channels and output pixels a block.
struct ConvTile {
    kernel: &'static str,
    channels: usize,
    pixels: usize,
}

/// The tile for more than 16 output channels.
const CONV_WIDE: ConvTile = ConvTile {
    kernel: "vae_conv_igemm_64x128",
    channels: 64,
    pixels: 128,
};

/// The tile for at most 16 output channels (the decoder's RGB head).
const CONV_NARROW: ConvTile = ConvTile {
    kernel: "vae_conv_igemm_16x256",
    channels: 16,
    pixels: 256,
};

/// A convolution's geometry as the kernels read it: `ConvShape` of `kernels/vae.cu`, same
/// fields in the same order.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvShape {
    cin: i32,
    h: i32,
    w: i32,
    cout: i32,
    ho: i32,
    wo: i32,
    kt: i32,
    kh: i32,
    kw: i32,
    t_stride: i32,
    s_stride: i32,
    lead: i32,
    pad_h: i32,
    pad_w: i32,
    hist_t: i32,
    hist_frames: i32,
    n: i32,
    ldw: i32,
}

// SAFETY: a `#[repr(C)]` struct of eighteen `i32`s (no padding, no pointers), laid out exactly
// like the kernels' `ConvShape`; it is passed by value.
unsafe impl DeviceRepr for ConvShape {}

/// A convolution's geometry in host sizes: output frames and frame size, kernel taps, strides,
/// the time offset (`lead`: output frame `fo`, tap `a` reads input frame
/// `fo·t_stride + a − lead`, negative ones from the history, then zeros) and the top / left zero
/// padding (the bottom / right padding is whatever the output size reaches past the input).
struct ConvGeometry {
    t_out: usize,
    ho: usize,
    wo: usize,
    kt: usize,
    kh: usize,
    kw: usize,
    t_stride: usize,
    s_stride: usize,
    lead: usize,
    pad_h: usize,
    pad_w: usize,
}

/// An optional f32 buffer as a kernel argument: its device pointer, or null for `None` (the
/// kernels read null as "absent").
enum OptF32<'a> {
    Some(&'a CudaSlice<f32>),
    Null(u64),
}

impl<'a> OptF32<'a> {
    fn new(s: Option<&'a CudaSlice<f32>>) -> Self {
        s.map_or(OptF32::Null(0), OptF32::Some)
    }

    fn push(&'a self, l: &mut LaunchArgs<'a>) {
        match self {
            OptF32::Some(s) => l.arg(*s),
            OptF32::Null(p) => l.arg(p),
        };
    }
}

/// Run one convolution of `x [T, Cin, H, W]` (shapes already checked by the caller) with weight
/// `[Cout, Cin, taps...]` (taps = kt·kh·kw, any storage type), optional `bias [Cout]` and
/// optional `history` (`[hist_t, Cin, H, W]` with the number of its last frames that stand for
/// input frames −1, −2, ...): `[T_out, Cout, Ho, Wo]`.
fn conv(
    b: &Cuda,
    op: &'static str,
    x: &Tensor<Cuda>,
    history: Option<(&Tensor<Cuda>, usize)>,
    weight: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    g: ConvGeometry,
) -> Result<Tensor<Cuda>> {
    let (cin, h, w) = (x.shape()[1], x.shape()[2], x.shape()[3]);
    let cout = weight.shape()[0];
    let xs = Cuda::f32_of(x, op)?;
    let (hist, hist_t, hist_frames) = match history {
        Some((t, frames)) => (Some(Cuda::f32_of(t, op)?), t.shape()[0], frames),
        None => (None, 0, 0),
    };
    let tile = if cout <= CONV_NARROW.channels {
        CONV_NARROW
    } else {
        CONV_WIDE
    };
    let ldw = cout.next_multiple_of(tile.channels);
    let taps = g.kt * g.kh * g.kw;
    let n = g.t_out * g.ho * g.wo;
    let shape = ConvShape {
        cin: dim(op, cin)?,
        h: dim(op, h)?,
        w: dim(op, w)?,
        cout: dim(op, cout)?,
        ho: dim(op, g.ho)?,
        wo: dim(op, g.wo)?,
        kt: dim(op, g.kt)?,
        kh: dim(op, g.kh)?,
        kw: dim(op, g.kw)?,
        t_stride: dim(op, g.t_stride)?,
        s_stride: dim(op, g.s_stride)?,
        lead: dim(op, g.lead)?,
        pad_h: dim(op, g.pad_h)?,
        pad_w: dim(op, g.pad_w)?,
        hist_t: dim(op, hist_t)?,
        hist_frames: dim(op, hist_frames)?,
        n: dim(op, n)?,
        ldw: dim(op, ldw)?,
    };
    // Products the kernel forms in `int`: H·W, Ho·Wo, the reduction steps, the input frame
    // index and the block count.
    dim(op, h * w)?;
    dim(op, g.ho * g.wo)?;
    dim(op, taps * cin.div_ceil(CONV_BK))?;
    dim(op, g.t_out * g.t_stride + g.kt)?;
    let blocks = dim(op, ldw / tile.channels * n.div_ceil(tile.pixels))?;

    let out_shape = vec![g.t_out, cout, g.ho, g.wo];
    let out = b.alloc::<f32>(n * cout)?;
    if n * cout == 0 {
        return Ok(Tensor::from_parts(CudaBuffer::F32(out), out_shape));
    }
    // The weight as f32 rows k = tap·Cin + ci of ldw columns (zero past Cout).
    let k = taps * cin;
    let wt = b.alloc::<f32>(k * ldw)?;
    if k > 0 {
        let total = (k * ldw) as u64;
        let (taps32, ldw32) = (dim(op, taps)?, shape.ldw);
        b.launch(
            &format!("vae_conv_weight_prep_{}", suffix(weight.buf.dtype())),
            grid_1d((k * ldw).min(MAX_FLAT_ELEMENTS)),
            |l| {
                push_buf(l, &weight.buf);
                l.arg(&wt)
                    .arg(&shape.cout)
                    .arg(&shape.cin)
                    .arg(&taps32)
                    .arg(&ldw32)
                    .arg(&total);
            },
        )?;
    }
    let bias32 = bias.map(|t| b.weight_f32(t)).transpose()?;
    let hist_arg = OptF32::new(hist);
    let bias_arg = OptF32::new(bias32.as_deref());
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (CONV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    b.launch(tile.kernel, cfg, |l| {
        l.arg(xs);
        hist_arg.push(l);
        l.arg(&wt);
        bias_arg.push(l);
        l.arg(&out).arg(&shape);
    })?;
    Ok(Tensor::from_parts(CudaBuffer::F32(out), out_shape))
}

/// Causal 3-D convolution of `x [T, Cin, H, W]` with weight `[Cout, Cin, kt, kh, kw]` (odd kh,
/// kw; zero padding keeps H and W; stride 1) and optional bias `[Cout]`: output frame `t` sees
/// input frames `t−kt+1 ..= t`, those before the first taken from `history [ht, Cin, H, W]`
/// (its last frames, the newest last), then zeros. Kernel `vae_conv_igemm_*`.
pub(super) fn conv3d_causal(
    b: &Cuda,
    x: &Tensor<Cuda>,
    history: Option<&Tensor<Cuda>>,
    weight: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let shapes::Conv3d {
        t,
        h,
        w,
        kt,
        kh,
        kw,
        hist_frames,
        ..
    } = shapes::conv3d_causal(x, history, weight, bias)?;
    let history = history.map(|hs| (hs, hist_frames));
    let g = ConvGeometry {
        t_out: t,
        ho: h,
        wo: w,
        kt,
        kh,
        kw,
        t_stride: 1,
        s_stride: 1,
        lead: kt - 1,
        pad_h: kh / 2,
        pad_w: kw / 2,
    };
    conv(b, "conv3d_causal", x, history, weight, bias, g)
}

/// 2-D convolution of every frame of `x [T, Cin, H, W]` with weight `[Cout, Cin, kh, kw]` and
/// optional bias, stride 2, one zero row / column padded at the bottom / right (Wan's
/// downsampler): `[T, Cout, (H+1−kh)/2+1, (W+1−kw)/2+1]`. Kernel `vae_conv_igemm_*`.
pub(super) fn conv2d_down2(
    b: &Cuda,
    x: &Tensor<Cuda>,
    weight: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let shapes::Conv2dDown {
        t, kh, kw, ho, wo, ..
    } = shapes::conv2d_down2(x, weight, bias)?;
    let g = ConvGeometry {
        t_out: t,
        ho,
        wo,
        kt: 1,
        kh,
        kw,
        t_stride: 1,
        s_stride: 2,
        lead: 0,
        pad_h: 0,
        pad_w: 0,
    };
    conv(b, "conv2d_down2", x, None, weight, bias, g)
}

/// Temporal convolution of `x [T, Cin, H, W]` with weight `[Cout, Cin, kt, 1, 1]` and optional
/// bias, stride 2, no padding: output frame `j` sees input frames `2j .. 2j + kt` (Wan's
/// temporal downsampler), `[(T−kt)/2+1, Cout, H, W]`. Kernel `vae_conv_igemm_*`.
pub(super) fn conv_time_down2(
    b: &Cuda,
    x: &Tensor<Cuda>,
    weight: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let shapes::ConvTimeDown {
        h, w, kt, t_out, ..
    } = shapes::conv_time_down2(x, weight, bias)?;
    let g = ConvGeometry {
        t_out,
        ho: h,
        wo: w,
        kt,
        kh: 1,
        kw: 1,
        t_stride: 2,
        s_stride: 1,
        lead: 0,
        pad_h: 0,
        pad_w: 0,
    };
    conv(b, "conv_time_down2", x, None, weight, bias, g)
}

/// Wan's RMS norm over the channels of `x [T, C, H, W]`: `x / max(‖x_c‖₂, 1e−12) · √C · γ` per
/// frame and pixel, then SiLU when `silu`; `gamma` has C elements of any storage type. Kernel
/// `vae_channel_rms_norm`, one thread per pixel.
pub(super) fn channel_rms_norm(
    b: &Cuda,
    x: &Tensor<Cuda>,
    gamma: &Tensor<Cuda>,
    silu: bool,
) -> Result<Tensor<Cuda>> {
    let [t, c, h, w] = dims4(x, "channel_rms_norm")?;
    if gamma.numel() != c {
        return Err(Error::shape(
            "channel_rms_norm",
            format!("gamma {:?} for {c} channels", gamma.shape()),
        ));
    }
    let xs = Cuda::f32_of(x, "channel_rms_norm")?;
    let y = b.alloc::<f32>(x.numel())?;
    if x.numel() > 0 {
        let g = b.weight_f32(gamma)?;
        let pixels = t * h * w;
        let (c32, hw) = (dim("channel_rms_norm", c)?, dim("channel_rms_norm", h * w)?);
        let (pixels64, root_c, silu32) = (pixels as u64, (c as f32).sqrt(), i32::from(silu));
        b.launch(
            "vae_channel_rms_norm",
            grid_1d(pixels.min(MAX_FLAT_ELEMENTS)),
            |l| {
                l.arg(xs)
                    .arg(&*g)
                    .arg(&y)
                    .arg(&c32)
                    .arg(&hw)
                    .arg(&pixels64)
                    .arg(&root_c)
                    .arg(&silu32);
            },
        )?;
    }
    Ok(Tensor::from_parts(CudaBuffer::F32(y), x.shape().to_vec()))
}

/// Nearest-neighbour ×2 in H and W: `x [T, C, H, W]` → `[T, C, 2H, 2W]`. Kernel
/// `vae_upsample2x`, one thread per input element.
pub(super) fn upsample2x(b: &Cuda, x: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    let [t, c, h, w] = dims4(x, "upsample2x")?;
    let xs = Cuda::f32_of(x, "upsample2x")?;
    let n = x.numel();
    let y = b.alloc::<f32>(4 * n)?;
    if n > 0 {
        let (w32, n64) = (dim("upsample2x", w)?, n as u64);
        b.launch("vae_upsample2x", grid_1d(n.min(MAX_FLAT_ELEMENTS)), |l| {
            l.arg(xs).arg(&y).arg(&w32).arg(&n64);
        })?;
    }
    Ok(Tensor::from_parts(
        CudaBuffer::F32(y),
        vec![t, c, 2 * h, 2 * w],
    ))
}

/// Single-head attention per frame over the `N = H·W` positions of `qkv [T, 3C, H, W]`
/// (channels `[0, C)` queries, `[C, 2C)` keys, `[2C, 3C)` values), scale `1/√C`:
/// `[T, C, H, W]`. Kernels `vae_attention_c{64,128,256,384}` (`kernels/vae_attention.cu`): flash
/// attention read straight from the channel-major layout, one block of 256 threads per frame and
/// 64 queries, each launch producing up to 384 output channels (wider C takes several launches,
/// each recomputing the scores).
pub(super) fn spatial_attention(b: &Cuda, qkv: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    const OP: &str = "spatial_attention";
    /// Output channels a launch produces at most (the widest kernel).
    const MAX_CHANNELS: usize = 384;
    /// Queries per block.
    const QUERY_TILE: usize = 64;
    let [t, c3, h, w] = dims4(qkv, OP)?;
    if c3 % 3 != 0 {
        return Err(Error::shape(
            OP,
            format!("{:?}: channels not 3·C", qkv.shape()),
        ));
    }
    let c = c3 / 3;
    let n = h * w;
    let xs = Cuda::f32_of(qkv, OP)?;
    let y = b.alloc::<f32>(t * c * n)?;
    if t * c * n > 0 {
        let kernel = match c {
            0..=64 => "vae_attention_c64",
            65..=128 => "vae_attention_c128",
            129..=256 => "vae_attention_c256",
            _ => "vae_attention_c384",
        };
        // The kernel's int loops step past C and N by up to a tile.
        dim(OP, c.max(n) + QUERY_TILE)?;
        let (c32, n32) = (dim(OP, c)?, dim(OP, n)?);
        let blocks = dim(OP, t * n.div_ceil(QUERY_TILE))? as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale = 1.0 / (c as f32).sqrt();
        for c_out0 in (0..c).step_by(MAX_CHANNELS) {
            let c0 = c_out0 as i32;
            b.launch(kernel, cfg, |l| {
                l.arg(xs).arg(&y).arg(&c32).arg(&n32).arg(&scale).arg(&c0);
            })?;
        }
    }
    Ok(Tensor::from_parts(CudaBuffer::F32(y), vec![t, c, h, w]))
}
