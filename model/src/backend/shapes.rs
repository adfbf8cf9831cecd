//! Shape checks shared by every backend: one definition of what an op accepts, so that the CPU
//! reference and the GPU refuse the same inputs with the same message, and neither panics on
//! them.

use super::{Backend, Tensor, expect_rank};
use crate::error::{Error, Result};

/// The four dimensions of a rank-4 tensor (`op` names the error otherwise).
pub(crate) fn dims4<B: Backend>(t: &Tensor<B>, op: &'static str) -> Result<[usize; 4]> {
    expect_rank(op, t, 4)?;
    let s = t.shape();
    Ok([s[0], s[1], s[2], s[3]])
}

/// `attention`: `q[B, Lq, H, d]`, `k`, `v` `[B, Lk, H, d]`, multiplicities `[B, Lk]`; at least
/// one key when there are queries. Returns `[B, Lq, Lk, H, d]`.
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    key_multiplicity: Option<&Tensor<B>>,
) -> Result<[usize; 5]> {
    expect_rank("attention q", q, 4)?;
    expect_rank("attention k", k, 4)?;
    let [b, lq, h, d] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
    let lk = k.shape()[1];
    if k.shape() != v.shape()
        || k.shape()[0] != b
        || k.shape()[2] != h
        || k.shape()[3] != d
        || key_multiplicity.is_some_and(|m| m.shape() != [b, lk])
    {
        return Err(Error::shape(
            "attention",
            format!(
                "q {:?}, k {:?}, v {:?}, multiplicity {:?}",
                q.shape(),
                k.shape(),
                v.shape(),
                key_multiplicity.map(|m| m.shape().to_vec())
            ),
        ));
    }
    if lk == 0 && lq > 0 {
        return Err(Error::shape(
            "attention",
            "no keys: a softmax over zero keys is undefined",
        ));
    }
    Ok([b, lq, lk, h, d])
}

/// A causal 3-D convolution's dimensions.
pub(crate) struct Conv3d {
    pub t: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kt: usize,
    pub kh: usize,
    pub kw: usize,
    /// History frames the convolution reads (at most kt − 1; fewer are zeros before them).
    pub hist_frames: usize,
}

/// `conv3d_causal`: `x[T, Cin, H, W]`, weight `[Cout, Cin, kt ≥ 1, odd kh, odd kw]`, bias
/// `[Cout]`, history `[ht, Cin, H, W]`.
pub(crate) fn conv3d_causal<B: Backend>(
    x: &Tensor<B>,
    history: Option<&Tensor<B>>,
    weight: &Tensor<B>,
    bias: Option<&Tensor<B>>,
) -> Result<Conv3d> {
    let [t, cin, h, w] = dims4(x, "conv3d_causal")?;
    expect_rank("conv3d_causal weight", weight, 5)?;
    let ws = weight.shape();
    let [cout, wcin, kt, kh, kw] = [ws[0], ws[1], ws[2], ws[3], ws[4]];
    if wcin != cin
        || kt == 0
        || kh % 2 == 0
        || kw % 2 == 0
        || bias.is_some_and(|b| b.numel() != cout)
    {
        return Err(Error::shape(
            "conv3d_causal",
            format!("input {:?}, weight {ws:?}", x.shape()),
        ));
    }
    let hist_frames = match history {
        Some(hs) => {
            let [ht, hc, hh, hw] = dims4(hs, "conv3d_causal history")?;
            if hc != cin || hh != h || hw != w {
                return Err(Error::shape(
                    "conv3d_causal",
                    format!("history {:?} for input {:?}", hs.shape(), x.shape()),
                ));
            }
            ht.min(kt - 1)
        }
        None => 0,
    };
    Ok(Conv3d {
        t,
        cin,
        h,
        w,
        cout,
        kt,
        kh,
        kw,
        hist_frames,
    })
}

/// A stride-2 spatial convolution's dimensions (output `ho`, `wo`).
pub(crate) struct Conv2dDown {
    pub t: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
}

/// `conv2d_down2`: `x[T, Cin, H, W]`, weight `[Cout, Cin, kh, kw]` no larger than the frame
/// padded by one row and column, bias `[Cout]`.
pub(crate) fn conv2d_down2<B: Backend>(
    x: &Tensor<B>,
    weight: &Tensor<B>,
    bias: Option<&Tensor<B>>,
) -> Result<Conv2dDown> {
    let [t, cin, h, w] = dims4(x, "conv2d_down2")?;
    let [cout, wcin, kh, kw] = dims4(weight, "conv2d_down2 weight")?;
    if wcin != cin
        || kh == 0
        || kw == 0
        || kh > h + 1
        || kw > w + 1
        || bias.is_some_and(|b| b.numel() != cout)
    {
        return Err(Error::shape(
            "conv2d_down2",
            format!("input {:?}, weight {:?}", x.shape(), weight.shape()),
        ));
    }
    Ok(Conv2dDown {
        t,
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        ho: (h + 1 - kh) / 2 + 1,
        wo: (w + 1 - kw) / 2 + 1,
    })
}

/// A stride-2 temporal convolution's dimensions (`t_out` output frames).
pub(crate) struct ConvTimeDown {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kt: usize,
    pub t_out: usize,
}

/// `conv_time_down2`: `x[T, Cin, H, W]`, weight `[Cout, Cin, 1 ≤ kt ≤ T, 1, 1]`, bias `[Cout]`.
pub(crate) fn conv_time_down2<B: Backend>(
    x: &Tensor<B>,
    weight: &Tensor<B>,
    bias: Option<&Tensor<B>>,
) -> Result<ConvTimeDown> {
    let [t, cin, h, w] = dims4(x, "conv_time_down2")?;
    expect_rank("conv_time_down2 weight", weight, 5)?;
    let ws = weight.shape();
    let [cout, kt] = [ws[0], ws[2]];
    if ws[1] != cin
        || ws[3] != 1
        || ws[4] != 1
        || kt == 0
        || t < kt
        || bias.is_some_and(|b| b.numel() != cout)
    {
        return Err(Error::shape(
            "conv_time_down2",
            format!("input {:?}, weight {ws:?}", x.shape()),
        ));
    }
    Ok(ConvTimeDown {
        cin,
        h,
        w,
        cout,
        kt,
        t_out: (t - kt) / 2 + 1,
    })
}

/// `attention_rel_bias`: `q[B, Lq ≥ 1, H, d]`, `k`, `v` `[B, Lk ≥ 1, H, d]`, bias
/// `[H, Lq + Lk − 1]`. Returns `[B, Lq, Lk, H, d]`.
pub(crate) fn attention_rel_bias<B: Backend>(
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    rel_bias: &Tensor<B>,
) -> Result<[usize; 5]> {
    expect_rank("attention q", q, 4)?;
    expect_rank("attention k", k, 4)?;
    let [b, lq, h, d] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
    let lk = k.shape()[1];
    if k.shape() != v.shape()
        || k.shape()[0] != b
        || k.shape()[2] != h
        || k.shape()[3] != d
        || lq == 0
        || lk == 0
        || rel_bias.shape() != [h, lq + lk - 1]
    {
        return Err(Error::shape(
            "attention_rel_bias",
            format!(
                "q {:?}, k {:?}, v {:?}, relative bias {:?}",
                q.shape(),
                k.shape(),
                v.shape(),
                rel_bias.shape()
            ),
        ));
    }
    Ok([b, lq, lk, h, d])
}

/// `modulation_table`: table `[C, D]`, projection `[B, C·D]` or `[B, D]`. Returns `(B, C, D,
/// shared)`, `shared` when one D-vector serves every chunk.
pub(crate) fn modulation_table<B: Backend>(
    table: &Tensor<B>,
    proj: &Tensor<B>,
) -> Result<(usize, usize, usize, bool)> {
    expect_rank("modulation_table", table, 2)?;
    let (c, d) = (table.shape()[0], table.shape()[1]);
    let b = *proj.shape().first().unwrap_or(&0);
    let x = proj.numel() / b.max(1);
    if x != c * d && x != d {
        return Err(Error::shape(
            "modulation_table",
            format!(
                "table {:?} with projection {:?}",
                table.shape(),
                proj.shape()
            ),
        ));
    }
    Ok((b, c, d, x == d))
}

/// `unpatchify`: `y[B, L, pt·ph·pw·C]` with L = F'·H'·W'. Returns `(B, L, features)`.
pub(crate) fn unpatchify<B: Backend>(
    y: &Tensor<B>,
    grid: [usize; 3],
    patch: [usize; 3],
    channels: usize,
) -> Result<(usize, usize, usize)> {
    expect_rank("unpatchify", y, 3)?;
    let [gf, gh, gw] = grid;
    let [pt, ph, pw] = patch;
    let (b, l, feat) = (y.shape()[0], y.shape()[1], y.shape()[2]);
    if l != gf * gh * gw || feat != pt * ph * pw * channels {
        return Err(Error::shape(
            "unpatchify",
            format!(
                "{:?} for grid {grid:?}, patch {patch:?}, {channels} channels",
                y.shape()
            ),
        ));
    }
    Ok((b, l, feat))
}
