//! Elementwise kernels: activations, gated residuals, modulation tables, products, clamping.

use super::{Cuda, Tensor};
use crate::backend::{Activation, ModRow};
use crate::error::{Error, Result};

fn todo(b: &Cuda, op: &str) -> Error {
    Error::device(b.name_str(), format!("{op}: not implemented on CUDA yet"))
}

pub(super) fn activate(b: &Cuda, _x: &mut Tensor<Cuda>, _act: Activation) -> Result<()> {
    Err(todo(b, "activate"))
}

pub(super) fn modulation_table(
    b: &Cuda,
    _table: &Tensor<Cuda>,
    _proj: &Tensor<Cuda>,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "modulation_table"))
}

pub(super) fn add_gated(
    b: &Cuda,
    _x: &mut Tensor<Cuda>,
    _y: &Tensor<Cuda>,
    _gate: Option<ModRow<'_, Cuda>>,
) -> Result<()> {
    Err(todo(b, "add_gated"))
}

pub(super) fn mul_assign(b: &Cuda, _x: &mut Tensor<Cuda>, _y: &Tensor<Cuda>) -> Result<()> {
    Err(todo(b, "mul_assign"))
}

pub(super) fn clamp(b: &Cuda, _x: &mut Tensor<Cuda>, _lo: f32, _hi: f32) -> Result<()> {
    Err(todo(b, "clamp"))
}
