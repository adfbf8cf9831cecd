//! Normalisation kernels: layer norm (affine or modulated), sums of squares, RMS scaling.
//!
//! All are row kernels (one block per row, see [`row_launch`]) that accumulate in f32 and
//! follow the CPU reference's formulas: two-pass biased variance, `1 / sqrt` in IEEE precision.

use cudarc::driver::PushKernelArg;

use super::elementwise::{ModRowArgs, row_launch};
use super::{Cuda, Tensor, dim, push_buf, suffix};
use crate::backend::{Modulation, expect_rank};
use crate::error::{Error, Result};

/// Layer norm over the last dimension of `x[B, L, D]` (biased variance), then optionally
/// `·weight + bias` (width D, any storage type; converted to f32 only if the two differ), then
/// optionally `·(1 + scale[b]) + shift[b]` from rows of modulation tables `[B, C, D]`. Kernels
/// `layer_norm_plain`, `layer_norm_mod`, `layer_norm_affine[_mod]_{f32,bf16,f16}`.
pub(super) fn layer_norm(
    b: &Cuda,
    x: &Tensor<Cuda>,
    eps: f32,
    affine: Option<(&Tensor<Cuda>, &Tensor<Cuda>)>,
    modulation: Option<Modulation<'_, Cuda>>,
) -> Result<Tensor<Cuda>> {
    expect_rank("layer_norm", x, 3)?;
    let [batch, tokens, d] = [x.shape()[0], x.shape()[1], x.shape()[2]];
    let xs = Cuda::f32_of(x, "layer_norm")?;
    if affine.is_some_and(|(w, bb)| w.numel() != d || bb.numel() != d) {
        return Err(Error::shape(
            "layer_norm",
            "affine parameters must have width D",
        ));
    }
    let mods = match &modulation {
        Some(m) => Some((
            ModRowArgs::new(&m.shift, batch, d)?,
            ModRowArgs::new(&m.scale, batch, d)?,
        )),
        None => None,
    };
    let mut out = b.output(x.shape().to_vec())?;
    let rows = batch * tokens;
    if rows * d == 0 {
        return Ok(out);
    }
    // Weight and bias of different storage types (unusual) both go to the f32 kernel.
    let converted = match affine {
        Some((w, bb)) if w.buf.dtype() != bb.buf.dtype() => {
            Some((b.weight_f32(w)?, b.weight_f32(bb)?))
        }
        _ => None,
    };
    let name = match affine {
        None if mods.is_some() => "layer_norm_mod".to_string(),
        None => "layer_norm_plain".to_string(),
        Some((w, _)) => format!(
            "layer_norm_affine{}_{}",
            if mods.is_some() { "_mod" } else { "" },
            if converted.is_some() {
                "f32"
            } else {
                suffix(w.buf.dtype())
            }
        ),
    };
    let (rows64, tokens64, d32) = (rows as u64, tokens as u64, dim("layer_norm", d)?);
    let os = Cuda::f32_mut(&mut out, "layer_norm")?;
    b.launch(&name, row_launch(rows, d), |l| {
        l.arg(xs).arg(os);
        match (&converted, affine) {
            (Some((w32, b32)), _) => {
                l.arg(&**w32).arg(&**b32);
            }
            (None, Some((w, bb))) => {
                push_buf(l, &w.buf);
                push_buf(l, &bb.buf);
            }
            (None, None) => {}
        }
        if let Some((shift, scale)) = &mods {
            shift.push(l);
            scale.push(l);
        }
        l.arg(&rows64).arg(&tokens64).arg(&d32).arg(&eps);
    })?;
    Ok(out)
}

/// Per-row sum of squares over the last dimension: `x[.., D]` -> `[..]` (kernel
/// `sum_squares_rows`, one block a row; an empty row sums to 0).
pub(super) fn sum_squares(b: &Cuda, x: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    let rank = x.shape().len();
    if rank == 0 {
        return Err(Error::shape(
            "sum_squares",
            "expected a tensor of rank ≥ 1, got a scalar",
        ));
    }
    let d = x.last_dim();
    let shape = x.shape()[..rank - 1].to_vec();
    let rows: usize = shape.iter().product();
    let xs = Cuda::f32_of(x, "sum_squares")?;
    let mut out = b.output(shape)?;
    if rows == 0 {
        return Ok(out);
    }
    let (rows64, d32) = (rows as u64, dim("sum_squares", d)?);
    let os = Cuda::f32_mut(&mut out, "sum_squares")?;
    b.launch("sum_squares_rows", row_launch(rows, d), |l| {
        l.arg(xs).arg(os).arg(&rows64).arg(&d32);
    })?;
    Ok(out)
}

/// `x[r, :] = x[r, :] · (1 / sqrt(sumsq[r] / full_width + eps)) · weight[:]`, in place, with the
/// weight of width D in any storage type (kernels `rms_apply_{f32,bf16,f16}`, one block a row).
pub(super) fn rms_apply(
    b: &Cuda,
    x: &mut Tensor<Cuda>,
    sumsq: &Tensor<Cuda>,
    full_width: usize,
    eps: f32,
    weight: &Tensor<Cuda>,
) -> Result<()> {
    let d = x.last_dim();
    if weight.numel() != d || sumsq.numel() * d != x.numel() {
        return Err(Error::shape(
            "rms_apply",
            format!(
                "x {:?}, sumsq {:?}, weight {:?}",
                x.shape(),
                sumsq.shape(),
                weight.shape()
            ),
        ));
    }
    let ss = Cuda::f32_of(sumsq, "rms_apply")?;
    let n = x.numel();
    let xs = Cuda::f32_mut(x, "rms_apply")?;
    if n == 0 {
        return Ok(());
    }
    let rows = n / d;
    let (rows64, d32, full) = (rows as u64, dim("rms_apply", d)?, full_width as f32);
    let name = format!("rms_apply_{}", suffix(weight.buf.dtype()));
    b.launch(&name, row_launch(rows, d), |l| {
        l.arg(xs).arg(ss);
        push_buf(l, &weight.buf);
        l.arg(&rows64).arg(&d32).arg(&full).arg(&eps);
    })
}
