//! The render farm as separate processes: `longtake coordinator` (a replica; with `--etcd` one
//! of several, one leading), `longtake worker`, and the client commands `submit`, `get`,
//! `watch`, `cancel` and `list`.
//!
//! Clients and workers take a list of coordinator addresses and call them in turn: a standby
//! answers UNAVAILABLE (naming the leader), a dead replica does not answer, and the call moves
//! to the next address until one leads or the client's patience (`--timeout`) runs out.
//!
//! - [`serve`]: the processes, `coordinator` and `worker`.
//! - [`client`]: the client commands.
//!
//! This module holds what both sides share: how to reach the coordinators (addresses, TLS,
//! bearer tokens, the failover loop of [`Coordinators`]) and the async runtime.

mod client;
mod serve;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use longtake_proto::v1::render_service_client::RenderServiceClient;
use longtake_proto::{AuthedChannel, Bearer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use client::{IdArgs, ListArgs, SubmitArgs, cancel, delete, get, list, submit, watch};
pub(crate) use client::{state_name, terminal};
pub use serve::{CoordinatorArgs, WorkerArgs, coordinator, worker};

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

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
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
