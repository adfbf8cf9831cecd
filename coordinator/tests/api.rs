//! The public API over real gRPC on 127.0.0.1:0: validation, idempotency, listing, health,
//! reflection and shutdown.

mod common;

use std::time::Duration;

use common::*;
use longtake_coordinator::CoordinatorConfig;
use longtake_proto::v1 as pb;
use pb::render_spec::Length;
use tonic_types::StatusExt;

#[tokio::test]
async fn bad_requests_name_the_field() {
    let server = Server::start(CoordinatorConfig::default()).await;
    let mut client = server.renders().await;
    let base = two_window_spec;
    let cases: Vec<(pb::RenderSpec, &str)> = vec![
        (
            pb::RenderSpec {
                prompt: "".into(),
                ..base()
            },
            "prompt",
        ),
        (
            pb::RenderSpec {
                prompt: "   ".into(),
                ..base()
            },
            "prompt",
        ),
        (
            pb::RenderSpec {
                length: None,
                ..base()
            },
            "duration_s",
        ),
        (
            pb::RenderSpec {
                length: Some(Length::DurationS(0.0)),
                ..base()
            },
            "duration_s",
        ),
        (
            pb::RenderSpec {
                length: Some(Length::DurationS(-3.0)),
                ..base()
            },
            "duration_s",
        ),
        (
            pb::RenderSpec {
                length: Some(Length::DurationS(601.0)),
                ..base()
            },
            "duration_s",
        ),
        (
            pb::RenderSpec {
                length: Some(Length::NumFrames(0)),
                ..base()
            },
            "num_frames",
        ),
        (
            pb::RenderSpec {
                length: Some(Length::NumFrames(16)),
                ..base()
            },
            "num_frames",
        ),
        (
            pb::RenderSpec {
                length: Some(Length::NumFrames(100_001)),
                ..base()
            },
            "num_frames",
        ),
        (
            pb::RenderSpec {
                fps: Some(0),
                ..base()
            },
            "fps",
        ),
        (
            pb::RenderSpec {
                fps: Some(121),
                ..base()
            },
            "fps",
        ),
        (
            pb::RenderSpec {
                width: Some(100),
                ..base()
            },
            "width",
        ),
        (
            pb::RenderSpec {
                width: Some(0),
                ..base()
            },
            "width",
        ),
        (
            pb::RenderSpec {
                height: Some(8),
                ..base()
            },
            "height",
        ),
        (
            pb::RenderSpec {
                height: Some(4112),
                ..base()
            },
            "height",
        ),
        (
            pb::RenderSpec {
                steps: Some(0),
                ..base()
            },
            "steps",
        ),
        (
            pb::RenderSpec {
                steps: Some(1001),
                ..base()
            },
            "steps",
        ),
        (
            pb::RenderSpec {
                guidance: Some(f32::NAN),
                ..base()
            },
            "guidance",
        ),
        (
            pb::RenderSpec {
                guidance: Some(-1.0),
                ..base()
            },
            "guidance",
        ),
        (
            pb::RenderSpec {
                flow_shift: Some(0.0),
                ..base()
            },
            "flow_shift",
        ),
        (
            pb::RenderSpec {
                window: Some(0),
                ..base()
            },
            "window",
        ),
        (
            pb::RenderSpec {
                window: Some(22),
                ..base()
            },
            "window",
        ),
        (
            pb::RenderSpec {
                window: Some(3),
                overlap: Some(3),
                ..base()
            },
            "overlap",
        ),
        (
            pb::RenderSpec {
                stitching: 7,
                ..base()
            },
            "stitching",
        ),
        (
            pb::RenderSpec {
                output: "ftp://host/dir".into(),
                ..base()
            },
            "output",
        ),
        (
            pb::RenderSpec {
                output: "s3://".into(),
                ..base()
            },
            "output",
        ),
        (
            pb::RenderSpec {
                initial_noise: Some(b"nope".to_vec()),
                ..base()
            },
            "initial_noise",
        ),
    ];
    for (spec, field) in cases {
        let status = submit(&mut client, spec.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "expected the message to name {field}: {:?}",
            status.message()
        );
        assert!(
            status.message().len() > field.len() + 10,
            "{}",
            status.message()
        );
        // The same, machine-readable: google.rpc.BadRequest and ErrorInfo in the details.
        let details = status.get_error_details();
        let violation = &details
            .bad_request()
            .expect("BadRequest details")
            .field_violations[0];
        assert_eq!(violation.field, field);
        let info = details.error_info().expect("ErrorInfo details");
        assert_eq!(info.reason, "INVALID_FIELD");
        assert_eq!(info.metadata["retryable"], "false");
    }
    let missing = client
        .submit_render(pb::SubmitRenderRequest::default())
        .await
        .unwrap_err();
    assert!(
        missing.message().starts_with("spec: "),
        "{}",
        missing.message()
    );
    let long_key = client
        .submit_render(pb::SubmitRenderRequest {
            spec: Some(base()),
            idempotency_key: "k".repeat(129),
        })
        .await
        .unwrap_err();
    assert!(long_key.message().starts_with("idempotency_key: "));
    // Nothing was created by the rejected requests.
    let list = client
        .list_renders(pb::ListRendersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.renders.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn idempotency_key() {
    let server = Server::start(CoordinatorConfig::default()).await;
    let mut client = server.renders().await;
    let request = |spec: pb::RenderSpec| pb::SubmitRenderRequest {
        spec: Some(spec),
        idempotency_key: "studio-42/shot-7".into(),
    };
    // No seed: the coordinator picks one, and a repeat must not pick another render.
    let spec = pb::RenderSpec {
        seed: None,
        ..two_window_spec()
    };
    let first = client
        .submit_render(request(spec.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let again = client
        .submit_render(request(spec.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.render_id, first.render_id);
    assert!(!again.created);
    let other = client
        .submit_render(request(pb::RenderSpec {
            steps: Some(3),
            ..spec.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists);
    assert!(
        other.message().contains(&first.render_id),
        "{}",
        other.message()
    );
    assert!(other.message().starts_with("idempotency_key: "));
    // Without a key, the same spec is a new render.
    let a = submit(&mut client, spec.clone()).await.unwrap();
    let b = submit(&mut client, spec).await.unwrap();
    assert_ne!(a.render_id, b.render_id);

    let render = get(&mut client, &first.render_id).await;
    assert_eq!(render.idempotency_key, "studio-42/shot-7");
    let resolved = render.spec.clone().unwrap();
    assert!(resolved.seed.is_some(), "the chosen seed is reported");
    assert_eq!(resolved.fps, Some(16));
    assert_eq!(render.plan, None);
    assert_eq!(state(&render), pb::RenderState::Queued);
    server.stop().await;
}

#[tokio::test]
async fn list_pages_and_filters() {
    let server = Server::start(CoordinatorConfig::default()).await;
    let mut client = server.renders().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            submit(&mut client, two_window_spec())
                .await
                .unwrap()
                .render_id,
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    client
        .cancel_render(pb::CancelRenderRequest {
            render_id: ids[1].clone(),
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_renders(pb::ListRendersRequest {
                page_size: 2,
                page_token: token.clone(),
                states: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.renders.len() <= 2);
        seen.extend(page.renders.into_iter().map(|r| r.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    let cancelled = client
        .list_renders(pb::ListRendersRequest {
            states: vec![pb::RenderState::Cancelled as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.renders.len(), 1);
    assert_eq!(cancelled.renders[0].id, ids[1]);
    for bad in [
        pb::ListRendersRequest {
            page_size: 1001,
            ..Default::default()
        },
        pb::ListRendersRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
        pb::ListRendersRequest {
            states: vec![42],
            ..Default::default()
        },
    ] {
        let e = client.list_renders(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
    let missing = client
        .get_render(pb::GetRenderRequest {
            render_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = Server::start(CoordinatorConfig::default()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "longtake.v1.RenderService", "longtake.v1.WorkerService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = Server::start(CoordinatorConfig::default()).await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "longtake.v1.WorkerService".into(),
            )),
        },
    ];
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "longtake.v1.RenderService",
        "longtake.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let server = Server::start(CoordinatorConfig::default()).await;
    let mut client = server.renders().await;
    // A render that never runs (no workers), watched, plus a worker with its task stream open.
    let id = submit(
        &mut client,
        pb::RenderSpec {
            priority: -1,
            ..two_window_spec()
        },
    )
    .await
    .unwrap()
    .render_id;
    let mut watch = client
        .watch_render(pb::WatchRenderRequest {
            render_id: id,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());
    let worker = FakeWorker::join(&server, "idle", true).await;
    server.stop().await;
    drop(worker);
}
