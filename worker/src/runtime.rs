//! The worker process: register with the coordinator, keep the lease alive, pull tasks, and hand
//! them to a dedicated compute thread (`crate::compute`: model code is synchronous CPU or GPU work
//! and must not block the async runtime; gRPC calls made from the compute thread go through the
//! runtime's handle).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use longtake_model::backend::cpu::Cpu;
use longtake_model::backend::cuda::Cuda;
use longtake_model::backend::cuda::nccl::NcclComm;
use longtake_model::comm::{Comm, ThreadComm};
use longtake_model::noise::NoiseLayout;
use longtake_model::window::Stitching;
use longtake_proto::v1 as pb;
use longtake_proto::v1::worker_service_client::WorkerServiceClient;
use longtake_telemetry::{Counter, Family, Histogram, Registry, SECONDS};
use tokio::runtime::Handle;
use tonic::transport::Channel;

use crate::compute::Compute;

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

/// Communicators for a worker's tensor-parallel group, one per rank.
pub(crate) type MakeComms<B> = fn(&[B]) -> longtake_model::Result<Vec<Box<dyn Comm<B>>>>;

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
    pub(crate) window_steps: Arc<Counter>,
    pub(crate) step_seconds: Arc<Histogram>,
    pub(crate) checkpoint_bytes: Arc<Counter>,
    pub(crate) checkpoint_seconds: Arc<Histogram>,
    pub(crate) halo_seconds: Arc<Histogram>,
    pub(crate) tasks: Arc<Family<Counter>>,
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

pub(crate) type Client =
    WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, Calls>>;

/// What every call to the coordinator carries: the cluster token, and the `traceparent` of
/// the span it is made in (so the coordinator's span for it joins the render's trace).
#[derive(Clone)]
pub(crate) struct Calls {
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
pub(crate) type CancelFlags = std::sync::Mutex<HashMap<(String, u64), Arc<AtomicBool>>>;

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
pub(crate) fn flag(map: &CancelFlags, render: &str, epoch: u64) -> Arc<AtomicBool> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(m.entry((render.to_string(), epoch)).or_default())
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

/// A request's noise layout as the model crate names it (resolved by the coordinator; an
/// unknown value falls back to independent noise).
pub fn noise_layout_from_pb(v: i32) -> NoiseLayout {
    match pb::NoiseLayout::try_from(v).unwrap_or(pb::NoiseLayout::Independent) {
        pb::NoiseLayout::Rescheduled => NoiseLayout::Rescheduled,
        pb::NoiseLayout::Independent | pb::NoiseLayout::Unspecified => NoiseLayout::Independent,
    }
}

/// The request's value for a noise layout (the inverse of [`noise_layout_from_pb`]).
pub fn noise_layout_to_pb(layout: NoiseLayout) -> pb::NoiseLayout {
    match layout {
        NoiseLayout::Independent => pb::NoiseLayout::Independent,
        NoiseLayout::Rescheduled => pb::NoiseLayout::Rescheduled,
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
