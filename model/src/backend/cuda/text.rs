//! Text-encoder kernels: embedding gather and attention with a relative-position bias.

use super::{Cuda, Tensor};
use crate::error::{Error, Result};

fn todo(b: &Cuda, op: &str) -> Error {
    Error::device(b.name_str(), format!("{op}: not implemented on CUDA yet"))
}

pub(super) fn embedding(b: &Cuda, _table: &Tensor<Cuda>, _ids: &[u32]) -> Result<Tensor<Cuda>> {
    Err(todo(b, "embedding"))
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
