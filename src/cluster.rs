//! The render farm as separate processes: `longtake coordinator` (a replica; with `--etcd` one
//! of several, one leading), `longtake worker`, and the client commands `submit`, `get`,
//! `watch`, `cancel` and `list`.
//!
//! Clients and workers take a list of coordinator addresses and call them in turn: a standby
//! answers UNAVAILABLE (naming the leader), a dead replica does not answer, and the call moves
//! to the next address until one leads or the client's patience (`--timeout`) runs out.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use longtake_coordinator::CoordinatorConfig;
use longtake_model::device::Placement;
use longtake_proto::v1 as pb;
use longtake_proto::v1::render_service_client::RenderServiceClient;
use longtake_proto::{AuthedChannel, Bearer};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::render::{ProgressDisplay, RequestArgs};

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to serve the public API on (`host:port`; port 0 picks a free one, printed as
    /// `listening on ADDR` on the first line of stdout). Without --worker-listen the worker API
    /// is served here too.
    #[arg(long)]
    listen: String,
    /// Address to serve the worker API on, apart from the public one (printed as `workers
    /// listening on ADDR` on the second line of stdout). The public listener then exposes only
    /// the public service (and health and reflection).
    #[arg(long)]
    worker_listen: Option<String>,
    /// PEM certificate (chain) for TLS on every listener; needs --tls-key. Clients then connect
    /// with https:// (or --ca-cert).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate: the worker listener accepts only workers with a client certificate
    /// signed by it (mutual TLS). Needs --worker-listen and --tls-cert.
    #[arg(long, requires_all = ["worker_listen", "tls_cert"])]
    worker_client_ca: Option<PathBuf>,
    /// Tenants file (JSON: names, bearer tokens, limits; reloaded when it changes). With it
    /// every public call needs a tenant's token and sees only that tenant's renders, and each
    /// tenant's outputs go under `<store>/tenants/<name>/`. Format: README, "Tenants".
    #[arg(long)]
    tenants: Option<PathBuf>,
    /// File holding the token every worker must present (`authorization: Bearer`), at least 16
    /// characters; or set LONGTAKE_CLUSTER_TOKEN.
    #[arg(long)]
    cluster_token_file: Option<PathBuf>,
    /// A model of the catalogue: `NAME=DIR` (repeatable). Requests name models by NAME (or
    /// builtin:demo, builtin:smoke); DIR must be readable here and on the workers.
    #[arg(long = "model", value_name = "NAME=DIR")]
    models: Vec<String>,
    /// Let requests name a model directory and an output location of their own (a trusted,
    /// single-user setup). Default: models only from the catalogue, outputs only under --store.
    #[arg(long)]
    allow_client_paths: bool,
    /// The largest public request accepted, in MiB (initial noise included).
    #[arg(long, default_value_t = 256)]
    max_request_mib: usize,
    /// Address for plain-HTTP `GET /metrics` (Prometheus text format) and `/healthz`.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Delete finished renders (outputs and state) this many hours after they finished.
    /// Default: keep them until `longtake delete`.
    #[arg(long)]
    retention_hours: Option<f64>,
    /// etcd endpoints, comma-separated (`127.0.0.1:2379,...`). With them the state lives in etcd
    /// and several replicas may run: one leads, the others stand by. Without: the state is in
    /// this process's memory (a single coordinator).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Prefix of every etcd key (several farms can share one etcd).
    #[arg(long, default_value = "longtake/")]
    etcd_prefix: String,
    /// Where renders are written: a directory or `s3://bucket/prefix` (objects under
    /// `jobs/<render id>/`; endpoint and credentials from the AWS_* variables and
    /// LONGTAKE_S3_ENDPOINT).
    #[arg(long)]
    store: String,
    /// The address clients and workers reach this replica at (default: the listening address).
    #[arg(long)]
    advertise: Option<String>,
    /// Seconds without a heartbeat after which a worker is dropped and its render rolled back.
    #[arg(long, default_value_t = 10.0)]
    lease_ttl: f64,
    /// Seconds of the leader's etcd lease: a dead leader is replaced within about this long.
    #[arg(long, default_value_t = 5)]
    leader_ttl: i64,
    /// Seconds a halo exchange waits for a neighbour (must cover the slowest sampler step).
    #[arg(long, default_value_t = 600.0)]
    halo_timeout: f64,
    /// Attempts per render: after this many rollbacks (workers lost) it fails.
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Workers checkpoint every window after every N sampler steps (under the render's output,
    /// `checkpoints/`, deleted once it succeeds); a rollback resumes from the last step every
    /// window has. 0 turns checkpoints off (a rollback restarts from step 0).
    #[arg(long, default_value_t = 5)]
    checkpoint_every: u32,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Coordinator addresses, comma-separated (`http://host:port` or `host:port`); every
    /// replica may be listed.
    #[arg(long, value_delimiter = ',', required = true)]
    coordinator: Vec<String>,
    /// Name in logs and manifests (default: `<host name>-<process id>`).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Tensor-parallel ranks per group: the transformer is sharded over this many GPUs (or CPU
    /// threads), and the worker registers one group per --tp GPUs of --device. Must divide the
    /// model's head count.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// The coordinator's cluster token (or set LONGTAKE_CLUSTER_TOKEN; the environment keeps it
    /// out of process listings).
    #[arg(long, env = "LONGTAKE_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    #[command(flatten)]
    tls: ClientTls,
    /// PEM client certificate for a worker listener that requires one (--worker-client-ca on
    /// the coordinator); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address for plain-HTTP `GET /metrics` (Prometheus text format) and `/healthz`.
    #[arg(long)]
    metrics_listen: Option<String>,
}

/// How a client trusts the coordinator's TLS certificate.
#[derive(Args, Clone)]
pub struct ClientTls {
    /// PEM CA certificate that signed the coordinator's certificate. With it, addresses without
    /// a scheme are https://; without it, https:// addresses are checked against the system's
    /// roots.
    #[arg(long, env = "LONGTAKE_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

/// Coordinator addresses and how long a client keeps trying them.
#[derive(Args, Clone)]
pub struct Target {
    /// Coordinator addresses, comma-separated (`http://host:port` or `host:port`); every
    /// replica may be listed.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        env = "LONGTAKE_COORDINATOR"
    )]
    coordinator: Vec<String>,
    /// Seconds to keep trying when no listed coordinator leads (a failover in progress).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// The tenant's bearer token, when the coordinator has tenants (or set LONGTAKE_TOKEN; the
    /// environment keeps it out of process listings).
    #[arg(long, env = "LONGTAKE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    request: RequestArgs,
    /// Among queued renders a higher priority starts first (then the older one).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Makes the submission safe to repeat: the same key and request give the same render
    /// (default: a fresh key, so that the command's own retries never submit twice).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Follow the render until it ends; exit 0 only if it succeeded, printing its output
    /// location.
    #[arg(long)]
    wait: bool,
    /// Print the render as JSON (with --wait: the final state) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct IdArgs {
    #[command(flatten)]
    target: Target,
    /// The render's id (the first line `submit` prints).
    render_id: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// Only renders in these states (comma-separated): queued, planning, encoding_text,
    /// denoising, decoding, succeeded, failed, cancelled.
    #[arg(long, value_delimiter = ',')]
    state: Vec<String>,
    /// Print JSON instead of text: an array of renders, or with --page-size an object
    /// `{"renders": [...], "next_page_token": "..."}`.
    #[arg(long)]
    json: bool,
    /// Print one page of at most N renders (1..=1000), newest first, instead of every render;
    /// the token for the next page follows (text: a last line `next page: TOKEN`).
    #[arg(long)]
    page_size: Option<u32>,
    /// Continue after the page that returned TOKEN (tokens stay valid on any replica).
    #[arg(long, requires = "page_size")]
    page_token: Option<String>,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `body` with the process's telemetry installed (logs on stderr; spans over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set), then flushes the spans still buffered.
fn with_telemetry(
    rt: &tokio::runtime::Runtime,
    service: &str,
    body: impl Future<Output = Result<()>>,
) -> Result<()> {
    rt.block_on(async {
        let guard = longtake_telemetry::traces::init(service);
        let result = body.await;
        let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
        result
    })
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{what}: {}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!("{what}: {} is not a PEM file", path.display());
    }
    Ok(pem)
}

/// How a client reaches the coordinators: TLS settings (when any) and the scheme of bare
/// addresses.
#[derive(Clone, Default)]
struct Connect {
    tls: Option<ClientTlsConfig>,
}

impl Connect {
    fn new(tls: &ClientTls, identity: Option<(&Path, &Path)>) -> Result<Connect> {
        let mut config = None;
        if let Some(ca) = &tls.ca_cert {
            config = Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read_pem("ca-cert", ca)?)),
            );
        }
        if let Some((cert, key)) = identity {
            let id = Identity::from_pem(read_pem("tls-cert", cert)?, read_pem("tls-key", key)?);
            config = Some(
                config
                    .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots())
                    .identity(id),
            );
        }
        Ok(Connect { tls: config })
    }

    /// `addr` as a URL: as given when it has a scheme, else https:// with TLS settings and
    /// http:// without.
    fn url(&self, addr: &str) -> String {
        if addr.contains("://") {
            addr.to_string()
        } else if self.tls.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }

    fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let e = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("coordinator: {url:?}"))?;
        let tls = match (&self.tls, url.starts_with("https://")) {
            (Some(t), true) => Some(t.clone()),
            (None, true) => Some(ClientTlsConfig::new().with_native_roots()),
            (_, false) => None,
        };
        Ok(match tls {
            Some(t) => e
                .tls_config(t)
                .with_context(|| format!("coordinator: {url:?}: TLS"))?,
            None => e,
        })
    }
}

fn bearer(what: &str, token: Option<&str>) -> Result<Bearer> {
    let token = token.filter(|t| !t.is_empty());
    if let Some(t) = token {
        longtake_coordinator::access::check_token(t).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    }
    Bearer::new(token).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

pub fn coordinator(a: &CoordinatorArgs) -> Result<()> {
    for (name, v) in [("lease-ttl", a.lease_ttl), ("halo-timeout", a.halo_timeout)] {
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            bail!("{name}: {v} is out of range; allowed: 0 < seconds <= 86400");
        }
    }
    if !(1..=3600).contains(&a.leader_ttl) {
        bail!(
            "leader-ttl: {} is out of range; allowed: 1..=3600 seconds",
            a.leader_ttl
        );
    }
    if a.max_attempts == 0 {
        bail!("max-attempts: must be at least 1");
    }
    if a.store.is_empty() {
        bail!("store: must name a directory or s3://bucket[/prefix]");
    }
    if a.store.starts_with("s3://") && a.store.len() <= 5 {
        bail!("store: {:?} must be s3://bucket[/prefix]", a.store);
    }
    let retention = match a.retention_hours {
        None => None,
        Some(h) if h.is_finite() && h > 0.0 && h <= 100_000.0 => {
            Some(Duration::from_secs_f64(h * 3600.0))
        }
        Some(h) => bail!("retention-hours: {h} is out of range; allowed: 0 < hours <= 100000"),
    };
    if !(1..=1024).contains(&a.max_request_mib) {
        bail!(
            "max-request-mib: {} is out of range; allowed: 1..=1024",
            a.max_request_mib
        );
    }
    let cluster_token = match &a.cluster_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cluster-token-file: {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LONGTAKE_CLUSTER_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    if let Some(t) = &cluster_token {
        longtake_coordinator::access::check_token(t)
            .map_err(|e| anyhow::anyhow!("cluster token: {e}"))?;
    }
    let tenants = match &a.tenants {
        Some(path) => Some(
            longtake_coordinator::access::Tenants::load(path)
                .map_err(|e| anyhow::anyhow!("tenants: {e}"))?,
        ),
        None => None,
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(longtake_coordinator::TlsSettings {
            cert_pem: read_pem("tls-cert", cert)?,
            key_pem: read_pem("tls-key", key)?,
            worker_client_ca_pem: match &a.worker_client_ca {
                Some(ca) => Some(read_pem("worker-client-ca", ca)?),
                None => None,
            },
        }),
        _ => None,
    };
    let models = crate::models::LocalModels::with_catalogue(&a.models)?;
    let config = CoordinatorConfig {
        lease_ttl: Duration::from_secs_f64(a.lease_ttl),
        halo_timeout: Duration::from_secs_f64(a.halo_timeout),
        max_attempts: a.max_attempts,
        checkpoint_every: a.checkpoint_every,
        default_output: a.store.clone(),
        jobs_prefix: "jobs".to_string(),
        models: std::sync::Arc::new(models),
        tenants: tenants.clone(),
        cluster_token: cluster_token.map(Into::into),
        client_paths: a.allow_client_paths,
        max_request_bytes: a.max_request_mib << 20,
        retention,
        ..CoordinatorConfig::default()
    };
    let rt = runtime()?;
    with_telemetry(&rt, "longtake-coordinator", async {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("listen: cannot bind {}", a.listen))?;
        let metrics = match &a.metrics_listen {
            Some(m) => Some(
                tokio::net::TcpListener::bind(m)
                    .await
                    .with_context(|| format!("metrics-listen: cannot bind {m}"))?,
            ),
            None => None,
        };
        let addr: SocketAddr = listener.local_addr()?;
        out!("listening on {addr}");
        let worker_listener = match &a.worker_listen {
            Some(w) => {
                let l = tokio::net::TcpListener::bind(w)
                    .await
                    .with_context(|| format!("worker-listen: cannot bind {w}"))?;
                out!("workers listening on {}", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if let Some(t) = &tenants {
            tracing::info!(tenants = t.table().len(), "tenants loaded");
            t.watch(Duration::from_secs(2));
        }
        let listener = longtake_coordinator::Listeners {
            public: listener,
            worker: worker_listener,
            tls,
            metrics,
        };
        if a.etcd.is_empty() {
            tracing::info!(%addr, "coordinator leading (state in memory)");
            longtake_coordinator::run(listener, terminated(), config).await?;
        } else {
            let opts = longtake_coordinator::ReplicaOptions {
                etcd: a.etcd.clone(),
                namespace: a.etcd_prefix.clone(),
                advertise: a.advertise.clone().unwrap_or_else(|| addr.to_string()),
                leader_ttl_s: a.leader_ttl,
            };
            tracing::info!(%addr, etcd = ?a.etcd, "coordinator replica starting");
            longtake_coordinator::run_replica(listener, terminated(), config, opts).await?;
        }
        Ok(())
    })
}

pub fn worker(a: &WorkerArgs) -> Result<()> {
    let name = a.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    if a.tp == 0 {
        bail!("--tp: must be at least 1 (ranks per tensor-parallel group)");
    }
    // One registration per tensor-parallel group: the CPU (its ranks are threads), or each
    // group of --tp GPUs with its own compute thread.
    let slots: Vec<(String, Vec<String>, longtake_worker::WorkerBackend)> =
        match a.device.placement()? {
            Placement::Cpu => vec![(
                name.clone(),
                vec!["cpu".into()],
                longtake_worker::WorkerBackend::Cpu { tp: a.tp },
            )],
            Placement::Cuda(ids) => {
                if ids.len() % a.tp != 0 {
                    bail!(
                        "--tp {}: the {} GPU(s) of --device do not split into groups of {}; \
                         allowed: a divisor of {}",
                        a.tp,
                        ids.len(),
                        a.tp,
                        ids.len()
                    );
                }
                let mut slots = Vec::new();
                for group in ids.chunks(a.tp) {
                    let mut gpus = a.device.open_gpus(group)?;
                    let first = gpus.remove(0);
                    let label: Vec<String> = group.iter().map(|i| i.to_string()).collect();
                    slots.push((
                        format!("{name}-gpu{}", label.join("-")),
                        group.iter().map(|i| format!("cuda:{i}")).collect(),
                        longtake_worker::WorkerBackend::Cuda(first, gpus),
                    ));
                }
                slots
            }
        };
    let connect = Connect::new(&a.tls, a.tls_cert.as_deref().zip(a.tls_key.as_deref()))?;
    let auth = bearer("cluster-token", a.cluster_token.as_deref())?;
    let urls: Vec<String> = a.coordinator.iter().map(|c| connect.url(c)).collect();
    let endpoints = urls
        .iter()
        .map(|u| connect.endpoint(u))
        .collect::<Result<Vec<_>>>()?;
    let metrics = std::sync::Arc::new(longtake_worker::WorkerMetrics::default());
    let rt = runtime()?;
    with_telemetry(&rt, "longtake-worker", async {
        if let Some(m) = &a.metrics_listen {
            let l = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("metrics-listen: cannot bind {m}"))?;
            tokio::spawn(longtake_telemetry::serve(
                l,
                std::sync::Arc::clone(&metrics.registry),
                std::sync::Arc::new(|| true),
            ));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            terminated().await;
            tracing::info!("stopping: finishing the current step, then leaving the pool");
            let _ = stop_tx.send(true);
        });
        let mut loops = Vec::new();
        for (slot_name, devices, backend) in slots {
            loops.push(tokio::spawn(worker_loop(
                urls.clone(),
                endpoints.clone(),
                longtake_worker::WorkerOptions {
                    name: slot_name,
                    backend,
                    devices,
                    capacity: 1,
                    registered: None,
                    auth: auth.clone(),
                    metrics: std::sync::Arc::clone(&metrics),
                },
                stop_rx.clone(),
            )));
        }
        for l in loops {
            let _ = l.await;
        }
        tracing::info!("worker stopped");
        Ok(())
    })
}

/// One registration's life: connect to a coordinator, register, compute until the stream ends,
/// register again (with this coordinator or the next), until `stop` turns true.
async fn worker_loop(
    urls: Vec<String>,
    endpoints: Vec<Endpoint>,
    opts: longtake_worker::WorkerOptions,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) {
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut i = 0usize;
    let mut backoff = Duration::from_millis(100);
    while !*stop_rx.borrow() {
        let u = &urls[i % urls.len()];
        let channel = match endpoints[i % urls.len()]
            .clone()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(coordinator = %u, error = %e, "cannot reach the coordinator");
                i += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(stop_rx.clone()) => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        match longtake_worker::run(channel, opts.clone(), stopped(stop_rx.clone())).await {
            Ok(longtake_worker::Exit::Shutdown) => break,
            Ok(longtake_worker::Exit::Disconnected) => {
                tracing::warn!(coordinator = %u, "disconnected; registering again");
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                let longtake_worker::WorkerError::Rpc { status, .. } = &e;
                if status.code() == tonic::Code::Unimplemented {
                    tracing::warn!(coordinator = %u, "this address serves no worker API: point workers at the coordinator's --worker-listen address; trying the next coordinator");
                } else {
                    tracing::warn!(coordinator = %u, error = %e, "not accepted; trying the next coordinator");
                }
                i += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(stop_rx.clone()) => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The coordinators a client calls, in turn, until one leads.
#[derive(Clone)]
pub(crate) struct Coordinators {
    urls: Vec<String>,
    endpoints: Vec<Endpoint>,
    auth: Bearer,
    channels: Vec<Option<Channel>>,
    current: usize,
    patience: Duration,
}

/// Whether another replica (or the same one a moment later) may answer where this one did not.
fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

impl Coordinators {
    pub(crate) fn new(t: &Target) -> Result<Self> {
        if !(t.timeout.is_finite() && t.timeout > 0.0) {
            bail!(
                "timeout: {} must be a positive number of seconds",
                t.timeout
            );
        }
        let connect = Connect::new(&t.tls, None)?;
        let urls: Vec<String> = t.coordinator.iter().map(|c| connect.url(c)).collect();
        let endpoints = urls
            .iter()
            .map(|u| connect.endpoint(u))
            .collect::<Result<Vec<_>>>()?;
        Ok(Coordinators {
            channels: vec![None; urls.len()],
            auth: bearer("token", t.token.as_deref())?,
            endpoints,
            urls,
            current: 0,
            patience: Duration::from_secs_f64(t.timeout),
        })
    }

    fn client(&mut self) -> RenderServiceClient<AuthedChannel> {
        let i = self.current;
        let channel = self.channels[i]
            .get_or_insert_with(|| {
                self.endpoints[i]
                    .clone()
                    .connect_timeout(Duration::from_secs(2))
                    .connect_lazy()
            })
            .clone();
        RenderServiceClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(longtake_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(longtake_proto::MAX_MESSAGE_BYTES)
    }

    /// Call `f` on the coordinators in turn until one answers with something other than
    /// UNAVAILABLE, or the patience runs out.
    pub(crate) async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(RenderServiceClient<AuthedChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.patience;
        let mut tried = 0usize;
        loop {
            match f(self.client()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if retryable(&s) && Instant::now() < deadline => {
                    tracing::debug!(coordinator = %self.urls[self.current], error = %s.message(), "trying the next coordinator");
                    self.current = (self.current + 1) % self.urls.len();
                    tried += 1;
                    if tried.is_multiple_of(self.urls.len()) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                Err(s) => return Err(s),
            }
        }
    }
}

/// A coordinator's error for people: the message, then the machine-readable reason and whether
/// a retry can help (from the rich error details, when the server sent them).
fn status_error(s: tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    match s.get_error_details().error_info() {
        Some(info) => {
            let retry = if info.metadata.get("retryable").is_some_and(|r| r == "true") {
                "retrying may help"
            } else {
                "retrying will not help"
            };
            anyhow::anyhow!("{} ({}; {retry})", s.message(), info.reason)
        }
        None => anyhow::anyhow!("{} ({:?})", s.message(), s.code()),
    }
}

pub(crate) fn state_name(state: i32) -> String {
    pb::RenderState::try_from(state)
        .unwrap_or(pb::RenderState::Unspecified)
        .as_str_name()
        .trim_start_matches("RENDER_STATE_")
        .to_lowercase()
}

fn parse_state(s: &str) -> Result<pb::RenderState> {
    let name = format!("RENDER_STATE_{}", s.trim().to_uppercase());
    match pb::RenderState::from_str_name(&name) {
        Some(st) if st != pb::RenderState::Unspecified => Ok(st),
        _ => bail!(
            "state: {s:?} is not a render state; allowed: queued, planning, encoding_text, \
             denoising, decoding, succeeded, failed, cancelled"
        ),
    }
}

fn rfc3339(t: &Option<prost_types::Timestamp>) -> serde_json::Value {
    match t {
        Some(t) => json!(format!("{}.{:03}", t.seconds, t.nanos / 1_000_000)),
        None => serde_json::Value::Null,
    }
}

/// A render as JSON for scripts (the proto's field names; timestamps as Unix seconds).
fn render_json(r: &pb::Render) -> serde_json::Value {
    let spec = r.spec.clone().unwrap_or_default();
    let p = r.progress.clone().unwrap_or_default();
    let length = match spec.length {
        Some(pb::render_spec::Length::DurationS(d)) => json!({ "duration_s": d }),
        Some(pb::render_spec::Length::NumFrames(n)) => json!({ "num_frames": n }),
        None => json!({}),
    };
    json!({
        "id": r.id,
        "state": state_name(r.state),
        "error": r.error,
        "output_uri": r.output_uri,
        "idempotency_key": r.idempotency_key,
        "spec": {
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "length": length,
            "fps": spec.fps,
            "width": spec.width,
            "height": spec.height,
            "seed": spec.seed,
            "steps": spec.steps,
            "guidance": spec.guidance,
            "flow_shift": spec.flow_shift,
            "model": spec.model,
            "stitching": pb::Stitching::try_from(spec.stitching)
                .unwrap_or(pb::Stitching::Unspecified)
                .as_str_name()
                .trim_start_matches("STITCHING_")
                .to_lowercase(),
            "window": spec.window,
            "overlap": spec.overlap,
            "output": spec.output,
            "png_frames": spec.png_frames,
            "priority": spec.priority,
            "has_initial_noise": r.has_initial_noise,
        },
        "plan": r.plan.as_ref().map(|p| json!({
            "num_frames": p.num_frames,
            "latent_frames": p.latent_frames,
            "windows": p.windows.iter().map(|w| [w.start, w.len]).collect::<Vec<_>>(),
        })),
        "progress": {
            "phase": state_name(p.phase),
            "window_steps_done": p.window_steps_done,
            "window_steps_total": p.window_steps_total,
            "frames_done": p.frames_done,
            "frames_total": p.frames_total,
            "message": p.message,
        },
        "created_at": rfc3339(&r.created_at),
        "started_at": rfc3339(&r.started_at),
        "finished_at": rfc3339(&r.finished_at),
    })
}

fn print_render(r: &pb::Render, as_json: bool) {
    if as_json {
        out!("{}", render_json(r));
        return;
    }
    let p = r.progress.clone().unwrap_or_default();
    out!("{}", r.id);
    out!("state:    {}", state_name(r.state));
    out!(
        "prompt:   {}",
        r.spec.as_ref().map(|s| s.prompt.as_str()).unwrap_or("")
    );
    out!(
        "progress: {}/{} window-steps, {}/{} frames",
        p.window_steps_done,
        p.window_steps_total,
        p.frames_done,
        p.frames_total
    );
    if !p.message.is_empty() {
        out!("message:  {}", p.message);
    }
    if !r.error.is_empty() {
        out!("error:    {}", r.error);
    }
    out!("output:   {}", r.output_uri);
}

pub(crate) fn terminal(state: i32) -> bool {
    matches!(
        pb::RenderState::try_from(state),
        Ok(pb::RenderState::Succeeded | pb::RenderState::Failed | pb::RenderState::Cancelled)
    )
}

/// Follow render `id` until it ends, across dropped streams and coordinator failovers; each
/// snapshot goes to `on_event`. Returns the final state.
async fn follow(
    coords: &mut Coordinators,
    id: &str,
    mut on_event: impl FnMut(&pb::Render),
) -> Result<pb::Render> {
    let mut last: Option<pb::Render> = None;
    let mut after = 0u64;
    loop {
        let mut stream = coords
            .call(|mut c| {
                let req = pb::WatchRenderRequest {
                    render_id: id.to_string(),
                    after_sequence: after,
                };
                async move { c.watch_render(req).await }
            })
            .await
            .map_err(status_error)?;
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    after = after.max(ev.sequence);
                    if let Some(r) = ev.render {
                        on_event(&r);
                        let done = terminal(r.state);
                        last = Some(r);
                        if done {
                            return Ok(last.expect("just set"));
                        }
                    }
                }
                Ok(None) => break,
                Err(s) if retryable(&s) => {
                    tracing::debug!(error = %s.message(), "watch interrupted; resuming");
                    break;
                }
                Err(s) => return Err(status_error(s)),
            }
        }
        if let Some(r) = &last
            && terminal(r.state)
        {
            return Ok(r.clone());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn submit(a: &SubmitArgs) -> Result<()> {
    let mut spec = a.request.spec(false)?;
    spec.priority = a.priority;
    let key = a
        .idempotency_key
        .clone()
        .unwrap_or_else(|| format!("cli-{}", uuid_like()));
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let resp = coords
            .call(|mut c| {
                let req = pb::SubmitRenderRequest {
                    spec: Some(spec.clone()),
                    idempotency_key: key.clone(),
                };
                async move { c.submit_render(req).await }
            })
            .await
            .map_err(status_error)?;
        let id = resp.render_id;
        if !a.json || !a.wait {
            if a.json {
                out!("{}", json!({ "render_id": id, "created": resp.created }));
            } else {
                out!("{id}");
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if !a.wait {
            return Ok(());
        }
        let mut display = ProgressDisplay::new();
        let last = follow(&mut coords, &id, |r| display.show(r)).await?;
        display.finish();
        if a.json {
            out!("{}", render_json(&last));
        }
        if last.state != pb::RenderState::Succeeded as i32 {
            bail!("render {id} {}: {}", state_name(last.state), last.error);
        }
        if !a.json {
            out!("{}", last.output_uri);
        }
        Ok(())
    })
}

fn uuid_like() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

pub fn get(a: &IdArgs) -> Result<()> {
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let r = coords
            .call(|mut c| {
                let id = a.render_id.clone();
                async move { c.get_render(pb::GetRenderRequest { render_id: id }).await }
            })
            .await
            .map_err(status_error)?;
        print_render(&r, a.json);
        Ok(())
    })
}

pub fn watch(a: &IdArgs) -> Result<()> {
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let mut display = ProgressDisplay::new();
        let last = follow(&mut coords, &a.render_id, |r| {
            if a.json {
                out!("{}", render_json(r));
            } else {
                display.show(r);
            }
        })
        .await?;
        display.finish();
        if !a.json {
            print_render(&last, false);
        }
        if last.state != pb::RenderState::Succeeded as i32 {
            bail!(
                "render {} {}: {}",
                last.id,
                state_name(last.state),
                last.error
            );
        }
        Ok(())
    })
}

pub fn cancel(a: &IdArgs) -> Result<()> {
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let r = coords
            .call(|mut c| {
                let id = a.render_id.clone();
                async move {
                    c.cancel_render(pb::CancelRenderRequest { render_id: id })
                        .await
                }
            })
            .await
            .map_err(status_error)?;
        print_render(&r, a.json);
        Ok(())
    })
}

pub fn delete(a: &IdArgs) -> Result<()> {
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let r = coords
            .call(|mut c| {
                let id = a.render_id.clone();
                async move {
                    c.delete_render(pb::DeleteRenderRequest { render_id: id })
                        .await
                }
            })
            .await
            .map_err(status_error)?;
        if a.json {
            out!(
                "{}",
                json!({"render_id": a.render_id, "objects_deleted": r.objects_deleted})
            );
        } else {
            out!("deleted {} ({} objects)", a.render_id, r.objects_deleted);
        }
        Ok(())
    })
}

pub fn list(a: &ListArgs) -> Result<()> {
    let states: Vec<i32> = a
        .state
        .iter()
        .map(|s| parse_state(s).map(|st| st as i32))
        .collect::<Result<_>>()?;
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let mut all = Vec::new();
        let mut token = a.page_token.clone().unwrap_or_default();
        let next = loop {
            let page = coords
                .call(|mut c| {
                    let req = pb::ListRendersRequest {
                        page_size: a.page_size.unwrap_or(500),
                        page_token: token.clone(),
                        states: states.clone(),
                    };
                    async move { c.list_renders(req).await }
                })
                .await
                .map_err(status_error)?;
            all.extend(page.renders);
            if page.next_page_token.is_empty() || a.page_size.is_some() {
                break page.next_page_token;
            }
            token = page.next_page_token;
        };
        if a.json {
            let v: Vec<serde_json::Value> = all.iter().map(render_json).collect();
            if a.page_size.is_some() {
                out!(
                    "{}",
                    serde_json::json!({"renders": v, "next_page_token": next})
                );
            } else {
                out!("{}", serde_json::Value::Array(v));
            }
        } else {
            for r in &all {
                let p = r.progress.clone().unwrap_or_default();
                out!(
                    "{}  {:<13} {:>6}/{:<6} {}",
                    r.id,
                    state_name(r.state),
                    p.window_steps_done,
                    p.window_steps_total,
                    r.spec.as_ref().map(|s| s.prompt.as_str()).unwrap_or("")
                );
            }
            if a.page_size.is_some() && !next.is_empty() {
                out!("next page: {next}");
            }
        }
        Ok(())
    })
}
