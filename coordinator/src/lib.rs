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
//! [`run`] serves the public RenderService and the WorkerService, each with gRPC health
//! checking and server reflection, until `shutdown` resolves (mini-redis shape: the caller
//! binds, tests use port 0): on one listener, or on two ([`Listeners::worker`]) so that the
//! public one exposes only public services; with TLS when [`Listeners::tls`] is set. Access
//! (tenant tokens, the cluster token) is checked by [`access`]. [`serve`] does the same for a
//! [`Coordinator`] built by the caller.
//!
//! Clients are the generated ones in `longtake_proto::v1`:
//! `render_service_client::RenderServiceClient` (studios, the CLI) and
//! `worker_service_client::WorkerServiceClient` (workers). Both must raise their message size
//! limits to [`longtake_proto::MAX_MESSAGE_BYTES`].

pub mod access;
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
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

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
    /// Tenants and their tokens: the public API then needs a tenant's token, and each tenant
    /// sees only its own renders. `None`: an open API.
    pub tenants: Option<Arc<access::Tenants>>,
    /// The token every worker call must carry. `None`: none needed (workers on a trusted
    /// network, or checked by client certificates).
    pub cluster_token: Option<Arc<str>>,
    /// Whether a request may name a model directory and an output location. Otherwise models
    /// come from the catalogue by name and outputs go under `default_output` (per tenant).
    pub client_paths: bool,
    /// The largest public request accepted, in bytes (initial noise included).
    pub max_request_bytes: usize,
    /// Finished renders (their outputs and records) are deleted this long after they finished.
    /// `None`: kept until DeleteRender.
    pub retention: Option<Duration>,
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
            tenants: None,
            cluster_token: None,
            client_paths: true,
            max_request_bytes: longtake_proto::MAX_MESSAGE_BYTES,
            retention: None,
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
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()>,
    config: CoordinatorConfig,
    opts: ReplicaOptions,
) -> Result<(), CoordinatorError> {
    let client = etcd::Etcd::connect(&opts.etcd, &opts.namespace)?;
    let store = etcd::EtcdStore::new(client.clone());
    let coordinator = Coordinator::standby(config, Arc::new(store.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(coordinator.clone(), listeners.into(), async {
        let _ = stop_rx.await;
    }));
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
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()>,
    config: CoordinatorConfig,
) -> Result<(), CoordinatorError> {
    let coordinator = Coordinator::new(config, Arc::new(store::MemoryStore::new()));
    serve(coordinator, listeners.into(), shutdown).await
}

/// Where a coordinator serves: the public API's listener, the worker API's (`None`: the public
/// one serves both), and TLS.
pub struct Listeners {
    pub public: TcpListener,
    pub worker: Option<TcpListener>,
    pub tls: Option<TlsSettings>,
    /// Plain HTTP `GET /metrics` (Prometheus text format) and `/healthz`.
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(public: TcpListener) -> Self {
        Listeners {
            public,
            worker: None,
            tls: None,
            metrics: None,
        }
    }
}

/// The server's certificate and key (PEM), and optionally the CA whose client certificates the
/// worker listener requires.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub worker_client_ca_pem: Option<Vec<u8>>,
}

impl TlsSettings {
    fn server_config(&self, client_ca: bool) -> ServerTlsConfig {
        let mut c =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if client_ca && let Some(ca) = &self.worker_client_ca_pem {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        c
    }
}

/// gRPC health and reflection naming only `services`.
async fn health_and_reflection(
    services: &[&str],
) -> Result<
    (
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
    ),
    CoordinatorError,
> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(longtake_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for s in services {
        health
            .set_service_status(*s, tonic_health::ServingStatus::Serving)
            .await;
        reflection = reflection.with_service_name(*s);
    }
    Ok((health_service, reflection.build_v1()?))
}

const RENDER_SERVICE: &str = "longtake.v1.RenderService";
const WORKER_SERVICE: &str = "longtake.v1.WorkerService";

/// Serve the coordinator until `shutdown` resolves: the public RenderService (checked by
/// [`access::PublicAuth`]) and the WorkerService (checked by [`access::WorkerAuth`]), on one
/// listener or two, each with health and reflection naming only what it serves.
pub async fn serve(
    coordinator: Coordinator,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let config = coordinator.config().clone();
    let max = longtake_proto::MAX_MESSAGE_BYTES;
    let metrics = listeners.metrics.map(|l| {
        let c = coordinator.clone();
        tokio::spawn(longtake_telemetry::serve(
            l,
            coordinator.metrics(),
            Arc::new(move || c.is_leading()),
        ))
    });
    let public_auth = access::PublicAuth {
        tenants: config.tenants.clone(),
    };
    let worker_auth = access::WorkerAuth {
        cluster_token: config.cluster_token.clone(),
    };
    let render = InterceptedService::new(
        RenderServiceServer::new(coordinator.clone())
            .max_decoding_message_size(config.max_request_bytes)
            .max_encoding_message_size(max),
        public_auth,
    );
    let worker = InterceptedService::new(
        WorkerServiceServer::new(coordinator.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        worker_auth,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let closing = coordinator.clone();
    let signal = async move {
        shutdown.await;
        closing.close();
        let _ = stop_tx.send(true);
    };
    let builder = |tls: Option<ServerTlsConfig>| -> Result<Server, CoordinatorError> {
        let b = Server::builder();
        Ok(match tls {
            Some(t) => b.tls_config(t)?,
            None => b,
        })
    };
    let tls = listeners.tls.as_ref();
    match listeners.worker {
        None => {
            let (health, reflection) =
                health_and_reflection(&[RENDER_SERVICE, WORKER_SERVICE]).await?;
            let public = builder(tls.map(|t| t.server_config(false)))?
                .add_service(health)
                .add_service(reflection)
                .add_service(render)
                .add_service(worker)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listeners.public).with_nodelay(Some(true)),
                    stopped(),
                );
            tokio::join!(signal, public).1?;
        }
        Some(worker_listener) => {
            let (health, reflection) = health_and_reflection(&[RENDER_SERVICE]).await?;
            let public = builder(tls.map(|t| t.server_config(false)))?
                .add_service(health)
                .add_service(reflection)
                .add_service(render)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listeners.public).with_nodelay(Some(true)),
                    stopped(),
                );
            let (health, reflection) = health_and_reflection(&[WORKER_SERVICE]).await?;
            let workers = builder(tls.map(|t| t.server_config(true)))?
                .add_service(health)
                .add_service(reflection)
                .add_service(worker)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(worker_listener).with_nodelay(Some(true)),
                    stopped(),
                );
            let (_, p, w) = tokio::join!(signal, public, workers);
            p?;
            w?;
        }
    }
    if let Some(m) = metrics {
        m.abort();
    }
    Ok(())
}
