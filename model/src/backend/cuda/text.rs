//! Text-encoder kernels: embedding gather and attention with a relative-position bias.

use super::{Cuda, Tensor};
use crate::error::{Error, Result};

fn todo(b: &Cuda, op: &str) -> Error {
    Error::device(b.name_str(), format!("{op}: not implemented on CUDA yet"))
}

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

pub(super) fn attention_rel_bias(
    b: &Cuda,
    _q: &Tensor<Cuda>,
    _k: &Tensor<Cuda>,
    _v: &Tensor<Cuda>,
    _rel_bias: &Tensor<Cuda>,
    _scale: f32,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "attention_rel_bias"))
}
