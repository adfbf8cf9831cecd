//! The coordinator's Prometheus metrics: counters moved where things happen, and gauges
//! computed from the state when `/metrics` is scraped.

use longtake_telemetry::{Counter, Family, Histogram, Registry, SECONDS, labels};

use super::*;

pub(super) struct Metrics {
    pub registry: Arc<Registry>,
    pub submitted: Arc<Family<Counter>>,
    pub rejected: Arc<Family<Counter>>,
    pub finished: Arc<Family<Counter>>,
    pub window_steps: Arc<Counter>,
    pub rollbacks: Arc<Counter>,
    pub checkpoints: Arc<Counter>,
    pub halo_bytes: Arc<Counter>,
    pub halo_wait: Arc<Histogram>,
    pub leader_changes: Arc<Counter>,
    pub expired_leases: Arc<Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        Metrics {
            submitted: r.counters(
                "longtake_renders_submitted_total",
                "Renders accepted, by tenant (empty on an open API).",
            ),
            rejected: r.counters(
                "longtake_submissions_rejected_total",
                "SubmitRender calls refused, by reason.",
            ),
            finished: r.counters(
                "longtake_renders_finished_total",
                "Renders that reached a terminal state, by state.",
            ),
            window_steps: r.counter(
                "longtake_window_steps_total",
                "Window-steps the workers reported done (rate: window-steps per second).",
            ),
            rollbacks: r.counter(
                "longtake_rollbacks_total",
                "Renders rolled back (a worker lost, a new leader).",
            ),
            checkpoints: r.counter(
                "longtake_checkpoints_committed_total",
                "Checkpoints committed (every window of a render at one step).",
            ),
            halo_bytes: r.counter(
                "longtake_halo_bytes_total",
                "Halo bytes relayed between windows.",
            ),
            halo_wait: r.histogram(
                "longtake_halo_exchange_seconds",
                "Time an ExchangeHalo call waited for its partners.",
                SECONDS,
            ),
            leader_changes: r.counter(
                "longtake_leader_changes_total",
                "Times this replica became the leader.",
            ),
            expired_leases: r.counter(
                "longtake_worker_leases_expired_total",
                "Workers dropped because their lease lapsed.",
            ),
            registry: r,
        }
    }

    /// Gauges read from the state at every scrape.
    pub fn register_state(&self, inner: Weak<Inner>) {
        let r = &self.registry;
        let w = inner.clone();
        r.computed(
            "longtake_renders",
            "Renders by state and tenant.",
            Box::new(move || {
                let Some(inner) = w.upgrade() else {
                    return Vec::new();
                };
                let st = inner.lock();
                let mut counts: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
                for j in st.jobs.values() {
                    *counts
                        .entry((j.record.state.name(), j.record.tenant.clone()))
                        .or_default() += 1;
                }
                counts
                    .into_iter()
                    .map(|((s, t), n)| (labels(&[("state", s), ("tenant", &t)]), n as f64))
                    .collect()
            }),
        );
        let w = inner.clone();
        r.computed(
            "longtake_queue_depth",
            "Renders queued (waiting for workers).",
            Box::new(move || {
                let n = w.upgrade().map_or(0, |inner| {
                    let st = inner.lock();
                    st.jobs
                        .values()
                        .filter(|j| j.record.state == JobState::Queued)
                        .count()
                });
                vec![(Vec::new(), n as f64)]
            }),
        );
        let w = inner.clone();
        r.computed(
            "longtake_queued_window_steps",
            "Window-steps still to do in renders queued or running (what autoscaling follows).",
            Box::new(move || {
                let n = w.upgrade().map_or(0, |inner| {
                    let st = inner.lock();
                    st.jobs
                        .values()
                        .filter(|j| !j.record.state.is_terminal())
                        .map(remaining_window_steps)
                        .sum::<u64>()
                });
                vec![(Vec::new(), n as f64)]
            }),
        );
        let w = inner.clone();
        r.computed(
            "longtake_workers",
            "Registered workers (holding a lease), by state: busy (bound to a render) or idle.",
            Box::new(move || {
                let (busy, idle) = w.upgrade().map_or((0, 0), |inner| {
                    let st = inner.lock();
                    let busy = st.workers.values().filter(|w| w.render.is_some()).count();
                    (busy, st.workers.len() - busy)
                });
                vec![
                    (labels(&[("state", "busy")]), busy as f64),
                    (labels(&[("state", "idle")]), idle as f64),
                ]
            }),
        );
        r.computed(
            "longtake_leader",
            "1 while this replica leads, else 0.",
            Box::new(move || {
                let leading = inner.upgrade().is_some_and(|i| i.lock().leading);
                vec![(Vec::new(), if leading { 1.0 } else { 0.0 })]
            }),
        );
    }
}

/// Window-steps a render still needs: from its plan once planned, else from the plan its spec
/// will get.
fn remaining_window_steps(j: &Job) -> u64 {
    let p = &j.progress;
    if p.window_steps_total > 0 {
        return p.window_steps_total.saturating_sub(p.window_steps_done);
    }
    let s = &j.record.spec;
    let windows = plan::plan(
        s.latent_frames() as usize,
        s.window as usize,
        s.overlap as usize,
    )
    .map_or(1, |p| p.windows.len() as u64);
    windows * u64::from(s.steps)
}
