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
pub mod output;
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
    /// A worker that sends no heartbeat for this long is dropped, and the render it works on
    /// fails.
    pub lease_ttl: Duration,
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
            lease_ttl: Duration::from_secs(10),
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
