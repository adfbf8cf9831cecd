//! The backend seam: a device-resident [`Tensor`] and the model-level operations every backend
//! implements.
//!
//! Model code is written once against [`Backend`]; it never reads tensor data on the host except
//! at the edges (inputs in, outputs out). Operations are *model-level* (linear with fused bias and
//! activation, modulated layer norm, gated residual, RoPE, attention, ...) rather than elementary,
//! so that a backend can fuse elementwise work into as few passes over memory as possible.
//!
//! Storage may be f32, bf16 or f16 (weights keep the checkpoint's type); activations are f32 and
//! every reduction accumulates in f32. The CPU backend ([`cpu::Cpu`]) is the reference
//! implementation that any other backend is checked against.

pub mod cpu;
pub mod cuda;
mod kernels;
pub(crate) mod shapes;

/// The CPU kernel family this process runs (see [`kernels::family`]).
pub fn cpu_kernel_family() -> &'static str {
    kernels::family()
}

/// The variable that forces a lower CPU kernel family (see [`kernels::FORCE_ENV`]).
pub use kernels::FORCE_ENV as CPU_KERNELS_ENV;

/// Whether the forced kernel family, if any, is valid on this CPU; call before computing.
pub fn check_cpu_kernels() -> std::result::Result<(), String> {
    kernels::check_forced()
}
pub mod text_ops;
pub mod video_ops;

use crate::dtype::{DType, HostSlice};
use crate::error::{Error, Result};

/// Activation applied in the epilogue of [`Backend::linear`] or by [`Backend::activate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// x·sigmoid(x)
    Silu,
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715x³)))
    GeluTanh,
}

/// A row of a per-batch modulation table `[B, C, D]`: entry `index` of the C chunks, used as a
/// per-batch-item vector of width D.
#[derive(Clone, Copy)]
pub struct ModRow<'a, B: Backend> {
    pub table: &'a Tensor<B>,
    pub index: usize,
}

/// `LN(x)·(1 + scale) + shift`, the adaptive layer norm modulation.
#[derive(Clone, Copy)]
pub struct Modulation<'a, B: Backend> {
    pub shift: ModRow<'a, B>,
    pub scale: ModRow<'a, B>,
}

/// A device-resident tensor: a backend buffer plus a row-major shape.
pub struct Tensor<B: Backend> {
    pub(crate) buf: B::Buffer,
    shape: Vec<usize>,
}

impl<B: Backend> Tensor<B> {
    pub(crate) fn from_parts(buf: B::Buffer, shape: Vec<usize>) -> Self {
        Tensor { buf, shape }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn buffer(&self) -> &B::Buffer {
        &self.buf
    }

    pub fn buffer_mut(&mut self) -> &mut B::Buffer {
        &mut self.buf
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} -> {:?}", self.shape, shape),
            ));
        }
        Ok(Tensor {
            buf: self.buf,
            shape: shape.to_vec(),
        })
    }

    /// The size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
}

/// A compute device. Implementations own their memory; the host sees data only through
/// [`Backend::upload`] and [`Backend::download`].
pub trait Backend: Clone + Send + Sync + 'static {
    /// Device memory holding a tensor's elements in one storage dtype.
    type Buffer: Send + Sync;

    /// A short name for logs and errors (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    /// Wait until every operation queued so far has finished (a synchronous backend returns at
    /// once). Timings stop their clocks after it.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    // === Memory ===

    /// Copy host data to the device, keeping its storage type.
    fn upload(&self, shape: &[usize], data: HostSlice<'_>) -> Result<Tensor<Self>>;
    /// Copy f32 host data to the device, taking ownership where the device is the host.
    fn upload_f32(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor<Self>>;
    /// Copy a tensor back to the host as f32.
    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>>;
    /// The storage type of a tensor.
    fn dtype(&self, t: &Tensor<Self>) -> DType;
    /// A copy of rows `start..start + len` along the first dimension.
    fn slice_rows(&self, t: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>>;
    /// Concatenate tensors along the first dimension (all other dimensions equal).
    fn concat_rows(&self, parts: &[Tensor<Self>]) -> Result<Tensor<Self>>;

    // === Dense ===

    /// `y[.., N] = act(x[.., K] · w[N, K]ᵀ + bias[N])`.
    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        act: Activation,
    ) -> Result<Tensor<Self>>;

    /// Elementwise activation, in place.
    fn activate(&self, x: &mut Tensor<Self>, act: Activation) -> Result<()>;

    /// Per-batch modulation rows: `out[b, c, :] = table[c, :] + proj[b, ..]` where `proj[B, X]`
    /// holds either one D-vector per chunk (`X = C·D`) or one shared by all chunks (`X = D`).
    fn modulation_table(&self, table: &Tensor<Self>, proj: &Tensor<Self>) -> Result<Tensor<Self>>;

    // === Normalisation ===

    /// Layer norm over the last dimension of `x[B, L, D]` (biased variance), optionally affine
    /// (`weight`, `bias` of width D) and optionally modulated per batch item.
    fn layer_norm(
        &self,
        x: &Tensor<Self>,
        eps: f32,
        affine: Option<(&Tensor<Self>, &Tensor<Self>)>,
        modulation: Option<Modulation<'_, Self>>,
    ) -> Result<Tensor<Self>>;

    /// `x[B, L, D] += y[B, L, D] · gate[b]` (or `+= y` without a gate).
    fn add_gated(
        &self,
        x: &mut Tensor<Self>,
        y: &Tensor<Self>,
        gate: Option<ModRow<'_, Self>>,
    ) -> Result<()>;

    /// Per-row sum of squares over the last dimension: `[.., D] -> [..]`. With the columns split
    /// across tensor-parallel ranks, the all-reduced sums give the full-width RMS.
    fn sum_squares(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// `x[r, :] = x[r, :] · rsqrt(sumsq[r] / full_width + eps) · weight[:]`, in place.
    fn rms_apply(
        &self,
        x: &mut Tensor<Self>,
        sumsq: &Tensor<Self>,
        full_width: usize,
        eps: f32,
        weight: &Tensor<Self>,
    ) -> Result<()>;

    // === Attention ===

    /// Rotary embedding on `x[B, L, H, d]` in place, adjacent pairs `(2i, 2i+1)` rotated by the
    /// angle whose cosine and sine are `cos[l, i]`, `sin[l, i]` (tables `[L, d/2]`).
    fn rope(&self, x: &mut Tensor<Self>, cos: &Tensor<Self>, sin: &Tensor<Self>) -> Result<()>;

    /// Softmax attention, no mask, scale `1/√d`: `q[B, Lq, H, d]`, `k`, `v` `[B, Lk, H, d]`
    /// -> `[B, Lq, H, d]`. `key_multiplicity[B, Lk]`, when given, counts how many identical key /
    /// value rows each row stands for (0 = padding that takes no part).
    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        key_multiplicity: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

    // === Layout ===

    /// `x[B, C, F, H, W]` -> patches `[B, L, C·pt·ph·pw]` with token index `(f·H' + h)·W' + w` and
    /// feature index `((c·pt + kt)·ph + kh)·pw + kw` (the Conv3d weight layout).
    fn patchify(&self, x: &Tensor<Self>, patch: [usize; 3]) -> Result<Tensor<Self>>;

    /// `y[B, L, pt·ph·pw·C]` (channel fastest) -> `[B, C, F'·pt, H'·ph, W'·pw]`.
    fn unpatchify(
        &self,
        y: &Tensor<Self>,
        grid: [usize; 3],
        patch: [usize; 3],
        channels: usize,
    ) -> Result<Tensor<Self>>;
}

pub(crate) fn expect_rank<B: Backend>(op: &'static str, t: &Tensor<B>, rank: usize) -> Result<()> {
    if t.shape().len() != rank {
        return Err(Error::shape(
            op,
            format!("expected a rank-{rank} tensor, got shape {:?}", t.shape()),
        ));
    }
    Ok(())
}
