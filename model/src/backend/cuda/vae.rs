//! Video-autoencoder kernels: causal 3-D convolution, the downsampling convolutions, channel
//! RMS norm, nearest upsampling and per-frame spatial attention.

use super::{Cuda, Tensor};
use crate::error::{Error, Result};

fn todo(b: &Cuda, op: &str) -> Error {
    Error::device(b.name_str(), format!("{op}: not implemented on CUDA yet"))
}

pub(super) fn conv3d_causal(
    b: &Cuda,
    _x: &Tensor<Cuda>,
    _history: Option<&Tensor<Cuda>>,
    _weight: &Tensor<Cuda>,
    _bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "conv3d_causal"))
}

pub(super) fn conv2d_down2(
    b: &Cuda,
    _x: &Tensor<Cuda>,
    _weight: &Tensor<Cuda>,
    _bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "conv2d_down2"))
}

pub(super) fn conv_time_down2(
    b: &Cuda,
    _x: &Tensor<Cuda>,
    _weight: &Tensor<Cuda>,
    _bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "conv_time_down2"))
}

pub(super) fn channel_rms_norm(
    b: &Cuda,
    _x: &Tensor<Cuda>,
    _gamma: &Tensor<Cuda>,
    _silu: bool,
) -> Result<Tensor<Cuda>> {
    Err(todo(b, "channel_rms_norm"))
}

pub(super) fn upsample2x(b: &Cuda, _x: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    Err(todo(b, "upsample2x"))
}

pub(super) fn spatial_attention(b: &Cuda, _qkv: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    Err(todo(b, "spatial_attention"))
}
