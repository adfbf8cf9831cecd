//! The worker process: register with the coordinator, keep the lease alive, pull tasks, and run
//! them on a dedicated compute thread (model code is synchronous CPU work and must not block the
//! async runtime; gRPC calls made from the compute thread go through the runtime's handle).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use longtake_model::backend::cpu::Cpu;
use longtake_model::backend::cuda::Cuda;
use longtake_model::backend::cuda::nccl::NcclComm;
use longtake_model::builtin::Builtin;
use longtake_model::comm::{Comm, SoloComm, ThreadComm};
use longtake_model::io::read_f32_bytes;
use longtake_model::noise::latent_noise;
use longtake_model::pipeline::{ClipRequest, PipelineBackend, WanPipeline};
use longtake_model::window::{self, Geometry, Part, Stitching, WindowSpec, WindowState};
use longtake_proto::v1 as pb;
use longtake_proto::v1::worker_service_client::WorkerServiceClient;
use longtake_telemetry::{Counter, Family, Histogram, Registry, SECONDS};
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use tokio::runtime::Handle;
use tonic::transport::Channel;

use crate::media::{Mp4Writer, png, to_rgb8};

/// Errors that stop a worker (task failures are reported to the coordinator instead).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator call {call}: {status}")]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
}

/// The devices a worker computes on: the CPU (with `tp` tensor-parallel ranks as threads), or
/// a GPU (rank 0) with the other GPUs of its tensor-parallel group (rank order; none for one
/// GPU), joined by NCCL.
#[derive(Clone)]
pub enum WorkerBackend {
    Cpu { tp: usize },
    Cuda(Cuda, Vec<Cuda>),
}

impl WorkerBackend {
    /// Every rank's GPU, rank 0 first.
    fn gpus(first: &Cuda, rest: &[Cuda]) -> Vec<Cuda> {
        std::iter::once(first).chain(rest).cloned().collect()
    }
}

impl std::fmt::Debug for WorkerBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerBackend::Cpu { tp: 1 } => f.write_str("cpu"),
            WorkerBackend::Cpu { tp } => write!(f, "cpu (tp {tp})"),
            WorkerBackend::Cuda(first, rest) => {
                let ids: Vec<String> = WorkerBackend::gpus(first, rest)
                    .iter()
                    .map(|c| c.ordinal().to_string())
                    .collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

impl WorkerBackend {
    /// What the worker reports as its kernel family: workers whose families differ compute
    /// slightly different numbers.
    fn kernel_family(&self) -> String {
        match self {
            WorkerBackend::Cpu { .. } => longtake_model::backend::cpu_kernel_family().to_string(),
            WorkerBackend::Cuda(c, _) => {
                let (major, minor) = c.capability();
                format!("cuda-sm{major}{minor}-{:?}", c.precision()).to_lowercase()
            }
        }
    }
}

/// Communicators for a worker's tensor-parallel group, one per rank.
type MakeComms<B> = fn(&[B]) -> longtake_model::Result<Vec<Box<dyn Comm<B>>>>;

fn cpu_comms(ranks: &[Cpu]) -> longtake_model::Result<Vec<Box<dyn Comm<Cpu>>>> {
    Ok(ThreadComm::group(ranks.len())?
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Comm<Cpu>>)
        .collect())
}

fn cuda_comms(ranks: &[Cuda]) -> longtake_model::Result<Vec<Box<dyn Comm<Cuda>>>> {
    Ok(NcclComm::group(ranks)?
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Comm<Cuda>>)
        .collect())
}

/// How a worker presents itself.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub name: String,
    /// Where it computes.
    pub backend: WorkerBackend,
    /// Devices this worker owns, as reported to the coordinator.
    pub devices: Vec<String>,
    /// Relative share of windows to give this worker.
    pub capacity: u32,
    /// Gains one permit once the coordinator has accepted the registration (lets an in-process
    /// launcher wait for all its workers before submitting work).
    pub registered: Option<Arc<tokio::sync::Semaphore>>,
    /// The cluster token every call carries (none: calls carry no credentials).
    pub auth: longtake_proto::Bearer,
    /// Where the worker counts its work (shared across re-registrations).
    pub metrics: Arc<WorkerMetrics>,
}

/// A worker's Prometheus metrics.
pub struct WorkerMetrics {
    pub registry: Arc<Registry>,
    window_steps: Arc<Counter>,
    step_seconds: Arc<Histogram>,
    checkpoint_bytes: Arc<Counter>,
    checkpoint_seconds: Arc<Histogram>,
    halo_seconds: Arc<Histogram>,
    tasks: Arc<Family<Counter>>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let r = Registry::new();
        WorkerMetrics {
            window_steps: r.counter(
                "longtake_worker_window_steps_total",
                "Window-steps this worker computed.",
            ),
            step_seconds: r.histogram(
                "longtake_worker_step_seconds",
                "Time of one sampler step over this worker's windows (model passes, halo exchange, fusion).",
                SECONDS,
            ),
            checkpoint_bytes: r.counter(
                "longtake_worker_checkpoint_bytes_total",
                "Bytes of window checkpoints written.",
            ),
            checkpoint_seconds: r.histogram(
                "longtake_worker_checkpoint_seconds",
                "Time to write one step's checkpoints of this worker's windows.",
                SECONDS,
            ),
            halo_seconds: r.histogram(
                "longtake_worker_halo_exchange_seconds",
                "Time of one halo exchange (relay plus waiting for the neighbours' step).",
                SECONDS,
            ),
            tasks: r.counters(
                "longtake_worker_tasks_total",
                "Tasks ended, by kind (denoise, decode) and outcome (done, cancelled, failed).",
            ),
            registry: r,
        }
    }
}

type Client = WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, Calls>>;

/// What every call to the coordinator carries: the cluster token, and the `traceparent` of
/// the span it is made in (so the coordinator's span for it joins the render's trace).
#[derive(Clone)]
struct Calls {
    auth: longtake_proto::Bearer,
}

impl tonic::service::Interceptor for Calls {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = self.auth.call(request)?;
        longtake_telemetry::traces::inject(request.metadata_mut());
        Ok(request)
    }
}

/// Cancellation flags by assignment (render id, epoch).
type CancelFlags = std::sync::Mutex<HashMap<(String, u64), Arc<AtomicBool>>>;

fn client(channel: Channel, auth: longtake_proto::Bearer) -> Client {
    WorkerServiceClient::with_interceptor(channel, Calls { auth })
        .max_decoding_message_size(longtake_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(longtake_proto::MAX_MESSAGE_BYTES)
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `shutdown` resolved: the worker left the pool (Leave) after stopping its task.
    Shutdown,
    /// The coordinator ended the task stream or became unreachable (a failover, a lapsed
    /// lease): register again, with this coordinator or another replica.
    Disconnected,
}

/// Run a worker against the coordinator behind `channel` until `shutdown` resolves or the
/// coordinator closes the task stream. Either way the task in progress is stopped at its next
/// step boundary (a coordinator that lost this worker has rolled its render back already).
pub async fn run(
    channel: Channel,
    opts: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, WorkerError> {
    let mut rpc = client(channel, opts.auth.clone());
    let reg = rpc
        .register(pb::RegisterRequest {
            worker_name: opts.name.clone(),
            devices: opts.devices.clone(),
            capacity: opts.capacity,
            kernel_family: opts.backend.kernel_family(),
        })
        .await
        .map_err(|status| WorkerError::Rpc {
            call: "Register",
            status,
        })?
        .into_inner();
    let worker_id = reg.worker_id.clone();
    if let Some(r) = &opts.registered {
        r.add_permits(1);
    }
    let ttl = reg
        .lease_ttl
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::from_secs(10));

    // Keep the lease: heartbeats at a third of its length.
    let beat = {
        let mut rpc = rpc.clone();
        let id = worker_id.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            loop {
                tick.tick().await;
                if rpc
                    .heartbeat(pb::HeartbeatRequest {
                        worker_id: id.clone(),
                    })
                    .await
                    .is_err()
                {
                    // The coordinator is gone or dropped us; the task stream ends too.
                    break;
                }
            }
        })
    };

    let mut stream = rpc
        .pull_tasks(pb::PullTasksRequest {
            worker_id: worker_id.clone(),
        })
        .await
        .map_err(|status| WorkerError::Rpc {
            call: "PullTasks",
            status,
        })?
        .into_inner();

    // The compute thread takes tasks in order; cancellation flags are per assignment.
    let (tx, rx) = std::sync::mpsc::channel::<pb::Task>();
    let cancelled: Arc<CancelFlags> = Arc::default();
    // Set when the worker stops: tasks not started yet are dropped too.
    let cancel_all = Arc::new(AtomicBool::new(false));
    let compute = {
        let thread = std::thread::Builder::new().name(format!("longtake-worker-{}", opts.name));
        macro_rules! compute_on {
            ($ranks:expr, $make_comms:expr) => {{
                let ranks = $ranks;
                let ctx = Compute {
                    backend: ranks[0].clone(),
                    ranks,
                    make_comms: $make_comms,
                    rpc: rpc.clone(),
                    handle: Handle::current(),
                    worker_id: worker_id.clone(),
                    models: HashMap::new(),
                    cancelled: Arc::clone(&cancelled),
                    cancel_all: Arc::clone(&cancel_all),
                    metrics: Arc::clone(&opts.metrics),
                };
                thread.spawn(move || ctx.serve(rx))
            }};
        }
        match &opts.backend {
            WorkerBackend::Cpu { tp } => compute_on!(vec![Cpu; (*tp).max(1)], cpu_comms),
            WorkerBackend::Cuda(first, rest) => {
                compute_on!(WorkerBackend::gpus(first, rest), cuda_comms)
            }
        }
        .expect("spawn the compute thread")
    };

    tokio::pin!(shutdown);
    let mut seen = std::collections::HashSet::new();
    let exit = loop {
        tokio::select! {
            _ = &mut shutdown => break Exit::Shutdown,
            msg = stream.message() => match msg {
                Ok(Some(task)) => {
                    if let Some(pb::task::Kind::Cancel(c)) = &task.kind {
                        flag(&cancelled, &c.render_id, c.epoch).store(true, Ordering::SeqCst);
                        continue;
                    }
                    // A task sent again (a reopened stream) runs once.
                    if !seen.insert(task.task_id.clone()) {
                        continue;
                    }
                    if tx.send(task).is_err() {
                        break Exit::Disconnected;
                    }
                }
                Ok(None) | Err(_) => break Exit::Disconnected,
            }
        }
    };
    drop(tx);
    beat.abort();
    if exit == Exit::Shutdown {
        // Leave first, so that the coordinator moves this worker's windows at once.
        let _ = rpc
            .leave(pb::LeaveRequest {
                worker_id: worker_id.clone(),
                reason: "the worker is shutting down".into(),
            })
            .await;
    }
    // Whatever runs now belongs to an assignment that is over: stop it at its next step.
    for f in cancelled.lock().unwrap_or_else(|e| e.into_inner()).values() {
        f.store(true, Ordering::SeqCst);
    }
    cancel_all.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || compute.join()).await;
    Ok(exit)
}

/// The cancellation flag of one assignment (render, epoch): a CancelTask of an earlier epoch
/// never stops the same render's later assignment.
fn flag(map: &CancelFlags, render: &str, epoch: u64) -> Arc<AtomicBool> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(m.entry((render.to_string(), epoch)).or_default())
}

/// State of the compute thread.
struct Compute<B: PipelineBackend> {
    /// Rank 0's device: text encoder, VAE and the host side of every task.
    backend: B,
    /// Every rank's device (rank 0 first); more than one shards the transformer.
    ranks: Vec<B>,
    make_comms: MakeComms<B>,
    rpc: Client,
    handle: Handle,
    worker_id: String,
    /// Loaded pipelines by model name (a directory, or a built-in model's name).
    models: HashMap<String, Arc<WanPipeline<B>>>,
    cancelled: Arc<CancelFlags>,
    cancel_all: Arc<AtomicBool>,
    metrics: Arc<WorkerMetrics>,
}

/// A task failure: the message sent to the coordinator.
type TaskResult<T> = Result<T, String>;

/// The failure of a task stopped by a cancel (its render cancelled or rolled back).
const CANCELLED: &str = "cancelled";

impl<B: PipelineBackend> Compute<B> {
    fn serve(mut self, rx: std::sync::mpsc::Receiver<pb::Task>) {
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
            let (render_id, epoch, outcome, identity, timings) = match &task.kind {
                Some(pb::task::Kind::Denoise(d)) => {
                    let mut timings = HashMap::new();
                    let r = self.denoise(&task.task_id, d, &mut timings);
                    (
                        d.render_id.clone(),
                        d.epoch,
                        r.map(pb::task_result::Outcome::Denoise),
                        self.identity(d.spec.as_ref()),
                        timings,
                    )
                }
                Some(pb::task::Kind::Decode(d)) => {
                    let mut timings = HashMap::new();
                    let r = self.decode(&task.task_id, d, &mut timings);
                    (
                        d.render_id.clone(),
                        d.epoch,
                        r.map(pb::task_result::Outcome::Decode),
                        self.identity(d.spec.as_ref()),
                        timings,
                    )
                }
                _ => continue,
            };
            let kind = match &task.kind {
                Some(pb::task::Kind::Denoise(_)) => "denoise",
                _ => "decode",
            };
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
            let mut timings = timings;
            timings.insert("task_total".into(), started.elapsed().as_secs_f64());
            let result = pb::TaskResult {
                worker_id: self.worker_id.clone(),
                task_id: task.task_id.clone(),
                render_id,
                epoch,
                outcome: Some(outcome.unwrap_or_else(pb::task_result::Outcome::Error)),
                model_identity: identity,
                timings_s: timings,
            };
            self.cancelled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(result.render_id.clone(), epoch));
            let mut rpc = self.rpc.clone();
            // A coordinator that is gone cannot be told; the task stream ends and so do we.
            let _ = self.handle.block_on(rpc.complete_task(result));
        }
    }

    /// The model's identity for the manifest: the built-in model's fingerprint, or the directory
    /// and a hash of each component's config file.
    fn identity(&self, spec: Option<&pb::RenderSpec>) -> String {
        let model = spec.map(|s| s.model.as_str()).unwrap_or("");
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

    fn pipeline(&mut self, model: &str) -> TaskResult<Arc<WanPipeline<B>>> {
        if let Some(p) = self.models.get(model) {
            return Ok(Arc::clone(p));
        }
        let dir = match Builtin::lookup(model) {
            Some(b) => b.model_dir().map_err(|e| e.to_string())?,
            None => PathBuf::from(model),
        };
        let loaded = if self.ranks.len() > 1 {
            (self.make_comms)(&self.ranks).and_then(|comms| {
                WanPipeline::load_group(&dir, self.ranks.iter().cloned().zip(comms).collect())
            })
        } else {
            WanPipeline::load(&dir, &self.backend)
        };
        let pipe = Arc::new(loaded.map_err(|e| format!("loading model {}: {e}", dir.display()))?);
        self.models.insert(model.to_string(), Arc::clone(&pipe));
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
        let mut rpc = self.rpc.clone();
        let _ = self.handle.block_on(rpc.report_progress(pb::TaskProgress {
            worker_id: self.worker_id.clone(),
            task_id: task_id.to_string(),
            render_id: render_id.to_string(),
            epoch,
            phase: phase as i32,
            window_steps_done: steps,
            frames_done: frames,
            message,
            ..Default::default()
        }));
    }

    fn denoise(
        &mut self,
        task_id: &str,
        t: &pb::DenoiseTask,
        timings: &mut HashMap<String, f64>,
    ) -> TaskResult<pb::DenoiseResult> {
        let spec = t.spec.as_ref().ok_or("denoise task without a spec")?;
        let shape = t
            .latent_shape
            .as_ref()
            .ok_or("denoise task without a latent shape")?;
        let plan_pb = t.plan.as_ref().ok_or("denoise task without a plan")?;
        let pipe = self.pipeline(&spec.model)?;
        let geo = geometry(shape);
        let plan = window_specs(plan_pb);
        let stitching = stitching_from_pb(spec.stitching);
        let steps = spec.steps.unwrap_or(50) as usize;
        let req = ClipRequest {
            prompt: spec.prompt.clone(),
            negative_prompt: Some(spec.negative_prompt.clone()),
            num_frames: t.num_frames as usize,
            height: geo.height * pipe.dir.vae.spatial_factor(),
            width: geo.width * pipe.dir.vae.spatial_factor(),
            steps,
            guidance: spec.guidance.unwrap_or(5.0),
            flow_shift: spec.flow_shift.map(f64::from),
            seed: spec.seed.unwrap_or(0),
            noise: None,
        };
        let stored_noise = if t.initial_noise_key.is_empty() {
            None
        } else {
            let (store, prefix) = open_store(&t.output_uri)?;
            let key = object_key(&prefix, &t.initial_noise_key);
            let bytes = self
                .read_object(&*store, &key)
                .map_err(|e| format!("initial noise: reading {key}: {e}"))?;
            Some(bytes)
        };
        let noise = match stored_noise.as_ref().or(spec.initial_noise.as_ref()) {
            Some(bytes) => {
                let (s, data) =
                    read_f32_bytes(bytes, "noise").map_err(|e| format!("initial noise: {e}"))?;
                if s != [1, geo.channels, geo.frames, geo.height, geo.width] {
                    return Err(format!(
                        "initial noise has shape {s:?}; the render needs [1, {}, {}, {}, {}]",
                        geo.channels, geo.frames, geo.height, geo.width
                    ));
                }
                data
            }
            None => latent_noise(req.seed, geo.channels, 0..geo.frames, geo.height, geo.width),
        };
        let cancel = flag(&self.cancelled, &t.render_id, t.epoch);
        let comm = SoloComm::new(&self.backend);
        let clock = Instant::now();
        let stop = || cancel.load(Ordering::SeqCst) || self.cancel_all.load(Ordering::SeqCst);
        let guided = pipe
            .guided_until(&req, &mut Vec::new(), &stop)
            .map_err(|e| match e {
                longtake_model::Error::Cancelled(_) => CANCELLED.to_string(),
                e => e.to_string(),
            })?;
        timings.insert("text_encode".into(), clock.elapsed().as_secs_f64());
        let scheduler = pipe.scheduler(&req).map_err(|e| e.to_string())?;
        let owned: Vec<usize> = t.owned_windows.iter().map(|w| *w as usize).collect();
        if owned.iter().any(|w| *w >= plan.len()) {
            return Err(format!(
                "owned windows {owned:?} are not all in a plan of {}",
                plan.len()
            ));
        }
        let clock = Instant::now();
        let mut done = 0u64;
        let report = |done: u64| {
            self.progress(
                (task_id, &t.render_id, t.epoch),
                pb::RenderState::Denoising,
                done,
                0,
                String::new(),
            );
        };
        let finals: Vec<Part> = if stitching == Stitching::Autoregressive
            && owned.len() == plan.len()
        {
            // Sequential by nature: the whole sequence runs here.
            let out = window::denoise(
                &guided,
                &comm,
                &scheduler,
                steps,
                &geo,
                &noise,
                &plan,
                stitching,
                |d, _| {
                    if d % plan.len() == 0 {
                        report(d as u64);
                    }
                },
            )
            .map_err(|e| e.to_string())?;
            plan.iter()
                .enumerate()
                .map(|(i, w)| Part {
                    window: i,
                    start: w.start,
                    len: w.len,
                    data: geo.take(&out, w.frames()),
                })
                .collect()
        } else if stitching == Stitching::Autoregressive {
            return Err("autoregressive renders must be planned onto one worker".into());
        } else {
            let mut states: Vec<WindowState> = owned
                .iter()
                .map(|&i| WindowState::new(i, plan[i].clone(), &geo, &noise, &scheduler, steps))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let every = t.checkpoint_every as usize;
            let store = if every > 0 || !t.resume_from.is_empty() {
                Some(open_store(&t.output_uri)?)
            } else {
                None
            };
            let first = t.resume_step as usize;
            if let Some((store, prefix)) = store.as_ref().filter(|_| !t.resume_from.is_empty()) {
                let clock = Instant::now();
                for w in states.iter_mut() {
                    let key = object_key(
                        prefix,
                        &format!("{}/w{}.safetensors", t.resume_from, w.index),
                    );
                    let bytes = self
                        .read_object(&**store, &key)
                        .map_err(|e| format!("cannot resume: reading the checkpoint {key}: {e}"))?;
                    w.restore(&bytes)
                        .map_err(|e| format!("cannot resume from {key}: {e}"))?;
                    if w.step_index() != first {
                        return Err(format!(
                            "cannot resume: {key} is after step {}, the task resumes after step {first}",
                            w.step_index()
                        ));
                    }
                }
                timings.insert("resume".into(), clock.elapsed().as_secs_f64());
                done = (first * states.len()) as u64;
            }
            let mut checkpoint_s = 0.0;
            // Time spent in halo exchanges (relay plus waiting for the neighbours' step).
            let mut halo_s = 0.0;
            for step in first..steps {
                if cancel.load(Ordering::SeqCst) || self.cancel_all.load(Ordering::SeqCst) {
                    return Err(CANCELLED.into());
                }
                let step_clock = Instant::now();
                let _step = tracing::info_span!("step", step, windows = states.len()).entered();
                let preds: Vec<Part> = states
                    .iter()
                    .map(|w| w.predict(&guided, &comm, &geo))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                let received = if stitching == Stitching::Codenoise {
                    let clock = Instant::now();
                    let r = self.exchange(t, step as u32, &plan, &owned, &preds, &geo)?;
                    halo_s += clock.elapsed().as_secs_f64();
                    self.metrics
                        .halo_seconds
                        .observe(clock.elapsed().as_secs_f64());
                    r
                } else {
                    HashMap::new()
                };
                for (w, p) in states.iter_mut().zip(&preds) {
                    let fused = if stitching == Stitching::Codenoise {
                        let mut parts: Vec<&Part> = preds
                            .iter()
                            .filter(|q| !window::overlap(&plan[q.window], &w.spec).is_empty())
                            .collect();
                        if let Some(r) = received.get(&w.index) {
                            parts.extend(r.iter());
                        }
                        window::fuse(&geo, &plan, w.spec.frames(), &parts)
                            .map_err(|e| e.to_string())?
                    } else {
                        p.data.clone()
                    };
                    w.step(&fused).map_err(|e| e.to_string())?;
                    done += 1;
                }
                self.metrics.window_steps.add(states.len() as f64);
                self.metrics
                    .step_seconds
                    .observe(step_clock.elapsed().as_secs_f64());
                let k = step + 1;
                match store.as_ref() {
                    Some((store, prefix)) if every > 0 && k.is_multiple_of(every) && k < steps => {
                        let clock = Instant::now();
                        self.write_checkpoints(t, &**store, prefix, k, &states)?;
                        checkpoint_s += clock.elapsed().as_secs_f64();
                        self.metrics
                            .checkpoint_seconds
                            .observe(clock.elapsed().as_secs_f64());
                        self.report_checkpoint(task_id, t, done, k, &owned);
                    }
                    _ => report(done),
                }
            }
            if checkpoint_s > 0.0 {
                timings.insert("checkpoint_write".into(), checkpoint_s);
            }
            if halo_s > 0.0 {
                timings.insert("halo_exchange".into(), halo_s);
            }
            states.iter().map(|w| w.latents()).collect()
        };
        timings.insert("denoise".into(), clock.elapsed().as_secs_f64());
        if t.output_uri.is_empty() {
            return Ok(pb::DenoiseResult {
                windows: finals
                    .into_iter()
                    .map(|p| pb::WindowLatents {
                        window: p.window as u32,
                        latents: f32_le(&p.data),
                        latents_key: String::new(),
                    })
                    .collect(),
            });
        }
        // The final latents go to the object store; the result names them.
        let clock = Instant::now();
        let (store, prefix) = open_store(&t.output_uri)?;
        let mut windows = Vec::new();
        for p in finals {
            let key = format!("windows/e{}/w{}.f32", t.epoch, p.window);
            self.handle
                .block_on(longtake_objects::put(
                    &*store,
                    &object_key(&prefix, &key),
                    f32_le(&p.data),
                ))
                .map_err(|e| format!("writing {key} to {}: {e}", t.output_uri))?;
            windows.push(pb::WindowLatents {
                window: p.window as u32,
                latents: Vec::new(),
                latents_key: key,
            });
        }
        timings.insert("write_windows".into(), clock.elapsed().as_secs_f64());
        Ok(pb::DenoiseResult { windows })
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

    /// Read the windows' final latents named by a decode task and fuse them into the whole
    /// sequence with the plan's weights (the function that fuses halos): a safetensors file with
    /// `latents` [1, C, T, h, w].
    fn fuse_windows(
        &self,
        t: &pb::DecodeTask,
        store: &dyn ObjectStore,
        prefix: &StorePath,
    ) -> TaskResult<Vec<u8>> {
        let shape = t
            .latent_shape
            .as_ref()
            .ok_or("decode task without a latent shape")?;
        let plan_pb = t.plan.as_ref().ok_or("decode task without a plan")?;
        let geo = geometry(shape);
        let plan = window_specs(plan_pb);
        if t.window_keys.len() != plan.len() {
            return Err(format!(
                "{} window keys for a plan of {} windows",
                t.window_keys.len(),
                plan.len()
            ));
        }
        let mut parts = Vec::new();
        for (i, (key, w)) in t.window_keys.iter().zip(&plan).enumerate() {
            let bytes = self
                .read_object(store, &object_key(prefix, key))
                .map_err(|e| format!("reading {key} under {}: {e}", t.output_uri))?;
            let data = f32_from_le(&bytes);
            let want = geo.channels * w.len * geo.height * geo.width;
            if data.len() != want || bytes.len() % 4 != 0 {
                return Err(format!(
                    "{key}: {} bytes; window {i} needs {want} f32 values",
                    bytes.len()
                ));
            }
            parts.push(Part {
                window: i,
                start: w.start,
                len: w.len,
                data,
            });
        }
        let refs: Vec<&Part> = parts.iter().collect();
        let fused = window::fuse(&geo, &plan, 0..geo.frames, &refs).map_err(|e| e.to_string())?;
        let dims = [1, geo.channels, geo.frames, geo.height, geo.width];
        longtake_model::io::f32_safetensors(&[("latents", &dims, &fused)], Default::default())
            .map_err(|e| e.to_string())
    }

    /// Write every window's checkpoint after `k` steps, each object created once (a retried or
    /// stale writer never replaces one).
    fn write_checkpoints(
        &self,
        t: &pb::DenoiseTask,
        store: &dyn ObjectStore,
        prefix: &StorePath,
        k: usize,
        states: &[WindowState],
    ) -> TaskResult<()> {
        for w in states {
            let bytes = w.checkpoint().map_err(|e| e.to_string())?;
            self.metrics.checkpoint_bytes.add(bytes.len() as f64);
            let key = object_key(
                prefix,
                &format!("{}/s{k}/w{}.safetensors", t.checkpoint_dir, w.index),
            );
            self.create_object(store, &key, bytes)
                .map_err(|e| format!("writing the checkpoint {key}: {e}"))?;
        }
        Ok(())
    }

    fn report_checkpoint(
        &self,
        task_id: &str,
        t: &pb::DenoiseTask,
        done: u64,
        k: usize,
        windows: &[usize],
    ) {
        let mut rpc = self.rpc.clone();
        let _ = self.handle.block_on(rpc.report_progress(pb::TaskProgress {
            worker_id: self.worker_id.clone(),
            task_id: task_id.to_string(),
            render_id: t.render_id.clone(),
            epoch: t.epoch,
            phase: pb::RenderState::Denoising as i32,
            window_steps_done: done,
            frames_done: 0,
            message: String::new(),
            checkpoint_step: k as u32,
            checkpoint_windows: windows.iter().map(|w| *w as u32).collect(),
        }));
    }

    /// Send each owned window's prediction over the frames it shares with remote windows, and
    /// receive theirs: received parts by destination window.
    fn exchange(
        &self,
        t: &pb::DenoiseTask,
        step: u32,
        plan: &[WindowSpec],
        owned: &[usize],
        preds: &[Part],
        geo: &Geometry,
    ) -> TaskResult<HashMap<usize, Vec<Part>>> {
        let mut calls = Vec::new();
        for p in preds {
            let me = &plan[p.window];
            let parts: Vec<pb::HaloPart> = plan
                .iter()
                .enumerate()
                .filter(|(j, other)| !owned.contains(j) && !window::overlap(me, other).is_empty())
                .map(|(j, other)| {
                    let r = window::overlap(me, other);
                    let wgeo = Geometry {
                        frames: me.len,
                        ..*geo
                    };
                    let data = wgeo.take(&p.data, r.start - me.start..r.end - me.start);
                    pb::HaloPart {
                        neighbor_window: j as u32,
                        frame_start: r.start as u32,
                        frame_count: r.len() as u32,
                        data: f32_le(&data),
                    }
                })
                .collect();
            if parts.is_empty() {
                continue;
            }
            let mut rpc = self.rpc.clone();
            let req = pb::HaloRequest {
                render_id: t.render_id.clone(),
                epoch: t.epoch,
                step,
                window: p.window as u32,
                parts,
            };
            let w = p.window;
            calls.push(async move { (w, rpc.exchange_halo(req).await) });
        }
        let answers = self.handle.block_on(futures::future::join_all(calls));
        let mut out: HashMap<usize, Vec<Part>> = HashMap::new();
        for (w, answer) in answers {
            let resp = answer
                .map_err(|s| {
                    // The render was cancelled while this window waited for its neighbours.
                    if s.code() == tonic::Code::Cancelled {
                        return CANCELLED.to_string();
                    }
                    format!(
                        "halo exchange for window {w} at step {step}: {}",
                        s.message()
                    )
                })?
                .into_inner();
            for part in resp.parts {
                let data = f32_from_le(&part.data);
                let len = part.frame_count as usize;
                if data.len() != geo.channels * len * geo.height * geo.width {
                    return Err(format!(
                        "halo from window {} has {} values for {len} frames",
                        part.neighbor_window,
                        data.len()
                    ));
                }
                out.entry(w).or_default().push(Part {
                    window: part.neighbor_window as usize,
                    start: part.frame_start as usize,
                    len,
                    data,
                });
            }
        }
        Ok(out)
    }

    fn decode(
        &mut self,
        task_id: &str,
        t: &pb::DecodeTask,
        timings: &mut HashMap<String, f64>,
    ) -> TaskResult<pb::DecodeResult> {
        let spec = t.spec.as_ref().ok_or("decode task without a spec")?;
        let pipe = self.pipeline(&spec.model)?;
        let cancel = flag(&self.cancelled, &t.render_id, t.epoch);
        let cancel_all = Arc::clone(&self.cancel_all);
        let backend = self.backend.clone();
        let (store, prefix) = open_store(&t.output_uri)?;
        // Inline latents are written as `latents.safetensors` here; a key names the file the
        // coordinator has written already.
        let (latents_file, inline) = match &t.latents {
            Some(pb::decode_task::Latents::LatentsSafetensors(b)) => (b.clone(), true),
            Some(pb::decode_task::Latents::LatentsKey(key)) => {
                let path = object_key(&prefix, key);
                let bytes = self
                    .read_object(&*store, &path)
                    .map_err(|e| format!("reading {key} under {}: {e}", t.output_uri))?;
                (bytes, false)
            }
            None if !t.window_keys.is_empty() => {
                let clock = Instant::now();
                let file = self.fuse_windows(t, &*store, &prefix)?;
                let path = object_key(&prefix, "latents.safetensors");
                // Written once: a decode sent again finds it there (the same bytes).
                self.create_object(&*store, &path, file.clone())
                    .map_err(|e| format!("writing latents.safetensors: {e}"))?;
                timings.insert("fuse".into(), clock.elapsed().as_secs_f64());
                (file, false)
            }
            None => return Err("decode task without latents".into()),
        };
        let (shape, latents) =
            read_f32_bytes(&latents_file, "latents").map_err(|e| e.to_string())?;
        let [_, c, tt, h, w] = <[usize; 5]>::try_from(shape.as_slice())
            .map_err(|_| format!("latents shape {shape:?}"))?;
        // Every output is created once: a decode sent again (its first worker lost) or a stale
        // decoder finds the same bytes there and leaves them; a finished render never changes.
        let put = |name: &str, bytes: Vec<u8>| -> TaskResult<String> {
            let key = object_key(&prefix, name);
            self.handle
                .block_on(longtake_objects::write_once(&*store, &key, bytes))
                .map_err(|e| format!("writing {name} to {}: {e}", t.output_uri))?;
            Ok(name.to_string())
        };
        let mut objects = vec![if inline {
            put("latents.safetensors", latents_file.clone())?
        } else {
            "latents.safetensors".to_string()
        }];
        let clock = Instant::now();
        let z = pipe.denormalize(&latents, tt * h * w);
        let sf = pipe.dir.vae.spatial_factor();
        let (ph, pw) = (h * sf, w * sf);
        let fps = spec.fps.unwrap_or(16);
        let mut mp4 = Mp4Writer::new(pw, ph, fps).map_err(|e| e.to_string())?;
        let mut frame_no = 0usize;
        let mut encode_s = 0.0;
        let total = pipe.dir.vae.frames_for(tt);
        pipe.vae()
            .decode_stream(&z, [c, tt, h, w], 1, |px| {
                if cancel.load(Ordering::SeqCst) || cancel_all.load(Ordering::SeqCst) {
                    return Err(longtake_model::Error::Cancelled("decode".into()));
                }
                let data = backend.download(&px)?;
                let e = Instant::now();
                let plane = 3 * ph * pw;
                for f in data.chunks_exact(plane) {
                    let rgb = to_rgb8(f, ph, pw);
                    mp4.push_rgb(&rgb)
                        .map_err(|e| longtake_model::Error::external("video", e.to_string()))?;
                    if spec.png_frames {
                        let bytes = png(&rgb, pw, ph)
                            .map_err(|e| longtake_model::Error::external("png", e.to_string()))?;
                        objects.push(
                            put(&format!("frames/{frame_no:06}.png"), bytes)
                                .map_err(|e| longtake_model::Error::external("png", e))?,
                        );
                    }
                    frame_no += 1;
                }
                encode_s += e.elapsed().as_secs_f64();
                self.progress(
                    (task_id, &t.render_id, t.epoch),
                    pb::RenderState::Decoding,
                    0,
                    frame_no as u64,
                    format!("{frame_no}/{total} frames"),
                );
                Ok(())
            })
            .map_err(|e| match e {
                longtake_model::Error::Cancelled(_) => CANCELLED.to_string(),
                e => e.to_string(),
            })?;
        let video = mp4.finish().map_err(|e| e.to_string())?;
        timings.insert("decode".into(), clock.elapsed().as_secs_f64() - encode_s);
        timings.insert("video_encode".into(), encode_s);
        let clock = Instant::now();
        objects.push(put("video.mp4", video)?);
        timings.insert("write".into(), clock.elapsed().as_secs_f64());
        Ok(pb::DecodeResult {
            objects,
            frame_count: frame_no as u32,
        })
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

/// A request's stitching as the model crate names it (the coordinator resolves `Unspecified`
/// before a task reaches a worker; an unknown value falls back to codenoise).
pub fn stitching_from_pb(v: i32) -> Stitching {
    match pb::Stitching::try_from(v).unwrap_or(pb::Stitching::Codenoise) {
        pb::Stitching::Independent => Stitching::Independent,
        pb::Stitching::Autoregressive => Stitching::Autoregressive,
        pb::Stitching::Codenoise | pb::Stitching::Unspecified => Stitching::Codenoise,
    }
}

/// The request's value for a strategy (the inverse of [`stitching_from_pb`]).
pub fn stitching_to_pb(mode: Stitching) -> pb::Stitching {
    match mode {
        Stitching::Codenoise => pb::Stitching::Codenoise,
        Stitching::Independent => pb::Stitching::Independent,
        Stitching::Autoregressive => pb::Stitching::Autoregressive,
    }
}
