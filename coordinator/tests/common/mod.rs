//! A coordinator on 127.0.0.1:0, tonic clients for it, and a scriptable fake worker.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use longtake_coordinator::CoordinatorConfig;
use longtake_proto::MAX_MESSAGE_BYTES;
use longtake_proto::v1 as pb;
use pb::render_service_client::RenderServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub struct Server {
    pub addr: SocketAddr,
    pub output: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), longtake_coordinator::CoordinatorError>>>,
}

impl Server {
    /// A coordinator whose default output is a fresh temporary directory.
    pub async fn start(config: CoordinatorConfig) -> Server {
        let output = tempfile::tempdir().unwrap();
        let config = CoordinatorConfig {
            default_output: output.path().to_str().unwrap().to_string(),
            ..config
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(longtake_coordinator::run(
            listener,
            async {
                let _ = rx.await;
            },
            config,
        ));
        Server {
            addr,
            output,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn renders(&self) -> RenderServiceClient<Channel> {
        RenderServiceClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Shut down and check that the server stops promptly, open streams or not.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let stopped = tokio::time::timeout(Duration::from_secs(10), self.handle.take().unwrap())
            .await
            .expect("the coordinator stops within 10 s of shutdown");
        stopped.unwrap().unwrap();
    }
}

/// A spec that plans into two windows: 17 frames = 5 latent frames, window 3, overlap 1 →
/// windows [0,3) and [2,5) sharing latent frame 2; 16×16 pixels = 2×2 latents; 2 steps.
pub fn two_window_spec() -> pb::RenderSpec {
    pb::RenderSpec {
        prompt: "a lighthouse at dusk".into(),
        length: Some(pb::render_spec::Length::NumFrames(17)),
        width: Some(16),
        height: Some(16),
        steps: Some(2),
        window: Some(3),
        overlap: Some(1),
        seed: Some(1234),
        model: "builtin:smoke".into(),
        ..Default::default()
    }
}

pub async fn submit(
    client: &mut RenderServiceClient<Channel>,
    spec: pb::RenderSpec,
) -> Result<pb::SubmitRenderResponse, tonic::Status> {
    client
        .submit_render(pb::SubmitRenderRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn get(client: &mut RenderServiceClient<Channel>, id: &str) -> pb::Render {
    client
        .get_render(pb::GetRenderRequest {
            render_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub fn state(render: &pb::Render) -> pb::RenderState {
    pb::RenderState::try_from(render.state).unwrap()
}

/// Poll until the render reaches `want` (10 s at most).
pub async fn wait_for_state(
    client: &mut RenderServiceClient<Channel>,
    id: &str,
    want: pb::RenderState,
) -> pb::Render {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(client, id).await;
        if state(&r) == want {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "render {id} is {:?}, waited for {want:?}: {r:?}",
            state(&r)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registered worker with its task stream open.
pub struct FakeWorker {
    pub client: WorkerServiceClient<Channel>,
    pub id: String,
    pub tasks: tonic::Streaming<pb::Task>,
    heartbeat: Option<JoinHandle<()>>,
}

impl FakeWorker {
    /// Register, open the task stream, and (with `heartbeat`) renew the lease every 100 ms.
    pub async fn join(server: &Server, name: &str, heartbeat: bool) -> FakeWorker {
        Self::join_family(server, name, heartbeat, "cpu-test").await
    }

    /// [`FakeWorker::join`] with a kernel family.
    pub async fn join_family(
        server: &Server,
        name: &str,
        heartbeat: bool,
        family: &str,
    ) -> FakeWorker {
        let mut client = server.workers().await;
        let reg = client
            .register(pb::RegisterRequest {
                worker_name: name.to_string(),
                devices: vec!["cpu".into()],
                capacity: 1,
                kernel_family: family.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        let tasks = client
            .pull_tasks(pb::PullTasksRequest {
                worker_id: reg.worker_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let heartbeat = heartbeat.then(|| {
            let mut c = client.clone();
            let id = reg.worker_id.clone();
            tokio::spawn(async move {
                loop {
                    let _ = c
                        .heartbeat(pb::HeartbeatRequest {
                            worker_id: id.clone(),
                        })
                        .await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        FakeWorker {
            client,
            id: reg.worker_id,
            tasks,
            heartbeat,
        }
    }

    pub async fn next_task(&mut self) -> pb::Task {
        tokio::time::timeout(Duration::from_secs(10), self.tasks.message())
            .await
            .expect("a task within 10 s")
            .unwrap()
            .expect("the task stream is open")
    }

    pub async fn next_denoise(&mut self) -> (String, pb::DenoiseTask) {
        let t = self.next_task().await;
        match t.kind {
            Some(pb::task::Kind::Denoise(d)) => (t.task_id, d),
            other => panic!("expected a denoise task, got {other:?}"),
        }
    }

    pub async fn complete(
        &mut self,
        task_id: &str,
        render_id: &str,
        epoch: u64,
        outcome: pb::task_result::Outcome,
    ) -> Result<(), tonic::Status> {
        self.client
            .complete_task(pb::TaskResult {
                worker_id: self.id.clone(),
                task_id: task_id.to_string(),
                render_id: render_id.to_string(),
                epoch,
                outcome: Some(outcome),
                model_identity: "builtin-smoke (test)".into(),
                timings_s: [("denoise".to_string(), 0.01)].into_iter().collect(),
            })
            .await
            .map(|_| ())
    }

    pub fn stop_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

/// `n` f32 values as little-endian bytes.
pub fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
