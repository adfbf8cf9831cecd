//! A render's outputs: storing the windows' latents, the decode task, and the write-once manifest.

use super::*;

impl Inner {
    /// Every window's latents are in: store the ones handed in inline as objects (workers with
    /// an output send keys), commit the keys in the job, and send the decode task. A failure
    /// here rolls the render back.
    pub(super) fn begin_decode(self: &Arc<Self>, run: &mut Run, output_uri: String) {
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
    pub(super) fn windows_stored(&self, st: &mut State, id: &str, epoch: u64, keys: Vec<String>) {
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
    pub(super) fn dispatch_decode(&self, st: &mut State, id: &str, epoch: u64) {
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
            traceparent: job.record.traceparent.clone().unwrap_or_default(),
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
    pub(super) fn finalize(
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
pub(super) fn window_plan(plan: &WindowPlan) -> pb::WindowPlan {
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

pub(super) fn latent_shape(shape: [u32; 4]) -> pb::LatentShape {
    pb::LatentShape {
        channels: shape[0],
        frames: shape[1],
        height: shape[2],
        width: shape[3],
    }
}

/// `value` as JSON through its text form, so that its `f32` fields read as written (0.9), where
/// `serde_json::to_value` widens them (0.8999999761581421).
fn as_written(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_string(value)
        .and_then(|text| serde_json::from_str(&text))
        .unwrap_or(serde_json::Value::Null)
}

/// The manifest: request, plan, model, outputs, timings and versions of a finished render.
pub(super) fn manifest(job: &Job, run: &Run) -> serde_json::Value {
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
        "request": as_written(spec),
        "idempotency_key": r.idempotency_key,
        "seed": spec.seed,
        "kernel_family": r.kernel_family,
        "trace_id": r.traceparent.as_deref().and_then(longtake_telemetry::traces::trace_id),
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
            "noise_layout": spec.noise_layout,
            // Autoregressive windows only (null for the others, which hold nothing).
            "hold_noise": (spec.stitching == StitchingMode::Autoregressive).then(|| as_written(&spec.hold_noise)),
            "hold_release": (spec.stitching == StitchingMode::Autoregressive).then(|| as_written(&spec.hold_release)),
            "windows": windows,
        },
        "model": {
            "name": spec.model,
            "path": if spec.is_builtin() { serde_json::Value::Null } else { spec.model.clone().into() },
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
