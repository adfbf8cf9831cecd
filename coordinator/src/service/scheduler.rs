//! Scheduling and the reconciler: which render runs where, and what happens when a worker is lost.

use super::outputs::{latent_shape, window_plan};
use super::*;

impl Inner {
    /// Start queued renders, highest priority (then oldest) first, while a worker is free.
    /// A render bound to a kernel family only takes free workers of that family; one that
    /// cannot start now does not hold back the renders behind it.
    pub(super) fn schedule(&self, st: &mut State) {
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
    pub(super) fn start(&self, st: &mut State, id: &str) {
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
                traceparent: job.record.traceparent.clone().unwrap_or_default(),
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
    pub(super) fn end_render(&self, st: &mut State, id: &str, state: JobState, reason: String) {
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
    pub(super) fn roll_back(&self, st: &mut State, id: &str, reason: String) {
        if !self.stop_run(st, id, &reason) {
            return;
        }
        let max = self.config.max_attempts;
        let Some(job) = st.jobs.get_mut(id) else {
            return;
        };
        self.metrics.rollbacks.inc();
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
    pub(super) fn stop_run(&self, st: &mut State, id: &str, reason: &str) -> bool {
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
                        traceparent: String::new(),
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
    pub(super) fn expire_leases(&self) {
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
            self.metrics.expired_leases.inc();
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
    pub(super) fn running<'a>(
        jobs: &'a mut HashMap<String, Job>,
        runs: &'a mut HashMap<String, Run>,
        render_id: &str,
        epoch: u64,
    ) -> Result<(&'a mut Job, &'a mut Run), Error> {
        let job = jobs
            .get_mut(render_id)
            .ok_or_else(|| Error::not_found("render_id", format!("no render {render_id:?}")))?;
        match runs.get_mut(render_id) {
            Some(run) => {
                if run.epoch != epoch {
                    return Err(Error::field(
                        Kind::StaleEpoch,
                        "epoch",
                        format!(
                            "{epoch} is stale; render {render_id} is at epoch {}",
                            run.epoch
                        ),
                    ));
                }
                Ok((job, run))
            }
            _ => Err(match job.record.state {
                JobState::Cancelled => {
                    Error::plain(Kind::Cancelled, format!("render {render_id} was cancelled"))
                }
                JobState::Failed => Error::plain(
                    Kind::NotRunning,
                    format!("render {render_id} failed: {}", job.record.error),
                ),
                state => Error::plain(
                    Kind::NotRunning,
                    format!("render {render_id} is not running (state {state:?})"),
                ),
            }),
        }
    }
}
