//! NCCL collectives for the GPUs of one process: one [`NcclComm`] per rank, each used by its
//! rank's thread, queued on that GPU's compute stream (so a collective is ordered after the
//! kernels that produce its input, without host synchronisation).

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm as RawComm, ReduceOp};

use super::{Cuda, CudaBuffer, Tensor};
use crate::backend::Backend;
use crate::comm::Comm;
use crate::error::{Error, Result};

/// Whether the NCCL library can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library; no NCCL call is made.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// One rank of an NCCL group.
pub struct NcclComm {
    comm: RawComm,
    backend: Cuda,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time; each `NcclComm` is
// moved to its rank's thread and used only there (the `Comm` trait takes `&self` from that
// thread alone, and the type is not `Sync`).
unsafe impl Send for NcclComm {}

fn nccl_err(backend: &Cuda, what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Parallel(format!("NCCL {what} on {}: {e:?}", backend.name_str()))
}

impl NcclComm {
    /// Communicators for `backends` (one GPU each, distinct), in rank order.
    pub fn group(backends: &[Cuda]) -> Result<Vec<NcclComm>> {
        if backends.is_empty() {
            return Err(Error::Parallel("the group size must be at least 1".into()));
        }
        if !nccl_present() {
            return Err(Error::device(
                "cuda",
                "NCCL (libnccl.so), which tensor parallelism over GPUs needs, is not installed or \
                 not on the library path: install NCCL, or `pip install nvidia-nccl-cu13` and link \
                 its libnccl.so.2 as libnccl.so in a directory on LD_LIBRARY_PATH",
            ));
        }
        let mut ordinals: Vec<usize> = backends.iter().map(Cuda::ordinal).collect();
        ordinals.sort_unstable();
        ordinals.dedup();
        if ordinals.len() != backends.len() {
            return Err(Error::Parallel(
                "every rank of an NCCL group needs its own GPU".into(),
            ));
        }
        let streams = backends.iter().map(|b| b.stream().clone()).collect();
        let comms = RawComm::from_devices(streams)
            .map_err(|e| nccl_err(&backends[0], "initialising the group", e))?;
        Ok(comms
            .into_iter()
            .zip(backends)
            .map(|(comm, b)| NcclComm {
                comm,
                backend: b.clone(),
            })
            .collect())
    }

    fn data<'a>(&self, t: &'a Tensor<Cuda>, op: &'static str) -> Result<&'a CudaSlice<f32>> {
        match &t.buf {
            CudaBuffer::F32(s) => Ok(s),
            _ => Err(Error::Parallel(format!("{op}: only f32 tensors"))),
        }
    }
}

impl Comm<Cuda> for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, t: &mut Tensor<Cuda>) -> Result<()> {
        let n = t.numel();
        let CudaBuffer::F32(s) = &mut t.buf else {
            return Err(Error::Parallel("all_reduce_sum: only f32 tensors".into()));
        };
        let mut view = s.slice_mut(..n);
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(|e| nccl_err(&self.backend, "all_reduce", e))
    }

    fn all_gather(&self, t: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
        let n = t.numel();
        let src = self.data(t, "all_gather")?;
        let world = self.world_size();
        let mut out = self.backend.alloc::<f32>(n * world)?;
        {
            let view = src.slice(..n);
            let mut dst = out.slice_mut(..n * world);
            self.comm
                .all_gather(&view, &mut dst)
                .map_err(|e| nccl_err(&self.backend, "all_gather", e))?;
        }
        let mut shape = t.shape().to_vec();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= world;
        Ok(Tensor::from_parts(CudaBuffer::F32(out), shape))
    }

    fn broadcast(&self, t: &mut Tensor<Cuda>, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::Parallel(format!(
                "broadcast root {root} is not a rank of a group of {}",
                self.world_size()
            )));
        }
        let n = t.numel();
        let CudaBuffer::F32(s) = &mut t.buf else {
            return Err(Error::Parallel("broadcast: only f32 tensors".into()));
        };
        let mut view = s.slice_mut(..n);
        self.comm
            .broadcast_in_place(&mut view, root as i32)
            .map(|_| ())
            .map_err(|e| nccl_err(&self.backend, "broadcast", e))
    }

    /// A one-element all-reduce, then the host waits for it: every rank has arrived.
    fn barrier(&self) -> Result<()> {
        let mut one = self.backend.upload_f32(&[1], vec![0.0])?;
        self.all_reduce_sum(&mut one)?;
        Backend::synchronize(&self.backend)
    }
}
