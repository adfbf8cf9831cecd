//! Text-encoder kernels: embedding gather and attention with a relative-position bias.

use super::{Cuda, Tensor};
use crate::error::{Error, Result};

/// Rows `ids` of an embedding table `[V, D]` (any storage type, read where it is: never
/// converted) as f32 `[ids.len(), D]`. The ids are checked against V on the host first (the same
/// input error as the CPU), then uploaded; kernels `embedding_{f32,bf16,f16}`, one block a row.
pub(super) fn embedding(b: &Cuda, table: &Tensor<Cuda>, ids: &[u32]) -> Result<Tensor<Cuda>> {
    use super::elementwise::row_launch;
    use super::{dim, push_buf, suffix};
    use crate::backend::expect_rank;
    use cudarc::driver::PushKernelArg;

    expect_rank("embedding", table, 2)?;
    let (rows, d) = (table.shape()[0], table.shape()[1]);
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(Error::input(
            "input_ids",
            format!("token id {bad} is outside the embedding table ({rows} rows)"),
        ));
    }
    let mut out = b.output(vec![ids.len(), d])?;
    if ids.is_empty() || d == 0 {
        return Ok(out);
    }
    let ids_dev = b
        .stream()
        .clone_htod(ids)
        .map_err(|e| b.err("uploading token ids", e))?;
    let (n64, d32) = (ids.len() as u64, dim("embedding", d)?);
    let name = format!("embedding_{}", suffix(table.buf.dtype()));
    let os = Cuda::f32_mut(&mut out, "embedding")?;
    b.launch(&name, row_launch(ids.len(), d), |l| {
        push_buf(l, &table.buf);
        l.arg(&ids_dev).arg(os).arg(&n64).arg(&d32);
    })?;
    Ok(out)
}

/// UMT5 self-attention with a relative-position bias: `q[B, Lq, H, d]`, `k`, `v` `[B, Lk, H, d]`
/// -> `[B, Lq, H, d]`, logits `scale · q[i]·k[j] + rel_bias[h, j − i + Lq − 1]`, all f32 (checks
/// and errors as the CPU's). Kernel `attention_rel_bias_f32`: one block of 128 threads per
/// (batch item, head, query row), any d and sequence length.
pub(super) fn attention_rel_bias(
    b: &Cuda,
    q: &Tensor<Cuda>,
    k: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    rel_bias: &Tensor<Cuda>,
    scale: f32,
) -> Result<Tensor<Cuda>> {
    use super::{dim, grid_rows};
    use cudarc::driver::PushKernelArg;

    const OP: &str = "attention_rel_bias";
    const KERNEL: &str = "attention_rel_bias_f32";
    let [batch, lq, lk, h, d] = crate::backend::shapes::attention_rel_bias(q, k, v, rel_bias)?;
    let (qs, ks, vs, rel) = (
        Cuda::f32_of(q, OP)?,
        Cuda::f32_of(k, OP)?,
        Cuda::f32_of(v, OP)?,
        Cuda::f32_of(rel_bias, OP)?,
    );
    let mut out = b.output(vec![batch, lq, h, d])?;
    if out.numel() == 0 {
        return Ok(out);
    }
    // The kernel's int arithmetic: the bias row width Lq + Lk − 1 (with room for its key-chunk
    // steps) and one block per row.
    dim(OP, lq + lk + 256)?;
    let blocks = dim(OP, batch * h * lq)?;
    let (lq32, lk32, h32, d32) = (dim(OP, lq)?, dim(OP, lk)?, dim(OP, h)?, dim(OP, d)?);
    let os = Cuda::f32_mut(&mut out, OP)?;
    b.launch(KERNEL, grid_rows(blocks as usize, 128), |l| {
        l.arg(qs)
            .arg(ks)
            .arg(vs)
            .arg(rel)
            .arg(os)
            .arg(&lq32)
            .arg(&lk32)
            .arg(&h32)
            .arg(&d32)
            .arg(&scale);
    })?;
    Ok(out)
}
