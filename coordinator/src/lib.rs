//! longtake-coordinator: the gRPC API, request validation, window planning, scheduling, job state
//! and output assembly. It depends on `longtake-proto` only and never links the model.
//!
//! # Layout
//!
//! - [`plan`]: the window plan and fusion weights (pure).
//! - [`validate`]: SubmitRender validation and defaults (pure).
//! - [`assemble`]: splitting windows over workers, halo partners, fusing the windows' latents
//!   (pure).
//! - [`store`]: the [`JobStore`](store::JobStore) trait, the embedded in-memory store and the
//!   versioned job record.
//! - [`etcd`]: the etcd-backed store (writes fenced by the leader key) and leader election.
//! - [`errors`]: the rich gRPC error details (reason, field, retryable) every error carries.
//! - `events`: each render's event log (sequence numbers, resumable watches).
//! - [`output`]: opening an output location (local directory or S3) and writing `manifest.json`.
//! - [`service`]: the [`Coordinator`]: live state, scheduling, and the `RenderService` and
//!   `WorkerService` implementations.
//!
//! # Serving
//!
//! [`run`] serves both services plus gRPC health checking and server reflection on one
//! listener until `shutdown` resolves (mini-redis shape: the caller binds, tests use port 0).
//! [`serve`] does the same over any incoming connection stream (an in-process duplex transport,
//! a simulated network), with a [`Coordinator`] built by the caller.
//!
//! Clients are the generated ones in `longtake_proto::v1`:
//! `render_service_client::RenderServiceClient` (studios, the CLI) and
//! `worker_service_client::WorkerServiceClient` (workers). Both must raise their message size
//! limits to [`longtake_proto::MAX_MESSAGE_BYTES`].

pub mod assemble;
pub mod errors;
pub mod etcd;
mod events;
pub mod geometry;
pub use longtake_objects as output;
pub mod plan;
pub mod service;
pub mod store;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use longtake_proto::v1::render_service_server::RenderServiceServer;
use longtake_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpIncoming};

pub use service::Coordinator;
pub use validate::Limits;

/// Everything a coordinator needs besides its listener.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Request limits (duration, frames, window).
    pub limits: Limits,
    /// What each model is (geometry, native window, defaults), asked at every SubmitRender.
    pub models: std::sync::Arc<dyn geometry::ModelCatalog>,
    /// A worker that sends no heartbeat for this long is dropped, and the render it works on is
    /// rolled back and started again on the workers left.
    pub lease_ttl: Duration,
    /// A render rolled back this many times (workers lost) fails instead of starting again.
    pub max_attempts: u32,
    /// Workers checkpoint every window after every this many sampler steps (0: never); a
    /// rollback resumes from the last step every window has a checkpoint of.
    pub checkpoint_every: u32,
    /// How long an ExchangeHalo call waits for its neighbours' parts before DEADLINE_EXCEEDED.
    /// It must cover the slowest worker's sampler step.
    pub halo_timeout: Duration,
    /// The output of a render whose spec names none: a local directory or `s3://bucket/prefix`.
    /// Empty: every request must name one.
    pub default_output: String,
    /// Renders write under `<output>/<jobs_prefix>/<render id>/`. Empty: directly under
    /// `<output>/<render id>/`.
    pub jobs_prefix: String,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            limits: Limits::default(),
            models: std::sync::Arc::new(geometry::Wan21Catalog),
            lease_ttl: Duration::from_secs(10),
            max_attempts: 5,
            checkpoint_every: 0,
            halo_timeout: Duration::from_secs(600),
            default_output: "renders".to_string(),
            jobs_prefix: "jobs".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("state store: {0}")]
    Store(#[from] store::StoreError),
    /// This replica lost its leadership (its lease lapsed or a newer leader fenced it off).
    #[error("deposed: {0}")]
    Deposed(String),
}

/// How a replica joins the control plane in etcd.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// etcd endpoints (`host:port` or `http://host:port`).
    pub etcd: Vec<String>,
    /// Every key goes under this prefix.
    pub namespace: String,
    /// The address clients and workers can reach this replica at; standbys name it in their
    /// redirections.
    pub advertise: String,
    /// The leader lease's TTL in seconds: a dead leader is replaced within about this long.
    pub leader_ttl_s: i64,
}

/// Serve one coordinator replica on `listener` with its state in etcd, until `shutdown`
/// resolves: it stands by (refusing calls with UNAVAILABLE and the leader's address) until it
/// wins the election, then reads the state back from etcd, requeues the renders that were
/// running and leads. Returns [`CoordinatorError::Deposed`] if it loses the leadership (the
/// process should exit and be restarted as a standby); on `shutdown` it resigns, so a standby
/// takes over at once.
pub async fn run_replica(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    config: CoordinatorConfig,
    opts: ReplicaOptions,
) -> Result<(), CoordinatorError> {
    let client = etcd::Etcd::connect(&opts.etcd, &opts.namespace)?;
    let store = etcd::EtcdStore::new(client.clone());
    let coordinator = Coordinator::standby(config, Arc::new(store.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        coordinator.clone(),
        TcpIncoming::from(listener),
        async {
            let _ = stop_rx.await;
        },
    ));
    tokio::pin!(shutdown);
    let hint = coordinator.clone();
    let elected = tokio::select! {
        l = etcd::campaign(&client, "leader", &opts.advertise, opts.leader_ttl_s, |leader| {
            hint.set_leader_hint(leader)
        }) => Some(l),
        _ = &mut shutdown => None,
    };
    let outcome = match elected {
        None => Ok(()),
        Some(leadership) => {
            store.fence_with(&leadership);
            let epoch_base = (leadership.term.max(0) as u64) << 20;
            let mut lost = leadership.lost.clone();
            let mut deposed = coordinator.deposed();
            let taken = loop {
                tokio::select! {
                    r = coordinator.take_over(epoch_base) => match r {
                        Ok(n) => break Ok(n),
                        Err(store::StoreError::Unavailable(e)) => {
                            tracing::warn!(error = %e, "reading the state back failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => break Err(e),
                    },
                    _ = &mut shutdown => break Ok(0),
                }
            };
            match taken {
                Err(e) => Err(CoordinatorError::Store(e)),
                Ok(_) => {
                    tracing::info!(term = leadership.term, address = %opts.advertise, "elected leader");
                    tokio::select! {
                        _ = &mut shutdown => {
                            leadership.resign(&client).await;
                            Ok(())
                        }
                        _ = lost.wait_for(|l| *l) => Err(CoordinatorError::Deposed(
                            "the leader lease lapsed".into(),
                        )),
                        _ = deposed.wait_for(|d| *d) => Err(CoordinatorError::Deposed(
                            "a newer leader fenced off this replica's writes".into(),
                        )),
                    }
                }
            }
        }
    };
    if outcome.is_err() {
        coordinator.step_down();
    }
    let _ = stop_tx.send(());
    match server.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "the gRPC server task failed"),
    }
    outcome
}

/// Serve a new coordinator (embedded in-memory job store) on `listener` until `shutdown`
/// resolves: `RenderService`, `WorkerService`, `grpc.health.v1.Health` and
/// `grpc.reflection.v1.ServerReflection`.
pub async fn run(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    config: CoordinatorConfig,
) -> Result<(), CoordinatorError> {
    let coordinator = Coordinator::new(config, Arc::new(store::MemoryStore::new()));
    serve(coordinator, TcpIncoming::from(listener), shutdown).await
}

/// Serve `coordinator` over `incoming` connections until `shutdown` resolves. On shutdown, open
/// task and watch streams are ended and halo waits fail with UNAVAILABLE, so that in-flight calls
/// finish and the server stops.
pub async fn serve<I, IO, IE>(
    coordinator: Coordinator,
    incoming: I,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = longtake_proto::MAX_MESSAGE_BYTES;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RenderServiceServer<Coordinator>>()
        .await;
    health
        .set_serving::<WorkerServiceServer<Coordinator>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(longtake_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let closing = coordinator.clone();
    let signal = async move {
        shutdown.await;
        closing.close();
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            RenderServiceServer::new(coordinator.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            WorkerServiceServer::new(coordinator)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, signal)
        .await?;
    Ok(())
}
