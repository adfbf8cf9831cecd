//! The WorkerService: registration, leases, task streams, progress and results.

use super::outputs::manifest;
use super::*;
use tracing::Instrument;

/// The WorkerService handlers, wrapped by [`WorkerService`] like the public ones.
impl Coordinator {
    async fn handle_register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Error> {
        let req = request.into_inner();
        let inner = &self.inner;
        if inner.is_closing() {
            return Err(Error::shutting_down());
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
    ) -> Result<Response<pb::HeartbeatResponse>, Error> {
        let id = request.into_inner().worker_id;
        let mut st = self.inner.lead()?;
        let worker = st.workers.get_mut(&id).ok_or_else(|| {
            Error::not_found(
                "worker_id",
                format!("{id:?} is not registered (its lease lapsed?); register again"),
            )
        })?;
        worker.last_heartbeat = Instant::now();
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn handle_leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Error> {
        let req = request.into_inner();
        let inner = &self.inner;
        let mut st = inner.lead()?;
        let worker = st.workers.remove(&req.worker_id).ok_or_else(|| {
            Error::not_found(
                "worker_id",
                format!("{:?} is not registered", req.worker_id),
            )
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
    ) -> Result<Response<TaskStream>, Error> {
        let id = request.into_inner().worker_id;
        let mut st = self.inner.lead()?;
        let State { workers, runs, .. } = &mut *st;
        let worker = workers.get_mut(&id).ok_or_else(|| {
            Error::not_found(
                "worker_id",
                format!("{id:?} is not registered; register first"),
            )
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
    ) -> Result<Response<pb::ReportProgressResponse>, Error> {
        let req = request.into_inner();
        let inner = &self.inner;
        let mut st = inner.lead()?;
        let State { jobs, runs, .. } = &mut *st;
        let (job, run) = Inner::running(jobs, runs, &req.render_id, req.epoch)?;
        let steps = u64::from(job.record.spec.steps);
        let task = run.tasks.get_mut(&req.task_id).ok_or_else(|| {
            Error::not_found(
                "task_id",
                format!("no task {:?} in this render", req.task_id),
            )
        })?;
        if task.worker_id != req.worker_id {
            return Err(Error::field(
                Kind::NotYourTask,
                "task_id",
                format!("{} belongs to another worker", req.task_id),
            ));
        }
        match &task.kind {
            TaskKind::Denoise { windows } => {
                let done = req.window_steps_done.min(windows.len() as u64 * steps);
                if done > task.window_steps_done {
                    inner
                        .metrics
                        .window_steps
                        .add((done - task.window_steps_done) as f64);
                }
                task.window_steps_done = done;
            }
            TaskKind::Decode => task.frames_done = req.frames_done,
        }
        if req.checkpoint_step > 0 {
            let TaskKind::Denoise { windows } = &task.kind else {
                return Err(Error::invalid(
                    "checkpoint_step",
                    "a decode task has no checkpoints",
                ));
            };
            let every = inner.config.checkpoint_every;
            let k = req.checkpoint_step;
            if u64::from(k) > steps || every == 0 || !k.is_multiple_of(every) {
                return Err(Error::invalid(
                    "checkpoint_step",
                    format!("{k} is not a checkpoint step (every {every} of {steps} steps)"),
                ));
            }
            if let Some(w) = req
                .checkpoint_windows
                .iter()
                .find(|w| !windows.contains(&(**w as usize)))
            {
                return Err(Error::invalid(
                    "checkpoint_windows",
                    format!(
                        "window {w} is not one of this task's {}",
                        ranges_text(windows)
                    ),
                ));
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
                inner.metrics.checkpoints.inc();
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
}

impl Coordinator {
    async fn handle_complete_task(
        &self,
        request: Request<pb::TaskResult>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Error> {
        let req = request.into_inner();
        let inner = &self.inner;
        let mut st = inner.lead()?;
        let State { jobs, runs, .. } = &mut *st;
        let (job, run) = Inner::running(jobs, runs, &req.render_id, req.epoch)?;
        let task = run.tasks.get_mut(&req.task_id).ok_or_else(|| {
            Error::not_found(
                "task_id",
                format!("no task {:?} in this render", req.task_id),
            )
        })?;
        if task.worker_id != req.worker_id {
            return Err(Error::field(
                Kind::NotYourTask,
                "task_id",
                format!("{} belongs to another worker", req.task_id),
            ));
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
            .ok_or_else(|| Error::invalid("outcome", "is missing"));
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
                        Some(Error::invalid("denoise", reason)),
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
                Some(Error::invalid("outcome", "does not match the task's kind")),
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

type TaskStream = UnboundedReceiverStream<Result<pb::Task, Status>>;

#[tonic::async_trait]
impl WorkerService for Coordinator {
    type PullTasksStream = TaskStream;

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.handle_register(request).await.map_err(Status::from)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.handle_heartbeat(request).await.map_err(Status::from)
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.handle_leave(request).await.map_err(Status::from)
    }

    async fn pull_tasks(
        &self,
        request: Request<pb::PullTasksRequest>,
    ) -> Result<Response<Self::PullTasksStream>, Status> {
        self.handle_pull_tasks(request).await.map_err(Status::from)
    }

    async fn report_progress(
        &self,
        request: Request<pb::TaskProgress>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let span = remote_span("report_progress", &request);
        self.handle_report_progress(request)
            .instrument(span)
            .await
            .map_err(Status::from)
    }

    async fn exchange_halo(
        &self,
        request: Request<pb::HaloRequest>,
    ) -> Result<Response<pb::HaloResponse>, Status> {
        let span = remote_span("exchange_halo", &request);
        self.handle_exchange_halo(request)
            .instrument(span)
            .await
            .map_err(Status::from)
    }

    async fn complete_task(
        &self,
        request: Request<pb::TaskResult>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let span = remote_span("complete_task", &request);
        self.handle_complete_task(request)
            .instrument(span)
            .await
            .map_err(Status::from)
    }
}

/// A span for a worker's call about a task: a child of the worker's span when the call carries
/// a `traceparent` (so it joins the render's trace).
fn remote_span<T>(name: &'static str, request: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!("worker_call", call = name);
    longtake_telemetry::traces::set_parent_from(&span, request.metadata());
    span
}
