//! The CUDA backend: the model's operations on NVIDIA GPUs.
//!
//! Everything is loaded at run time (cudarc's dynamic loading), so the binary builds and runs on
//! machines without CUDA; [`devices`] says what this machine has, and [`Cuda::new`] fails with an
//! [`Error::Device`] naming what is missing (the driver, NVRTC, cuBLASLt) instead of panicking.
//!
//! Kernels are CUDA C sources in `kernels/`, written without CUDA headers (a driver-only machine
//! has none), compiled at start-up with NVRTC for the device's architecture and cached on disk by
//! source hash and architecture ([`nvrtc`]). Linear layers run on cuBLASLt ([`blas`]) with f32
//! accumulation and the bias in the epilogue. Storage follows the CPU backend's rules:
//! activations are f32, weights keep the checkpoint's type (bf16 stays bf16 on the device).
//!
//! One [`Cuda`] is one GPU with one stream; every operation is queued on that stream, so results
//! are ordered without host synchronisation. Only [`Backend::download`] (and [`Backend::synchronize`])
//! wait for the device.

mod attention;
mod blas;
mod elementwise;
mod layout;
pub mod nccl;
mod norm;
pub mod nvrtc;
mod text;
mod vae;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, DriverError,
    LaunchArgs, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};

use super::text_ops::TextOps;
use super::video_ops::VideoOps;
use super::{Activation, Backend, ModRow, Modulation, Tensor};
use crate::dtype::{DType, HostSlice};
use crate::error::{Error, Result};

/// What this machine offers for `--device cuda`: the GPUs, or why there are none.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub memory_bytes: usize,
}

/// Whether the CUDA driver library can be loaded at all.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The GPUs of this machine, or the reason none can be used (no driver library, the driver
/// failing to initialise, zero devices).
pub fn devices() -> Result<Vec<DeviceInfo>> {
    (0..device_count()?)
        .map(|i| {
            let ctx = CudaContext::new(i).map_err(|e| drv(&format!("cuda:{i}"), "opening", e))?;
            Ok(DeviceInfo {
                ordinal: i,
                name: ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
                capability: ctx.compute_capability().unwrap_or((0, 0)),
                memory_bytes: ctx.total_mem().unwrap_or(0),
            })
        })
        .collect()
}

/// How many GPUs the driver reports (at least one), without opening any.
fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::device(
            "cuda",
            "the NVIDIA driver library (libcuda.so) is not installed or not on the library path",
        ));
    }
    let n = CudaContext::device_count().map_err(|e| drv("cuda", "counting devices", e))?;
    if n <= 0 {
        return Err(Error::device(
            "cuda",
            "the NVIDIA driver reports no GPU on this machine",
        ));
    }
    Ok(n as usize)
}

pub(crate) fn drv(device: &str, what: &str, e: DriverError) -> Error {
    Error::device(device, format!("{what}: {e}"))
}

/// How attention computes: `F32` keeps every product in f32 (SIMT kernels; parity with the CPU
/// to ~1e-6), `Bf16` runs the score and value products on bf16 tensor cores with f32
/// accumulation (the speed checkpoints stored in bf16 are meant for). Linear layers follow the
/// weights' storage type either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    /// Parse `f32` / `bf16`.
    pub fn parse(s: &str) -> Option<Precision> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Precision::F32),
            "bf16" | "bfloat16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// One GPU and its stream, kernels and cuBLASLt handle. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    capability: (i32, i32),
    precision: Precision,
    /// Fill new buffers with NaN (`LONGTAKE_CUDA_POISON=1`, for the op checks).
    poison: bool,
    functions: HashMap<String, CudaFunction>,
    blas: Mutex<blas::Blas>,
}

/// Device memory in one storage type.
pub enum CudaBuffer {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

impl CudaBuffer {
    fn dtype(&self) -> DType {
        match self {
            CudaBuffer::F32(_) => DType::F32,
            CudaBuffer::BF16(_) => DType::BF16,
            CudaBuffer::F16(_) => DType::F16,
        }
    }
}

impl Cuda {
    /// Open GPU `ordinal`: a context, a stream, the kernels (compiled with NVRTC or taken from
    /// the cache) and a cuBLASLt handle.
    pub fn new(ordinal: usize, precision: Precision) -> Result<Cuda> {
        let label = format!("cuda:{ordinal}");
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::device(
                &label,
                format!(
                    "this machine has {count} GPU(s): cuda:0..=cuda:{}",
                    count - 1
                ),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv(&label, "opening", e))?;
        // The backend orders all work on one stream: per-allocation events are not needed.
        // SAFETY: no stream other than `stream` below ever touches this context's allocations.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| drv(&label, "creating a stream", e))?;
        let capability = ctx
            .compute_capability()
            .map_err(|e| drv(&label, "reading the compute capability", e))?;
        if capability.0 < 8 {
            return Err(Error::device(
                &label,
                format!(
                    "compute capability {}.{}: the kernels need 8.0 or newer (A100, H100, L4, RTX 30xx and later)",
                    capability.0, capability.1
                ),
            ));
        }
        let arch = nvrtc::arch_for(capability);
        let mut functions = HashMap::new();
        for module in nvrtc::modules() {
            let ptx = nvrtc::compile_cached(&module, arch).map_err(|e| Error::device(&label, e))?;
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.as_str()))
                .map_err(|e| drv(&label, &format!("loading kernel module {}", module.name), e))?;
            for f in nvrtc::Module::entries(&ptx) {
                let func = m.load_function(&f).map_err(|e| {
                    drv(&label, &format!("loading kernel {f} of {}", module.name), e)
                })?;
                functions.insert(f, func);
            }
        }
        let blas = blas::Blas::new(&label, &stream)?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Cuda {
            inner: Arc::new(Inner {
                ordinal,
                name,
                ctx,
                stream,
                capability,
                precision,
                poison: std::env::var("LONGTAKE_CUDA_POISON").is_ok_and(|v| v == "1"),
                functions,
                blas: Mutex::new(blas),
            }),
        })
    }

    /// The GPU's index on this machine.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The GPU's marketing name (`NVIDIA H200`).
    pub fn device_name(&self) -> &str {
        &self.inner.name
    }

    /// Compute capability (major, minor).
    pub fn capability(&self) -> (i32, i32) {
        self.inner.capability
    }

    /// How attention computes (see [`Precision`]).
    pub fn precision(&self) -> Precision {
        self.inner.precision
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub(crate) fn err(&self, what: &str, e: DriverError) -> Error {
        drv(&self.name_str(), what, e)
    }

    /// `cuda:N`, for errors.
    pub(crate) fn name_str(&self) -> String {
        format!("cuda:{}", self.inner.ordinal)
    }

    /// A loaded kernel by name.
    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.inner.functions.get(name).ok_or_else(|| {
            Error::device(
                self.name_str(),
                format!("kernel `{name}` is not in the sources"),
            )
        })
    }

    /// Launch kernel `name` with `cfg`; `args` pushes its arguments in order.
    pub(crate) fn launch<'a>(
        &'a self,
        name: &str,
        cfg: LaunchConfig,
        args: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<()> {
        let f = self.func(name)?;
        let mut b = self.inner.stream.launch_builder(f);
        args(&mut b);
        // SAFETY: every kernel's argument list is pushed by the one wrapper that calls it, in the
        // order and with the types of its `extern "C"` signature, and each wrapper checks the
        // buffer sizes its launch grid addresses.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| self.err(&format!("launching {name}"), e))
    }

    /// Uninitialised device memory for `n` elements (every caller writes all of it). With
    /// `LONGTAKE_CUDA_POISON=1` every new buffer is filled with 0xFF bytes (NaN in f32, bf16 and
    /// f16) first, so that an element a kernel forgets to write shows up in a comparison.
    pub(crate) fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the memory is written by the kernel or copy that follows before it is read.
        let mut s = unsafe { self.inner.stream.alloc::<T>(n.max(1)) }
            .map_err(|e| self.err("allocating", e))?;
        if self.inner.poison {
            let bytes = s.num_bytes();
            let stream = &self.inner.stream;
            let (ptr, _sync) = s.device_ptr_mut(stream);
            // SAFETY: `ptr` addresses the `bytes` bytes just allocated on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream())
            }
            .map_err(|e| self.err("poisoning a new buffer", e))?;
        }
        Ok(s)
    }

    /// A new f32 tensor of `shape` whose every element the caller's kernel writes.
    pub(crate) fn output(&self, shape: Vec<usize>) -> Result<Tensor<Cuda>> {
        let n = shape.iter().product();
        Ok(Tensor::from_parts(CudaBuffer::F32(self.alloc(n)?), shape))
    }

    /// The f32 data of an activation tensor.
    pub(crate) fn f32_of<'a>(t: &'a Tensor<Cuda>, op: &'static str) -> Result<&'a CudaSlice<f32>> {
        match &t.buf {
            CudaBuffer::F32(s) => Ok(s),
            _ => Err(Error::shape(op, "activations must be f32")),
        }
    }

    /// The f32 data of an activation tensor, mutable.
    pub(crate) fn f32_mut<'a>(
        t: &'a mut Tensor<Cuda>,
        op: &'static str,
    ) -> Result<&'a mut CudaSlice<f32>> {
        match &mut t.buf {
            CudaBuffer::F32(s) => Ok(s),
            _ => Err(Error::shape(op, "activations must be f32")),
        }
    }
}

/// A weight's data as f32: borrowed when stored as f32, else converted into a new buffer.
pub(crate) enum F32Data<'a> {
    Borrowed(&'a CudaSlice<f32>),
    Owned(CudaSlice<f32>),
}

impl std::ops::Deref for F32Data<'_> {
    type Target = CudaSlice<f32>;

    fn deref(&self) -> &CudaSlice<f32> {
        match self {
            F32Data::Borrowed(s) => s,
            F32Data::Owned(s) => s,
        }
    }
}

impl Cuda {
    /// `n` f32 values converted to storage type `d` (bf16 or f16) in a new buffer.
    pub(crate) fn cast_from_f32(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        d: DType,
    ) -> Result<CudaBuffer> {
        let n64 = n as u64;
        let cfg = grid_1d(n.min(1 << 24));
        Ok(match d {
            DType::F32 => {
                return Err(Error::shape("cast", "f32 to f32 is not a conversion"));
            }
            DType::BF16 => {
                let y = self.alloc::<bf16>(n)?;
                self.launch("cast_f32_to_bf16", cfg, |l| {
                    l.arg(x).arg(&y).arg(&n64);
                })?;
                CudaBuffer::BF16(y)
            }
            DType::F16 => {
                let y = self.alloc::<f16>(n)?;
                self.launch("cast_f32_to_f16", cfg, |l| {
                    l.arg(x).arg(&y).arg(&n64);
                })?;
                CudaBuffer::F16(y)
            }
        })
    }

    /// A weight tensor's data as f32 (bf16 / f16 weights converted into a new buffer).
    pub(crate) fn weight_f32<'a>(&self, t: &'a Tensor<Cuda>) -> Result<F32Data<'a>> {
        let n = t.numel();
        let n64 = n as u64;
        let cfg = grid_1d(n.min(1 << 24));
        match &t.buf {
            CudaBuffer::F32(s) => Ok(F32Data::Borrowed(s)),
            CudaBuffer::BF16(s) => {
                let y = self.alloc::<f32>(n)?;
                self.launch("cast_bf16_to_f32", cfg, |l| {
                    l.arg(s).arg(&y).arg(&n64);
                })?;
                Ok(F32Data::Owned(y))
            }
            CudaBuffer::F16(s) => {
                let y = self.alloc::<f32>(n)?;
                self.launch("cast_f16_to_f32", cfg, |l| {
                    l.arg(s).arg(&y).arg(&n64);
                })?;
                Ok(F32Data::Owned(y))
            }
        }
    }
}

/// Launch geometry for one thread per element, 256 threads a block.
pub(crate) fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, u32::MAX as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch geometry for one block of `threads` per row.
pub(crate) fn grid_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, u32::MAX as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The name suffix of a kernel instantiated per storage type (`_f32`, `_bf16`, `_f16`).
pub(crate) fn suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

/// Push any storage type's device pointer as a kernel argument (the kernel's parameter type
/// is chosen by the name suffix, see [`suffix`]).
pub(crate) fn push_buf<'a>(b: &mut LaunchArgs<'a>, buf: &'a CudaBuffer) {
    match buf {
        CudaBuffer::F32(s) => b.arg(s),
        CudaBuffer::BF16(s) => b.arg(s),
        CudaBuffer::F16(s) => b.arg(s),
    };
}

/// A `usize` dimension as the kernels' `int`, refused past `i32::MAX`.
pub(crate) fn dim(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, format!("dimension {v} exceeds 2^31 - 1")))
}

impl Backend for Cuda {
    type Buffer = CudaBuffer;

    fn name(&self) -> String {
        format!("cuda:{}", self.inner.ordinal)
    }

    fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e))
    }

    fn upload(&self, shape: &[usize], data: HostSlice<'_>) -> Result<Tensor<Self>> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::shape(
                "upload",
                format!("shape {shape:?} for {} elements", data.len()),
            ));
        }
        let s = &self.inner.stream;
        let buf = match data {
            HostSlice::F32(v) => {
                CudaBuffer::F32(s.clone_htod(v).map_err(|e| self.err("upload", e))?)
            }
            HostSlice::BF16(v) => {
                CudaBuffer::BF16(s.clone_htod(v).map_err(|e| self.err("upload", e))?)
            }
            HostSlice::F16(v) => {
                CudaBuffer::F16(s.clone_htod(v).map_err(|e| self.err("upload", e))?)
            }
        };
        Ok(Tensor::from_parts(buf, shape.to_vec()))
    }

    fn upload_f32(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor<Self>> {
        self.upload(shape, HostSlice::F32(&data))
    }

    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        let s = &self.inner.stream;
        let n = t.numel();
        let e = |e| self.err("download", e);
        // A copy into pageable memory is synchronous in practice; the documentation says it
        // "might be", so the stream is synchronised before the host reads the data.
        let mut v = match &t.buf {
            CudaBuffer::F32(b) => {
                let v = s.clone_dtoh(b).map_err(e)?;
                s.synchronize().map_err(e)?;
                v
            }
            CudaBuffer::BF16(b) => {
                let v = s.clone_dtoh(b).map_err(e)?;
                s.synchronize().map_err(e)?;
                v.into_iter().map(|x| x.to_f32()).collect()
            }
            CudaBuffer::F16(b) => {
                let v = s.clone_dtoh(b).map_err(e)?;
                s.synchronize().map_err(e)?;
                v.into_iter().map(|x| x.to_f32()).collect()
            }
        };
        v.truncate(n);
        Ok(v)
    }

    fn dtype(&self, t: &Tensor<Self>) -> DType {
        t.buf.dtype()
    }

    fn slice_rows(&self, t: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>> {
        layout::slice_rows(self, t, start, len)
    }

    fn concat_rows(&self, parts: &[Tensor<Self>]) -> Result<Tensor<Self>> {
        layout::concat_rows(self, parts)
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        blas::linear(self, x, w, bias, act)
    }

    fn activate(&self, x: &mut Tensor<Self>, act: Activation) -> Result<()> {
        elementwise::activate(self, x, act)
    }

    fn modulation_table(&self, table: &Tensor<Self>, proj: &Tensor<Self>) -> Result<Tensor<Self>> {
        elementwise::modulation_table(self, table, proj)
    }

    fn layer_norm(
        &self,
        x: &Tensor<Self>,
        eps: f32,
        affine: Option<(&Tensor<Self>, &Tensor<Self>)>,
        modulation: Option<Modulation<'_, Self>>,
    ) -> Result<Tensor<Self>> {
        norm::layer_norm(self, x, eps, affine, modulation)
    }

    fn add_gated(
        &self,
        x: &mut Tensor<Self>,
        y: &Tensor<Self>,
        gate: Option<ModRow<'_, Self>>,
    ) -> Result<()> {
        elementwise::add_gated(self, x, y, gate)
    }

    fn sum_squares(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        norm::sum_squares(self, x)
    }

    fn rms_apply(
        &self,
        x: &mut Tensor<Self>,
        sumsq: &Tensor<Self>,
        full_width: usize,
        eps: f32,
        weight: &Tensor<Self>,
    ) -> Result<()> {
        norm::rms_apply(self, x, sumsq, full_width, eps, weight)
    }

    fn rope(&self, x: &mut Tensor<Self>, cos: &Tensor<Self>, sin: &Tensor<Self>) -> Result<()> {
        layout::rope(self, x, cos, sin)
    }

    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        key_multiplicity: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        attention::attention(self, q, k, v, key_multiplicity)
    }

    fn patchify(&self, x: &Tensor<Self>, patch: [usize; 3]) -> Result<Tensor<Self>> {
        layout::patchify(self, x, patch)
    }

    fn unpatchify(
        &self,
        y: &Tensor<Self>,
        grid: [usize; 3],
        patch: [usize; 3],
        channels: usize,
    ) -> Result<Tensor<Self>> {
        layout::unpatchify(self, y, grid, patch, channels)
    }
}

impl VideoOps for Cuda {
    fn conv3d_causal(
        &self,
        x: &Tensor<Self>,
        history: Option<&Tensor<Self>>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        vae::conv3d_causal(self, x, history, weight, bias)
    }

    fn conv2d_down2(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        vae::conv2d_down2(self, x, weight, bias)
    }

    fn conv_time_down2(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        vae::conv_time_down2(self, x, weight, bias)
    }

    fn channel_rms_norm(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        silu: bool,
    ) -> Result<Tensor<Self>> {
        vae::channel_rms_norm(self, x, gamma, silu)
    }

    fn upsample2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        vae::upsample2x(self, x)
    }

    fn spatial_attention(&self, qkv: &Tensor<Self>) -> Result<Tensor<Self>> {
        vae::spatial_attention(self, qkv)
    }

    fn clamp(&self, x: &mut Tensor<Self>, lo: f32, hi: f32) -> Result<()> {
        elementwise::clamp(self, x, lo, hi)
    }
}

impl TextOps for Cuda {
    fn embedding(&self, table: &Tensor<Self>, ids: &[u32]) -> Result<Tensor<Self>> {
        text::embedding(self, table, ids)
    }

    fn attention_rel_bias(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        rel_bias: &Tensor<Self>,
        scale: f32,
    ) -> Result<Tensor<Self>> {
        text::attention_rel_bias(self, q, k, v, rel_bias, scale)
    }

    fn mul_assign(&self, x: &mut Tensor<Self>, y: &Tensor<Self>) -> Result<()> {
        elementwise::mul_assign(self, x, y)
    }
}
