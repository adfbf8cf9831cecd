//! Attention: a flash-attention kernel (online softmax, bf16 tensor-core MMA, tiles in shared
//! memory) with key multiplicities for the text keys.

use super::{Cuda, Tensor};
use crate::error::{Error, Result};

fn todo(b: &Cuda, op: &str) -> Error {
    Error::device(b.name_str(), format!("{op}: not implemented on CUDA yet"))
}

pub(super) fn attention(
    b: &Cuda,
    _q: &Tensor<Cuda>,
    _k: &Tensor<Cuda>,
    _v: &Tensor<Cuda>,
    _key_multiplicity: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "attention"))
}
