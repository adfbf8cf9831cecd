//! A tensor-parallel transformer driven from one thread: [`DitGroup`] holds rank 0's shard and
//! communicator and one helper thread per other rank (its own device, shard and communicator).
//!
//! The pipeline calls rank 0 as if the transformer were local: each forward's inputs go to the
//! helpers as the host data the pipeline holds anyway (the latents of one window, the timesteps; the text context once per
//! prompt), every rank runs the same forward (the collectives need them all), and rank 0's
//! output is the result. A helper that fails answers with its error, so a forward never waits
//! on a rank that has stopped.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use crate::backend::Tensor;
use crate::comm::Comm;
use crate::error::{Error, Result};
use crate::pipeline::PipelineBackend;
use crate::wan::{DitInputs, TextContext, WanTransformer};

/// A text context as host data, to be built on each rank's device.
#[derive(Clone)]
struct HostContext {
    batch: usize,
    seq: usize,
    dim: usize,
    data: std::sync::Arc<Vec<f32>>,
}

enum Msg {
    /// Replace the rank's text context.
    Context(HostContext),
    /// Run one forward on the current context.
    Forward {
        shape: Vec<usize>,
        latents: std::sync::Arc<Vec<f32>>,
        timesteps: Vec<f32>,
    },
}

struct Helper {
    tx: Sender<Msg>,
    rx: Receiver<Result<()>>,
    thread: Option<JoinHandle<()>>,
}

/// One rank's state on its helper thread.
struct Rank<B: PipelineBackend> {
    backend: B,
    model: WanTransformer<B>,
    comm: Box<dyn Comm<B>>,
    context: Option<TextContext<B>>,
}

impl<B: PipelineBackend> Rank<B> {
    fn handle(&mut self, msg: Msg) -> Result<()> {
        match msg {
            Msg::Context(c) => {
                self.context = Some(TextContext::from_host(
                    &self.backend,
                    c.batch,
                    c.seq,
                    c.dim,
                    &c.data,
                )?);
                Ok(())
            }
            Msg::Forward {
                shape,
                latents,
                timesteps,
            } => {
                let context = self
                    .context
                    .as_ref()
                    .ok_or_else(|| Error::Parallel("a forward before any text context".into()))?;
                let x = self.backend.upload_f32(&shape, latents.to_vec())?;
                self.model.forward(
                    self.comm.as_ref(),
                    &DitInputs {
                        latents: &x,
                        timesteps: &timesteps,
                        context,
                    },
                )?;
                Ok(())
            }
        }
    }
}

/// Rank 0 of a tensor-parallel transformer and the helper threads of the other ranks.
pub struct DitGroup<B: PipelineBackend> {
    backend: B,
    model: WanTransformer<B>,
    comm: Mutex<Box<dyn Comm<B>>>,
    /// Behind a mutex so that the group can be shared (`Sync`); one caller drives it at a time.
    helpers: Mutex<Vec<Helper>>,
}

impl<B: PipelineBackend> DitGroup<B> {
    /// Load shard r of `dir` on `ranks[r].0` with communicator `ranks[r].1`; rank 0 stays with
    /// the caller, the others get a thread each.
    pub fn load(dir: &std::path::Path, ranks: Vec<(B, Box<dyn Comm<B>>)>) -> Result<DitGroup<B>> {
        let world = ranks.len();
        if world < 2 {
            return Err(Error::Parallel(
                "a transformer group needs at least 2 ranks".into(),
            ));
        }
        // Every rank loads its shard on its own thread, so that loading runs in parallel and a
        // rank's failure is reported by rank.
        let mut iter = ranks.into_iter();
        let (backend0, comm0) = iter.next().expect("world >= 2");
        let mut helpers = Vec::with_capacity(world - 1);
        for (r, (backend, comm)) in iter.enumerate() {
            let rank = r + 1;
            let (tx, rx_msg) = channel::<Msg>();
            let (tx_res, rx) = channel::<Result<()>>();
            let dir = dir.to_path_buf();
            let thread = std::thread::Builder::new()
                .name(format!("longtake-tp-rank{rank}"))
                .spawn(move || {
                    let model = match WanTransformer::load(&dir, &backend, rank, world) {
                        Ok(m) => m,
                        Err(e) => {
                            let _ = tx_res.send(Err(e));
                            return;
                        }
                    };
                    if tx_res.send(Ok(())).is_err() {
                        return;
                    }
                    let mut state = Rank {
                        backend,
                        model,
                        comm,
                        context: None,
                    };
                    while let Ok(msg) = rx_msg.recv() {
                        let out = state.handle(msg);
                        let failed = out.is_err();
                        if tx_res.send(out).is_err() || failed {
                            // After a failure the group is unusable: the collectives of the
                            // next forward would wait for this rank.
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Parallel(format!("starting rank {rank}: {e}")))?;
            helpers.push(Helper {
                tx,
                rx,
                thread: Some(thread),
            });
        }
        let model = WanTransformer::load(dir, &backend0, 0, world)?;
        for (r, h) in helpers.iter().enumerate() {
            match h.rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Error::Parallel(format!("rank {}: {e}", r + 1))),
                Err(_) => return Err(Error::Parallel(format!("rank {} stopped", r + 1))),
            }
        }
        Ok(DitGroup {
            backend: backend0,
            model,
            comm: Mutex::new(comm0),
            helpers: Mutex::new(helpers),
        })
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.helpers().len() + 1
    }

    fn helpers(&self) -> std::sync::MutexGuard<'_, Vec<Helper>> {
        self.helpers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rank 0's shard (its config describes the whole model).
    pub fn rank0(&self) -> &WanTransformer<B> {
        &self.model
    }

    /// Send a text context (host data, `[batch, seq, dim]`) to every helper.
    pub fn set_context(&self, batch: usize, seq: usize, dim: usize, data: &[f32]) -> Result<()> {
        let c = HostContext {
            batch,
            seq,
            dim,
            data: std::sync::Arc::new(data.to_vec()),
        };
        let helpers = self.helpers();
        broadcast(&helpers, || Msg::Context(c.clone()))?;
        collect(&helpers)
    }

    /// One forward on every rank of latents given as host data (`shape`, `latents`), with the
    /// context last sent by [`Self::set_context`] (rank 0 uses `context`, built from the same
    /// data); rank 0's output. The host data goes to every rank as it is, so nothing is read
    /// back from rank 0's device.
    pub fn forward(
        &self,
        shape: &[usize],
        latents: Vec<f32>,
        timesteps: &[f32],
        context: &TextContext<B>,
    ) -> Result<Tensor<B>> {
        let host = std::sync::Arc::new(latents);
        let helpers = self.helpers();
        broadcast(&helpers, || Msg::Forward {
            shape: shape.to_vec(),
            latents: std::sync::Arc::clone(&host),
            timesteps: timesteps.to_vec(),
        })?;
        let out = self.backend.upload_f32(shape, host.to_vec()).and_then(|x| {
            let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            self.model.forward(
                comm.as_ref(),
                &DitInputs {
                    latents: &x,
                    timesteps,
                    context,
                },
            )
        });
        let answers = collect(&helpers);
        let out = out?;
        answers?;
        Ok(out)
    }
}

fn broadcast(helpers: &[Helper], msg: impl Fn() -> Msg) -> Result<()> {
    for (r, h) in helpers.iter().enumerate() {
        h.tx.send(msg())
            .map_err(|_| Error::Parallel(format!("rank {} has stopped", r + 1)))?;
    }
    Ok(())
}

/// Every helper's answer to the last message; the first error, naming its rank.
fn collect(helpers: &[Helper]) -> Result<()> {
    let mut first = Ok(());
    for (r, h) in helpers.iter().enumerate() {
        let out = match h.rx.recv() {
            Ok(o) => o,
            Err(_) => Err(Error::Parallel("stopped".into())),
        };
        if let Err(e) = out
            && first.is_ok()
        {
            first = Err(Error::Parallel(format!("rank {}: {e}", r + 1)));
        }
    }
    first
}

impl<B: PipelineBackend> Drop for DitGroup<B> {
    fn drop(&mut self) {
        let helpers = self.helpers.get_mut().unwrap_or_else(|e| e.into_inner());
        for h in helpers.iter_mut() {
            // Closing the channel ends the helper's loop.
            let (dead, _) = channel();
            drop(std::mem::replace(&mut h.tx, dead));
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}
