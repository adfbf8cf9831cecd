//! The events of a render for WatchRender: a log with sequence numbers in which every change of
//! state and every rollback is kept and a run of progress updates within one state collapses to
//! its latest, so a client that resumes after a dropped stream misses no change.

use std::sync::{Arc, Mutex};

use longtake_proto::v1 as pb;
use tokio::sync::watch;

/// The events of one render: every change of state and every rollback kept, a run of progress
/// updates within one state collapsed to its latest, each with a sequence number.
pub(crate) struct EventLog {
    log: Mutex<Vec<Event>>,
    seq: Mutex<u64>,
    /// The latest sequence number, for waking watchers.
    pub(crate) changed: watch::Sender<u64>,
}

struct Event {
    seq: u64,
    /// Kept for good (a change of state, a rollback), or replaceable by the next progress update.
    milestone: bool,
    render: pb::Render,
}

/// Events kept per render at most; past it the oldest milestones go (a resuming client then
/// starts from the oldest kept).
const MAX_EVENTS: usize = 10_000;

impl EventLog {
    /// A log whose sequence numbers start above `base` (a leader's term base, so that a client
    /// resuming on a new leader with a sequence number of the old one misses nothing).
    pub(crate) fn new(base: u64) -> Arc<Self> {
        Arc::new(EventLog {
            log: Mutex::new(Vec::new()),
            seq: Mutex::new(base),
            changed: watch::channel(0).0,
        })
    }

    pub(crate) fn push(&self, render: pb::Render) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let milestone = match log.last() {
            None => true,
            Some(last) => {
                last.render.state != render.state
                    || render
                        .progress
                        .as_ref()
                        .is_some_and(|p| p.message.starts_with("rolled back"))
            }
        };
        if !milestone && log.last().is_some_and(|l| !l.milestone) {
            log.pop();
        }
        log.push(Event {
            seq: *seq,
            milestone,
            render,
        });
        if log.len() > MAX_EVENTS {
            log.remove(0);
        }
        self.changed.send_replace(*seq);
    }

    /// Events after `seq`, or (`seq` = 0) the latest one only.
    pub(crate) fn after(&self, seq: u64) -> Vec<(u64, pb::Render)> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if seq == 0 {
            return log
                .last()
                .map(|e| vec![(e.seq, e.render.clone())])
                .unwrap_or_default();
        }
        log.iter()
            .filter(|e| e.seq > seq)
            .map(|e| (e.seq, e.render.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(state: pb::RenderState, done: u64, message: &str) -> pb::Render {
        pb::Render {
            state: state as i32,
            progress: Some(pb::Progress {
                window_steps_done: done,
                message: message.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn changes_are_kept_progress_collapses_and_resumes_miss_nothing() {
        use pb::RenderState::{Denoising, Queued};
        let log = EventLog::new(1000);
        log.push(render(Queued, 0, "waiting"));
        log.push(render(Denoising, 1, ""));
        log.push(render(Denoising, 2, ""));
        log.push(render(Denoising, 3, ""));
        log.push(render(Denoising, 0, "rolled back to step 0: worker lost"));
        log.push(render(Denoising, 4, ""));
        log.push(render(Denoising, 5, ""));
        let all = log.after(1000);
        let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
        // Queued, the first denoising event, the latest progress before the rollback, the
        // rollback, and the latest progress after it.
        assert_eq!(seqs, [1001, 1002, 1004, 1005, 1007]);
        let done: Vec<u64> = all
            .iter()
            .map(|(_, r)| r.progress.as_ref().unwrap().window_steps_done)
            .collect();
        assert_eq!(done, [0, 1, 3, 0, 5]);
        // Resuming after any sequence number gives exactly the later kept events.
        assert_eq!(log.after(1002).len(), 3);
        assert_eq!(log.after(1003).len(), 3);
        assert_eq!(log.after(1005).len(), 1);
        assert!(log.after(1007).is_empty());
        // A fresh watch starts with the latest.
        assert_eq!(log.after(0), vec![(1007, all[4].1.clone())]);
        assert_eq!(*log.changed.borrow(), 1007);
    }
}
