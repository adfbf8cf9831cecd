//! Running a tensor-parallel group of ranks, one thread each: CPU ranks joined by the thread
//! communicator, GPU ranks by NCCL.

use crate::backend::Backend;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::nccl::NcclComm;
use crate::backend::cuda::{Cuda, Precision};
use crate::comm::{Comm, SoloComm, ThreadComm};
use crate::device::Placement;
use crate::error::{Error, Result};
use crate::pipeline::PipelineBackend;

/// Run `f` on `world` CPU ranks, each on its own thread with its communicator, and return rank
/// 0's result, or the first error in rank order.
///
/// Every rank must make the same collective calls; to fail together rather than leave peers
/// waiting, a rank that can fail on its own (loading its shard) should call [`agree`] first.
pub fn run_group<T: Send>(world: usize, f: impl Fn(ThreadComm) -> Result<T> + Sync) -> Result<T> {
    let comms = ThreadComm::group(world)?;
    run_ranks(vec![Cpu; world], comms, |_, c| f(c))
}

/// Run `f` on every rank (a backend and its communicator), each on its own thread, and return
/// rank 0's result, or the first error in rank order.
pub fn run_ranks<B: Backend, C: Send, T: Send>(
    backends: Vec<B>,
    comms: Vec<C>,
    f: impl Fn(&B, C) -> Result<T> + Sync,
) -> Result<T> {
    if backends.len() != comms.len() {
        return Err(Error::Parallel(format!(
            "{} backends for {} communicators",
            backends.len(),
            comms.len()
        )));
    }
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = backends
            .iter()
            .zip(comms)
            .map(|(b, c)| {
                let f = &f;
                s.spawn(move || f(b, c))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Parallel(format!("rank {r} panicked"))))
            })
            .collect()
    });
    let mut first = None;
    for r in results {
        match r {
            Ok(v) if first.is_none() => first = Some(Ok(v)),
            Err(e) if !matches!(first, Some(Err(_))) => first = Some(Err(e)),
            _ => {}
        }
    }
    first.unwrap_or_else(|| Err(Error::Parallel("empty group".into())))
}

/// A computation that runs on every rank of a tensor-parallel group, on any backend.
pub trait RankJob: Sync {
    type Output: Send;
    fn run<B: PipelineBackend>(&self, backend: &B, comm: &dyn Comm<B>) -> Result<Self::Output>;
}

/// Run `job` on a group of `tp` ranks of `placement` (CPU ranks are threads; GPU ranks are the
/// first `tp` GPUs of the placement, joined by NCCL when more than one) and return rank 0's
/// output. `precision` applies to GPUs.
pub fn run_job<J: RankJob>(
    placement: &Placement,
    tp: usize,
    precision: Precision,
    job: &J,
) -> Result<J::Output> {
    if tp == 0 {
        return Err(Error::Parallel(
            "the tensor-parallel size must be at least 1".into(),
        ));
    }
    match placement {
        Placement::Cpu => run_group(tp, |comm| job.run(&Cpu, &comm)),
        Placement::Cuda(ids) => {
            if ids.len() < tp {
                return Err(Error::Parallel(format!(
                    "tensor parallelism over {tp} GPUs, but the device list {placement} has {}",
                    ids.len()
                )));
            }
            let backends = ids[..tp]
                .iter()
                .map(|i| Cuda::new(*i, precision))
                .collect::<Result<Vec<_>>>()?;
            if tp == 1 {
                return job.run(&backends[0], &SoloComm::new(&backends[0]));
            }
            let comms = NcclComm::group(&backends)?;
            run_ranks(backends, comms, |b, c| job.run(b, &c))
        }
    }
}

/// Share every rank's outcome of a step that may fail on one rank only: all ranks return `Ok`
/// if every rank succeeded, otherwise every rank returns an error (its own, or one naming the
/// rank that failed).
pub fn agree<B: Backend, T>(comm: &dyn Comm<B>, backend: &B, outcome: Result<T>) -> Result<T> {
    let world = comm.world_size();
    let mut flags = vec![0.0f32; world];
    if outcome.is_err() {
        flags[comm.rank()] = 1.0;
    }
    let mut t = backend.upload_f32(&[world], flags)?;
    comm.all_reduce_sum(&mut t)?;
    let failed = backend.download(&t)?;
    match outcome {
        Err(e) => Err(e),
        Ok(v) => match failed.iter().position(|f| *f > 0.0) {
            Some(r) => Err(Error::Parallel(format!("rank {r} failed; see its error"))),
            None => Ok(v),
        },
    }
}
