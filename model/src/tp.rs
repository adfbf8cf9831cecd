//! Running a tensor-parallel group of CPU ranks, one thread each.

use crate::backend::cpu::Cpu;
use crate::comm::{Comm, ThreadComm};
use crate::error::{Error, Result};

/// Run `f` on `world` ranks, each on its own thread with its communicator, and return rank 0's
/// result, or the first error in rank order.
///
/// Every rank must make the same collective calls; to fail together rather than leave peers
/// waiting, a rank that can fail on its own (loading its shard) should call [`agree`] first.
pub fn run_group<T: Send>(world: usize, f: impl Fn(ThreadComm) -> Result<T> + Sync) -> Result<T> {
    let comms = ThreadComm::group(world)?;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
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

/// Share every rank's outcome of a step that may fail on one rank only: all ranks return `Ok`
/// if every rank succeeded, otherwise every rank returns an error (its own, or one naming the
/// rank that failed).
pub fn agree<T>(comm: &dyn Comm<Cpu>, outcome: Result<T>) -> Result<T> {
    use crate::backend::Backend;
    let world = comm.world_size();
    let mut flags = vec![0.0f32; world];
    if outcome.is_err() {
        flags[comm.rank()] = 1.0;
    }
    let mut t = Cpu.upload_f32(&[world], flags)?;
    comm.all_reduce_sum(&mut t)?;
    let failed = Cpu.download(&t)?;
    match outcome {
        Err(e) => Err(e),
        Ok(v) => match failed.iter().position(|f| *f > 0.0) {
            Some(r) => Err(Error::Parallel(format!("rank {r} failed; see its error"))),
            None => Ok(v),
        },
    }
}
