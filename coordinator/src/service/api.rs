//! The public RenderService: submit, get, list, watch and cancel.

use super::*;

/// The RenderService handlers; [`RenderService`] wraps each to attach the rich error details.
impl Coordinator {
    async fn handle_submit_render(
        &self,
        request: Request<pb::SubmitRenderRequest>,
    ) -> Result<Response<pb::SubmitRenderResponse>, Error> {
        let inner = &self.inner;
        let req = request.into_inner();
        let Some(spec) = req.spec else {
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
        let model = inner
            .config
            .models
            .model_info(spec.model.trim())
            .map_err(|e| Error::invalid("model", e))?;
        let valid = validate::validate(
            &spec,
            &inner.config.limits,
            &model,
            &inner.config.default_output,
            random_u64(),
        )?;
        // A repeat with the same idempotency key returns the render created the first time.
        let repeat = |st: &State| -> Option<Result<Response<pb::SubmitRenderResponse>, Error>> {
            let id = st.idempotency.get(&key).filter(|_| !key.is_empty())?;
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
        let id = request.into_inner().render_id;
        let st = self.inner.lead()?;
        let job = st
            .jobs
            .get(&id)
            .ok_or_else(|| Error::not_found("render_id", format!("no render {id:?}")))?;
        Ok(Response::new(job.snapshot()))
    }

    async fn handle_list_renders(
        &self,
        request: Request<pb::ListRendersRequest>,
    ) -> Result<Response<pb::ListRendersResponse>, Error> {
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
        let req = request.into_inner();
        let id = req.render_id;
        let log = {
            let st = self.inner.lead()?;
            Arc::clone(
                &st.jobs
                    .get(&id)
                    .ok_or_else(|| Error::not_found("render_id", format!("no render {id:?}")))?
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
        let id = request.into_inner().render_id;
        let mut st = self.inner.lead()?;
        let job = st
            .jobs
            .get(&id)
            .ok_or_else(|| Error::not_found("render_id", format!("no render {id:?}")))?;
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

type WatchStream = ReceiverStream<Result<pb::RenderEvent, Status>>;

#[tonic::async_trait]
impl RenderService for Coordinator {
    type WatchRenderStream = WatchStream;

    async fn submit_render(
        &self,
        request: Request<pb::SubmitRenderRequest>,
    ) -> Result<Response<pb::SubmitRenderResponse>, Status> {
        self.handle_submit_render(request)
            .await
            .map_err(Status::from)
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
}
