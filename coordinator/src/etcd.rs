//! etcd as the coordinator's source of truth: [`EtcdStore`], a [`JobStore`] whose writes are
//! fenced by the leader key, and [`campaign`], leader election on an etcd lease.
//!
//! It speaks etcd's v3 gRPC API (KV and Lease) through the clients in
//! `longtake_proto::etcd`. Every key lives under a namespace prefix (`longtake/` by default), so
//! several farms can share one etcd.
//!
//! # Leadership and fencing
//!
//! A candidate creates the leader key `<ns>leader` in a transaction that succeeds only if the key
//! does not exist, attached to a lease it keeps alive. The key's create revision is the leader's
//! term: every later write of that leader is a transaction that first compares the leader key's
//! create revision with its term, so once the lease lapses (and another candidate creates the
//! key anew, at a higher revision) a deposed leader's writes fail with
//! [`StoreError::Fenced`]. Terms grow with every election; the coordinator derives its
//! assignment epochs from them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ep::kv_client::KvClient;
use ep::lease_client::LeaseClient;
use longtake_proto::etcd as ep;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

use crate::store::{JobStore, StoreError, StoreFuture, Versioned};

/// A connection to an etcd cluster (any of its endpoints).
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    namespace: String,
    endpoints: String,
}

fn unavailable(what: &str, endpoints: &str, status: tonic::Status) -> StoreError {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            StoreError::Rejected(format!("etcd {what}: {}", status.message()))
        }
        _ => StoreError::Unavailable(format!("etcd at {endpoints}: {what}: {}", status.message())),
    }
}

/// The first key after every key that starts with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn put_op(key: Vec<u8>, value: Vec<u8>, lease: i64) -> ep::RequestOp {
    ep::RequestOp {
        request: Some(ep::request_op::Request::RequestPut(ep::PutRequest {
            key,
            value,
            lease,
            prev_kv: false,
        })),
    }
}

fn delete_op(key: Vec<u8>) -> ep::RequestOp {
    ep::RequestOp {
        request: Some(ep::request_op::Request::RequestDeleteRange(
            ep::DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

fn range_op(key: Vec<u8>) -> ep::RequestOp {
    ep::RequestOp {
        request: Some(ep::request_op::Request::RequestRange(ep::RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

fn compare(key: Vec<u8>, target: ep::compare::CompareTarget, value: i64) -> ep::Compare {
    use ep::compare::TargetUnion;
    let union = match target {
        ep::compare::CompareTarget::Create => TargetUnion::CreateRevision(value),
        ep::compare::CompareTarget::Mod => TargetUnion::ModRevision(value),
        _ => TargetUnion::Version(value),
    };
    ep::Compare {
        result: ep::compare::CompareResult::Equal as i32,
        target: target as i32,
        key,
        target_union: Some(union),
    }
}

/// The key-values of the `i`-th response of a transaction that ran range operations.
fn ranged(resp: &ep::TxnResponse, i: usize) -> Option<&ep::KeyValue> {
    match resp.responses.get(i)?.response.as_ref()? {
        ep::response_op::Response::ResponseRange(r) => r.kvs.first(),
        _ => None,
    }
}

impl Etcd {
    /// Connect lazily to `endpoints` (`http://host:port`, or `host:port`); keys go under
    /// `namespace`. Calls time out after 5 s, so an unreachable etcd is an error, not a hang.
    pub fn connect(endpoints: &[String], namespace: &str) -> Result<Etcd, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Rejected("etcd: no endpoint given".into()));
        }
        let mut list = Vec::new();
        for e in endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            let ep = Endpoint::from_shared(url.clone())
                .map_err(|err| StoreError::Rejected(format!("etcd endpoint {e:?}: {err}")))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5));
            list.push(ep);
        }
        let channel = Channel::balance_list(list.into_iter());
        Ok(Etcd {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            lease: LeaseClient::new(channel),
            namespace: namespace.to_string(),
            endpoints: endpoints.join(","),
        })
    }

    fn key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.namespace).into_bytes()
    }

    async fn txn(&self, what: &str, req: ep::TxnRequest) -> Result<ep::TxnResponse, StoreError> {
        self.kv
            .clone()
            .txn(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| unavailable(what, &self.endpoints, s))
    }

    async fn range(
        &self,
        what: &str,
        req: ep::RangeRequest,
    ) -> Result<ep::RangeResponse, StoreError> {
        self.kv
            .clone()
            .range(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| unavailable(what, &self.endpoints, s))
    }

    /// The value of `key` (under the namespace), if any.
    pub async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self
            .range(
                "get",
                ep::RangeRequest {
                    key: self.key(key),
                    ..Default::default()
                },
            )
            .await?;
        Ok(resp.kvs.into_iter().next().map(|kv| kv.value))
    }
}

/// Keys per page when listing.
const LIST_PAGE: i64 = 256;

/// The fence of a leader: its leader key and the term (create revision) it holds it at.
#[derive(Debug, Clone)]
struct Fence {
    key: Vec<u8>,
    term: i64,
}

/// A [`JobStore`] in etcd. Once fenced ([`EtcdStore::fence_with`], a leader's store), every
/// write is conditional on the leader key still being the one this leader created.
#[derive(Clone)]
pub struct EtcdStore {
    etcd: Etcd,
    fence: Arc<OnceLock<Fence>>,
}

impl EtcdStore {
    /// An unfenced store (a standby, which writes nothing; tools; tests).
    pub fn new(etcd: Etcd) -> Self {
        EtcdStore {
            etcd,
            fence: Arc::default(),
        }
    }

    /// Fence every later write (of every clone) by `leadership`: they fail once it is lost.
    /// The first fence stays.
    pub fn fence_with(&self, leadership: &Leadership) {
        let _ = self.fence.set(Fence {
            key: self.etcd.key(&leadership.key),
            term: leadership.term,
        });
    }

    /// Put `value` (or delete the key when `None`), fenced, and compared with `expected` when
    /// given.
    async fn write(
        &self,
        key: &str,
        expected: Option<Option<u64>>,
        value: Option<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        let k = self.etcd.key(key);
        let fence = self.fence.get();
        let mut compares = Vec::new();
        if let Some(f) = fence {
            compares.push(compare(
                f.key.clone(),
                ep::compare::CompareTarget::Create,
                f.term,
            ));
        }
        if let Some(expected) = expected {
            compares.push(match expected {
                None => compare(k.clone(), ep::compare::CompareTarget::Create, 0),
                Some(rev) => compare(k.clone(), ep::compare::CompareTarget::Mod, rev as i64),
            });
        }
        let mut failure = vec![range_op(k.clone())];
        if let Some(f) = fence {
            failure.push(range_op(f.key.clone()));
        }
        let resp = self
            .etcd
            .txn(
                "write",
                ep::TxnRequest {
                    compare: compares,
                    success: vec![match value {
                        Some(v) => put_op(k, v, 0),
                        None => delete_op(k),
                    }],
                    failure,
                },
            )
            .await?;
        let revision = resp.header.as_ref().map(|h| h.revision).unwrap_or(0) as u64;
        if resp.succeeded {
            return Ok(revision);
        }
        if let Some(f) = fence {
            let holder = ranged(&resp, 1).map(|kv| kv.create_revision);
            if holder != Some(f.term) {
                return Err(StoreError::Fenced(format!(
                    "the leader key is at term {holder:?}, this coordinator led at term {}",
                    f.term
                )));
            }
        }
        Err(StoreError::Conflict {
            key: key.to_string(),
            expected: expected.flatten(),
            found: ranged(&resp, 0).map(|kv| kv.mod_revision as u64),
        })
    }
}

impl JobStore for EtcdStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        Box::pin(async move {
            let resp = self
                .etcd
                .range(
                    "get",
                    ep::RangeRequest {
                        key: self.etcd.key(key),
                        ..Default::default()
                    },
                )
                .await?;
            Ok(resp.kvs.into_iter().next().map(|kv| Versioned {
                revision: kv.mod_revision as u64,
                value: kv.value,
            }))
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, u64> {
        Box::pin(self.write(key, None, Some(value)))
    }

    fn compare_and_set<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(self.write(key, Some(expected), Some(value)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.write(key, None, None).await.map(|_| ()) })
    }

    fn write_batch<'a>(&'a self, ops: &'a [(String, Option<Vec<u8>>)]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // etcd refuses requests over 1.5 MiB (its --max-request-bytes): transactions of at
            // most TXN_BYTES each, in order.
            let mut start = 0;
            while start < ops.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < ops.len() && (end == start || bytes + op_bytes(&ops[end]) <= TXN_BYTES)
                {
                    bytes += op_bytes(&ops[end]);
                    end += 1;
                }
                self.write_txn(&ops[start..end]).await?;
                start = end;
            }
            Ok(())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<(String, Versioned)>> {
        Box::pin(async move {
            // Pages of LIST_PAGE keys, all read at the revision of the first page: one answer
            // for any number of jobs, never one message larger than gRPC allows.
            let k = self.etcd.key(prefix);
            let end = prefix_end(&k);
            let ns = self.etcd.namespace.len();
            let mut out = Vec::new();
            let mut start = k;
            let mut revision = 0;
            loop {
                let resp = self
                    .etcd
                    .range(
                        "list",
                        ep::RangeRequest {
                            key: start.clone(),
                            range_end: end.clone(),
                            limit: LIST_PAGE,
                            revision,
                            ..Default::default()
                        },
                    )
                    .await?;
                if revision == 0 {
                    revision = resp.header.as_ref().map_or(0, |h| h.revision);
                }
                let last = resp.kvs.last().map(|kv| kv.key.clone());
                out.extend(resp.kvs.into_iter().map(|kv| {
                    let key = String::from_utf8_lossy(&kv.key[ns.min(kv.key.len())..]).into_owned();
                    (
                        key,
                        Versioned {
                            revision: kv.mod_revision as u64,
                            value: kv.value,
                        },
                    )
                }));
                match last {
                    Some(mut key) if resp.more => {
                        key.push(0);
                        start = key;
                    }
                    _ => return Ok(out),
                }
            }
        })
    }
}

/// The most bytes of keys and values in one batch transaction.
const TXN_BYTES: usize = 512 << 10;

fn op_bytes(op: &(String, Option<Vec<u8>>)) -> usize {
    op.0.len() + op.1.as_ref().map_or(0, Vec::len)
}

impl EtcdStore {
    /// One fenced transaction of unconditional puts and deletes.
    async fn write_txn(&self, ops: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        {
            let fence = self.fence.get();
            let compares = fence
                .map(|f| {
                    vec![compare(
                        f.key.clone(),
                        ep::compare::CompareTarget::Create,
                        f.term,
                    )]
                })
                .unwrap_or_default();
            let success = ops
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => put_op(self.etcd.key(k), v.clone(), 0),
                    None => delete_op(self.etcd.key(k)),
                })
                .collect();
            let failure = fence
                .map(|f| vec![range_op(f.key.clone())])
                .unwrap_or_default();
            let resp = self
                .etcd
                .txn(
                    "write",
                    ep::TxnRequest {
                        compare: compares,
                        success,
                        failure,
                    },
                )
                .await?;
            if resp.succeeded {
                return Ok(());
            }
            let f = fence.expect("an unconditional transaction succeeds");
            let holder = ranged(&resp, 0).map(|kv| kv.create_revision);
            Err(StoreError::Fenced(format!(
                "the leader key is at term {holder:?}, this coordinator led at term {}",
                f.term
            )))
        }
    }
}

/// Held leadership: the leader key (without namespace), the term, and a flag that turns true
/// when the lease is lost.
pub struct Leadership {
    pub key: String,
    /// The leader key's create revision: grows with every election.
    pub term: i64,
    pub lease_id: i64,
    pub lost: watch::Receiver<bool>,
    stop: mpsc::Sender<()>,
}

impl Leadership {
    /// Give up leadership now (clean shutdown): revoke the lease, which deletes the leader key, so
    /// a standby takes over at once instead of after the lease's TTL.
    pub async fn resign(self, etcd: &Etcd) {
        let _ = self.stop.send(()).await;
        let _ = etcd
            .lease
            .clone()
            .lease_revoke(ep::LeaseRevokeRequest { id: self.lease_id })
            .await;
    }
}

/// Campaign for `key` (under the namespace) with `value` (the advertised address) on a lease of
/// `ttl_s` seconds, until elected. While another candidate leads, `on_standby` is called with its
/// value. Errors from an unreachable etcd are retried.
pub async fn campaign(
    etcd: &Etcd,
    key: &str,
    value: &str,
    ttl_s: i64,
    mut on_standby: impl FnMut(&str),
) -> Leadership {
    let k = etcd.key(key);
    let mut last_hint = None;
    loop {
        match try_campaign(etcd, &k, value, ttl_s).await {
            Ok(Ok((term, lease_id))) => {
                let (lost_tx, lost) = watch::channel(false);
                let (stop, stop_rx) = mpsc::channel(1);
                tokio::spawn(keep_alive(etcd.clone(), lease_id, ttl_s, lost_tx, stop_rx));
                return Leadership {
                    key: key.to_string(),
                    term,
                    lease_id,
                    lost,
                    stop,
                };
            }
            Ok(Err(holder)) => {
                if last_hint.as_deref() != Some(holder.as_str()) {
                    tracing::info!(leader = %holder, "standing by");
                    on_standby(&holder);
                    last_hint = Some(holder);
                }
            }
            Err(e) => tracing::warn!(error = %e, "campaign: etcd unreachable; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One attempt: Ok(Ok((term, lease))) when elected, Ok(Err(leader's value)) when another leads.
async fn try_campaign(
    etcd: &Etcd,
    k: &[u8],
    value: &str,
    ttl_s: i64,
) -> Result<Result<(i64, i64), String>, StoreError> {
    let current = etcd
        .range(
            "leader",
            ep::RangeRequest {
                key: k.to_vec(),
                ..Default::default()
            },
        )
        .await?;
    if let Some(kv) = current.kvs.first() {
        return Ok(Err(String::from_utf8_lossy(&kv.value).into_owned()));
    }
    let grant = etcd
        .lease
        .clone()
        .lease_grant(ep::LeaseGrantRequest { ttl: ttl_s, id: 0 })
        .await
        .map_err(|s| unavailable("lease grant", &etcd.endpoints, s))?
        .into_inner();
    let resp = etcd
        .txn(
            "campaign",
            ep::TxnRequest {
                compare: vec![compare(k.to_vec(), ep::compare::CompareTarget::Create, 0)],
                success: vec![put_op(k.to_vec(), value.as_bytes().to_vec(), grant.id)],
                failure: vec![range_op(k.to_vec())],
            },
        )
        .await?;
    if resp.succeeded {
        let term = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        return Ok(Ok((term, grant.id)));
    }
    let _ = etcd
        .lease
        .clone()
        .lease_revoke(ep::LeaseRevokeRequest { id: grant.id })
        .await;
    Ok(Err(ranged(&resp, 0)
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default()))
}

/// Renew the lease every third of its TTL; flip `lost` once it has not been renewed for a whole
/// TTL (etcd unreachable) or etcd says it is gone.
async fn keep_alive(
    etcd: Etcd,
    lease_id: i64,
    ttl_s: i64,
    lost: watch::Sender<bool>,
    mut stop: mpsc::Receiver<()>,
) {
    let ttl = Duration::from_secs(ttl_s.max(1) as u64);
    let mut renewed = tokio::time::Instant::now();
    loop {
        let (tx, rx) = mpsc::channel(4);
        // The first request goes in before the call: etcd answers the stream's headers only
        // once it has a request to answer.
        let _ = tx.try_send(ep::LeaseKeepAliveRequest { id: lease_id });
        let opened = tokio::time::timeout(
            ttl,
            etcd.lease
                .clone()
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        if let Ok(Ok(resp)) = opened {
            let mut answers = resp.into_inner();
            let mut tick = tokio::time::interval(ttl / 3);
            loop {
                tokio::select! {
                    _ = stop.recv() => return,
                    _ = tick.tick() => {
                        if tx.send(ep::LeaseKeepAliveRequest { id: lease_id }).await.is_err() {
                            break;
                        }
                    }
                    answer = answers.message() => match answer {
                        Ok(Some(a)) if a.ttl > 0 => renewed = tokio::time::Instant::now(),
                        Ok(Some(_)) => {
                            tracing::error!(lease = lease_id, "the leader lease is gone");
                            lost.send_replace(true);
                            return;
                        }
                        Ok(None) | Err(_) => break,
                    },
                }
                if renewed.elapsed() > ttl {
                    break;
                }
            }
        }
        if renewed.elapsed() > ttl {
            tracing::error!(
                lease = lease_id,
                "the leader lease could not be renewed within its TTL"
            );
            lost.send_replace(true);
            return;
        }
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_of_keys() {
        assert_eq!(prefix_end(b"jobs/"), b"jobs0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
