//! A denoise task: the owned windows stepped together through the sampler, predictions over
//! shared frames exchanged with the windows of other workers, checkpoints written as asked.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use longtake_model::comm::SoloComm;
use longtake_model::io::read_f32_bytes;
use longtake_model::noise::{NoisePlan, laid_out_noise};
use longtake_model::pipeline::{ClipRequest, PipelineBackend};
use longtake_model::window::{self, Geometry, Hold, Part, Stitching, WindowSpec, WindowState};
use longtake_proto::v1 as pb;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;

use super::{
    CANCELLED, Compute, TaskResult, f32_from_le, f32_le, geometry, object_key, open_store,
    window_specs,
};
use crate::runtime::{flag, noise_layout_from_pb, stitching_from_pb};

impl<B: PipelineBackend> Compute<B> {
    pub(super) fn denoise(
        &mut self,
        task_id: &str,
        t: &pb::DenoiseTask,
        timings: &mut HashMap<String, f64>,
    ) -> TaskResult<pb::DenoiseResult> {
        let spec = t.spec.as_ref().ok_or("denoise task without a spec")?;
        let shape = t
            .latent_shape
            .as_ref()
            .ok_or("denoise task without a latent shape")?;
        let plan_pb = t.plan.as_ref().ok_or("denoise task without a plan")?;
        let pipe = self.pipeline(&spec.model)?;
        let geo = geometry(shape);
        let plan = window_specs(plan_pb);
        let stitching = stitching_from_pb(spec.stitching);
        let steps = spec.steps.unwrap_or(50) as usize;
        let req = ClipRequest {
            prompt: spec.prompt.clone(),
            negative_prompt: Some(spec.negative_prompt.clone()),
            num_frames: t.num_frames as usize,
            height: geo.height * pipe.dir.vae.spatial_factor(),
            width: geo.width * pipe.dir.vae.spatial_factor(),
            steps,
            guidance: spec.guidance.unwrap_or(5.0),
            flow_shift: spec.flow_shift.map(f64::from),
            seed: spec.seed.unwrap_or(0),
            noise: None,
        };
        let stored_noise = if t.initial_noise_key.is_empty() {
            None
        } else {
            let (store, prefix) = open_store(&t.output_uri)?;
            let key = object_key(&prefix, &t.initial_noise_key);
            let bytes = self
                .read_object(&*store, &key)
                .map_err(|e| format!("initial noise: reading {key}: {e}"))?;
            Some(bytes)
        };
        let noise = match stored_noise.as_ref().or(spec.initial_noise.as_ref()) {
            Some(bytes) => {
                let (s, data) =
                    read_f32_bytes(bytes, "noise").map_err(|e| format!("initial noise: {e}"))?;
                if s != [1, geo.channels, geo.frames, geo.height, geo.width] {
                    return Err(format!(
                        "initial noise has shape {s:?}; the render needs [1, {}, {}, {}, {}]",
                        geo.channels, geo.frames, geo.height, geo.width
                    ));
                }
                data
            }
            None => {
                let layout = NoisePlan {
                    layout: noise_layout_from_pb(spec.noise_layout),
                    window: plan_pb.window as usize,
                    overlap: plan_pb.overlap as usize,
                };
                laid_out_noise(
                    req.seed,
                    layout,
                    geo.channels,
                    0..geo.frames,
                    geo.height,
                    geo.width,
                )
            }
        };
        let cancel = flag(&self.cancelled, &t.render_id, t.epoch);
        let comm = SoloComm::new(&self.backend);
        let clock = Instant::now();
        let stop = || cancel.load(Ordering::SeqCst) || self.cancel_all.load(Ordering::SeqCst);
        let guided = pipe
            .guided_until(&req, &mut Vec::new(), &stop)
            .map_err(|e| match e {
                longtake_model::Error::Cancelled(_) => CANCELLED.to_string(),
                e => e.to_string(),
            })?;
        timings.insert("text_encode".into(), clock.elapsed().as_secs_f64());
        let scheduler = pipe.scheduler(&req).map_err(|e| e.to_string())?;
        let owned: Vec<usize> = t.owned_windows.iter().map(|w| *w as usize).collect();
        if owned.iter().any(|w| *w >= plan.len()) {
            return Err(format!(
                "owned windows {owned:?} are not all in a plan of {}",
                plan.len()
            ));
        }
        let clock = Instant::now();
        let mut done = 0u64;
        let report = |done: u64| {
            self.progress(
                (task_id, &t.render_id, t.epoch),
                pb::RenderState::Denoising,
                done,
                0,
                String::new(),
            );
        };
        let finals: Vec<Part> = if stitching == Stitching::Autoregressive
            && owned.len() == plan.len()
        {
            // Sequential by nature: the whole sequence runs here.
            let out = window::denoise(
                &guided,
                &comm,
                &scheduler,
                steps,
                &geo,
                &noise,
                &plan,
                stitching,
                Hold {
                    noise: spec.hold_noise.unwrap_or(1.0),
                    release: spec.hold_release.unwrap_or(0.0),
                },
                |d, _| {
                    if d % plan.len() == 0 {
                        report(d as u64);
                    }
                },
            )
            .map_err(|e| e.to_string())?;
            plan.iter()
                .enumerate()
                .map(|(i, w)| Part {
                    window: i,
                    start: w.start,
                    len: w.len,
                    data: geo.take(&out, w.frames()),
                })
                .collect()
        } else if stitching == Stitching::Autoregressive {
            return Err("autoregressive renders must be planned onto one worker".into());
        } else {
            let mut states: Vec<WindowState> = owned
                .iter()
                .map(|&i| WindowState::new(i, plan[i].clone(), &geo, &noise, &scheduler, steps))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let every = t.checkpoint_every as usize;
            let store = if every > 0 || !t.resume_from.is_empty() {
                Some(open_store(&t.output_uri)?)
            } else {
                None
            };
            let first = t.resume_step as usize;
            if let Some((store, prefix)) = store.as_ref().filter(|_| !t.resume_from.is_empty()) {
                let clock = Instant::now();
                for w in states.iter_mut() {
                    let key = object_key(
                        prefix,
                        &format!("{}/w{}.safetensors", t.resume_from, w.index),
                    );
                    let bytes = self
                        .read_object(&**store, &key)
                        .map_err(|e| format!("cannot resume: reading the checkpoint {key}: {e}"))?;
                    w.restore(&bytes)
                        .map_err(|e| format!("cannot resume from {key}: {e}"))?;
                    if w.step_index() != first {
                        return Err(format!(
                            "cannot resume: {key} is after step {}, the task resumes after step {first}",
                            w.step_index()
                        ));
                    }
                }
                timings.insert("resume".into(), clock.elapsed().as_secs_f64());
                done = (first * states.len()) as u64;
            }
            let mut checkpoint_s = 0.0;
            // Time spent in halo exchanges (relay plus waiting for the neighbours' step).
            let mut halo_s = 0.0;
            for step in first..steps {
                if cancel.load(Ordering::SeqCst) || self.cancel_all.load(Ordering::SeqCst) {
                    return Err(CANCELLED.into());
                }
                let step_clock = Instant::now();
                let _step = tracing::info_span!("step", step, windows = states.len()).entered();
                let preds: Vec<Part> = states
                    .iter()
                    .map(|w| w.predict(&guided, &comm, &geo))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                let received = if stitching == Stitching::Codenoise {
                    let clock = Instant::now();
                    let r = self.exchange(t, step as u32, &plan, &owned, &preds, &geo)?;
                    halo_s += clock.elapsed().as_secs_f64();
                    self.metrics
                        .halo_seconds
                        .observe(clock.elapsed().as_secs_f64());
                    r
                } else {
                    HashMap::new()
                };
                for (w, p) in states.iter_mut().zip(&preds) {
                    let fused = if stitching == Stitching::Codenoise {
                        let mut parts: Vec<&Part> = preds
                            .iter()
                            .filter(|q| !window::overlap(&plan[q.window], &w.spec).is_empty())
                            .collect();
                        if let Some(r) = received.get(&w.index) {
                            parts.extend(r.iter());
                        }
                        window::fuse(&geo, &plan, w.spec.frames(), &parts)
                            .map_err(|e| e.to_string())?
                    } else {
                        p.data.clone()
                    };
                    w.step(&fused).map_err(|e| e.to_string())?;
                    done += 1;
                }
                self.metrics.window_steps.add(states.len() as f64);
                self.metrics
                    .step_seconds
                    .observe(step_clock.elapsed().as_secs_f64());
                let k = step + 1;
                match store.as_ref() {
                    Some((store, prefix)) if every > 0 && k.is_multiple_of(every) && k < steps => {
                        let clock = Instant::now();
                        self.write_checkpoints(t, &**store, prefix, k, &states)?;
                        checkpoint_s += clock.elapsed().as_secs_f64();
                        self.metrics
                            .checkpoint_seconds
                            .observe(clock.elapsed().as_secs_f64());
                        self.report_checkpoint(task_id, t, done, k, &owned);
                    }
                    _ => report(done),
                }
            }
            if checkpoint_s > 0.0 {
                timings.insert("checkpoint_write".into(), checkpoint_s);
            }
            if halo_s > 0.0 {
                timings.insert("halo_exchange".into(), halo_s);
            }
            states.iter().map(|w| w.latents()).collect()
        };
        timings.insert("denoise".into(), clock.elapsed().as_secs_f64());
        if t.output_uri.is_empty() {
            return Ok(pb::DenoiseResult {
                windows: finals
                    .into_iter()
                    .map(|p| pb::WindowLatents {
                        window: p.window as u32,
                        latents: f32_le(&p.data),
                        latents_key: String::new(),
                    })
                    .collect(),
            });
        }
        // The final latents go to the object store; the result names them.
        let clock = Instant::now();
        let (store, prefix) = open_store(&t.output_uri)?;
        let mut windows = Vec::new();
        for p in finals {
            let key = format!("windows/e{}/w{}.f32", t.epoch, p.window);
            self.handle
                .block_on(longtake_objects::put(
                    &*store,
                    &object_key(&prefix, &key),
                    f32_le(&p.data),
                ))
                .map_err(|e| format!("writing {key} to {}: {e}", t.output_uri))?;
            windows.push(pb::WindowLatents {
                window: p.window as u32,
                latents: Vec::new(),
                latents_key: key,
            });
        }
        timings.insert("write_windows".into(), clock.elapsed().as_secs_f64());
        Ok(pb::DenoiseResult { windows })
    }

    /// Write every window's checkpoint after `k` steps, each object created once (a retried or
    /// stale writer never replaces one).
    fn write_checkpoints(
        &self,
        t: &pb::DenoiseTask,
        store: &dyn ObjectStore,
        prefix: &StorePath,
        k: usize,
        states: &[WindowState],
    ) -> TaskResult<()> {
        for w in states {
            let bytes = w.checkpoint().map_err(|e| e.to_string())?;
            self.metrics.checkpoint_bytes.add(bytes.len() as f64);
            let key = object_key(
                prefix,
                &format!("{}/s{k}/w{}.safetensors", t.checkpoint_dir, w.index),
            );
            self.create_object(store, &key, bytes)
                .map_err(|e| format!("writing the checkpoint {key}: {e}"))?;
        }
        Ok(())
    }

    fn report_checkpoint(
        &self,
        task_id: &str,
        t: &pb::DenoiseTask,
        done: u64,
        k: usize,
        windows: &[usize],
    ) {
        self.report(pb::TaskProgress {
            task_id: task_id.to_string(),
            render_id: t.render_id.clone(),
            epoch: t.epoch,
            phase: pb::RenderState::Denoising as i32,
            window_steps_done: done,
            checkpoint_step: k as u32,
            checkpoint_windows: windows.iter().map(|w| *w as u32).collect(),
            ..Default::default()
        });
    }

    /// Send each owned window's prediction over the frames it shares with remote windows, and
    /// receive theirs: received parts by destination window.
    fn exchange(
        &self,
        t: &pb::DenoiseTask,
        step: u32,
        plan: &[WindowSpec],
        owned: &[usize],
        preds: &[Part],
        geo: &Geometry,
    ) -> TaskResult<HashMap<usize, Vec<Part>>> {
        let mut calls = Vec::new();
        for p in preds {
            let me = &plan[p.window];
            let parts: Vec<pb::HaloPart> = plan
                .iter()
                .enumerate()
                .filter(|(j, other)| !owned.contains(j) && !window::overlap(me, other).is_empty())
                .map(|(j, other)| {
                    let r = window::overlap(me, other);
                    let wgeo = Geometry {
                        frames: me.len,
                        ..*geo
                    };
                    let data = wgeo.take(&p.data, r.start - me.start..r.end - me.start);
                    pb::HaloPart {
                        neighbor_window: j as u32,
                        frame_start: r.start as u32,
                        frame_count: r.len() as u32,
                        data: f32_le(&data),
                    }
                })
                .collect();
            if parts.is_empty() {
                continue;
            }
            let mut rpc = self.rpc.clone();
            let req = pb::HaloRequest {
                render_id: t.render_id.clone(),
                epoch: t.epoch,
                step,
                window: p.window as u32,
                parts,
            };
            let w = p.window;
            calls.push(async move { (w, rpc.exchange_halo(req).await) });
        }
        let answers = self.handle.block_on(futures::future::join_all(calls));
        let mut out: HashMap<usize, Vec<Part>> = HashMap::new();
        for (w, answer) in answers {
            let resp = answer
                .map_err(|s| {
                    // The render was cancelled while this window waited for its neighbours.
                    if s.code() == tonic::Code::Cancelled {
                        return CANCELLED.to_string();
                    }
                    format!(
                        "halo exchange for window {w} at step {step}: {}",
                        s.message()
                    )
                })?
                .into_inner();
            for part in resp.parts {
                let data = f32_from_le(&part.data);
                let len = part.frame_count as usize;
                if data.len() != geo.channels * len * geo.height * geo.width {
                    return Err(format!(
                        "halo from window {} has {} values for {len} frames",
                        part.neighbor_window,
                        data.len()
                    ));
                }
                out.entry(w).or_default().push(Part {
                    window: part.neighbor_window as usize,
                    start: part.frame_start as usize,
                    len,
                    data,
                });
            }
        }
        Ok(out)
    }
}
