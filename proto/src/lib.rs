//! longtake-proto: the gRPC API of longtake (the public `RenderService` and the worker-facing
//! service) and its generated tonic/prost code. Nothing else lives here.
//!
//! The services are defined with the coordinator and worker crates; until then this crate is
//! empty so the workspace layout is fixed from the start.
