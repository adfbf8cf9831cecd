//! Operations of the video autoencoder: causal 3-D convolution, channel RMS norm, nearest
//! upsampling and per-frame spatial attention, with their CPU implementation.
//!
//! Video activations are kept frame-major, `[T, C, H, W]`, so that one frame is one contiguous
//! `[C, H·W]` matrix: convolutions become sums of matrix products over kernel taps (no im2col
//! buffer), and temporal chunks are slices along the first dimension.

use rayon::prelude::*;

use super::cpu::{Cpu, CpuBuffer, SharedMut, gemm_strided, rows_per_task, threads};
use super::shapes::{self, dims4};
use super::{Backend, Tensor, kernels};
use crate::error::{Error, Result};

/// Video-autoencoder operations on frame-major `[T, C, H, W]` tensors.
pub trait VideoOps: Backend {
    /// Causal 3-D convolution with weight `[Cout, Cin, kt, kh, kw]` (odd kh, kw, zero-padded to
    /// keep H and W; stride 1). Output frame `t` sees input frames `t−kt+1 ..= t`; frames before
    /// the first come from `history` (the previous chunk's last input frames, oldest first),
    /// then zeros.
    fn conv3d_causal(
        &self,
        x: &Tensor<Self>,
        history: Option<&Tensor<Self>>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

    /// 2-D convolution with weight `[Cout, Cin, kh, kw]`, stride 2 and zero padding of one row
    /// / column at the bottom / right (Wan's downsampler), applied to every frame.
    fn conv2d_down2(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

    /// Temporal convolution with weight `[Cout, Cin, kt, 1, 1]`, stride 2, no padding: output
    /// frame `j` sees input frames `2j .. 2j + kt` (Wan's temporal downsampler).
    fn conv_time_down2(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

    /// Wan's RMS norm over channels: `x / max(‖x_c‖₂, 1e−12) · √C · γ`, optionally followed by
    /// SiLU, for `[T, C, H, W]` (per frame and pixel).
    fn channel_rms_norm(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        silu: bool,
    ) -> Result<Tensor<Self>>;

    /// Nearest-neighbour ×2 in H and W.
    fn upsample2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Single-head attention per frame over the H·W positions of `qkv[T, 3C, H, W]` (channels
    /// `[0:C]` queries, `[C:2C]` keys, `[2C:3C]` values), scale `1/√C`: `[T, C, H, W]`.
    fn spatial_attention(&self, qkv: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Clamp every element to `[lo, hi]`, in place.
    fn clamp(&self, x: &mut Tensor<Self>, lo: f32, hi: f32) -> Result<()>;
}

fn f32s<'a>(t: &'a Tensor<Cpu>, op: &'static str) -> Result<&'a [f32]> {
    match t.buffer() {
        CpuBuffer::F32(v) => Ok(v),
        _ => Err(Error::shape(op, "video tensors and weights must be f32")),
    }
}

impl VideoOps for Cpu {
    fn conv3d_causal(
        &self,
        x: &Tensor<Self>,
        history: Option<&Tensor<Self>>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let shapes::Conv3d {
            t,
            cin,
            h,
            w,
            cout,
            kt,
            kh,
            kw,
            hist_frames,
        } = shapes::conv3d_causal(x, history, weight, bias)?;
        let (ph, pw) = (kh / 2, kw / 2);
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        let frame_p = cin * hp * wp;
        // Spatially padded input with kt−1 leading frames (history, else zeros) and one extra
        // padded row at the end so the last tap's shifted view stays in bounds.
        let lead = kt - 1;
        let total = (lead + t) * frame_p + wp * 2 * pw + 2 * pw;
        let mut padded = vec![0.0f32; total];
        let xs = f32s(x, "conv3d_causal")?;
        let hist = match history {
            Some(hs) => Some(f32s(hs, "conv3d_causal")?),
            None => None,
        };
        let src_frame = |i: usize| -> Option<&[f32]> {
            // Padded frame i corresponds to input frame i − lead (negative: history / zeros).
            if i >= lead {
                let f = i - lead;
                Some(&xs[f * cin * h * w..(f + 1) * cin * h * w])
            } else {
                let back = lead - i; // 1 = the frame just before the input
                let hs = hist?;
                let ht = hs.len() / (cin * h * w);
                if back > hist_frames {
                    return None;
                }
                let f = ht - back;
                Some(&hs[f * cin * h * w..(f + 1) * cin * h * w])
            }
        };
        padded[..(lead + t) * frame_p]
            .par_chunks_mut(hp * wp)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (fi, c) = (plane / cin, plane % cin);
                if let Some(src) = src_frame(fi) {
                    let src = &src[c * h * w..(c + 1) * h * w];
                    for r in 0..h {
                        dst[(r + ph) * wp + pw..(r + ph) * wp + pw + w]
                            .copy_from_slice(&src[r * w..(r + 1) * w]);
                    }
                }
            });
        let wts = f32s(weight, "conv3d_causal")?;
        let taps = kt * kh * kw;
        // Output in padded-width layout [Cout, h, wp]; the last 2·pw columns of each row are
        // discarded. Each kernel tap is one matrix product [Cout, Cin] × shifted input.
        let n = h * wp;
        let mut out = vec![0.0f32; t * cout * h * w];
        let frame_out = |fo: usize, acc: &mut [f32], parallel: bool| {
            let mut first = true;
            for a in 0..kt {
                let base = (fo + a) * frame_p;
                for b in 0..kh {
                    for c in 0..kw {
                        let tap = (a * kh + b) * kw + c;
                        let off = base + b * wp + c;
                        gemm_strided(
                            cout,
                            n,
                            cin,
                            acc,
                            n,
                            !first,
                            &wts[tap..],
                            cin * taps,
                            taps,
                            &padded[off..],
                            hp * wp,
                            1,
                            1.0,
                            parallel,
                        );
                        first = false;
                    }
                }
            }
        };
        let bias = match bias {
            Some(b) => Some(f32s(b, "conv3d_causal")?),
            None => None,
        };
        let finish = |acc: &[f32], dst: &mut [f32]| {
            for co in 0..cout {
                let bv = bias.map_or(0.0, |b| b[co]);
                for r in 0..h {
                    let s = &acc[co * n + r * wp..co * n + r * wp + w];
                    let d = &mut dst[(co * h + r) * w..(co * h + r + 1) * w];
                    d.iter_mut().zip(s).for_each(|(d, s)| *d = *s + bv);
                }
            }
        };
        if t >= threads() * 2 {
            out.par_chunks_mut(cout * h * w).enumerate().for_each_init(
                || vec![0.0f32; cout * n],
                |acc, (fo, dst)| {
                    frame_out(fo, acc, false);
                    finish(acc, dst);
                },
            );
        } else {
            let mut acc = vec![0.0f32; cout * n];
            for (fo, dst) in out.chunks_mut(cout * h * w).enumerate() {
                frame_out(fo, &mut acc, true);
                finish(&acc, dst);
            }
        }
        Cpu.upload_f32(&[t, cout, h, w], out)
    }

    fn conv2d_down2(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let shapes::Conv2dDown {
            t,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            ho,
            wo,
        } = shapes::conv2d_down2(x, weight, bias)?;
        // One zero row/column padded at the bottom/right, then a valid stride-2 convolution.
        let xs = f32s(x, "conv2d_down2")?;
        let wts = f32s(weight, "conv2d_down2")?;
        let kk = cin * kh * kw;
        let mut out = vec![0.0f32; t * cout * ho * wo];
        out.par_chunks_mut(cout * ho * wo)
            .enumerate()
            .for_each(|(f, dst)| {
                // im2col: [Cin·kh·kw, ho·wo]
                let src = &xs[f * cin * h * w..(f + 1) * cin * h * w];
                let mut cols = vec![0.0f32; kk * ho * wo];
                for ci in 0..cin {
                    for a in 0..kh {
                        for b in 0..kw {
                            let row = (ci * kh + a) * kw + b;
                            for r in 0..ho {
                                let y = 2 * r + a;
                                if y >= h {
                                    continue;
                                }
                                for c in 0..wo {
                                    let xx = 2 * c + b;
                                    if xx < w {
                                        cols[row * ho * wo + r * wo + c] =
                                            src[(ci * h + y) * w + xx];
                                    }
                                }
                            }
                        }
                    }
                }
                gemm_strided(
                    cout,
                    ho * wo,
                    kk,
                    dst,
                    ho * wo,
                    false,
                    wts,
                    kk,
                    1,
                    &cols,
                    ho * wo,
                    1,
                    1.0,
                    false,
                );
                if let Some(b) = bias {
                    let b = f32s(b, "conv2d_down2").expect("checked");
                    for (co, plane) in dst.chunks_mut(ho * wo).enumerate() {
                        plane.iter_mut().for_each(|v| *v += b[co]);
                    }
                }
            });
        Cpu.upload_f32(&[t, cout, ho, wo], out)
    }

    fn conv_time_down2(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let shapes::ConvTimeDown {
            cin,
            h,
            w,
            cout,
            kt,
            t_out: to,
            ..
        } = shapes::conv_time_down2(x, weight, bias)?;
        let hw = h * w;
        let xs = f32s(x, "conv_time_down2")?;
        let wts = f32s(weight, "conv_time_down2")?;
        let bias = match bias {
            Some(b) => Some(f32s(b, "conv_time_down2")?),
            None => None,
        };
        let mut out = vec![0.0f32; to * cout * hw];
        for (j, dst) in out.chunks_mut(cout * hw).enumerate() {
            for a in 0..kt {
                let src = &xs[(2 * j + a) * cin * hw..(2 * j + a + 1) * cin * hw];
                gemm_strided(
                    cout,
                    hw,
                    cin,
                    dst,
                    hw,
                    a > 0,
                    &wts[a..],
                    cin * kt,
                    kt,
                    src,
                    hw,
                    1,
                    1.0,
                    true,
                );
            }
            if let Some(b) = bias {
                for (co, plane) in dst.chunks_mut(hw).enumerate() {
                    plane.iter_mut().for_each(|v| *v += b[co]);
                }
            }
        }
        Cpu.upload_f32(&[to, cout, h, w], out)
    }

    fn channel_rms_norm(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        silu: bool,
    ) -> Result<Tensor<Self>> {
        let [_, c, h, w] = dims4(x, "channel_rms_norm")?;
        if gamma.numel() != c {
            return Err(Error::shape(
                "channel_rms_norm",
                format!("gamma {:?} for {c} channels", gamma.shape()),
            ));
        }
        let xs = f32s(x, "channel_rms_norm")?;
        let g = f32s(gamma, "channel_rms_norm")?;
        let hw = h * w;
        let mut out = vec![0.0f32; xs.len()];
        // Per frame: sums of squares over channels for every pixel, then scale.
        out.par_chunks_mut(c * hw)
            .zip(xs.par_chunks(c * hw))
            .for_each(|(o, xf)| kernels::channel_rms_frame(xf, o, c, hw, g, silu));
        Cpu.upload_f32(x.shape(), out)
    }

    fn upsample2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let [t, c, h, w] = dims4(x, "upsample2x")?;
        let xs = f32s(x, "upsample2x")?;
        let mut out = vec![0.0f32; t * c * 4 * h * w];
        out.par_chunks_mut(4 * h * w)
            .zip(xs.par_chunks(h * w))
            .for_each(|(o, p)| {
                for r in 0..h {
                    let row = &mut o[2 * r * 2 * w..(2 * r + 1) * 2 * w];
                    for (i, v) in p[r * w..(r + 1) * w].iter().enumerate() {
                        row[2 * i] = *v;
                        row[2 * i + 1] = *v;
                    }
                    o.copy_within(2 * r * 2 * w..(2 * r + 1) * 2 * w, (2 * r + 1) * 2 * w);
                }
            });
        Cpu.upload_f32(&[t, c, 2 * h, 2 * w], out)
    }

    fn spatial_attention(&self, qkv: &Tensor<Self>) -> Result<Tensor<Self>> {
        let [t, c3, h, w] = dims4(qkv, "spatial_attention")?;
        if c3 % 3 != 0 {
            return Err(Error::shape(
                "spatial_attention",
                format!("{:?}: channels not 3·C", qkv.shape()),
            ));
        }
        let c = c3 / 3;
        let n = h * w;
        let xs = f32s(qkv, "spatial_attention")?;
        let scale = 1.0 / (c as f32).sqrt();
        let qc = (262_144 / n.max(1)).clamp(16, 256).min(n.max(1));
        let chunks = n.div_ceil(qc);
        let mut out = vec![0.0f32; t * c * n];
        let dst = SharedMut(out.as_mut_ptr());
        let out_len = out.len();
        (0..t * chunks)
            .into_par_iter()
            .for_each_init(Vec::<f32>::new, |scores, task| {
                let (f, q0) = (task / chunks, (task % chunks) * qc);
                let rows = qc.min(n - q0);
                let base = f * 3 * c * n;
                let (q, k, v) = (&xs[base..], &xs[base + c * n..], &xs[base + 2 * c * n..]);
                scores.resize(rows * n, 0.0);
                // scores[i, j] = Σ_c q[c, q0 + i] · k[c, j]
                gemm_strided(
                    rows,
                    n,
                    c,
                    scores,
                    n,
                    false,
                    &q[q0..],
                    1,
                    n,
                    k,
                    n,
                    1,
                    1.0,
                    false,
                );
                scores.iter_mut().for_each(|s| *s *= scale);
                kernels::softmax_rows(scores, n, None);
                // out[c, q0 + i] = Σ_j v[c, j] · scores[i, j]
                let off = f * c * n + q0;
                // SAFETY: this task writes columns q0..q0+rows of frame f's output, which no other
                // task writes; `out` outlives the parallel loop.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(off), out_len - off) };
                gemm_strided(c, rows, n, o, n, false, v, n, 1, scores, 1, n, 1.0, false);
            });
        Cpu.upload_f32(&[t, c, h, w], out)
    }

    fn clamp(&self, x: &mut Tensor<Self>, lo: f32, hi: f32) -> Result<()> {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(Error::shape("clamp", format!("bounds {lo}..={hi}")));
        }
        let d = x.last_dim();
        x.buffer_mut()
            .f32_mut("clamp")?
            .par_chunks_mut(rows_per_task(d) * d)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.clamp(lo, hi)));
        Ok(())
    }
}
