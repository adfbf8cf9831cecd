//! The coordinator: live state (renders, workers and their leases, the running renders'
//! assignment, halo rendezvous), scheduling, and the `RenderService` / `WorkerService`
//! implementations.
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

use crate::CoordinatorConfig;
use crate::assemble;
use crate::errors;
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
}

struct PersistOp {
    key: String,
    value: Vec<u8>,
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
    /// Idempotency key → render id.
    idempotency: HashMap<String, String>,
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
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(op) = persist_rx.recv().await {
                // An unreachable store (etcd restarting) is waited out, in order: later records
                // must not overtake this one.
                let mut backoff = Duration::from_millis(100);
                let result = loop {
                    match store.put(&op.key, op.value.clone()).await {
                        Err(StoreError::Unavailable(e)) => {
                            tracing::warn!(key = %op.key, error = %e, "job store unreachable; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            if weak.strong_count() == 0 {
                                break Err(StoreError::Unavailable(e));
                            }
                        }
                        other => break other.map(|_| ()),
                    }
                };
                if let Err(e) = &result {
                    tracing::error!(key = %op.key, error = %e, "job store write failed");
                    if matches!(e, StoreError::Fenced(_))
                        && let Some(inner) = weak.upgrade()
                    {
                        inner.step_down();
                    }
                }
                if let Some(done) = op.done {
                    let _ = done.send(result);
                }
            }
        });
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

    /// Whether this coordinator leads now.
    pub fn is_leading(&self) -> bool {
        self.inner.lock().leading
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
                st.idempotency
                    .insert(record.idempotency_key.clone(), id.clone());
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
    fn lead(&self) -> Result<MutexGuard<'_, State>, Status> {
        let st = self.lock();
        if st.leading {
            return Ok(st);
        }
        Err(if *self.deposed.borrow() {
            Status::unavailable(
                "this coordinator was deposed by a newer leader; call another replica",
            )
        } else if st.leader_hint.is_empty() {
            Status::unavailable(
                "this coordinator is a standby and no leader is known yet; retry shortly or call another replica",
            )
        } else {
            Status::unavailable(format!(
                "this coordinator is a standby; the leader is at {}",
                st.leader_hint
            ))
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

    /// Queue the job's record for the store and publish its snapshot to watchers.
    fn save(&self, job: &Job, done: Option<oneshot::Sender<Result<(), StoreError>>>) {
        let _ = self.persist.send(PersistOp {
            key: store::job_key(&job.record.id),
            value: store::encode_job(&job.record),
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
        }
        self.save(job, None);
    }

    /// Start queued renders, highest priority (then oldest) first, while a worker is free.
    /// A render bound to a kernel family only takes free workers of that family; one that
    /// cannot start now does not hold back the renders behind it.
    fn schedule(&self, st: &mut State) {
        loop {
            let free: BTreeSet<&str> = st
                .workers
                .values()
                .filter(|w| w.render.is_none())
                .map(|w| w.kernel_family.as_str())
                .collect();
            if free.is_empty() {
                return;
            }
            let next = st
                .jobs
                .values()
                .filter(|j| j.record.state == JobState::Queued)
                .filter(|j| {
                    j.record
                        .kernel_family
                        .as_deref()
                        .is_none_or(|f| free.contains(f))
                })
                .max_by(|a, b| {
                    (a.record.spec.priority)
                        .cmp(&b.record.spec.priority)
                        .then(b.record.created_at_ms.cmp(&a.record.created_at_ms))
                        .then(b.record.id.cmp(&a.record.id))
                })
                .map(|j| j.record.id.clone());
            let Some(id) = next else { return };
            self.start(st, &id);
        }
    }

    /// Plan render `id` and hand its windows to free workers: as many as it has windows (one
    /// for an autoregressive render), each bound to it until it ends, so that a worker never
    /// holds windows of two renders (their halo exchanges could wait on each other).
    fn start(&self, st: &mut State, id: &str) {
        st.epoch += 1;
        let epoch = st.epoch;
        let State {
            jobs,
            workers,
            runs,
            ..
        } = &mut *st;
        let Some(job) = jobs.get_mut(id) else { return };
        let started = Instant::now();
        job.record.started_at_ms = Some(now_ms());
        self.set_state(job, JobState::Planning);
        let spec = job.record.spec.clone();
        let shape = spec.latent_shape();
        let plan = match plan::plan(
            shape[1] as usize,
            spec.window as usize,
            spec.overlap as usize,
        ) {
            Ok(p) => p,
            Err(e) => {
                job.record.error = format!("cannot plan the render: {e}");
                self.set_state(job, JobState::Failed);
                return;
            }
        };
        let n = plan.windows.len();
        // Denoised already (the fused latents are stored): only the decode is left.
        let decode_only = job.record.denoised.is_some();
        let wanted = match spec.stitching {
            _ if decode_only => 1,
            StitchingMode::Autoregressive => 1,
            _ => n,
        };
        // The render's kernel family: recorded at its first start, from its first free worker.
        let family = match &job.record.kernel_family {
            Some(f) => f.clone(),
            None => match workers.values().find(|w| w.render.is_none()) {
                Some(w) => w.kernel_family.clone(),
                None => return,
            },
        };
        job.record.kernel_family = Some(family.clone());
        let chosen: Vec<String> = workers
            .iter()
            .filter(|(_, w)| w.render.is_none() && w.kernel_family == family)
            .take(wanted)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &chosen {
            if let Some(w) = workers.get_mut(k) {
                w.render = Some(id.to_string());
            }
        }
        if decode_only {
            job.progress.window_steps_total = n as u64 * u64::from(spec.steps);
            job.progress.window_steps_done = job.progress.window_steps_total;
            job.progress.frames_total = u64::from(spec.num_frames);
            let owners = vec![chosen[0].clone(); n];
            let run = Run::new(id, epoch, plan, shape, owners, vec![Vec::new(); n], started);
            runs.insert(id.to_string(), run);
            self.set_state(job, JobState::Decoding);
            self.dispatch_decode(st, id, epoch);
            return;
        }
        let worker_list: Vec<(&String, &Worker)> = chosen
            .iter()
            .filter_map(|k| workers.get_key_value(k))
            .collect();
        let groups = match spec.stitching {
            // Sequential by nature: one worker does all of it.
            StitchingMode::Autoregressive => {
                let mut g = vec![0..0; worker_list.len()];
                g[0] = 0..n;
                g
            }
            _ => assemble::split_windows(
                n,
                &worker_list
                    .iter()
                    .map(|(_, w)| w.capacity)
                    .collect::<Vec<_>>(),
            ),
        };
        let mut owner_index = vec![0usize; n];
        let mut owners = vec![String::new(); n];
        for (k, g) in groups.iter().enumerate() {
            for w in g.clone() {
                owner_index[w] = k;
                owners[w] = worker_list[k].0.clone();
            }
        }
        let partners = if spec.stitching == StitchingMode::Codenoise {
            assemble::halo_partners(&plan.windows, &owner_index)
        } else {
            vec![Vec::new(); n]
        };
        let pb_plan = window_plan(&plan);
        let pb_spec = spec.to_proto(None);
        // Autoregressive renders run as one sequential loop: no checkpoints, always from 0.
        let sequential = spec.stitching == StitchingMode::Autoregressive;
        let resume = job.record.checkpoint.clone().filter(|_| !sequential);
        let resume_step = resume.as_ref().map_or(0, |c| c.step);
        let checkpoint_every = if sequential {
            0
        } else {
            self.config.checkpoint_every
        };
        let mut tasks = BTreeMap::new();
        let mut closed = Vec::new();
        for (k, g) in groups.iter().enumerate() {
            if g.is_empty() {
                continue;
            }
            let (worker_id, worker) = worker_list[k];
            let task_id = format!("{id}/{epoch}/denoise-{k}");
            let task = pb::Task {
                task_id: task_id.clone(),
                kind: Some(pb::task::Kind::Denoise(pb::DenoiseTask {
                    render_id: id.to_string(),
                    epoch,
                    spec: Some(pb_spec.clone()),
                    plan: Some(pb_plan.clone()),
                    owned_windows: g.clone().map(|w| w as u32).collect(),
                    latent_shape: Some(latent_shape(shape)),
                    num_frames: spec.num_frames,
                    output_uri: job.record.output_uri.clone(),
                    checkpoint_every,
                    checkpoint_dir: format!("checkpoints/e{epoch}"),
                    resume_from: resume.as_ref().map(|c| c.dir.clone()).unwrap_or_default(),
                    resume_step,
                    initial_noise_key: if spec.has_initial_noise {
                        NOISE.to_string()
                    } else {
                        String::new()
                    },
                })),
            };
            if worker.tasks.send(Ok(task.clone())).is_err() {
                closed.push(worker_id.clone());
            }
            tasks.insert(
                task_id,
                RunTask {
                    sent: task,
                    worker_id: worker_id.clone(),
                    worker_name: worker.name.clone(),
                    kind: TaskKind::Denoise { windows: g.clone() },
                    done: false,
                    window_steps_done: g.len() as u64 * u64::from(resume_step),
                    frames_done: 0,
                },
            );
            tracing::info!(render = id, epoch, worker = %worker.name, windows = ?g, resume_step, "denoise task sent");
        }
        job.record.plan = Some(PlanRecord {
            num_frames: spec.num_frames,
            latent_frames: shape[1],
            windows: plan
                .windows
                .iter()
                .map(|w| [w.start as u32, w.len as u32])
                .collect(),
        });
        job.progress.window_steps_total = n as u64 * u64::from(spec.steps);
        job.progress.window_steps_done = n as u64 * u64::from(resume_step);
        job.progress.frames_total = u64::from(spec.num_frames);
        job.progress.message = format!(
            "{n} window(s) of {} latent frames on {} worker(s)",
            plan.window.min(plan.latent_frames),
            groups.iter().filter(|g| !g.is_empty()).count()
        );
        let mut run = Run::new(id, epoch, plan, shape, owners, partners, started);
        run.tasks = tasks;
        runs.insert(id.to_string(), run);
        self.set_state(job, JobState::EncodingText);
        if !closed.is_empty() {
            // A worker whose task stream is gone cannot take part; drop it.
            let names: Vec<String> = closed
                .iter()
                .filter_map(|w| st.workers.remove(w).map(|w| w.name))
                .collect();
            self.roll_back(
                st,
                id,
                format!(
                    "worker(s) {} closed their task stream before the render started",
                    names.join(", ")
                ),
            );
        }
    }

    /// Stop render `id` as FAILED or CANCELLED: tell its workers, drop its halo slots, start the
    /// next render.
    fn end_render(&self, st: &mut State, id: &str, state: JobState, reason: String) {
        if !self.stop_run(st, id, &reason) {
            return;
        }
        let Some(job) = st.jobs.get_mut(id) else {
            return;
        };
        if state == JobState::Failed {
            job.record.error = reason.clone();
        }
        job.finalizing = false;
        job.progress.message = reason;
        tracing::warn!(render = id, state = ?state, error = %job.record.error, "render stopped");
        self.set_state(job, state);
        self.schedule(st);
    }

    /// A worker of render `id` is gone: stop the run, and queue the render again from step 0
    /// (its result does not depend on which workers compute it), unless it has been rolled back
    /// `max_attempts` times already.
    fn roll_back(&self, st: &mut State, id: &str, reason: String) {
        if !self.stop_run(st, id, &reason) {
            return;
        }
        let max = self.config.max_attempts;
        let Some(job) = st.jobs.get_mut(id) else {
            return;
        };
        job.record.attempts += 1;
        if job.record.attempts >= max {
            job.record.error = format!("{reason}; given up after {} attempts", job.record.attempts);
            job.progress.message = job.record.error.clone();
            tracing::warn!(render = id, error = %job.record.error, "render failed");
            self.set_state(job, JobState::Failed);
        } else {
            let step = job.record.checkpoint.as_ref().map_or(0, |c| c.step);
            job.progress.window_steps_done = 0;
            job.progress.frames_done = 0;
            let attempt = job.record.attempts + 1;
            job.progress.message = if job.record.denoised.is_some() {
                format!(
                    "rolled back to the decode (attempt {attempt} of {max}; the denoised \
                     latents are kept): {reason}"
                )
            } else {
                format!("rolled back to step {step} (attempt {attempt} of {max}): {reason}")
            };
            tracing::warn!(render = id, reason = %reason, "render rolled back");
            self.set_state(job, JobState::Queued);
        }
        self.schedule(st);
    }

    /// Stop the run of render `id` if it has one: tell its busy workers to drop their tasks and
    /// end its halo waits. False when the render is unknown or already finished.
    fn stop_run(&self, st: &mut State, id: &str, reason: &str) -> bool {
        let State {
            jobs,
            workers,
            runs,
            halos,
            ..
        } = &mut *st;
        let Some(job) = jobs.get(id) else {
            return false;
        };
        if job.record.state.is_terminal() {
            return false;
        }
        release_workers(workers, id);
        if let Some(run) = runs.remove(id) {
            let busy: BTreeSet<&String> = run
                .tasks
                .values()
                .filter(|t| !t.done)
                .map(|t| &t.worker_id)
                .collect();
            for worker_id in busy {
                if let Some(w) = workers.get(worker_id) {
                    let _ = w.tasks.send(Ok(pb::Task {
                        task_id: format!("{id}/{}/cancel", run.epoch),
                        kind: Some(pb::task::Kind::Cancel(pb::CancelTask {
                            render_id: id.to_string(),
                            epoch: run.epoch,
                            reason: reason.to_string(),
                        })),
                    }));
                }
            }
        }
        halos.retain(|k, slot| {
            if k.render == id {
                slot.notify.notify_one();
                false
            } else {
                true
            }
        });
        true
    }

    /// Drop workers whose lease lapsed; roll back the render that still needed one of them.
    fn expire_leases(&self) {
        let ttl = self.config.lease_ttl;
        let mut st = self.lock();
        let expired: Vec<String> = st
            .workers
            .iter()
            .filter(|(_, w)| w.last_heartbeat.elapsed() > ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for worker_id in expired {
            let Some(worker) = st.workers.remove(&worker_id) else {
                continue;
            };
            let silent = worker.last_heartbeat.elapsed();
            tracing::warn!(worker = %worker.name, id = %worker_id, "worker lease lapsed");
            let held = st.runs.values().find_map(|run| {
                let held = run
                    .tasks
                    .values()
                    .find(|t| !t.done && t.worker_id == worker_id)?;
                let what = match &held.kind {
                    TaskKind::Denoise { windows } => ranges_text(windows),
                    TaskKind::Decode => "the decode task".to_string(),
                };
                Some((run.render_id.clone(), what))
            });
            if let Some((render_id, what)) = held {
                let reason = format!(
                    "worker {} ({worker_id}) lost its lease: no heartbeat for {:.1} s \
                     (lease ttl {:.1} s) while it held {what}",
                    worker.name,
                    silent.as_secs_f64(),
                    ttl.as_secs_f64()
                );
                self.roll_back(&mut st, &render_id, reason);
            }
        }
    }

    /// The job `render_id` and its run at `epoch`, or the status a worker call gets otherwise.
    fn running<'a>(
        jobs: &'a mut HashMap<String, Job>,
        runs: &'a mut HashMap<String, Run>,
        render_id: &str,
        epoch: u64,
    ) -> Result<(&'a mut Job, &'a mut Run), Status> {
        let job = jobs
            .get_mut(render_id)
            .ok_or_else(|| Status::not_found(format!("render_id: no render {render_id:?}")))?;
        match runs.get_mut(render_id) {
            Some(run) => {
                if run.epoch != epoch {
                    return Err(Status::failed_precondition(format!(
                        "epoch: {epoch} is stale; render {render_id} is at epoch {}",
                        run.epoch
                    )));
                }
                Ok((job, run))
            }
            _ => Err(match job.record.state {
                JobState::Cancelled => {
                    Status::cancelled(format!("render {render_id} was cancelled"))
                }
                JobState::Failed => Status::failed_precondition(format!(
                    "render {render_id} failed: {}",
                    job.record.error
                )),
                state => Status::failed_precondition(format!(
                    "render {render_id} is not running (state {state:?})"
                )),
            }),
        }
    }

    /// Every window's latents are in: store the ones handed in inline as objects (workers with
    /// an output send keys), commit the keys in the job, and send the decode task. A failure
    /// here rolls the render back.
    fn begin_decode(self: &Arc<Self>, run: &mut Run, output_uri: String) {
        let epoch = run.epoch;
        let mut keys = Vec::new();
        let mut inline = Vec::new();
        for (i, w) in run.latents.iter_mut().enumerate() {
            match w.take() {
                Some(WindowData::Key(k)) => keys.push(k),
                Some(WindowData::Inline(v)) => {
                    let k = format!("windows/e{epoch}/w{i}.f32");
                    inline.push((k.clone(), v));
                    keys.push(k);
                }
                None => keys.push(String::new()),
            }
        }
        let id = run.render_id.clone();
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let written = async {
                if inline.is_empty() {
                    return Ok(());
                }
                let (store, prefix) = output::open_store(&output_uri).map_err(|e| e.to_string())?;
                for (k, v) in inline {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    output::write_once(&*store, &output::object_path(&prefix, &k), bytes)
                        .await
                        .map_err(|e| format!("writing {k}: {e}"))?;
                }
                Ok::<(), String>(())
            }
            .await;
            let mut st = inner.lock();
            match written {
                Ok(()) => inner.windows_stored(&mut st, &id, epoch, keys),
                Err(e) => {
                    let State { jobs, runs, .. } = &mut *st;
                    if Self::running(jobs, runs, &id, epoch).is_ok() {
                        inner.roll_back(&mut st, &id, format!("storing the latents failed: {e}"));
                    }
                }
            }
        });
    }

    /// Every window's final latents are stored: commit them (a rollback now only decodes
    /// again) and send the decode task.
    fn windows_stored(&self, st: &mut State, id: &str, epoch: u64, keys: Vec<String>) {
        let State { jobs, runs, .. } = &mut *st;
        let Ok((job, run)) = Self::running(jobs, runs, id, epoch) else {
            return;
        };
        let workers: Vec<String> = (0..run.plan.windows.len())
            .map(|i| {
                run.tasks
                    .values()
                    .find(|t| matches!(&t.kind, TaskKind::Denoise { windows } if windows.contains(&i)))
                    .map(|t| t.worker_name.clone())
                    .unwrap_or_default()
            })
            .collect();
        job.record.denoised = Some(store::DenoisedRecord { keys, workers });
        self.save(job, None);
        self.dispatch_decode(st, id, epoch);
    }

    /// Send the decode task (the windows' latents are stored) to one of the render's workers.
    fn dispatch_decode(&self, st: &mut State, id: &str, epoch: u64) {
        let State {
            jobs,
            workers,
            runs,
            ..
        } = &mut *st;
        let Ok((job, run)) = Self::running(jobs, runs, id, epoch) else {
            return;
        };
        let target = workers
            .get_key_value(&run.owners[0])
            .filter(|(_, w)| w.render.as_deref() == Some(id))
            .or_else(|| {
                workers
                    .iter()
                    .find(|(_, w)| w.render.as_deref() == Some(id))
            });
        let Some((worker_id, worker)) = target else {
            let reason = "no worker is left to decode the latents".to_string();
            self.roll_back(st, id, reason);
            return;
        };
        let task_id = format!("{id}/{epoch}/decode");
        let spec = &job.record.spec;
        let task = pb::Task {
            task_id: task_id.clone(),
            kind: Some(pb::task::Kind::Decode(pb::DecodeTask {
                render_id: id.to_string(),
                epoch,
                spec: Some(spec.to_proto(None)),
                latents: None,
                latent_shape: Some(latent_shape(run.shape)),
                num_frames: spec.num_frames,
                output_uri: job.record.output_uri.clone(),
                window_keys: job
                    .record
                    .denoised
                    .as_ref()
                    .map(|d| d.keys.clone())
                    .unwrap_or_default(),
                plan: Some(window_plan(&run.plan)),
            })),
        };
        let sent = worker.tasks.send(Ok(task.clone())).is_ok();
        run.tasks.insert(
            task_id,
            RunTask {
                sent: task,
                worker_id: worker_id.clone(),
                worker_name: worker.name.clone(),
                kind: TaskKind::Decode,
                done: false,
                window_steps_done: 0,
                frames_done: 0,
            },
        );
        job.progress.message = format!("decoding on {}", worker.name);
        self.publish(job);
        tracing::info!(render = id, epoch, worker = %worker.name, "decode task sent");
        if !sent {
            let reason = format!("worker {} closed its task stream", worker.name);
            let worker_id = worker_id.clone();
            st.workers.remove(&worker_id);
            self.roll_back(st, id, reason);
        }
    }

    /// Write `manifest.json` (the last object of a render), then mark the render SUCCEEDED.
    fn finalize(
        self: &Arc<Self>,
        id: String,
        epoch: u64,
        output_uri: String,
        manifest: serde_json::Value,
    ) {
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let written = async {
                let (store, prefix) = output::open_store(&output_uri).map_err(|e| e.to_string())?;
                output::write_manifest(&*store, &prefix, &manifest)
                    .await
                    .map_err(|e| e.to_string())?;
                // The checkpoints are of no use once the render is finished.
                for dir in ["checkpoints", "windows"] {
                    let path = prefix.clone().join(dir);
                    if let Err(e) = output::delete_prefix(&*store, &path).await {
                        tracing::warn!(render = %id, error = %e, "could not delete {dir}/");
                    }
                }
                Ok::<(), String>(())
            }
            .await;
            let mut st = inner.lock();
            let State {
                jobs,
                runs,
                workers,
                halos,
                ..
            } = &mut *st;
            if Self::running(jobs, runs, &id, epoch).is_err() {
                return;
            }
            match written {
                Ok(()) => {
                    runs.remove(&id);
                    halos.retain(|k, _| k.render != id);
                    release_workers(workers, &id);
                    let job = jobs.get_mut(&id).expect("checked above");
                    job.finalizing = false;
                    job.progress.message = format!("written to {output_uri}");
                    inner.set_state(job, JobState::Succeeded);
                    tracing::info!(render = %id, output = %output_uri, "render succeeded");
                    inner.schedule(&mut st);
                }
                Err(e) => {
                    let reason = format!("cannot write manifest.json under {output_uri}: {e}");
                    inner.end_render(&mut st, &id, JobState::Failed, reason);
                }
            }
        });
    }
}

/// The plan as workers get it: windows with their fusion weights.
fn window_plan(plan: &WindowPlan) -> pb::WindowPlan {
    pb::WindowPlan {
        latent_frames: plan.latent_frames as u32,
        window: plan.window as u32,
        overlap: plan.overlap as u32,
        windows: plan
            .windows
            .iter()
            .zip(&plan.weights)
            .map(|(w, weights)| pb::PlannedWindow {
                start: w.start as u32,
                len: w.len as u32,
                weights: weights.clone(),
            })
            .collect(),
    }
}

fn latent_shape(shape: [u32; 4]) -> pb::LatentShape {
    pb::LatentShape {
        channels: shape[0],
        frames: shape[1],
        height: shape[2],
        width: shape[3],
    }
}

/// The manifest: request, plan, model, outputs, timings and versions of a finished render.
fn manifest(job: &Job, run: &Run) -> serde_json::Value {
    let r = &job.record;
    let spec = &r.spec;
    let windows: Vec<serde_json::Value> = run
        .plan
        .windows
        .iter()
        .zip(&run.plan.weights)
        .enumerate()
        .map(|(i, (w, weights))| {
            serde_json::json!({
                "index": i,
                "start": w.start,
                "len": w.len,
                "weights": weights,
                "worker": r.denoised.as_ref().and_then(|d| d.workers.get(i).cloned()),
            })
        })
        .collect();
    serde_json::json!({
        "format": "longtake.manifest",
        "format_version": 1,
        "render_id": r.id,
        "smoke_test": spec.is_smoke(),
        "request": spec,
        "idempotency_key": r.idempotency_key,
        "seed": spec.seed,
        "kernel_family": r.kernel_family,
        "video": {
            "num_frames": spec.num_frames,
            "frames_written": run.frame_count,
            "fps": spec.fps,
            "width": spec.width,
            "height": spec.height,
        },
        "plan": {
            "latent_frames": run.plan.latent_frames,
            "window": run.plan.window,
            "overlap": run.plan.overlap,
            "latent_shape": [1, run.shape[0], run.shape[1], run.shape[2], run.shape[3]],
            "stitching": spec.stitching,
            "windows": windows,
        },
        "model": {
            "path": if spec.is_smoke() { serde_json::Value::Null } else { spec.model.clone().into() },
            "identity": run.model_identity,
        },
        "outputs": run.outputs,
        "timings_s": run.timings,
        "worker_timings_s": run.worker_timings,
        "versions": {
            "longtake": env!("CARGO_PKG_VERSION"),
            "git_sha": option_env!("LONGTAKE_GIT_SHA").unwrap_or("unknown"),
        },
        "created_at": rfc3339(r.created_at_ms),
        "started_at": r.started_at_ms.map(rfc3339),
        "finished_at": rfc3339(now_ms()),
    })
}

/// The RenderService handlers; [`RenderService`] wraps each to attach the rich error details.
impl Coordinator {
    async fn handle_submit_render(
        &self,
        request: Request<pb::SubmitRenderRequest>,
    ) -> Result<Response<pb::SubmitRenderResponse>, Status> {
        let inner = &self.inner;
        let req = request.into_inner();
        let Some(spec) = req.spec else {
            return Err(Status::invalid_argument("spec: is missing"));
        };
        let key = req.idempotency_key;
        if key.chars().count() > validate::MAX_IDEMPOTENCY_KEY_CHARS {
            return Err(Status::invalid_argument(format!(
                "idempotency_key: is {} characters; at most {}",
                key.chars().count(),
                validate::MAX_IDEMPOTENCY_KEY_CHARS
            )));
        }
        let fingerprint = fingerprint(&spec);
        let valid = validate::validate(
            &spec,
            &inner.config.limits,
            &inner.config.default_output,
            random_u64(),
        )?;
        // A repeat with the same idempotency key returns the render created the first time.
        let repeat = |st: &State| -> Option<Result<Response<pb::SubmitRenderResponse>, Status>> {
            let id = st.idempotency.get(&key).filter(|_| !key.is_empty())?;
            let job = &st.jobs[id];
            if job.record.request_fingerprint == fingerprint {
                return Some(Ok(Response::new(pb::SubmitRenderResponse {
                    render_id: id.clone(),
                    created: false,
                })));
            }
            Some(Err(Status::already_exists(format!(
                "idempotency_key: {key:?} was already used for render {id} with a different \
                 spec; repeat that spec exactly to get the same render, or use a new key"
            ))))
        };
        if let Some(r) = repeat(&*inner.lead()?) {
            return r;
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let base = if valid.output.starts_with("s3://") {
            valid.output.clone()
        } else {
            std::path::absolute(&valid.output)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| valid.output.clone())
        };
        let rel = output::join_uri(&inner.config.jobs_prefix, &id);
        let output_uri = output::join_uri(&base, rel.trim_start_matches('/'));
        // Bulk input goes to the object store before the job exists (never into the state
        // store); a render whose record is stored can always find it.
        if let Some(noise) = &spec.initial_noise {
            let written = async {
                let (store, prefix) = output::open_store(&output_uri).map_err(|e| e.to_string())?;
                output::write_once(&*store, &output::object_path(&prefix, NOISE), noise.clone())
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = written {
                return Err(Status::unavailable(format!(
                    "initial_noise: could not be stored under {output_uri}: {e}"
                )));
            }
        }
        let (id, stored) = {
            let mut st = inner.lead()?;
            if let Some(r) = repeat(&st) {
                return r;
            }
            let record = JobRecord {
                id: id.clone(),
                spec: valid,
                idempotency_key: key.clone(),
                request_fingerprint: fingerprint,
                state: JobState::Queued,
                error: String::new(),
                output_uri,
                plan: None,
                created_at_ms: now_ms(),
                started_at_ms: None,
                finished_at_ms: None,
                attempts: 0,
                checkpoint: None,
                denoised: None,
                kernel_family: None,
            };
            let progress = pb::Progress {
                phase: pb::RenderState::Queued as i32,
                message: "waiting for workers".to_string(),
                ..Default::default()
            };
            let job = Job {
                record,
                progress,
                events: EventLog::new(st.epoch_base),
                finalizing: false,
            };
            let (done, stored) = oneshot::channel();
            inner.save(&job, Some(done));
            st.jobs.insert(id.clone(), job);
            if !key.is_empty() {
                st.idempotency.insert(key, id.clone());
            }
            tracing::info!(render = %id, "render queued");
            inner.schedule(&mut st);
            (id, stored)
        };
        match stored.await {
            Ok(Ok(())) => Ok(Response::new(pb::SubmitRenderResponse {
                render_id: id,
                created: true,
            })),
            failure => {
                let why = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the store writer stopped".to_string(),
                };
                let mut st = inner.lock();
                inner.end_render(
                    &mut st,
                    &id,
                    JobState::Failed,
                    format!("the job could not be stored: {why}"),
                );
                Err(Status::unavailable(format!(
                    "render {id} could not be stored: {why}"
                )))
            }
        }
    }

    async fn handle_get_render(
        &self,
        request: Request<pb::GetRenderRequest>,
    ) -> Result<Response<pb::Render>, Status> {
        let id = request.into_inner().render_id;
        let st = self.inner.lead()?;
        let job = st
            .jobs
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("render_id: no render {id:?}")))?;
        Ok(Response::new(job.snapshot()))
    }

    async fn handle_list_renders(
        &self,
        request: Request<pb::ListRendersRequest>,
    ) -> Result<Response<pb::ListRendersResponse>, Status> {
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size: is {n}; allowed: 1..=1000 (0: 100)"
                )));
            }
        };
        let mut states = BTreeSet::new();
        for s in &req.states {
            let state = pb::RenderState::try_from(*s)
                .ok()
                .and_then(JobState::from_proto)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "states: {s} is not a render state (allowed: 1..=8)"
                    ))
                })?;
            states.insert(state.to_proto() as i32);
        }
        // Token: "<created_at_ms>.<id>" of the last render of the previous page.
        let after: Option<(u64, String)> = if req.page_token.is_empty() {
            None
        } else {
            let parsed = req
                .page_token
                .split_once('.')
                .and_then(|(ms, id)| Some((ms.parse().ok()?, id.to_string())));
            Some(parsed.ok_or_else(|| {
                Status::invalid_argument("page_token: is not a token this server issued")
            })?)
        };
        let st = self.inner.lead()?;
        let mut jobs: Vec<&Job> = st
            .jobs
            .values()
            .filter(|j| states.is_empty() || states.contains(&(j.record.state.to_proto() as i32)))
            .filter(|j| match &after {
                None => true,
                Some((ms, id)) => (j.record.created_at_ms, &j.record.id) < (*ms, id),
            })
            .collect();
        jobs.sort_by(|a, b| {
            (b.record.created_at_ms, &b.record.id).cmp(&(a.record.created_at_ms, &a.record.id))
        });
        let more = jobs.len() > page_size;
        jobs.truncate(page_size);
        let next_page_token = match (more, jobs.last()) {
            (true, Some(last)) => format!("{}.{}", last.record.created_at_ms, last.record.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRendersResponse {
            renders: jobs.iter().map(|j| j.snapshot()).collect(),
            next_page_token,
        }))
    }

    async fn handle_watch_render(
        &self,
        request: Request<pb::WatchRenderRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let req = request.into_inner();
        let id = req.render_id;
        let log = {
            let st = self.inner.lead()?;
            Arc::clone(
                &st.jobs
                    .get(&id)
                    .ok_or_else(|| Status::not_found(format!("render_id: no render {id:?}")))?
                    .events,
            )
        };
        let mut changed = log.changed.subscribe();
        let mut closing = self.inner.closing.subscribe();
        let (tx, rx) = mpsc::channel(16);
        let mut next = req.after_sequence;
        tokio::spawn(async move {
            loop {
                changed.borrow_and_update();
                for (seq, render) in log.after(next) {
                    next = seq;
                    let terminal = pb::RenderState::try_from(render.state)
                        .ok()
                        .and_then(JobState::from_proto)
                        .is_some_and(JobState::is_terminal);
                    let event = pb::RenderEvent {
                        render: Some(render),
                        sequence: seq,
                    };
                    if tx.send(Ok(event)).await.is_err() || terminal {
                        return;
                    }
                }
                tokio::select! {
                    c = changed.changed() => if c.is_err() { return },
                    _ = async { let _ = closing.wait_for(|c| *c).await; } => {
                        let _ = tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn handle_cancel_render(
        &self,
        request: Request<pb::CancelRenderRequest>,
    ) -> Result<Response<pb::Render>, Status> {
        let id = request.into_inner().render_id;
        let mut st = self.inner.lead()?;
        let job = st
            .jobs
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("render_id: no render {id:?}")))?;
        if !job.record.state.is_terminal() && !job.finalizing {
            self.inner.end_render(
                &mut st,
                &id,
                JobState::Cancelled,
                "cancelled by the user".to_string(),
            );
        }
        Ok(Response::new(st.jobs[&id].snapshot()))
    }
}

/// The WorkerService handlers, wrapped by [`WorkerService`] like the public ones.
impl Coordinator {
    async fn handle_register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        if inner.is_closing() {
            return Err(Status::unavailable("the coordinator is shutting down"));
        }
        let mut st = inner.lead()?;
        st.worker_seq += 1;
        let worker_id = format!(
            "w{:05}-{}",
            st.worker_seq,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let name = if req.worker_name.is_empty() {
            worker_id.clone()
        } else {
            req.worker_name
        };
        let (tasks, pending) = mpsc::unbounded_channel();
        tracing::info!(worker = %name, id = %worker_id, devices = ?req.devices, capacity = req.capacity, "worker registered");
        st.workers.insert(
            worker_id.clone(),
            Worker {
                name,
                capacity: req.capacity,
                last_heartbeat: Instant::now(),
                tasks,
                pending: Some(pending),
                render: None,
                kernel_family: req.kernel_family.clone(),
            },
        );
        inner.schedule(&mut st);
        let ttl = inner.config.lease_ttl;
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            lease_ttl: Some(prost_types::Duration {
                seconds: ttl.as_secs() as i64,
                nanos: ttl.subsec_nanos() as i32,
            }),
        }))
    }

    async fn handle_heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let id = request.into_inner().worker_id;
        let mut st = self.inner.lead()?;
        let worker = st.workers.get_mut(&id).ok_or_else(|| {
            Status::not_found(format!(
                "worker_id: {id:?} is not registered (its lease lapsed?); register again"
            ))
        })?;
        worker.last_heartbeat = Instant::now();
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn handle_leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        let mut st = inner.lead()?;
        let worker = st.workers.remove(&req.worker_id).ok_or_else(|| {
            Status::not_found(format!("worker_id: {:?} is not registered", req.worker_id))
        })?;
        let why = if req.reason.is_empty() {
            "no reason given".to_string()
        } else {
            req.reason
        };
        tracing::info!(worker = %worker.name, id = %req.worker_id, reason = %why, "worker left");
        let held = st.runs.values().find_map(|run| {
            run.tasks
                .values()
                .any(|t| !t.done && t.worker_id == req.worker_id)
                .then(|| run.render_id.clone())
        });
        if let Some(render_id) = held {
            let reason = format!("worker {} left the pool ({why})", worker.name);
            inner.roll_back(&mut st, &render_id, reason);
        }
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn handle_pull_tasks(
        &self,
        request: Request<pb::PullTasksRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        let id = request.into_inner().worker_id;
        let mut st = self.inner.lead()?;
        let State { workers, runs, .. } = &mut *st;
        let worker = workers.get_mut(&id).ok_or_else(|| {
            Status::not_found(format!(
                "worker_id: {id:?} is not registered; register first"
            ))
        })?;
        let rx = match worker.pending.take() {
            Some(rx) => rx,
            None => {
                // A reopened stream: what the old one may not have delivered is sent again (a
                // task is idempotent per task id and epoch).
                let (tx, rx) = mpsc::unbounded_channel();
                if let Some(run) = worker.render.as_ref().and_then(|r| runs.get(r)) {
                    for t in run.tasks.values().filter(|t| !t.done && t.worker_id == id) {
                        let _ = tx.send(Ok(t.sent.clone()));
                    }
                }
                worker.tasks = tx;
                rx
            }
        };
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn handle_report_progress(
        &self,
        request: Request<pb::TaskProgress>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        let mut st = inner.lead()?;
        let State { jobs, runs, .. } = &mut *st;
        let (job, run) = Inner::running(jobs, runs, &req.render_id, req.epoch)?;
        let steps = u64::from(job.record.spec.steps);
        let task = run.tasks.get_mut(&req.task_id).ok_or_else(|| {
            Status::not_found(format!("task_id: no task {:?} in this render", req.task_id))
        })?;
        if task.worker_id != req.worker_id {
            return Err(Status::permission_denied(format!(
                "task {} belongs to another worker",
                req.task_id
            )));
        }
        match &task.kind {
            TaskKind::Denoise { windows } => {
                task.window_steps_done = req.window_steps_done.min(windows.len() as u64 * steps);
            }
            TaskKind::Decode => task.frames_done = req.frames_done,
        }
        if req.checkpoint_step > 0 {
            let TaskKind::Denoise { windows } = &task.kind else {
                return Err(Status::invalid_argument(
                    "checkpoint_step: a decode task has no checkpoints",
                ));
            };
            let every = inner.config.checkpoint_every;
            let k = req.checkpoint_step;
            if u64::from(k) > steps || every == 0 || !k.is_multiple_of(every) {
                return Err(Status::invalid_argument(format!(
                    "checkpoint_step: {k} is not a checkpoint step (every {every} of {steps} steps)"
                )));
            }
            if let Some(w) = req
                .checkpoint_windows
                .iter()
                .find(|w| !windows.contains(&(**w as usize)))
            {
                return Err(Status::invalid_argument(format!(
                    "checkpoint_windows: window {w} is not one of this task's {}",
                    ranges_text(windows)
                )));
            }
            let n = run.plan.windows.len();
            let set = run.checkpoints.entry(k).or_default();
            set.extend(req.checkpoint_windows.iter().map(|w| *w as usize));
            let committed = job.record.checkpoint.as_ref().map_or(0, |c| c.step);
            if set.len() == n && k > committed {
                job.record.checkpoint = Some(CheckpointRecord {
                    step: k,
                    dir: format!("checkpoints/e{}/s{k}", run.epoch),
                    epoch: run.epoch,
                });
                run.checkpoints.retain(|s, _| *s > k);
                tracing::info!(render = %req.render_id, step = k, epoch = run.epoch, "checkpoint committed");
                inner.save(job, None);
            }
        }
        if !req.message.is_empty() {
            job.progress.message = format!("{}: {}", task.worker_name, req.message);
        }
        job.progress.window_steps_done = run.tasks.values().map(|t| t.window_steps_done).sum();
        job.progress.frames_done = run.tasks.values().map(|t| t.frames_done).sum();
        let denoising = req.phase == pb::RenderState::Denoising as i32 || req.window_steps_done > 0;
        if job.record.state == JobState::EncodingText && denoising {
            inner.set_state(job, JobState::Denoising);
        } else {
            inner.publish(job);
        }
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    async fn handle_exchange_halo(
        &self,
        request: Request<pb::HaloRequest>,
    ) -> Result<Response<pb::HaloResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.config.halo_timeout;
        let me = req.window;
        let expected: Vec<usize> = {
            let mut st = inner.lead()?;
            let State {
                jobs, runs, halos, ..
            } = &mut *st;
            let (job, run) = Inner::running(jobs, runs, &req.render_id, req.epoch)?;
            let steps = job.record.spec.steps;
            let n = run.plan.windows.len();
            if me as usize >= n {
                return Err(Status::invalid_argument(format!(
                    "window: is {me}; the plan has windows 0..={}",
                    n - 1
                )));
            }
            if req.step >= steps {
                return Err(Status::invalid_argument(format!(
                    "step: is {}; allowed: 0..={}",
                    req.step,
                    steps - 1
                )));
            }
            let partners = run.partners[me as usize].clone();
            let mut seen = BTreeSet::new();
            let [channels, _, h, w] = run.shape;
            for part in &req.parts {
                let to = part.neighbor_window as usize;
                if !partners.contains(&to) {
                    return Err(Status::invalid_argument(format!(
                        "parts.neighbor_window: {to} is not a halo partner of window {me} \
                         (partners: {partners:?})"
                    )));
                }
                if !seen.insert(to) {
                    return Err(Status::invalid_argument(format!(
                        "parts.neighbor_window: {to} appears twice"
                    )));
                }
                let shared =
                    assemble::intersection(&run.plan.windows[me as usize], &run.plan.windows[to])
                        .expect("partners overlap");
                if part.frame_start as usize != shared.start
                    || part.frame_count as usize != shared.len()
                {
                    return Err(Status::invalid_argument(format!(
                        "parts.frame_start/frame_count: {}+{} for window {to}; the shared frames are {}+{}",
                        part.frame_start,
                        part.frame_count,
                        shared.start,
                        shared.len()
                    )));
                }
                let want = 4 * (channels * part.frame_count * h * w) as usize;
                if part.data.len() != want {
                    return Err(Status::invalid_argument(format!(
                        "parts.data: {} bytes for window {to}; expected {want} (f32 [{channels}, {}, {h}, {w}])",
                        part.data.len(),
                        part.frame_count
                    )));
                }
            }
            if seen.len() != partners.len() {
                let missing: Vec<usize> = partners
                    .iter()
                    .copied()
                    .filter(|p| !seen.contains(p))
                    .collect();
                return Err(Status::invalid_argument(format!(
                    "parts: no part for window(s) {missing:?}; window {me} must send one part to \
                     each partner {partners:?}"
                )));
            }
            // This window is at `step`, so it has its parts of the step before: that slot can go
            // (it was kept so that a retried call after a lost response gets the same answer).
            if req.step > 0 {
                halos.remove(&HaloKey {
                    render: req.render_id.clone(),
                    epoch: req.epoch,
                    step: req.step - 1,
                    to_window: me,
                });
            }
            for part in req.parts {
                let key = HaloKey {
                    render: req.render_id.clone(),
                    epoch: req.epoch,
                    step: req.step,
                    to_window: part.neighbor_window,
                };
                let slot = halos.entry(key).or_default();
                slot.parts.insert(
                    me,
                    pb::HaloPart {
                        neighbor_window: me,
                        ..part
                    },
                );
                slot.notify.notify_one();
            }
            partners
        };
        if expected.is_empty() {
            return Ok(Response::new(pb::HaloResponse { parts: Vec::new() }));
        }
        let key = HaloKey {
            render: req.render_id.clone(),
            epoch: req.epoch,
            step: req.step,
            to_window: me,
        };
        loop {
            let notify = {
                let mut st = inner.lead()?;
                if inner.is_closing() {
                    return Err(Status::unavailable("the coordinator is shutting down"));
                }
                let State {
                    jobs, runs, halos, ..
                } = &mut *st;
                Inner::running(jobs, runs, &req.render_id, req.epoch)?;
                let slot = halos.entry(key.clone()).or_default();
                if expected
                    .iter()
                    .all(|w| slot.parts.contains_key(&(*w as u32)))
                {
                    // Kept until this window's next step: a retry gets the same parts.
                    return Ok(Response::new(pb::HaloResponse {
                        parts: slot.parts.values().cloned().collect(),
                    }));
                }
                Arc::clone(&slot.notify)
            };
            if tokio::time::timeout_at(deadline, notify.notified())
                .await
                .is_err()
            {
                let st = inner.lead()?;
                let have: Vec<u32> = st
                    .halos
                    .get(&key)
                    .map(|s| s.parts.keys().copied().collect())
                    .unwrap_or_default();
                return Err(Status::deadline_exceeded(format!(
                    "halo exchange of window {me} at step {} timed out after {:.0} s: waiting for \
                     windows {expected:?}, received {have:?}",
                    req.step,
                    inner.config.halo_timeout.as_secs_f64()
                )));
            }
        }
    }

    async fn handle_complete_task(
        &self,
        request: Request<pb::TaskResult>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        let mut st = inner.lead()?;
        let State { jobs, runs, .. } = &mut *st;
        let (job, run) = Inner::running(jobs, runs, &req.render_id, req.epoch)?;
        let task = run.tasks.get_mut(&req.task_id).ok_or_else(|| {
            Status::not_found(format!("task_id: no task {:?} in this render", req.task_id))
        })?;
        if task.worker_id != req.worker_id {
            return Err(Status::permission_denied(format!(
                "task {} belongs to another worker",
                req.task_id
            )));
        }
        if task.done {
            return Ok(Response::new(pb::CompleteTaskResponse {}));
        }
        let worker_name = task.worker_name.clone();
        if !req.model_identity.is_empty() {
            run.model_identity = req.model_identity.clone();
        }
        if !req.timings_s.is_empty() {
            run.worker_timings.insert(
                req.task_id.clone(),
                req.timings_s.clone().into_iter().collect(),
            );
        }
        let id = req.render_id.clone();
        let epoch = req.epoch;
        let outcome = req
            .outcome
            .ok_or_else(|| Status::invalid_argument("outcome: is missing"));
        let failure = match (outcome?, &task.kind) {
            (pb::task_result::Outcome::Error(message), _) => {
                // The reporting worker has dropped the task; only the others need a CancelTask.
                task.done = true;
                Some((format!("worker {worker_name}: {message}"), None))
            }
            (pb::task_result::Outcome::Denoise(result), TaskKind::Denoise { windows }) => {
                let windows = windows.clone();
                let [channels, _, h, w] = run.shape;
                let mut got = BTreeMap::new();
                let mut bad = None;
                for wl in result.windows {
                    let i = wl.window as usize;
                    let Some(win) = windows.contains(&i).then(|| run.plan.windows[i]) else {
                        bad = Some(format!(
                            "window {i} is not one of this task's {}",
                            ranges_text(&windows)
                        ));
                        break;
                    };
                    let want = 4 * channels as usize * win.len * (h * w) as usize;
                    if wl.latents.is_empty() {
                        let key = format!("windows/e{}/w{i}.f32", run.epoch);
                        if wl.latents_key != key {
                            bad = Some(format!(
                                "window {i}: latents_key {:?}; expected {key:?}",
                                wl.latents_key
                            ));
                            break;
                        }
                        got.insert(i, WindowData::Key(key));
                        continue;
                    }
                    if wl.latents.len() != want {
                        bad = Some(format!(
                            "window {i}: {} bytes of latents; expected {want} (f32 [{channels}, {}, {h}, {w}])",
                            wl.latents.len(),
                            win.len
                        ));
                        break;
                    }
                    let Some(data) = assemble::f32s_from_le(&wl.latents) else {
                        bad = Some(format!("window {i}: latents are not f32"));
                        break;
                    };
                    got.insert(i, WindowData::Inline(data));
                }
                if bad.is_none() && got.len() != windows.len() {
                    bad = Some(format!(
                        "{} window(s) of latents; the task owns {}",
                        got.len(),
                        ranges_text(&windows)
                    ));
                }
                match bad {
                    Some(reason) => Some((
                        format!("worker {worker_name} sent an invalid denoise result: {reason}"),
                        Some(Status::invalid_argument(format!("denoise: {reason}"))),
                    )),
                    None => {
                        for (i, data) in got {
                            run.latents[i] = Some(data);
                        }
                        task.done = true;
                        task.window_steps_done =
                            windows.len() as u64 * u64::from(job.record.spec.steps);
                        job.progress.window_steps_done =
                            run.tasks.values().map(|t| t.window_steps_done).sum();
                        if run.latents.iter().all(Option::is_some) {
                            let now = Instant::now();
                            run.timings.insert(
                                "denoise",
                                now.duration_since(run.phase_started).as_secs_f64(),
                            );
                            run.phase_started = now;
                            job.progress.message = "fusing the windows' latents".to_string();
                            inner.set_state(job, JobState::Decoding);
                            let output_uri = job.record.output_uri.clone();
                            inner.begin_decode(run, output_uri);
                        } else {
                            inner.publish(job);
                        }
                        None
                    }
                }
            }
            (pb::task_result::Outcome::Decode(result), TaskKind::Decode) => {
                task.done = true;
                task.frames_done = u64::from(result.frame_count);
                run.outputs = result.objects;
                run.frame_count = result.frame_count;
                run.timings
                    .insert("decode", run.phase_started.elapsed().as_secs_f64());
                run.timings
                    .insert("total", run.started.elapsed().as_secs_f64());
                job.progress.frames_done = u64::from(result.frame_count);
                job.progress.message = "writing manifest.json".to_string();
                job.finalizing = true;
                inner.publish(job);
                let manifest = manifest(job, run);
                let output_uri = job.record.output_uri.clone();
                drop(st);
                inner.finalize(id, epoch, output_uri, manifest);
                return Ok(Response::new(pb::CompleteTaskResponse {}));
            }
            (_, _) => Some((
                format!(
                    "worker {worker_name} sent a result of the wrong kind for task {}",
                    req.task_id
                ),
                Some(Status::invalid_argument(
                    "outcome: does not match the task's kind",
                )),
            )),
        };
        if let Some((reason, status)) = failure {
            inner.end_render(&mut st, &id, JobState::Failed, reason);
            if let Some(status) = status {
                return Err(status);
            }
        }
        Ok(Response::new(pb::CompleteTaskResponse {}))
    }
}

type WatchStream = ReceiverStream<Result<pb::RenderEvent, Status>>;
type TaskStream = UnboundedReceiverStream<Result<pb::Task, Status>>;

#[tonic::async_trait]
impl RenderService for Coordinator {
    type WatchRenderStream = WatchStream;

    async fn submit_render(
        &self,
        request: Request<pb::SubmitRenderRequest>,
    ) -> Result<Response<pb::SubmitRenderResponse>, Status> {
        self.handle_submit_render(request)
            .await
            .map_err(errors::enrich)
    }

    async fn get_render(
        &self,
        request: Request<pb::GetRenderRequest>,
    ) -> Result<Response<pb::Render>, Status> {
        self.handle_get_render(request)
            .await
            .map_err(errors::enrich)
    }

    async fn list_renders(
        &self,
        request: Request<pb::ListRendersRequest>,
    ) -> Result<Response<pb::ListRendersResponse>, Status> {
        self.handle_list_renders(request)
            .await
            .map_err(errors::enrich)
    }

    async fn watch_render(
        &self,
        request: Request<pb::WatchRenderRequest>,
    ) -> Result<Response<Self::WatchRenderStream>, Status> {
        self.handle_watch_render(request)
            .await
            .map_err(errors::enrich)
    }

    async fn cancel_render(
        &self,
        request: Request<pb::CancelRenderRequest>,
    ) -> Result<Response<pb::Render>, Status> {
        self.handle_cancel_render(request)
            .await
            .map_err(errors::enrich)
    }
}

#[tonic::async_trait]
impl WorkerService for Coordinator {
    type PullTasksStream = TaskStream;

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.handle_register(request).await.map_err(errors::enrich)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.handle_heartbeat(request).await.map_err(errors::enrich)
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.handle_leave(request).await.map_err(errors::enrich)
    }

    async fn pull_tasks(
        &self,
        request: Request<pb::PullTasksRequest>,
    ) -> Result<Response<Self::PullTasksStream>, Status> {
        self.handle_pull_tasks(request)
            .await
            .map_err(errors::enrich)
    }

    async fn report_progress(
        &self,
        request: Request<pb::TaskProgress>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        self.handle_report_progress(request)
            .await
            .map_err(errors::enrich)
    }

    async fn exchange_halo(
        &self,
        request: Request<pb::HaloRequest>,
    ) -> Result<Response<pb::HaloResponse>, Status> {
        self.handle_exchange_halo(request)
            .await
            .map_err(errors::enrich)
    }

    async fn complete_task(
        &self,
        request: Request<pb::TaskResult>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        self.handle_complete_task(request)
            .await
            .map_err(errors::enrich)
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
        assert_eq!(fingerprint(&spec), fingerprint(&spec.clone()));
        assert_ne!(
            fingerprint(&spec),
            fingerprint(&pb::RenderSpec {
                seed: Some(1),
                ..spec
            })
        );
    }
}
