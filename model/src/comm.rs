//! Collectives for tensor parallelism.
//!
//! [`Comm`] is the one interface model code uses (all-reduce sum, all-gather, broadcast,
//! barrier). [`ThreadComm`] implements it for the CPU backend across threads of one process,
//! [`SoloComm`] is the group of one rank for any backend, and
//! [`NcclComm`](crate::backend::cuda::nccl::NcclComm) serves the CUDA backend. The thread
//! communicator adds the ranks' contributions in rank order on every rank, so all ranks hold
//! bit-identical results and a run is reproducible; NCCL chooses its own reduction order
//! (ring or tree), which is deterministic for a fixed group and message size but not rank order.

use std::sync::{Arc, Barrier, Mutex};

use crate::backend::cpu::{Cpu, CpuBuffer};
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};

/// A communicator: this rank's handle on a group of `world_size` ranks.
pub trait Comm<B: Backend>: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replace `t` on every rank with the element-wise sum over ranks.
    fn all_reduce_sum(&self, t: &mut Tensor<B>) -> Result<()>;
    /// Concatenate every rank's `t` along the first dimension, in rank order.
    fn all_gather(&self, t: &Tensor<B>) -> Result<Tensor<B>>;
    /// Replace `t` on every rank with rank `root`'s `t`.
    fn broadcast(&self, t: &mut Tensor<B>, root: usize) -> Result<()>;
    /// Wait until every rank has arrived.
    fn barrier(&self) -> Result<()>;
}

/// The group of one rank, on any backend: every collective is the identity.
pub struct SoloComm<B: Backend> {
    backend: B,
}

impl<B: Backend> SoloComm<B> {
    pub fn new(backend: &B) -> Self {
        SoloComm {
            backend: backend.clone(),
        }
    }
}

impl<B: Backend> Comm<B> for SoloComm<B> {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _t: &mut Tensor<B>) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, t: &Tensor<B>) -> Result<Tensor<B>> {
        match t.shape().first() {
            Some(&rows) => self.backend.slice_rows(t, 0, rows),
            None => {
                let v = self.backend.download(t)?;
                self.backend.upload_f32(&[1], v)
            }
        }
    }

    fn broadcast(&self, _t: &mut Tensor<B>, root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::Parallel(format!(
                "broadcast root {root} is not a rank of a group of 1"
            )));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

struct Shared {
    barrier: Barrier,
    slots: Vec<Mutex<Vec<f32>>>,
}

/// Shared-memory collectives across the threads of one process (CPU tensor parallelism).
///
/// Every rank must make the same sequence of collective calls with tensors of the same shape;
/// a rank that stops calling leaves the others waiting, as with NCCL.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Communicators for a group of `world_size` ranks, one per thread, in rank order.
    pub fn group(world_size: usize) -> Result<Vec<ThreadComm>> {
        if world_size == 0 {
            return Err(Error::Parallel("the group size must be at least 1".into()));
        }
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world_size),
            slots: (0..world_size).map(|_| Mutex::new(Vec::new())).collect(),
        });
        Ok((0..world_size)
            .map(|rank| ThreadComm {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect())
    }

    fn world(&self) -> usize {
        self.shared.slots.len()
    }

    fn slot(&self, r: usize) -> std::sync::MutexGuard<'_, Vec<f32>> {
        // A poisoned slot means another rank panicked mid-copy; its data is still plain floats.
        self.shared.slots[r]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Publish this rank's data, then wait for everyone to have published.
    fn publish(&self, data: &[f32]) {
        {
            let mut s = self.slot(self.rank);
            s.clear();
            s.extend_from_slice(data);
        }
        self.shared.barrier.wait();
    }
}

fn data_mut<'a>(t: &'a mut Tensor<Cpu>, op: &'static str) -> Result<&'a mut [f32]> {
    t.buffer_mut().f32_mut(op)
}

impl Comm<Cpu> for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world()
    }

    fn all_reduce_sum(&self, t: &mut Tensor<Cpu>) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let data = data_mut(t, "all_reduce_sum")?;
        self.publish(data);
        let mut acc = self.slot(0).clone();
        for r in 1..self.world() {
            let s = self.slot(r);
            if s.len() != acc.len() {
                return Err(Error::Parallel(format!(
                    "all_reduce_sum: rank {r} sent {} elements, rank 0 sent {}",
                    s.len(),
                    acc.len()
                )));
            }
            acc.iter_mut().zip(s.iter()).for_each(|(a, b)| *a += *b);
        }
        data.copy_from_slice(&acc);
        // Nobody may overwrite its slot until every rank has read all of them.
        self.shared.barrier.wait();
        Ok(())
    }

    fn all_gather(&self, t: &Tensor<Cpu>) -> Result<Tensor<Cpu>> {
        let CpuBuffer::F32(data) = t.buffer() else {
            return Err(Error::Parallel("all_gather: only f32 tensors".into()));
        };
        if self.world() == 1 {
            return Cpu.upload_f32(t.shape(), data.clone());
        }
        self.publish(data);
        let mut out = Vec::with_capacity(data.len() * self.world());
        for r in 0..self.world() {
            out.extend_from_slice(&self.slot(r));
        }
        self.shared.barrier.wait();
        let mut shape = t.shape().to_vec();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world();
        if out.len() != shape.iter().product::<usize>() {
            return Err(Error::Parallel(
                "all_gather: ranks sent tensors of different sizes".into(),
            ));
        }
        Cpu.upload_f32(&shape, out)
    }

    fn broadcast(&self, t: &mut Tensor<Cpu>, root: usize) -> Result<()> {
        if root >= self.world() {
            return Err(Error::Parallel(format!(
                "broadcast root {root} is not a rank of a group of {}",
                self.world()
            )));
        }
        if self.world() == 1 {
            return Ok(());
        }
        let data = data_mut(t, "broadcast")?;
        self.publish(if self.rank == root { data } else { &[] });
        if self.rank != root {
            let s = self.slot(root);
            if s.len() != data.len() {
                return Err(Error::Parallel(format!(
                    "broadcast: root sent {} elements, rank {} expects {}",
                    s.len(),
                    self.rank,
                    data.len()
                )));
            }
            data.copy_from_slice(&s);
        }
        self.shared.barrier.wait();
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send>(n: usize, f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
        let comms = ThreadComm::group(n).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn all_reduce_gather_broadcast() {
        let out = run(3, |c| {
            let r = c.rank() as f32;
            let mut t = Cpu.upload_f32(&[2], vec![r, 10.0 * r]).unwrap();
            c.all_reduce_sum(&mut t).unwrap();
            let g = c
                .all_gather(&Cpu.upload_f32(&[1, 2], vec![r, r]).unwrap())
                .unwrap();
            let mut b = Cpu.upload_f32(&[2], vec![r + 5.0, r]).unwrap();
            c.broadcast(&mut b, 2).unwrap();
            c.barrier().unwrap();
            (
                Cpu.download(&t).unwrap(),
                g.shape().to_vec(),
                Cpu.download(&g).unwrap(),
                Cpu.download(&b).unwrap(),
            )
        });
        for (sum, gshape, gathered, bcast) in out {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gshape, vec![3, 2]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(bcast, vec![7.0, 2.0]);
        }
    }

    #[test]
    fn empty_group_is_an_error() {
        assert!(ThreadComm::group(0).is_err());
    }
}
