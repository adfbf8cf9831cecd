//! Layout kernels: row slices and concatenation, RoPE, patchify / unpatchify.

use super::{Cuda, Tensor};
use crate::error::{Error, Result};

fn todo(b: &Cuda, op: &str) -> Error {
    Error::device(b.name_str(), format!("{op}: not implemented on CUDA yet"))
}

pub(super) fn slice_rows(
    b: &Cuda,
    _t: &Tensor<Cuda>,
    _start: usize,
    _len: usize,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "slice_rows"))
}

pub(super) fn concat_rows(b: &Cuda, _parts: &[Tensor<Cuda>]) -> Result<Tensor<Cuda>> {
    Err(todo(b, "concat_rows"))
}

pub(super) fn rope(
    b: &Cuda,
    _x: &mut Tensor<Cuda>,
    _cos: &Tensor<Cuda>,
    _sin: &Tensor<Cuda>,
) -> Result<()> {
    Err(todo(b, "rope"))
}

pub(super) fn patchify(b: &Cuda, _x: &Tensor<Cuda>, _patch: [usize; 3]) -> Result<Tensor<Cuda>> {
    Err(todo(b, "patchify"))
}

pub(super) fn unpatchify(
    b: &Cuda,
    _y: &Tensor<Cuda>,
    _grid: [usize; 3],
    _patch: [usize; 3],
    _channels: usize,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "unpatchify"))
}
