//! The compute thread: it takes the tasks [`crate::runtime::run`] pulls, in order, runs them on
//! the worker's devices and reports each one's result (model code is synchronous CPU or GPU
//! work; the calls it makes to the coordinator go through the async runtime's handle).
//!
//! - [`denoise`]: a denoise task: windows stepped together, halos exchanged, checkpoints.
//! - [`decode`]: a decode task: windows fused, VAE decode, video and frames written.

mod decode;
mod denoise;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use longtake_model::builtin::Builtin;
use longtake_model::pipeline::{PipelineBackend, WanPipeline};
use longtake_model::window::{Geometry, WindowSpec};
use longtake_proto::v1 as pb;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use tokio::runtime::Handle;

use crate::runtime::{CancelFlags, Client, MakeComms, WorkerMetrics};

/// State of the compute thread.
pub(crate) struct Compute<B: PipelineBackend> {
    /// Rank 0's device: text encoder, VAE and the host side of every task.
    pub(crate) backend: B,
    /// Every rank's device (rank 0 first); more than one shards the transformer.
    pub(crate) ranks: Vec<B>,
    pub(crate) make_comms: MakeComms<B>,
    pub(crate) rpc: Client,
    pub(crate) handle: Handle,
    pub(crate) worker_id: String,
    /// Loaded pipelines by model name (a directory, or a built-in model's name), each with its
    /// identity as it was when loaded.
    pub(crate) models: HashMap<String, Loaded<B>>,
    pub(crate) cancelled: Arc<CancelFlags>,
    pub(crate) cancel_all: Arc<AtomicBool>,
    pub(crate) metrics: Arc<WorkerMetrics>,
}

/// A loaded model and its identity for the manifest ([`identity`]), taken when it was loaded.
pub(crate) struct Loaded<B: PipelineBackend> {
    pipe: Arc<WanPipeline<B>>,
    identity: String,
}

/// A task failure: the message sent to the coordinator.
type TaskResult<T> = Result<T, String>;

/// The failure of a task stopped by a cancel (its render cancelled or rolled back).
const CANCELLED: &str = "cancelled";

impl<B: PipelineBackend> Compute<B> {
    pub(crate) fn serve(mut self, rx: std::sync::mpsc::Receiver<pb::Task>) {
        while let Ok(task) = rx.recv() {
            if self.cancel_all.load(Ordering::SeqCst) {
                return;
            }
            let started = Instant::now();
            // The task's span, in the render's trace; calls made inside carry it.
            let span = match &task.kind {
                Some(pb::task::Kind::Denoise(d)) => tracing::info_span!(
                    "denoise",
                    render = %d.render_id,
                    epoch = d.epoch,
                    windows = ?d.owned_windows
                ),
                Some(pb::task::Kind::Decode(d)) => {
                    tracing::info_span!("decode", render = %d.render_id, epoch = d.epoch)
                }
                _ => tracing::Span::none(),
            };
            longtake_telemetry::traces::set_parent(&span, &task.traceparent);
            let _entered = span.enter();
            let mut timings = HashMap::new();
            let (kind, render_id, epoch, spec, outcome) = match &task.kind {
                Some(pb::task::Kind::Denoise(d)) => (
                    "denoise",
                    &d.render_id,
                    d.epoch,
                    d.spec.as_ref(),
                    self.denoise(&task.task_id, d, &mut timings)
                        .map(pb::task_result::Outcome::Denoise),
                ),
                Some(pb::task::Kind::Decode(d)) => (
                    "decode",
                    &d.render_id,
                    d.epoch,
                    d.spec.as_ref(),
                    self.decode(&task.task_id, d, &mut timings)
                        .map(pb::task_result::Outcome::Decode),
                ),
                _ => continue,
            };
            let identity = self.identity(spec);
            let ended = match &outcome {
                Ok(_) => "done",
                Err(e) if e == CANCELLED => "cancelled",
                Err(_) => "failed",
            };
            self.metrics
                .tasks
                .with(&[("kind", kind), ("outcome", ended)])
                .inc();
            match &outcome {
                Ok(_) => {
                    tracing::info!(task = %task.task_id, seconds = started.elapsed().as_secs_f64(), "task done")
                }
                Err(e) if e == CANCELLED => {
                    tracing::info!(task = %task.task_id, seconds = started.elapsed().as_secs_f64(), "task cancelled")
                }
                Err(e) => tracing::warn!(task = %task.task_id, error = %e, "task failed"),
            }
            timings.insert("task_total".into(), started.elapsed().as_secs_f64());
            let result = pb::TaskResult {
                worker_id: self.worker_id.clone(),
                task_id: task.task_id.clone(),
                render_id: render_id.clone(),
                epoch,
                outcome: Some(outcome.unwrap_or_else(pb::task_result::Outcome::Error)),
                model_identity: identity,
                timings_s: timings,
            };
            self.cancelled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(render_id.clone(), epoch));
            let mut rpc = self.rpc.clone();
            // A coordinator that is gone cannot be told; the task stream ends and so do we.
            let _ = self.handle.block_on(rpc.complete_task(result));
        }
    }

    /// The identity of the task's model: the loaded one's, else (a model that failed to load)
    /// as the files on disk say.
    fn identity(&self, spec: Option<&pb::RenderSpec>) -> String {
        let model = spec.map(|s| s.model.as_str()).unwrap_or("");
        match self.models.get(model) {
            Some(l) => l.identity.clone(),
            None => identity(model),
        }
    }

    fn pipeline(&mut self, model: &str) -> TaskResult<Arc<WanPipeline<B>>> {
        if let Some(l) = self.models.get(model) {
            return Ok(Arc::clone(&l.pipe));
        }
        let dir = match Builtin::lookup(model) {
            Some(b) => b.model_dir().map_err(|e| e.to_string())?,
            None => PathBuf::from(model),
        };
        // The files as this load reads them: later edits on disk do not change what was loaded.
        let id = identity(model);
        let loaded = if self.ranks.len() > 1 {
            (self.make_comms)(&self.ranks).and_then(|comms| {
                WanPipeline::load_group(&dir, self.ranks.iter().cloned().zip(comms).collect())
            })
        } else {
            WanPipeline::load(&dir, &self.backend)
        };
        let pipe = Arc::new(loaded.map_err(|e| format!("loading model {}: {e}", dir.display()))?);
        self.models.insert(
            model.to_string(),
            Loaded {
                pipe: Arc::clone(&pipe),
                identity: id,
            },
        );
        Ok(pipe)
    }

    fn progress(
        &self,
        (task_id, render_id, epoch): (&str, &str, u64),
        phase: pb::RenderState,
        steps: u64,
        frames: u64,
        message: String,
    ) {
        self.report(pb::TaskProgress {
            task_id: task_id.to_string(),
            render_id: render_id.to_string(),
            epoch,
            phase: phase as i32,
            window_steps_done: steps,
            frames_done: frames,
            message,
            ..Default::default()
        });
    }

    /// Send a progress report as this worker (a lost report is made good by the next one, or by
    /// the task's result).
    fn report(&self, progress: pb::TaskProgress) {
        let mut rpc = self.rpc.clone();
        let progress = pb::TaskProgress {
            worker_id: self.worker_id.clone(),
            ..progress
        };
        let _ = self.handle.block_on(rpc.report_progress(progress));
    }

    /// The bytes of object `key`.
    fn read_object(
        &self,
        store: &dyn ObjectStore,
        key: &StorePath,
    ) -> Result<Vec<u8>, object_store::Error> {
        self.handle.block_on(longtake_objects::read(store, key))
    }

    /// Create object `key` unless it exists (a retried or stale writer never replaces one; an
    /// existing object of the same task holds the same bytes).
    fn create_object(
        &self,
        store: &dyn ObjectStore,
        key: &StorePath,
        bytes: Vec<u8>,
    ) -> Result<(), object_store::Error> {
        self.handle
            .block_on(longtake_objects::write_once(store, key, bytes))
    }
}

/// FNV-1a, 64-bit: a stable content hash for config files.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn f32_le(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn geometry(shape: &pb::LatentShape) -> Geometry {
    Geometry {
        channels: shape.channels as usize,
        frames: shape.frames as usize,
        height: shape.height as usize,
        width: shape.width as usize,
    }
}

fn window_specs(plan: &pb::WindowPlan) -> Vec<WindowSpec> {
    plan.windows
        .iter()
        .map(|w| WindowSpec {
            start: w.start as usize,
            len: w.len as usize,
            weights: w.weights.clone(),
        })
        .collect()
}

/// `rel` under the key prefix `prefix`.
fn object_key(prefix: &StorePath, rel: &str) -> StorePath {
    longtake_objects::object_path(prefix, rel)
}

/// A local directory or `s3://bucket[/prefix]`: the store and the key prefix.
fn open_store(url: &str) -> TaskResult<(Arc<dyn ObjectStore>, StorePath)> {
    longtake_objects::open_store(url).map_err(|e| format!("output {url}: {e}"))
}

/// A model's identity for the manifest: the built-in model's fingerprint, or the directory and a
/// hash of each component's config file.
fn identity(model: &str) -> String {
    if let Some(b) = Builtin::lookup(model) {
        return format!("{} fingerprint {}", b.description(), b.fingerprint());
    }
    let hashes: Vec<String> = [
        "model_index.json",
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ]
    .iter()
    .map(|f| match std::fs::read(PathBuf::from(model).join(f)) {
        Ok(bytes) => format!("{f}={:016x}", fnv1a(&bytes)),
        Err(_) => format!("{f}=missing"),
    })
    .collect();
    format!("{model} [{}]", hashes.join(" "))
}
