//! The public RenderService: submit, get, list, watch and cancel.

use super::*;
use crate::access::{Caller, Tenant};

/// The RenderService handlers; [`RenderService`] wraps each to attach the rich error details.
impl Coordinator {
    async fn handle_submit_render(
        &self,
        request: Request<pb::SubmitRenderRequest>,
    ) -> Result<Response<pb::SubmitRenderResponse>, Error> {
        let inner = &self.inner;
        let caller = Caller::of(&request);
        let tenant = caller.tenant().to_string();
        // The render's trace: this span, a child of the caller's when it sent a traceparent.
        let span = tracing::info_span!("render", tenant = %tenant, render = tracing::field::Empty);
        longtake_telemetry::traces::set_parent_from(&span, request.metadata());
        let traceparent = longtake_telemetry::traces::traceparent(&span);
        let req = request.into_inner();
        let Some(mut spec) = req.spec else {
            return Err(Error::invalid("spec", "is missing"));
        };
        let key = req.idempotency_key;
        if key.chars().count() > validate::MAX_IDEMPOTENCY_KEY_CHARS {
            return Err(Error::invalid(
                "idempotency_key",
                format!(
                    "is {} characters; at most {}",
                    key.chars().count(),
                    validate::MAX_IDEMPOTENCY_KEY_CHARS
                ),
            ));
        }
        let fingerprint = fingerprint(&spec);
        let config = &inner.config;
        if !config.client_paths && !spec.output.trim().is_empty() {
            return Err(Error::invalid(
                "spec.output",
                "must be empty: this coordinator writes every render under its own store",
            ));
        }
        spec.model = config
            .models
            .location(spec.model.trim(), config.client_paths)
            .map_err(|e| Error::invalid("model", e))?;
        let model = config
            .models
            .model_info(&spec.model)
            .map_err(|e| Error::invalid("model", e))?;
        // Each tenant's renders go under its own prefix of the store.
        let default_output = match &caller.0 {
            Some(t) => output::join_uri(&config.default_output, &format!("tenants/{}", t.name)),
            None => config.default_output.clone(),
        };
        let valid =
            validate::validate(&spec, &config.limits, &model, &default_output, random_u64())?;
        if let Some(t) = &caller.0
            && let Some(max) = t.limits.max_request_seconds
            && valid.duration() > max
        {
            return Err(Error::field(
                Kind::LimitReached,
                "max_request_seconds",
                format!(
                    "the request is {:.2} s of video; tenant {:?} may request at most {max} s",
                    valid.duration(),
                    t.name
                ),
            ));
        }
        let idem = (tenant.clone(), key.clone());
        // A repeat with the same idempotency key returns the render created the first time.
        let repeat = |st: &State| -> Option<Result<Response<pb::SubmitRenderResponse>, Error>> {
            let id = st.idempotency.get(&idem).filter(|_| !key.is_empty())?;
            let job = &st.jobs[id];
            if job.record.request_fingerprint == fingerprint {
                return Some(Ok(Response::new(pb::SubmitRenderResponse {
                    render_id: id.clone(),
                    created: false,
                })));
            }
            Some(Err(Error::field(
                Kind::IdempotencyKeyReused,
                "idempotency_key",
                format!(
                    "{key:?} was already used for render {id} with a different \
                 spec; repeat that spec exactly to get the same render, or use a new key"
                ),
            )))
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
                return Err(Error::field(
                    Kind::Unavailable,
                    "initial_noise",
                    format!("could not be stored under {output_uri}: {e}"),
                ));
            }
        }
        let (id, stored) = {
            let mut st = inner.lead()?;
            if let Some(r) = repeat(&st) {
                return r;
            }
            if let Some(t) = &caller.0 {
                check_tenant_limits(&st, t, valid.duration())?;
            }
            span.record("render", id.as_str());
            let record = JobRecord {
                id: id.clone(),
                tenant: tenant.clone(),
                traceparent: traceparent.clone(),
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
                st.idempotency.insert(idem, id.clone());
            }
            tracing::info!(render = %id, "render queued");
            inner.schedule(&mut st);
            (id, stored)
        };
        match stored.await {
            Ok(Ok(())) => {
                inner.metrics.submitted.with(&[("tenant", &tenant)]).inc();
                Ok(Response::new(pb::SubmitRenderResponse {
                    render_id: id,
                    created: true,
                }))
            }
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
                Err(Error::unavailable(format!(
                    "render {id} could not be stored: {why}"
                )))
            }
        }
    }

    async fn handle_get_render(
        &self,
        request: Request<pb::GetRenderRequest>,
    ) -> Result<Response<pb::Render>, Error> {
        let caller = Caller::of(&request);
        let id = request.into_inner().render_id;
        let st = self.inner.lead()?;
        Ok(Response::new(visible(&st, &caller, &id)?.snapshot()))
    }

    async fn handle_list_renders(
        &self,
        request: Request<pb::ListRendersRequest>,
    ) -> Result<Response<pb::ListRendersResponse>, Error> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(Error::invalid(
                    "page_size",
                    format!("is {n}; allowed: 1..=1000 (0: 100)"),
                ));
            }
        };
        let mut states = BTreeSet::new();
        for s in &req.states {
            let state = pb::RenderState::try_from(*s)
                .ok()
                .and_then(JobState::from_proto)
                .ok_or_else(|| {
                    Error::invalid(
                        "states",
                        format!("{s} is not a render state (allowed: 1..=8)"),
                    )
                })?;
            states.insert(state.to_proto() as i32);
        }
        // Token: "<created_at_ms>.<id>" of the last render of the previous page.
        let after: Option<(u64, String)> =
            if req.page_token.is_empty() {
                None
            } else {
                let parsed = req
                    .page_token
                    .split_once('.')
                    .and_then(|(ms, id)| Some((ms.parse().ok()?, id.to_string())));
                Some(parsed.ok_or_else(|| {
                    Error::invalid("page_token", "is not a token this server issued")
                })?)
            };
        let st = self.inner.lead()?;
        let mut jobs: Vec<&Job> = st
            .jobs
            .values()
            .filter(|j| caller.0.is_none() || j.record.tenant == caller.tenant())
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
    ) -> Result<Response<WatchStream>, Error> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let id = req.render_id;
        let log = {
            let st = self.inner.lead()?;
            Arc::clone(&visible(&st, &caller, &id)?.events)
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
                        let _ = tx.send(Err(Error::shutting_down().into())).await;
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
    ) -> Result<Response<pb::Render>, Error> {
        let caller = Caller::of(&request);
        let id = request.into_inner().render_id;
        let mut st = self.inner.lead()?;
        let job = visible(&st, &caller, &id)?;
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

    async fn handle_delete_render(
        &self,
        request: Request<pb::DeleteRenderRequest>,
    ) -> Result<Response<pb::DeleteRenderResponse>, Error> {
        let caller = Caller::of(&request);
        let id = request.into_inner().render_id;
        let output_uri = {
            let st = self.inner.lead()?;
            let job = visible(&st, &caller, &id)?;
            if !job.record.state.is_terminal() {
                return Err(Error::field(
                    Kind::NotFinished,
                    "render_id",
                    format!(
                        "render {id} is {}; only a finished render can be deleted (cancel it \
                         first)",
                        job.record.state.name()
                    ),
                ));
            }
            job.record.output_uri.clone()
        };
        let objects_deleted = self.inner.delete_render(&id, &output_uri).await?;
        Ok(Response::new(pb::DeleteRenderResponse { objects_deleted }))
    }
}

/// The render `id` if the caller may see it: on an open API every render, with tenants only the
/// caller's own (another tenant's render is NOT_FOUND, as if it did not exist).
fn visible<'a>(st: &'a State, caller: &Caller, id: &str) -> Result<&'a Job, Error> {
    st.jobs
        .get(id)
        .filter(|j| caller.0.is_none() || j.record.tenant == caller.tenant())
        .ok_or_else(|| Error::not_found("render_id", format!("no render {id:?}")))
}

/// The tenant's limits on renders not yet finished, for a new render of `seconds`.
fn check_tenant_limits(st: &State, t: &Tenant, seconds: f64) -> Result<(), Error> {
    let open: Vec<&Job> = st
        .jobs
        .values()
        .filter(|j| j.record.tenant == t.name && !j.record.state.is_terminal())
        .collect();
    if let Some(max) = t.limits.concurrent_renders
        && open.len() >= max as usize
    {
        return Err(Error::field(
            Kind::LimitReached,
            "concurrent_renders",
            format!(
                "tenant {:?} has {} renders queued or running; its limit is {max} (wait for one \
                 to finish, or cancel one)",
                t.name,
                open.len()
            ),
        ));
    }
    if let Some(max) = t.limits.queued_video_seconds {
        let queued: f64 = open.iter().map(|j| j.record.spec.duration()).sum();
        if queued + seconds > max {
            return Err(Error::field(
                Kind::LimitReached,
                "queued_video_seconds",
                format!(
                    "tenant {:?} has {queued:.2} s of video queued or running; this render's \
                     {seconds:.2} s would exceed its limit of {max} s",
                    t.name
                ),
            ));
        }
    }
    Ok(())
}

type WatchStream = ReceiverStream<Result<pb::RenderEvent, Status>>;

#[tonic::async_trait]
impl RenderService for Coordinator {
    type WatchRenderStream = WatchStream;

    async fn submit_render(
        &self,
        request: Request<pb::SubmitRenderRequest>,
    ) -> Result<Response<pb::SubmitRenderResponse>, Status> {
        self.handle_submit_render(request).await.map_err(|e| {
            self.inner
                .metrics
                .rejected
                .with(&[("reason", e.kind.reason())])
                .inc();
            Status::from(e)
        })
    }

    async fn get_render(
        &self,
        request: Request<pb::GetRenderRequest>,
    ) -> Result<Response<pb::Render>, Status> {
        self.handle_get_render(request).await.map_err(Status::from)
    }

    async fn list_renders(
        &self,
        request: Request<pb::ListRendersRequest>,
    ) -> Result<Response<pb::ListRendersResponse>, Status> {
        self.handle_list_renders(request)
            .await
            .map_err(Status::from)
    }

    async fn watch_render(
        &self,
        request: Request<pb::WatchRenderRequest>,
    ) -> Result<Response<Self::WatchRenderStream>, Status> {
        self.handle_watch_render(request)
            .await
            .map_err(Status::from)
    }

    async fn cancel_render(
        &self,
        request: Request<pb::CancelRenderRequest>,
    ) -> Result<Response<pb::Render>, Status> {
        self.handle_cancel_render(request)
            .await
            .map_err(Status::from)
    }

    async fn delete_render(
        &self,
        request: Request<pb::DeleteRenderRequest>,
    ) -> Result<Response<pb::DeleteRenderResponse>, Status> {
        self.handle_delete_render(request)
            .await
            .map_err(Status::from)
    }
}
