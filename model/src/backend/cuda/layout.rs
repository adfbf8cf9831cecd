//! Layout kernels: row slices and concatenation, RoPE, patchify / unpatchify.
//!
//! Row slices and concatenation are device-to-device copies that keep the storage type; the
//! others are row kernels (one block a row, see [`row_launch`]) on f32 activations.

use std::ops::Range;

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

use super::elementwise::row_launch;
use super::{Cuda, CudaBuffer, Tensor, dim};
use crate::backend::expect_rank;
use crate::error::{Error, Result};

/// Dimensions as the kernels' `int`s, each refused past `i32::MAX`.
fn dims<const N: usize>(op: &'static str, v: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0; N];
    for (o, v) in out.iter_mut().zip(v) {
        *o = dim(op, v)?;
    }
    Ok(out)
}

/// A new buffer holding elements `range` of `src`.
fn copy_range<T: DeviceRepr>(
    b: &Cuda,
    src: &CudaSlice<T>,
    range: Range<usize>,
) -> Result<CudaSlice<T>> {
    let n = range.len();
    let mut dst = b.alloc::<T>(n)?;
    if n > 0 {
        b.stream()
            .memcpy_dtod(&src.slice(range), &mut dst.slice_mut(..n))
            .map_err(|e| b.err("copying rows", e))?;
    }
    Ok(dst)
}

/// A new buffer holding the first `n` elements of each part in turn, `total` in all.
fn concat_slices<T: DeviceRepr>(
    b: &Cuda,
    parts: &[(&CudaSlice<T>, usize)],
    total: usize,
) -> Result<CudaSlice<T>> {
    let mut dst = b.alloc::<T>(total)?;
    let mut at = 0;
    for &(src, n) in parts {
        if n > 0 {
            b.stream()
                .memcpy_dtod(&src.slice(..n), &mut dst.slice_mut(at..at + n))
                .map_err(|e| b.err("concatenating rows", e))?;
        }
        at += n;
    }
    Ok(dst)
}

/// A copy of rows `start..start + len` along the first dimension, in the tensor's storage type.
pub(super) fn slice_rows(
    b: &Cuda,
    t: &Tensor<Cuda>,
    start: usize,
    len: usize,
) -> Result<Tensor<Cuda>> {
    let rows = *t.shape().first().unwrap_or(&0);
    let end = start
        .checked_add(len)
        .filter(|&end| end <= rows && !t.shape().is_empty())
        .ok_or_else(|| {
            Error::shape(
                "slice_rows",
                format!(
                    "rows {start}..{} of {:?}",
                    start.saturating_add(len),
                    t.shape()
                ),
            )
        })?;
    let per = t.numel() / rows.max(1);
    let range = start * per..end * per;
    let buf = match &t.buf {
        CudaBuffer::F32(s) => CudaBuffer::F32(copy_range(b, s, range)?),
        CudaBuffer::BF16(s) => CudaBuffer::BF16(copy_range(b, s, range)?),
        CudaBuffer::F16(s) => CudaBuffer::F16(copy_range(b, s, range)?),
    };
    let mut shape = t.shape().to_vec();
    shape[0] = len;
    Ok(Tensor::from_parts(buf, shape))
}

/// Concatenation along the first dimension (all other dimensions and the storage type equal).
pub(super) fn concat_rows(b: &Cuda, parts: &[Tensor<Cuda>]) -> Result<Tensor<Cuda>> {
    let first = parts
        .first()
        .ok_or_else(|| Error::shape("concat_rows", "no parts"))?;
    let mut rows = 0;
    for p in parts {
        if p.shape().is_empty() || p.shape()[1..] != first.shape()[1..] {
            return Err(Error::shape(
                "concat_rows",
                format!("{:?} vs {:?}", p.shape(), first.shape()),
            ));
        }
        rows += p.shape()[0];
    }
    let total = parts.iter().map(|p| p.numel()).sum();
    let dtype = first.buf.dtype();
    macro_rules! join {
        ($variant:ident) => {{
            let slices = parts
                .iter()
                .map(|p| match &p.buf {
                    CudaBuffer::$variant(s) => Ok((s, p.numel())),
                    other => Err(Error::shape(
                        "concat_rows",
                        format!("parts of storage types {dtype} and {}", other.dtype()),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            CudaBuffer::$variant(concat_slices(b, &slices, total)?)
        }};
    }
    let buf = match &first.buf {
        CudaBuffer::F32(_) => join!(F32),
        CudaBuffer::BF16(_) => join!(BF16),
        CudaBuffer::F16(_) => join!(F16),
    };
    let mut shape = first.shape().to_vec();
    shape[0] = rows;
    Ok(Tensor::from_parts(buf, shape))
}

/// Rotary embedding on `x[B, L, H, d]` in place: adjacent pairs `(2i, 2i+1)` of every head
/// rotated by `cos[l, i]`, `sin[l, i]` (f32 tables `[L, d/2]`). Kernel `rope_rows`, one block a
/// token row of `H·d/2` pairs.
pub(super) fn rope(
    b: &Cuda,
    x: &mut Tensor<Cuda>,
    cos: &Tensor<Cuda>,
    sin: &Tensor<Cuda>,
) -> Result<()> {
    expect_rank("rope", x, 4)?;
    let [batch, l, h, d] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    if cos.numel() != l * d / 2 || sin.numel() != l * d / 2 || d % 2 != 0 {
        return Err(Error::shape(
            "rope",
            format!(
                "x {:?}, tables {:?}/{:?}",
                x.shape(),
                cos.shape(),
                sin.shape()
            ),
        ));
    }
    let (cs, ss) = (Cuda::f32_of(cos, "rope")?, Cuda::f32_of(sin, "rope")?);
    let n = x.numel();
    let xs = Cuda::f32_mut(x, "rope")?;
    if n == 0 {
        return Ok(());
    }
    dim("rope", h * d)?;
    let rows = batch * l;
    let (rows64, tokens64) = (rows as u64, l as u64);
    let (heads, half) = (dim("rope", h)?, dim("rope", d / 2)?);
    b.launch("rope_rows", row_launch(rows, h * d / 2), |la| {
        la.arg(xs)
            .arg(cs)
            .arg(ss)
            .arg(&rows64)
            .arg(&tokens64)
            .arg(&heads)
            .arg(&half);
    })
}

/// `x[B, C, F, H, W]` -> patches `[B, L, C·pt·ph·pw]`, token `(f·H' + h)·W' + w` (H' = H / ph,
/// ...; trailing frames, rows or columns that fill no whole patch are dropped, as on the CPU),
/// feature `((c·pt + kt)·ph + kh)·pw + kw`. Kernel `patchify_rows`, one block a token.
pub(super) fn patchify(b: &Cuda, x: &Tensor<Cuda>, patch: [usize; 3]) -> Result<Tensor<Cuda>> {
    expect_rank("patchify", x, 5)?;
    let s = x.shape();
    let [batch, c, f, hh, ww] = [s[0], s[1], s[2], s[3], s[4]];
    if patch.contains(&0) {
        return Err(Error::shape(
            "patchify",
            format!("patch {patch:?} of {s:?}"),
        ));
    }
    let [pt, ph, pw] = patch;
    let [gf, gh, gw] = [f / pt, hh / ph, ww / pw];
    let l = gf * gh * gw;
    let feat = c * pt * ph * pw;
    let xs = Cuda::f32_of(x, "patchify")?;
    let mut out = b.output(vec![batch, l, feat])?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let op = "patchify";
    dim(op, feat)?;
    let rows = batch * l;
    let rows64 = rows as u64;
    let [tokens, channels, frames, height, width, gh, gw, pt, ph, pw] =
        dims(op, [l, c, f, hh, ww, gh, gw, pt, ph, pw])?;
    let os = Cuda::f32_mut(&mut out, op)?;
    b.launch("patchify_rows", row_launch(rows, feat), |la| {
        la.arg(xs)
            .arg(os)
            .arg(&rows64)
            .arg(&tokens)
            .arg(&channels)
            .arg(&frames)
            .arg(&height)
            .arg(&width)
            .arg(&gh)
            .arg(&gw)
            .arg(&pt)
            .arg(&ph)
            .arg(&pw);
    })?;
    Ok(out)
}

/// `y[B, L, pt·ph·pw·C]` (channel fastest, L = F'·H'·W') -> `[B, C, F'·pt, H'·ph, W'·pw]`.
/// Kernel `unpatchify_planes`, one block a `(b, c, frame)` plane.
pub(super) fn unpatchify(
    b: &Cuda,
    y: &Tensor<Cuda>,
    grid: [usize; 3],
    patch: [usize; 3],
    channels: usize,
) -> Result<Tensor<Cuda>> {
    let (batch, l, feat) = crate::backend::shapes::unpatchify(y, grid, patch, channels)?;
    let [gf, gh, gw] = grid;
    let [pt, ph, pw] = patch;
    let [f, hh, ww] = [gf * pt, gh * ph, gw * pw];
    let ys = Cuda::f32_of(y, "unpatchify")?;
    let mut out = b.output(vec![batch, channels, f, hh, ww])?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let op = "unpatchify";
    dim(op, l)?;
    dim(op, feat)?;
    dim(op, hh * ww)?;
    let planes = batch * channels * f;
    let planes64 = planes as u64;
    let [channels, frames, height, width, gh, gw, pt, ph, pw] =
        dims(op, [channels, f, hh, ww, gh, gw, pt, ph, pw])?;
    let os = Cuda::f32_mut(&mut out, op)?;
    b.launch("unpatchify_planes", row_launch(planes, hh * ww), |la| {
        la.arg(ys)
            .arg(os)
            .arg(&planes64)
            .arg(&channels)
            .arg(&frames)
            .arg(&height)
            .arg(&width)
            .arg(&gh)
            .arg(&gw)
            .arg(&pt)
            .arg(&ph)
            .arg(&pw);
    })?;
    Ok(out)
}
