//! Normalisation kernels: layer norm (affine or modulated), sums of squares, RMS scaling.

use super::{Cuda, Tensor};
use crate::backend::Modulation;
use crate::error::{Error, Result};

fn todo(b: &Cuda, op: &str) -> Error {
    Error::device(b.name_str(), format!("{op}: not implemented on CUDA yet"))
}

pub(super) fn layer_norm(
    b: &Cuda,
    _x: &Tensor<Cuda>,
    _eps: f32,
    _affine: Option<(&Tensor<Cuda>, &Tensor<Cuda>)>,
    _modulation: Option<Modulation<'_, Cuda>>,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "layer_norm"))
}

pub(super) fn sum_squares(b: &Cuda, _x: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    Err(todo(b, "sum_squares"))
}

pub(super) fn rms_apply(
    b: &Cuda,
    _x: &mut Tensor<Cuda>,
    _sumsq: &Tensor<Cuda>,
    _full_width: usize,
    _eps: f32,
    _weight: &Tensor<Cuda>,
) -> Result<()> {
    Err(todo(b, "rms_apply"))
}
