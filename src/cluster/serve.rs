//! The processes: `longtake coordinator` (a replica; with `--etcd` one of several, one leading)
//! and `longtake worker` (one registration per tensor-parallel group, re-registering with the
//! next coordinator when one goes away).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use longtake_coordinator::CoordinatorConfig;
use longtake_model::device::Placement;
use tonic::transport::Endpoint;

use super::{ClientTls, Connect, bearer, read_pem, runtime};

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
