//! The halo relay: ExchangeHalo deposits a window's parts with its partners and waits for theirs.

use super::*;

impl Coordinator {
    pub(super) async fn handle_exchange_halo(
        &self,
        request: Request<pb::HaloRequest>,
    ) -> Result<Response<pb::HaloResponse>, Error> {
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
                return Err(Error::invalid(
                    "window",
                    format!("is {me}; the plan has windows 0..={}", n - 1),
                ));
            }
            if req.step >= steps {
                return Err(Error::invalid(
                    "step",
                    format!("is {}; allowed: 0..={}", req.step, steps - 1),
                ));
            }
            let partners = run.partners[me as usize].clone();
            let mut seen = BTreeSet::new();
            let [channels, _, h, w] = run.shape;
            for part in &req.parts {
                let to = part.neighbor_window as usize;
                if !partners.contains(&to) {
                    return Err(Error::invalid(
                        "parts.neighbor_window",
                        format!(
                            "{to} is not a halo partner of window {me} \
                         (partners: {partners:?})"
                        ),
                    ));
                }
                if !seen.insert(to) {
                    return Err(Error::invalid(
                        "parts.neighbor_window",
                        format!("{to} appears twice"),
                    ));
                }
                let shared =
                    assemble::intersection(&run.plan.windows[me as usize], &run.plan.windows[to])
                        .expect("partners overlap");
                if part.frame_start as usize != shared.start
                    || part.frame_count as usize != shared.len()
                {
                    return Err(Error::invalid(
                        "parts.frame_start/frame_count",
                        format!(
                            "{}+{} for window {to}; the shared frames are {}+{}",
                            part.frame_start,
                            part.frame_count,
                            shared.start,
                            shared.len()
                        ),
                    ));
                }
                let want = 4 * (channels * part.frame_count * h * w) as usize;
                if part.data.len() != want {
                    return Err(Error::invalid(
                        "parts.data",
                        format!(
                            "{} bytes for window {to}; expected {want} (f32 [{channels}, {}, {h}, {w}])",
                            part.data.len(),
                            part.frame_count
                        ),
                    ));
                }
            }
            if seen.len() != partners.len() {
                let missing: Vec<usize> = partners
                    .iter()
                    .copied()
                    .filter(|p| !seen.contains(p))
                    .collect();
                return Err(Error::invalid(
                    "parts",
                    format!(
                        "no part for window(s) {missing:?}; window {me} must send one part to \
                     each partner {partners:?}"
                    ),
                ));
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
            let bytes: usize = req.parts.iter().map(|p| p.data.len()).sum();
            inner.metrics.halo_bytes.add(bytes as f64);
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
        let waiting = Instant::now();
        loop {
            let notify = {
                let mut st = inner.lead()?;
                if inner.is_closing() {
                    return Err(Error::shutting_down());
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
                    inner
                        .metrics
                        .halo_wait
                        .observe(waiting.elapsed().as_secs_f64());
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
                return Err(Error::plain(
                    Kind::DeadlineExceeded,
                    format!(
                        "halo exchange of window {me} at step {} timed out after {:.0} s: waiting for \
                     windows {expected:?}, received {have:?}",
                        req.step,
                        inner.config.halo_timeout.as_secs_f64()
                    ),
                ));
            }
        }
    }
}
