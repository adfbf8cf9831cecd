//! Renders driven end to end by fake workers over real gRPC: task flow, halo relay, fusion,
//! decode, manifest, cancellation and failures.

mod common;

use std::time::Duration;

use common::*;
use longtake_coordinator::CoordinatorConfig;
use longtake_proto::v1 as pb;
use pb::task_result::Outcome;

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        lease_ttl: Duration::from_secs(3),
        halo_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// What window `w` sends at `step`: every value is the same, so the receiver can tell who sent it.
fn halo_value(window: u32, step: u32) -> f32 {
    (window * 100 + step) as f32
}

fn overlap(a: &pb::PlannedWindow, b: &pb::PlannedWindow) -> Option<(u32, u32)> {
    let start = a.start.max(b.start);
    let end = (a.start + a.len).min(b.start + b.len);
    (start < end).then_some((start, end - start))
}

/// Denoise like a worker would, with arbitrary numbers: exchange halos at every step with the
/// owners of the neighbouring windows (checking what comes back), report progress, and hand in
/// latents whose every value is `window + 1`.
async fn fake_denoise(worker: &mut FakeWorker, task_id: &str, task: pb::DenoiseTask) {
    let shape = task.latent_shape.unwrap();
    let plane = shape.height * shape.width;
    let plan = task.plan.unwrap();
    let steps = task.spec.as_ref().unwrap().steps.unwrap();
    let owned = task.owned_windows.clone();
    for step in 0..steps {
        let mut calls = Vec::new();
        for &win in &owned {
            let me = &plan.windows[win as usize];
            let parts: Vec<pb::HaloPart> = (0..plan.windows.len() as u32)
                .filter(|v| !owned.contains(v))
                .filter_map(|v| {
                    let (frame_start, frame_count) = overlap(me, &plan.windows[v as usize])?;
                    let n = shape.channels * frame_count * plane;
                    Some(pb::HaloPart {
                        neighbor_window: v,
                        frame_start,
                        frame_count,
                        data: f32_bytes((0..n).map(|_| halo_value(win, step))),
                    })
                })
                .collect();
            if parts.is_empty() {
                continue;
            }
            let mut client = worker.client.clone();
            let request = pb::HaloRequest {
                render_id: task.render_id.clone(),
                epoch: task.epoch,
                step,
                window: win,
                parts,
            };
            calls.push(tokio::spawn(async move {
                let first = client.exchange_halo(request.clone()).await;
                // The call is safe to retry (a response lost on the way): the same parts again.
                if let Ok(first) = &first {
                    let again = client.exchange_halo(request).await.unwrap().into_inner();
                    assert_eq!(&again, first.get_ref(), "a retried halo exchange differs");
                }
                (win, first)
            }));
        }
        for call in calls {
            let (win, response) = call.await.unwrap();
            let response = response.unwrap().into_inner();
            assert!(!response.parts.is_empty());
            for part in response.parts {
                let from = part.neighbor_window;
                assert!(!owned.contains(&from));
                let (start, count) =
                    overlap(&plan.windows[win as usize], &plan.windows[from as usize]).unwrap();
                assert_eq!((part.frame_start, part.frame_count), (start, count));
                let values = f32s(&part.data);
                assert_eq!(values.len() as u32, shape.channels * count * plane);
                assert!(values.iter().all(|&v| v == halo_value(from, step)));
            }
        }
        worker
            .client
            .report_progress(pb::TaskProgress {
                worker_id: worker.id.clone(),
                task_id: task_id.to_string(),
                render_id: task.render_id.clone(),
                epoch: task.epoch,
                phase: pb::RenderState::Denoising as i32,
                window_steps_done: u64::from((step + 1) * owned.len() as u32),
                frames_done: 0,
                message: format!("step {}/{steps}", step + 1),
                ..Default::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let windows = owned
        .iter()
        .map(|&win| {
            let n = shape.channels * plan.windows[win as usize].len * plane;
            pb::WindowLatents {
                window: win,
                latents: f32_bytes((0..n).map(|_| win as f32 + 1.0)),
                latents_key: String::new(),
            }
        })
        .collect();
    worker
        .complete(
            task_id,
            &task.render_id,
            task.epoch,
            Outcome::Denoise(pb::DenoiseResult { windows }),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn two_workers_codenoise_render_succeeds() {
    let server = Server::start(config()).await;
    let mut renders = server.renders().await;
    let mut a = FakeWorker::join(&server, "worker-a", true).await;
    let mut b = FakeWorker::join(&server, "worker-b", true).await;

    let id = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let mut watch = renders
        .watch_render(pb::WatchRenderRequest {
            render_id: id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let watcher = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(e) = watch.message().await.unwrap() {
            events.push(e.render.unwrap());
        }
        events
    });

    let (task_a, denoise_a) = a.next_denoise().await;
    let (task_b, denoise_b) = b.next_denoise().await;
    assert_eq!(denoise_a.owned_windows, [0]);
    assert_eq!(denoise_b.owned_windows, [1]);
    assert_eq!(denoise_a.epoch, denoise_b.epoch);
    let plan = denoise_a.plan.clone().unwrap();
    assert_eq!(plan.latent_frames, 5);
    assert_eq!(
        plan.windows
            .iter()
            .map(|w| (w.start, w.len))
            .collect::<Vec<_>>(),
        [(0, 3), (2, 3)]
    );
    assert_eq!(plan.windows[0].weights, [1.0, 1.0, 0.5]);
    let shape = denoise_a.latent_shape.unwrap();
    assert_eq!(
        (shape.channels, shape.frames, shape.height, shape.width),
        (16, 5, 2, 2)
    );
    assert_eq!(denoise_a.spec.as_ref().unwrap().seed, Some(1234));

    tokio::join!(
        fake_denoise(&mut a, &task_a, denoise_a),
        fake_denoise(&mut b, &task_b, denoise_b)
    );

    // The decode task goes to window 0's owner, naming every window's final latents (stored
    // under the output; these fake workers sent them inline, so the coordinator wrote them) and
    // the plan with its weights: the decoding worker fuses them.
    let task = a.next_task().await;
    let Some(pb::task::Kind::Decode(decode)) = task.kind else {
        panic!("expected a decode task, got {task:?}");
    };
    assert!(decode.latents.is_none());
    assert_eq!(
        decode.window_keys,
        [
            format!("windows/e{}/w0.f32", decode.epoch),
            format!("windows/e{}/w1.f32", decode.epoch)
        ]
    );
    let weights: Vec<Vec<f32>> = decode
        .plan
        .as_ref()
        .unwrap()
        .windows
        .iter()
        .map(|w| w.weights.clone())
        .collect();
    assert_eq!(weights, [vec![1.0, 1.0, 0.5], vec![0.5, 1.0, 1.0]]);
    for (i, key) in decode.window_keys.iter().enumerate() {
        let bytes = std::fs::read(std::path::Path::new(&decode.output_uri).join(key)).unwrap();
        let values = f32s(&bytes);
        assert_eq!(values.len(), 16 * 3 * 4);
        assert!(values.iter().all(|&v| v == i as f32 + 1.0));
    }
    let out_dir = std::path::PathBuf::from(&decode.output_uri);
    assert_eq!(out_dir, server.output.path().join("jobs").join(&id));
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("video.mp4"), b"not really a video").unwrap();
    wait_for_state(&mut renders, &id, pb::RenderState::Decoding).await;
    assert!(
        !out_dir.join("manifest.json").exists(),
        "the manifest must not exist before the outputs are reported written"
    );
    a.complete(
        &task.task_id,
        &id,
        decode.epoch,
        Outcome::Decode(pb::DecodeResult {
            objects: vec!["video.mp4".into(), "latents.safetensors".into()],
            frame_count: 17,
        }),
    )
    .await
    .unwrap();

    let events = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the watch stream ends after the terminal state")
        .unwrap();
    let last = events.last().unwrap();
    assert_eq!(state(last), pb::RenderState::Succeeded);
    assert!(
        events
            .iter()
            .any(|e| state(e) == pb::RenderState::Denoising),
        "progress was streamed: {:?}",
        events.iter().map(state).collect::<Vec<_>>()
    );
    let progress = last.progress.as_ref().unwrap();
    assert_eq!(
        (progress.window_steps_done, progress.window_steps_total),
        (4, 4)
    );
    assert_eq!((progress.frames_done, progress.frames_total), (17, 17));
    assert_eq!(last.plan.as_ref().unwrap().windows.len(), 2);
    assert!(last.finished_at.is_some() && last.started_at.is_some());

    // manifest.json exists and is complete (that it is written only after the decode is
    // reported was checked above, before the report).
    let manifest_path = out_dir.join("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["render_id"], id.as_str());
    assert_eq!(manifest["smoke_test"], true);
    assert_eq!(manifest["seed"], 1234);
    assert_eq!(manifest["request"]["prompt"], "a lighthouse at dusk");
    assert_eq!(manifest["plan"]["windows"][1]["start"], 2);
    assert_eq!(manifest["plan"]["windows"][1]["worker"], "worker-b");
    assert_eq!(manifest["model"]["identity"], "builtin-smoke (test)");
    assert_eq!(
        manifest["outputs"],
        serde_json::json!(["video.mp4", "latents.safetensors"])
    );
    for phase in ["plan", "denoise", "decode", "total"] {
        assert!(manifest["timings_s"][phase].is_number(), "{phase}");
    }
    assert!(manifest["versions"]["longtake"].is_string());

    // Late results for the finished render are refused.
    let late = a
        .complete(
            &task.task_id,
            &id,
            decode.epoch,
            Outcome::Error("late".into()),
        )
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn single_worker_gets_every_window_and_needs_no_halo() {
    let server = Server::start(config()).await;
    let mut renders = server.renders().await;
    let mut w = FakeWorker::join(&server, "solo", true).await;
    let id = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (task_id, task) = w.next_denoise().await;
    assert_eq!(task.owned_windows, [0, 1]);
    // A call for a window without remote partners returns at once with nothing.
    let none = w
        .client
        .exchange_halo(pb::HaloRequest {
            render_id: id.clone(),
            epoch: task.epoch,
            step: 0,
            window: 0,
            parts: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.parts.is_empty());
    fake_denoise(&mut w, &task_id, task).await;
    let decode = w.next_task().await;
    assert!(matches!(decode.kind, Some(pb::task::Kind::Decode(_))));
    server.stop().await;
}

#[tokio::test]
async fn cancel_stops_workers_and_halo_waits() {
    let server = Server::start(config()).await;
    let mut renders = server.renders().await;

    // Queued (no workers yet): cancelled at once.
    let queued = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let r = renders
        .cancel_render(pb::CancelRenderRequest {
            render_id: queued.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&r), pb::RenderState::Cancelled);
    assert!(r.finished_at.is_some());

    let mut a = FakeWorker::join(&server, "a", true).await;
    let mut b = FakeWorker::join(&server, "b", true).await;
    let id = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (_, task) = a.next_denoise().await;
    let _ = b.next_denoise().await;

    // Window 0 waits for window 1's part, which never comes...
    let mut client = a.client.clone();
    let (render_id, epoch) = (id.clone(), task.epoch);
    let waiting = tokio::spawn(async move {
        client
            .exchange_halo(pb::HaloRequest {
                render_id,
                epoch,
                step: 0,
                window: 0,
                parts: vec![pb::HaloPart {
                    neighbor_window: 1,
                    frame_start: 2,
                    frame_count: 1,
                    data: f32_bytes(vec![0.0; 16 * 4]),
                }],
            })
            .await
    });
    wait_for_state(&mut renders, &id, pb::RenderState::EncodingText).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...until the render is cancelled.
    let r = renders
        .cancel_render(pb::CancelRenderRequest {
            render_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&r), pb::RenderState::Cancelled);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the halo wait ends on cancel")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    for w in [&mut a, &mut b] {
        let t = w.next_task().await;
        let Some(pb::task::Kind::Cancel(c)) = t.kind else {
            panic!("expected a cancel task, got {t:?}");
        };
        assert_eq!((c.render_id.as_str(), c.epoch), (id.as_str(), epoch));
    }
    // Cancelling again is a no-op.
    let again = renders
        .cancel_render(pb::CancelRenderRequest {
            render_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&again), pb::RenderState::Cancelled);
    server.stop().await;
}

#[tokio::test]
async fn worker_error_fails_the_render_and_the_next_one_starts() {
    let server = Server::start(config()).await;
    let mut renders = server.renders().await;
    let mut w = FakeWorker::join(&server, "gpu-node-7", true).await;
    let first = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let second = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (task_id, task) = w.next_denoise().await;
    assert_eq!(task.render_id, first);
    assert_eq!(
        state(&get(&mut renders, &second).await),
        pb::RenderState::Queued
    );

    // A stale epoch is refused and changes nothing.
    let stale = w
        .complete(&task_id, &first, task.epoch + 1, Outcome::Error("x".into()))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert!(stale.message().contains("stale"), "{}", stale.message());

    w.complete(
        &task_id,
        &first,
        task.epoch,
        Outcome::Error("CUDA out of memory".into()),
    )
    .await
    .unwrap();
    let failed = wait_for_state(&mut renders, &first, pb::RenderState::Failed).await;
    assert!(failed.error.contains("gpu-node-7"), "{}", failed.error);
    assert!(
        failed.error.contains("CUDA out of memory"),
        "{}",
        failed.error
    );

    let (_, next) = w.next_denoise().await;
    assert_eq!(next.render_id, second);
    assert!(next.epoch > task.epoch);
    server.stop().await;
}

#[tokio::test]
async fn invalid_results_fail_the_render() {
    let server = Server::start(config()).await;
    let mut renders = server.renders().await;
    let mut w = FakeWorker::join(&server, "w", true).await;
    let id = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (task_id, task) = w.next_denoise().await;
    let short = w
        .complete(
            &task_id,
            &id,
            task.epoch,
            Outcome::Denoise(pb::DenoiseResult {
                windows: vec![pb::WindowLatents {
                    window: 0,
                    latents: vec![0; 12],
                    latents_key: String::new(),
                }],
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument);
    let failed = wait_for_state(&mut renders, &id, pb::RenderState::Failed).await;
    assert!(failed.error.contains("expected 768"), "{}", failed.error);
    server.stop().await;
}

#[tokio::test]
async fn lapsed_lease_rolls_the_render_back() {
    let server = Server::start(CoordinatorConfig {
        lease_ttl: Duration::from_millis(400),
        max_attempts: 2,
        ..config()
    })
    .await;
    let mut renders = server.renders().await;
    let mut w = FakeWorker::join(&server, "flaky", false).await;
    let id = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (_, first) = w.next_denoise().await;
    // The lease lapses: the render goes back to the queue (no worker is left to take it).
    let queued = wait_for_state(&mut renders, &id, pb::RenderState::Queued).await;
    let message = queued.progress.unwrap().message;
    assert!(message.starts_with("rolled back to step 0"), "{message}");
    assert!(message.contains("flaky"), "{message}");
    assert!(message.contains("lost its lease"), "{message}");
    assert!(message.contains("windows 0..=1"), "{message}");
    let gone = w
        .client
        .heartbeat(pb::HeartbeatRequest {
            worker_id: w.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    // A new worker takes it at a new epoch; the old epoch's result is refused.
    let mut w2 = FakeWorker::join(&server, "steady", true).await;
    let (_, second) = w2.next_denoise().await;
    assert!(second.epoch > first.epoch);
    let stale = w2
        .client
        .complete_task(pb::TaskResult {
            worker_id: w2.id.clone(),
            task_id: "x".into(),
            render_id: id.clone(),
            epoch: first.epoch,
            outcome: Some(pb::task_result::Outcome::Error("late".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert!(stale.message().contains("epoch"), "{}", stale.message());
    // A second lapse reaches max_attempts: the render fails.
    w2.stop_heartbeat();
    let failed = wait_for_state(&mut renders, &id, pb::RenderState::Failed).await;
    assert!(
        failed.error.contains("given up after 2 attempts"),
        "{}",
        failed.error
    );
    server.stop().await;
}

#[tokio::test]
async fn halo_exchange_times_out_and_checks_its_parts() {
    let server = Server::start(CoordinatorConfig {
        halo_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    let mut renders = server.renders().await;
    let mut a = FakeWorker::join(&server, "a", true).await;
    let _b = FakeWorker::join(&server, "b", true).await;
    let id = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (_, task) = a.next_denoise().await;
    let request = |parts: Vec<pb::HaloPart>| pb::HaloRequest {
        render_id: id.clone(),
        epoch: task.epoch,
        step: 0,
        window: 0,
        parts,
    };
    let part = |neighbor_window, frame_start, bytes| pb::HaloPart {
        neighbor_window,
        frame_start,
        frame_count: 1,
        data: vec![0; bytes],
    };
    for (parts, field) in [
        (vec![], "parts:"),
        (vec![part(0, 2, 256)], "parts.neighbor_window"),
        (vec![part(1, 1, 256)], "parts.frame_start"),
        (vec![part(1, 2, 255)], "parts.data"),
    ] {
        let e = a.client.exchange_halo(request(parts)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let e = a
        .client
        .exchange_halo(pb::HaloRequest {
            step: 2,
            ..request(vec![part(1, 2, 256)])
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("step:"), "{}", e.message());
    let e = a
        .client
        .exchange_halo(request(vec![part(1, 2, 256)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    assert!(
        e.message().contains("waiting for windows [1]"),
        "{}",
        e.message()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_reopened_task_stream_gets_the_unfinished_tasks_again() {
    let server = Server::start(config()).await;
    let mut renders = server.renders().await;
    let mut w = FakeWorker::join(&server, "w", true).await;
    submit(&mut renders, two_window_spec()).await.unwrap();
    let (first, _) = w.next_denoise().await;
    w.tasks = w
        .client
        .pull_tasks(pb::PullTasksRequest {
            worker_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (again, _) = w.next_denoise().await;
    assert_eq!(again, first);
    server.stop().await;
}

/// A render keeps the kernel family of its first workers: after a rollback it waits for a worker
/// of that family, while a worker of another family takes other renders meanwhile.
#[tokio::test]
async fn windows_move_only_within_a_kernel_family() {
    let server = Server::start(CoordinatorConfig {
        lease_ttl: Duration::from_millis(400),
        ..config()
    })
    .await;
    let mut renders = server.renders().await;
    let mut a = FakeWorker::join_family(&server, "a", false, "fam-a").await;
    let first = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (_, task) = a.next_denoise().await;
    assert_eq!(task.render_id, first);
    wait_for_state(&mut renders, &first, pb::RenderState::Queued).await;
    // A worker of another family does not take it...
    let mut b = FakeWorker::join_family(&server, "b", true, "fam-b").await;
    let nothing = tokio::time::timeout(Duration::from_millis(500), b.tasks.message()).await;
    assert!(
        nothing.is_err(),
        "a worker of another family got {nothing:?}"
    );
    // ...but takes a new render, which is not held back by the first.
    let second = submit(
        &mut renders,
        pb::RenderSpec {
            seed: Some(9),
            ..two_window_spec()
        },
    )
    .await
    .unwrap()
    .render_id;
    let (_, task) = b.next_denoise().await;
    assert_eq!(task.render_id, second);
    // A worker of the first family picks the first render up again.
    let mut c = FakeWorker::join_family(&server, "c", true, "fam-a").await;
    let (_, task) = c.next_denoise().await;
    assert_eq!(task.render_id, first);
    assert_eq!(
        get(&mut renders, &first).await.state,
        pb::RenderState::EncodingText as i32
    );
    server.stop().await;
}

/// A watch cut mid-render and resumed from the last sequence number it saw misses no change and
/// repeats nothing.
#[tokio::test]
async fn a_resumed_watch_misses_and_repeats_nothing() {
    let server = Server::start(config()).await;
    let mut renders = server.renders().await;
    let mut w = FakeWorker::join(&server, "w", true).await;
    let id = submit(&mut renders, two_window_spec())
        .await
        .unwrap()
        .render_id;
    let (task_id, task) = w.next_denoise().await;
    let mut first = renders
        .watch_render(pb::WatchRenderRequest {
            render_id: id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let seen = first.message().await.unwrap().unwrap();
    assert_eq!(
        state(seen.render.as_ref().unwrap()),
        pb::RenderState::EncodingText
    );
    drop(first); // the connection drops
    // Meanwhile: progress, a change of state, more progress, then the render is cancelled.
    for done in 1..=4u64 {
        w.client
            .report_progress(pb::TaskProgress {
                worker_id: w.id.clone(),
                task_id: task_id.clone(),
                render_id: id.clone(),
                epoch: task.epoch,
                phase: pb::RenderState::Denoising as i32,
                window_steps_done: done,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    renders
        .cancel_render(pb::CancelRenderRequest {
            render_id: id.clone(),
        })
        .await
        .unwrap();
    let mut resumed = renders
        .watch_render(pb::WatchRenderRequest {
            render_id: id.clone(),
            after_sequence: seen.sequence,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(10), resumed.message())
        .await
        .expect("the resumed stream ends after the terminal state")
        .unwrap()
    {
        events.push(e);
    }
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "{seqs:?}");
    assert!(seqs[0] > seen.sequence, "{seqs:?} after {}", seen.sequence);
    let states: Vec<pb::RenderState> = events
        .iter()
        .map(|e| state(e.render.as_ref().unwrap()))
        .collect();
    // Every change after the cut, in order: into DENOISING, its latest progress, then CANCELLED;
    // nothing from before the cut again.
    assert_eq!(
        states,
        [
            pb::RenderState::Denoising,
            pb::RenderState::Denoising,
            pb::RenderState::Cancelled
        ],
        "{events:?}"
    );
    let done: Vec<u64> = events[..2]
        .iter()
        .map(|e| {
            e.render
                .as_ref()
                .unwrap()
                .progress
                .as_ref()
                .unwrap()
                .window_steps_done
        })
        .collect();
    assert_eq!(done, [1, 4]);
    server.stop().await;
}
