//! The coordinator: live state (renders, workers and their leases, the running renders'
//! assignment, halo rendezvous), scheduling, and the `RenderService` / `WorkerService`
//! implementations, one module per responsibility:
//!
//! - this module: the state ([`Coordinator`], its jobs, runs and workers), leadership (standby,
//!   take-over, stepping down) and the ordered writer to the [`JobStore`];
//! - [`scheduler`]: which render starts on which workers, rollbacks, lease expiry;
//! - [`halo`]: the ExchangeHalo relay;
//! - [`outputs`]: the windows' stored latents, the decode task and the write-once manifest;
//! - [`api`]: the public RenderService (submit, get, list, watch, cancel);
//! - [`workers`]: the WorkerService (register, heartbeat, leave, task streams, progress,
//!   results).
//!
//! Every handler returns [`errors::Error`]; the gRPC status (code, reason, field, retry
//! advice) is made from it in one place, [`crate::errors`].
//!
//! # Scheduling
//!
//! Several renders run at once on disjoint sets of workers. While a worker is free, the
//! highest-priority queued render (then the oldest) starts on the free workers, as many as it
//! has windows (one for AUTOREGRESSIVE, which is sequential); they stay bound to it until it
//! ends, so no worker ever holds windows of two renders. It is planned ([`crate::plan`]), its
//! windows are split into contiguous groups over its workers in proportion to their capacity,
//! and each worker gets a `DenoiseTask` with a fresh epoch. When every window's final latents
//! are stored (objects under the output), they are committed in the job and one `DecodeTask`
//! naming them goes to the owner of window 0 (or another of the render's workers): the decoding
//! worker fuses them with the plan's weights, writes `latents.safetensors` once and decodes.
//! When the decoder reports its outputs written, `manifest.json` is written last and the render
//! is SUCCEEDED.
//!
//! # Halo exchange
//!
//! Under CODENOISE, window `w`'s halo partners are the windows that overlap it and belong to
//! another worker. An ExchangeHalo call for (render, epoch, step, window) first deposits its parts
//! in the slots of their destination windows, then waits on its own window's slot until every
//! partner's part has arrived, and returns them. Slots are keyed by (render, epoch, step,
//! destination window) and kept until that window's call for the next step (so that a call
//! retried after a lost response gets the same parts; depositing is idempotent too) or until the
//! render ends. The bytes are relayed, never read.
//!
//! # Failure
//!
//! A task result carrying an error fails the render; its other workers get a `CancelTask`. A
//! worker whose lease lapses (or that leaves) while it holds unfinished work rolls the render
//! back: its other workers get a `CancelTask` and the render is queued again, to start from
//! step 0 with a new epoch (after `max_attempts` rollbacks it fails). A new leader rolls back
//! the renders that were running. Epochs and event sequence numbers start above the leader's
//! term base, so they grow across failovers and a stale caller is always refused.
//!
//! # Locking
//!
//! All state sits behind one `std::sync::Mutex`: critical sections are short, never await, and
//! the only CPU-heavy step (fusing the latents) runs on a blocking thread outside it. Job records
//! are written to the [`JobStore`] by one background task, in the order the changes were made.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use longtake_proto::v1 as pb;
use pb::render_service_server::RenderService;
use pb::worker_service_server::WorkerService;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

mod api;
mod halo;
mod metrics;
mod outputs;
mod scheduler;
mod workers;

use crate::CoordinatorConfig;
use crate::assemble;
use crate::errors::{Error, Kind};
use crate::events::EventLog;
use crate::output;
use crate::plan::{self, WindowPlan};
use crate::store::{self, CheckpointRecord, JobRecord, JobState, JobStore, PlanRecord, StoreError};
use crate::validate::{self, StitchingMode};

/// A render's `initial_noise` file, under its output.
const NOISE: &str = "inputs/initial_noise.safetensors";

/// The coordinator's shared state; cheap to clone (one `Arc`). Serve it with [`crate::serve`].
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    config: CoordinatorConfig,
    /// The state store the persister writes to and a new leader reads back from.
    store: Arc<dyn JobStore>,
    state: Mutex<State>,
    /// Job-store writes, applied in order by the persister task.
    persist: mpsc::UnboundedSender<PersistOp>,
    /// Flipped to true on shutdown: watch streams end and halo waits give up.
    closing: watch::Sender<bool>,
    /// Flipped to true when a store write is refused because another coordinator leads now:
    /// this one must stop acting (the process exits).
    deposed: watch::Sender<bool>,
    metrics: metrics::Metrics,
}

struct PersistOp {
    key: String,
    /// The record; `None` deletes the key.
    value: Option<Vec<u8>>,
    /// Told when the write is done (SubmitRender waits for its record to be stored).
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

#[derive(Default)]
struct State {
    /// False on a standby: every call is refused with UNAVAILABLE and a pointer to the leader.
    leading: bool,
    /// Where the leader is, as far as a standby knows (its advertised address).
    leader_hint: String,
    jobs: HashMap<String, Job>,
    /// (Tenant, idempotency key) → render id.
    idempotency: HashMap<(String, String), String>,
    /// Registered workers by id; ids sort in registration order.
    workers: BTreeMap<String, Worker>,
    worker_seq: u64,
    /// The assignments of the renders being worked on, by render id.
    runs: HashMap<String, Run>,
    /// The last assignment epoch handed out. A leader starts from a base taken from the state
    /// store's leader term, so epochs grow across failovers.
    epoch: u64,
    /// This leader's base for epochs and event sequence numbers.
    epoch_base: u64,
    halos: HashMap<HaloKey, HaloSlot>,
}

struct Job {
    record: JobRecord,
    progress: pb::Progress,
    /// The render's events, for WatchRender.
    events: Arc<EventLog>,
    /// Set while `manifest.json` is written: the render can no longer be cancelled.
    finalizing: bool,
}

struct Run {
    render_id: String,
    epoch: u64,
    plan: WindowPlan,
    /// [C, T, h, w].
    shape: [u32; 4],
    /// Per window, the owning worker's id.
    owners: Vec<String>,
    /// Per window, its halo partners (empty unless CODENOISE).
    partners: Vec<Vec<usize>>,
    tasks: BTreeMap<String, RunTask>,
    /// Per window, its final latents once handed in (inline, or an object key).
    latents: Vec<Option<WindowData>>,
    model_identity: String,
    worker_timings: BTreeMap<String, BTreeMap<String, f64>>,
    started: Instant,
    phase_started: Instant,
    timings: BTreeMap<&'static str, f64>,
    outputs: Vec<String>,
    frame_count: u32,
    /// Windows whose checkpoint after a step has been written, by step (not yet committed).
    checkpoints: BTreeMap<u32, BTreeSet<usize>>,
}

impl Run {
    /// A run planned at `started`, with no task sent yet.
    fn new(
        id: &str,
        epoch: u64,
        plan: WindowPlan,
        shape: [u32; 4],
        owners: Vec<String>,
        partners: Vec<Vec<usize>>,
        started: Instant,
    ) -> Run {
        let n = plan.windows.len();
        Run {
            render_id: id.to_string(),
            epoch,
            plan,
            shape,
            owners,
            partners,
            tasks: BTreeMap::new(),
            latents: (0..n).map(|_| None).collect(),
            model_identity: String::new(),
            worker_timings: BTreeMap::new(),
            started,
            phase_started: Instant::now(),
            timings: BTreeMap::from([("plan", started.elapsed().as_secs_f64())]),
            outputs: Vec::new(),
            frame_count: 0,
            checkpoints: BTreeMap::new(),
        }
    }
}

/// Unbind the workers bound to render `id`: they are free for the next render.
fn release_workers(workers: &mut BTreeMap<String, Worker>, id: &str) {
    for w in workers.values_mut() {
        if w.render.as_deref() == Some(id) {
            w.render = None;
        }
    }
}

/// A window's final latents as handed in.
enum WindowData {
    Inline(Vec<f32>),
    /// An object under the render's output.
    Key(String),
}

struct RunTask {
    worker_id: String,
    worker_name: String,
    /// The task as sent, to send again on a reopened task stream.
    sent: pb::Task,
    kind: TaskKind,
    done: bool,
    window_steps_done: u64,
    frames_done: u64,
}

enum TaskKind {
    Denoise { windows: Range<usize> },
    Decode,
}

type TaskSender = mpsc::UnboundedSender<Result<pb::Task, Status>>;
type TaskReceiver = mpsc::UnboundedReceiver<Result<pb::Task, Status>>;

struct Worker {
    name: String,
    capacity: u32,
    last_heartbeat: Instant,
    tasks: TaskSender,
    /// The receiving end until the worker opens PullTasks.
    pending: Option<TaskReceiver>,
    /// The render this worker is bound to, from its start until it ends.
    render: Option<String>,
    /// Its compute kernel family (results are bit-identical only within one).
    kernel_family: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HaloKey {
    render: String,
    epoch: u64,
    step: u32,
    to_window: u32,
}

#[derive(Default)]
struct HaloSlot {
    /// Parts addressed to the slot's window, by sender window.
    parts: BTreeMap<u32, pb::HaloPart>,
    /// Woken (one permit) when a part arrives or the render stops.
    notify: Arc<Notify>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// `ms` since the Unix epoch as RFC 3339 UTC (`2026-11-02T10:04:05.123Z`).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// FNV-1a over the request's protobuf encoding: stable across processes and versions.
fn fingerprint(spec: &pb::RenderSpec) -> String {
    let bytes = prost::Message::encode_to_vec(spec);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn random_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

fn ranges_text(r: &Range<usize>) -> String {
    if r.len() == 1 {
        format!("window {}", r.start)
    } else {
        format!("windows {}..={}", r.start, r.end - 1)
    }
}

impl Job {
    fn snapshot(&self) -> pb::Render {
        let r = &self.record;
        pb::Render {
            id: r.id.clone(),
            spec: Some(r.spec.to_proto(None)),
            state: r.state.to_proto() as i32,
            plan: r.plan.as_ref().map(|p| pb::PlanSummary {
                num_frames: p.num_frames,
                latent_frames: p.latent_frames,
                windows: p
                    .windows
                    .iter()
                    .map(|&[start, len]| pb::WindowSpan { start, len })
                    .collect(),
            }),
            progress: Some(self.progress.clone()),
            error: r.error.clone(),
            output_uri: r.output_uri.clone(),
            has_initial_noise: r.spec.has_initial_noise,
            created_at: Some(timestamp(r.created_at_ms)),
            started_at: r.started_at_ms.map(timestamp),
            finished_at: r.finished_at_ms.map(timestamp),
            idempotency_key: r.idempotency_key.clone(),
        }
    }
}

impl Coordinator {
    /// A coordinator that leads at once over `store`, starting empty (the embedded, single
    /// machine form). Starts its background tasks (the store writer and the lease reaper), so it
    /// must be called inside a Tokio runtime; they stop when the last clone of the coordinator is
    /// dropped.
    pub fn new(config: CoordinatorConfig, store: Arc<dyn JobStore>) -> Self {
        let c = Self::standby(config, store);
        c.inner.lock().leading = true;
        c
    }

    /// A coordinator that stands by: it refuses every call with UNAVAILABLE (naming the leader
    /// given by [`Coordinator::set_leader_hint`]) until [`Coordinator::take_over`].
    pub fn standby(config: CoordinatorConfig, store: Arc<dyn JobStore>) -> Self {
        let (persist, mut persist_rx) = mpsc::unbounded_channel::<PersistOp>();
        let (closing, _) = watch::channel(false);
        let (deposed, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            store: Arc::clone(&store),
            state: Mutex::new(State::default()),
            persist,
            closing,
            deposed,
            metrics: metrics::Metrics::new(),
        });
        inner.metrics.register_state(Arc::downgrade(&inner));
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(first) = persist_rx.recv().await {
                // Everything queued meanwhile goes in the same write (one etcd transaction), the
                // last value of a key winning; order within a key is kept.
                let mut batch = vec![first];
                while batch.len() < store::MAX_BATCH {
                    match persist_rx.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                let mut ops: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(batch.len());
                let mut dones = Vec::new();
                for op in batch {
                    match ops.iter_mut().find(|(k, _)| *k == op.key) {
                        Some(slot) => slot.1 = op.value,
                        None => ops.push((op.key, op.value)),
                    }
                    dones.extend(op.done);
                }
                // An unreachable store (etcd restarting) is waited out, in order: later records
                // must not overtake these.
                let mut backoff = Duration::from_millis(100);
                let result = loop {
                    match store.write_batch(&ops).await {
                        Err(StoreError::Unavailable(e)) => {
                            tracing::warn!(writes = ops.len(), error = %e, "job store unreachable; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            if weak.strong_count() == 0 {
                                break Err(StoreError::Unavailable(e));
                            }
                        }
                        other => break other,
                    }
                };
                if let Err(e) = &result {
                    tracing::error!(writes = ops.len(), first = %ops[0].0, error = %e, "job store write failed");
                    if matches!(e, StoreError::Fenced(_))
                        && let Some(inner) = weak.upgrade()
                    {
                        inner.step_down();
                    }
                }
                for done in dones {
                    let _ = done.send(result.clone());
                }
            }
        });
        if let Some(keep) = inner.config.retention {
            let weak: Weak<Inner> = Arc::downgrade(&inner);
            let tick = (keep / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { break };
                    inner.expire_renders(keep).await;
                }
            });
        }
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        let tick = (inner.config.lease_ttl / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { break };
                inner.expire_leases();
            }
        });
        Coordinator { inner }
    }

    /// Where a standby sends its callers: the leader's advertised address.
    pub fn set_leader_hint(&self, hint: &str) {
        self.inner.lock().leader_hint = hint.to_string();
    }

    /// Stop leading at once (the leadership was lost): refuse every call from now on.
    pub fn step_down(&self) {
        self.inner.step_down();
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.inner.config
    }

    /// Whether this replica leads now and is not shutting down (what its readiness reports).
    pub fn is_leading(&self) -> bool {
        self.inner.lock().leading && !self.inner.is_closing()
    }

    /// This coordinator's metrics, for a `/metrics` endpoint.
    pub fn metrics(&self) -> Arc<longtake_telemetry::Registry> {
        Arc::clone(&self.inner.metrics.registry)
    }

    /// Becomes true once this coordinator has been deposed (a store write was fenced off by a
    /// newer leader). It then refuses every call; the process should exit.
    pub fn deposed(&self) -> watch::Receiver<bool> {
        self.inner.deposed.subscribe()
    }

    /// Become the leader: read every job back from the store, requeue the ones that were running
    /// (they restart from step 0 on the workers that register with this leader), and start
    /// scheduling. Assignment epochs continue above `epoch_base` (the leader term from the
    /// store), so that no epoch of an earlier leader is ever handed out again. Returns the
    /// number of jobs loaded.
    pub async fn take_over(&self, epoch_base: u64) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let mut loaded = Vec::new();
        for (key, stored) in inner.store.list("jobs/").await? {
            let record = match store::decode_job(&key, &stored.value) {
                Ok(r) => r,
                Err(e) => {
                    // One unreadable record must not keep the farm down; it stays as it is.
                    tracing::error!(key = %key, error = %e, "skipping an unreadable job record");
                    continue;
                }
            };
            loaded.push(record);
        }
        let count = loaded.len();
        let mut st = inner.lock();
        for record in loaded {
            let id = record.id.clone();
            if !record.idempotency_key.is_empty() {
                st.idempotency.insert(
                    (record.tenant.clone(), record.idempotency_key.clone()),
                    id.clone(),
                );
            }
            let mut job = Job {
                progress: pb::Progress {
                    phase: record.state.to_proto() as i32,
                    ..Default::default()
                },
                record,
                events: EventLog::new(epoch_base),
                finalizing: false,
            };
            if job.record.state.is_terminal() {
                inner.publish(&job);
            } else {
                let was = job.record.state;
                job.record.state = JobState::Queued;
                job.progress.phase = pb::RenderState::Queued as i32;
                job.progress.message = if was == JobState::Queued {
                    "waiting for workers".to_string()
                } else {
                    inner.metrics.rollbacks.inc();
                    format!(
                        "rolled back to step {}: a new coordinator leads (the render was {})",
                        job.record.checkpoint.as_ref().map_or(0, |c| c.step),
                        was.name()
                    )
                };
                inner.save(&job, None);
            }
            st.jobs.insert(id, job);
        }
        st.epoch = st.epoch.max(epoch_base);
        st.epoch_base = epoch_base;
        st.leading = true;
        inner.metrics.leader_changes.inc();
        tracing::info!(jobs = count, epoch_base, "leading");
        inner.schedule(&mut st);
        Ok(count)
    }

    /// End the open streams and halo waits (server shutdown).
    pub(crate) fn close(&self) {
        self.inner.closing.send_replace(true);
        let mut st = self.inner.lock();
        st.workers.clear();
        for slot in st.halos.values() {
            slot.notify.notify_one();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, if this coordinator leads; UNAVAILABLE naming the leader otherwise.
    fn lead(&self) -> Result<MutexGuard<'_, State>, Error> {
        let st = self.lock();
        if st.leading {
            return Ok(st);
        }
        Err(if *self.deposed.borrow() {
            Error::plain(
                Kind::NotLeader,
                "this coordinator was deposed by a newer leader; call another replica",
            )
        } else if st.leader_hint.is_empty() {
            Error::plain(
                Kind::NotLeader,
                "this coordinator is a standby and no leader is known yet; retry shortly or call another replica",
            )
        } else {
            Error::plain(
                Kind::NotLeader,
                format!(
                    "this coordinator is a standby; the leader is at {}",
                    st.leader_hint
                ),
            )
        })
    }

    /// Stop acting: a newer leader owns the state. Streams end, workers go elsewhere.
    fn step_down(&self) {
        let mut st = self.lock();
        if !st.leading {
            return;
        }
        st.leading = false;
        st.workers.clear();
        for slot in st.halos.values() {
            slot.notify.notify_one();
        }
        drop(st);
        tracing::error!("deposed: another coordinator leads; stepping down");
        self.deposed.send_replace(true);
    }

    fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Retention: delete the renders that finished more than `keep` ago (on the leader).
    async fn expire_renders(&self, keep: Duration) {
        let cutoff = now_ms().saturating_sub(keep.as_millis() as u64);
        let expired: Vec<(String, String)> = match self.lead() {
            Ok(st) => st
                .jobs
                .values()
                .filter(|j| j.record.state.is_terminal())
                .filter(|j| j.record.finished_at_ms.is_some_and(|t| t < cutoff))
                .map(|j| (j.record.id.clone(), j.record.output_uri.clone()))
                .collect(),
            Err(_) => return,
        };
        for (id, uri) in expired {
            if let Err(e) = self.delete_render(&id, &uri).await {
                tracing::warn!(render = %id, error = %e, "retention: deleting an expired render failed; retrying later");
            }
        }
    }

    /// Delete a finished render: every object under its output, then its record (so that a
    /// failure part-way leaves the record, and the delete can be repeated). Returns the number
    /// of objects removed.
    async fn delete_render(&self, id: &str, output_uri: &str) -> Result<u64, Error> {
        let removed = async {
            let (store, prefix) = output::open_store(output_uri).map_err(|e| e.to_string())?;
            output::delete_prefix(&*store, &prefix)
                .await
                .map_err(|e| e.to_string())
        }
        .await
        .map_err(|e| {
            Error::unavailable(format!(
                "render {id}: its outputs under {output_uri} could not be deleted: {e}"
            ))
        })?;
        let (done, stored) = oneshot::channel();
        {
            let mut st = self.lead()?;
            let Some(job) = st.jobs.remove(id) else {
                // Deleted meanwhile by another call.
                return Ok(removed as u64);
            };
            st.idempotency.remove(&(
                job.record.tenant.clone(),
                job.record.idempotency_key.clone(),
            ));
            let _ = self.persist.send(PersistOp {
                key: store::job_key(id),
                value: None,
                done: Some(done),
            });
        }
        match stored.await {
            Ok(Ok(())) => {
                tracing::info!(render = %id, objects = removed, "render deleted");
                Ok(removed as u64)
            }
            Ok(Err(e)) => Err(Error::unavailable(format!(
                "render {id}: its record could not be deleted: {e}"
            ))),
            Err(_) => Err(Error::unavailable("the store writer stopped")),
        }
    }

    /// Queue the job's record for the store and publish its snapshot to watchers.
    fn save(&self, job: &Job, done: Option<oneshot::Sender<Result<(), StoreError>>>) {
        let _ = self.persist.send(PersistOp {
            key: store::job_key(&job.record.id),
            value: Some(store::encode_job(&job.record)),
            done,
        });
        self.publish(job);
    }

    fn publish(&self, job: &Job) {
        job.events.push(job.snapshot());
    }

    fn set_state(&self, job: &mut Job, state: JobState) {
        job.record.state = state;
        job.progress.phase = state.to_proto() as i32;
        if state.is_terminal() {
            job.record.finished_at_ms = Some(now_ms());
            self.metrics.finished.with(&[("state", state.name())]).inc();
        }
        self.save(job, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn fingerprint_is_stable() {
        let spec = pb::RenderSpec {
            prompt: "x".into(),
            ..Default::default()
        };
        // FNV-1a 64 of the encoding 0a 01 78 (field 1, length 1, "x"), computed independently:
        // the fingerprint is stable across processes and versions, as idempotency needs.
        assert_eq!(fingerprint(&spec), "2fe852189d1bfb44");
        assert_ne!(
            fingerprint(&spec),
            fingerprint(&pb::RenderSpec {
                seed: Some(1),
                ..spec
            })
        );
    }
}
