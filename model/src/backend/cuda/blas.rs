//! Linear layers on cuBLASLt: `y[M, N] = act(x[M, K] · w[N, K]ᵀ + bias)`.
//!
//! cuBLASLt is column-major, so the row-major product is computed as its transpose,
//! `yᵀ[N, M] = w · xᵀ`: A is the weight (row-major `[N, K]` = column-major `[K, N]`, transposed),
//! B is the activation (column-major `[K, M]`), D is the output (column-major `[N, M]` = row-major
//! `[M, N]`). The weight's storage type decides the inputs' type: f32 weights run in full f32
//! (`CUBLAS_COMPUTE_32F`, never TF32), bf16 / f16 weights take the activations converted to
//! their type; accumulation and the output are f32 either way. The bias (converted to f32) and
//! the tanh-form GELU run in the epilogue; SiLU is a separate pass.
//!
//! A plan (descriptors, layouts and the heuristic's algorithm) is cached per shape, type and
//! epilogue.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::{Cuda, CudaBuffer, Tensor};
use crate::backend::Activation;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Workspace for cuBLASLt's split-K and stream-K algorithms (what it asks for on Hopper).
const WORKSPACE: usize = 32 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    epilogue: u32,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the descriptors were created by this plan and are destroyed once; no queued
        // matmul reads them after the handle's stream has been synchronised at shutdown.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle, its workspace and the plans made so far.
pub(super) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<Key, Plan>,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is used only under the backend's mutex, by one thread at a time; cuBLASLt
// handles may move between threads.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once, after the plans and the queued work.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn lt_err(device: &str, what: &str, e: cudarc::cublaslt::result::CublasError) -> Error {
    Error::device(device, format!("cuBLASLt {what}: {e:?}"))
}

impl Blas {
    pub(super) fn new(device: &str, stream: &Arc<CudaStream>) -> Result<Blas> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::device(
                device,
                "cuBLASLt (libcublasLt.so.13 or .12) is not installed or not on the library path: \
                 install the CUDA toolkit's cuBLAS, or `pip install nvidia-cublas` and add its lib \
                 directory to LD_LIBRARY_PATH",
            ));
        }
        let handle = lt::create_handle().map_err(|e| lt_err(device, "handle", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(|e| Error::device(device, format!("allocating the GEMM workspace: {e}")))?;
        Ok(Blas {
            handle,
            workspace,
            plans: HashMap::new(),
            stream: Arc::clone(stream),
        })
    }

    fn plan(&mut self, device: &str, key: Key) -> Result<&Plan> {
        if !self.plans.contains_key(&key) {
            let plan = make_plan(self.handle, device, key)?;
            self.plans.insert(key, plan);
        }
        Ok(&self.plans[&key])
    }
}

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
    }
}

fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> std::result::Result<(), lt::CublasError> {
    // SAFETY: `v` points to a live value of the attribute's type and size.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

fn make_plan(handle: sys::cublasLtHandle_t, device: &str, key: Key) -> Result<Plan> {
    let e = |what: &'static str| move |err| lt_err(device, what, err);
    let t = data_type(key.dtype);
    let f32t = sys::cudaDataType::CUDA_R_32F;
    let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)
        .map_err(e("descriptor"))?;
    let (op_t, op_n) = (1i32, 0i32);
    set_desc(
        desc,
        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
        &op_t,
    )
    .map_err(e("transpose A"))?;
    set_desc(
        desc,
        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
        &op_n,
    )
    .map_err(e("transpose B"))?;
    set_desc(
        desc,
        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
        &key.epilogue,
    )
    .map_err(e("epilogue"))?;
    let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
    // A: the weight, column-major [K, N] (ld K), used transposed.
    let a = lt::create_matrix_layout(t, k, n, k as i64).map_err(e("layout A"))?;
    // B: the activations, column-major [K, M] (ld K).
    let b = lt::create_matrix_layout(t, k, m, k as i64).map_err(e("layout B"))?;
    // D (and C): the output, column-major [N, M] (ld N).
    let d = lt::create_matrix_layout(f32t, n, m, n as i64).map_err(e("layout D"))?;
    let pref = lt::create_matmul_pref().map_err(e("preference"))?;
    let ws = WORKSPACE as u64;
    // SAFETY: `pref` is live; the attribute is a u64 byte count.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            std::mem::size_of::<u64>(),
        )
    }
    .map_err(e("workspace preference"))?;
    // SAFETY: every descriptor is live.
    let heur = unsafe { lt::get_matmul_algo_heuristic(handle, desc, a, b, d, d, pref) };
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = lt::destroy_matmul_pref(pref);
    }
    let heur = heur.map_err(|err| {
        lt_err(
            device,
            &format!(
                "no algorithm for {} x {} x {} with {} inputs",
                key.m, key.n, key.k, key.dtype
            ),
            err,
        )
    })?;
    Ok(Plan {
        desc,
        a,
        b,
        d,
        algo: heur.algo,
    })
}

pub(super) fn linear(
    b: &Cuda,
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    act: Activation,
) -> Result<Tensor<Cuda>> {
    let xs = Cuda::f32_of(x, "linear")?;
    let (n, k) = match w.shape() {
        [n, k] => (*n, *k),
        s => {
            return Err(Error::shape(
                "linear",
                format!("weight must be [N, K], got {s:?}"),
            ));
        }
    };
    if x.last_dim() != k || k == 0 {
        return Err(Error::shape(
            "linear",
            format!("input {:?} against weight {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(bs) = bias
        && bs.numel() != n
    {
        return Err(Error::shape(
            "linear",
            format!("bias {:?} for {n} outputs", bs.shape()),
        ));
    }
    let m = x.numel() / k.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = n;
    let mut out = b.output(shape)?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    // The input in the weight's storage type.
    let dtype = w.buf.dtype();
    let x_cast = match dtype {
        DType::F32 => None,
        d => Some(b.cast_from_f32(xs, m * k, d)?),
    };
    let bias32 = match bias {
        Some(bs) => Some(b.weight_f32(bs)?),
        None => None,
    };
    let epilogue = match (bias32.is_some(), act) {
        (true, Activation::GeluTanh) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        (false, Activation::GeluTanh) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
        (true, _) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        (false, _) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
    } as u32;
    let device = b.name_str();
    let stream = b.stream();
    {
        let mut guard = b.inner.blas.lock().unwrap_or_else(|e| e.into_inner());
        let blas = &mut *guard;
        let handle = blas.handle;
        let key = Key {
            m,
            n,
            k,
            dtype,
            epilogue,
        };
        let (desc, la, lb, ld, algo) = {
            let p = blas.plan(&device, key)?;
            (p.desc, p.a, p.b, p.d, p.algo)
        };
        let (bias_ptr, _bias_sync) = match &bias32 {
            Some(s) => {
                let (p, g) = s.device_ptr(stream);
                (Some(p), Some(g))
            }
            None => (None, None),
        };
        if let Some(p) = bias_ptr {
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &p,
            )
            .map_err(|e| lt_err(&device, "bias pointer", e))?;
        }
        let (a_ptr, _ga) = match &w.buf {
            CudaBuffer::F32(s) => s.device_ptr(stream),
            CudaBuffer::BF16(s) => s.device_ptr(stream),
            CudaBuffer::F16(s) => s.device_ptr(stream),
        };
        let (b_ptr, _gb) = match &x_cast {
            None => xs.device_ptr(stream),
            Some(CudaBuffer::F32(s)) => s.device_ptr(stream),
            Some(CudaBuffer::BF16(s)) => s.device_ptr(stream),
            Some(CudaBuffer::F16(s)) => s.device_ptr(stream),
        };
        let dst = Cuda::f32_mut(&mut out, "linear")?;
        let (d_ptr, _gd) = dst.device_ptr_mut(stream);
        let (ws_ptr, _gw) = blas.workspace.device_ptr_mut(stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the layouts describe exactly the buffers passed (checked shapes above: w is
        // [N, K], the input M·K elements in the weight's type, the output M·N f32, the bias N
        // f32); the workspace is WORKSPACE bytes; all are on the stream the call is queued on.
        unsafe {
            lt::matmul(
                handle,
                desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a_ptr as *const c_void,
                la,
                b_ptr as *const c_void,
                lb,
                d_ptr as *const c_void,
                ld,
                d_ptr as *mut c_void,
                ld,
                &algo,
                ws_ptr as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(&device, &format!("matmul {m} x {n} x {k}"), e))?;
    }
    if act == Activation::Silu {
        super::elementwise::activate(b, &mut out, act)?;
    }
    Ok(out)
}
