//! longtake-proto: the gRPC API of longtake and its generated tonic/prost code. Nothing else
//! lives here.
//!
//! - `proto/longtake/v1/render.proto`: the public `RenderService` (submit, get, list, watch,
//!   cancel), called by studios and the `longtake` CLI.
//! - `proto/longtake/v1/worker.proto`: the worker-facing `WorkerService` (register, heartbeat,
//!   task stream, progress, halo exchange, results), called by workers.
//! - `proto/etcd/etcd.proto`: the part of etcd's v3 API the coordinator's state store uses
//!   (clients only).
//!
//! Both are served by the coordinator, with gRPC health checking and server reflection
//! ([`FILE_DESCRIPTOR_SET`]) on the same port.

/// Package `longtake.v1`: messages, `render_service_{client,server}` and
/// `worker_service_{client,server}`.
pub mod v1 {
    tonic::include_proto!("longtake.v1");
}

/// Package `etcdserverpb`: the clients of etcd's `KV` and `Lease` services (the subset of etcd's
/// v3 API in `proto/etcd/etcd.proto`), for the coordinator's etcd-backed state store.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The encoded `FileDescriptorSet` of every file above (with its imports), for server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/longtake_descriptor.bin"));

/// The message size limit, in both directions, that longtake's servers accept and its clients
/// should set (`max_decoding_message_size` / `max_encoding_message_size`): window latents, fused
/// latents and initial noise travel as `bytes` and exceed tonic's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// Adds `authorization: Bearer <token>` to every call of a client built with it
/// (`XClient::with_interceptor(channel, Bearer::new(..)?)`); without a token, calls go out as
/// they are.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// `None`: no header. A token that cannot be a header value is an error.
    pub fn new(
        token: Option<&str>,
    ) -> Result<Bearer, tonic::metadata::errors::InvalidMetadataValue> {
        Ok(Bearer(match token {
            Some(t) => Some(format!("Bearer {t}").parse()?),
            None => None,
        }))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a [`Bearer`] token.
pub type AuthedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;
