//! Traces across processes: a coordinator and a worker export spans over OTLP to a receiver in
//! this test (opentelemetry's own generated `TraceService`); one render's spans, from both
//! processes, share one trace id, the one its manifest records.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use support::{first_line, spawn, wait_until};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_longtake"))
}

/// (service name, span name, trace id in hex) of every span received.
type Spans = Arc<Mutex<Vec<(String, String, String)>>>;

struct Receiver(Spans);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    got.push((service.clone(), span.name, trace));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[test]
fn one_trace_per_render_across_processes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let spans: Spans = Arc::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver(Arc::clone(&spans));
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("out").display().to_string();
    let env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
    ];
    let mut coord = spawn(
        dir,
        "coordinator",
        &exe(),
        &["coordinator", "--listen", "127.0.0.1:0", "--store", &store],
        &env,
    );
    let addr = first_line(&mut coord, Duration::from_secs(30))
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let _worker = spawn(
        dir,
        "worker",
        &exe(),
        &["worker", "--coordinator", &addr, "--threads", "1"],
        &env,
    );
    let o = Command::new(exe())
        .args([
            "submit",
            "--coordinator",
            &addr,
            "--wait",
            "--json",
            "--prompt",
            "a lighthouse",
            "--duration",
            "2",
            "--steps",
            "2",
            "--model",
            "builtin:smoke",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let render: serde_json::Value = serde_json::from_slice(
        o.stdout
            .split(|b| *b == b'\n')
            .find(|l| l.starts_with(b"{"))
            .unwrap(),
    )
    .unwrap();
    let output = PathBuf::from(render["output_uri"].as_str().unwrap());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("manifest.json")).unwrap()).unwrap();
    let trace = manifest["trace_id"]
        .as_str()
        .expect("the manifest's trace id")
        .to_string();
    assert_eq!(trace.len(), 32, "{trace}");
    let names = |service: &str| -> BTreeSet<String> {
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _, t)| s == service && *t == trace)
            .map(|(_, n, _)| n.clone())
            .collect()
    };
    wait_until(
        Duration::from_secs(30),
        "both processes' spans of the render",
        || {
            let c = names("longtake-coordinator");
            let w = names("longtake-worker");
            c.contains("render")
                && c.contains("worker_call")
                && w.contains("denoise")
                && w.contains("step")
                && w.contains("decode")
        },
    );
    // Every step span of the worker belongs to the render's trace.
    let other_steps = spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, n, t)| s == "longtake-worker" && n == "step" && *t != trace)
        .count();
    assert_eq!(other_steps, 0);
}
