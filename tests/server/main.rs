//! The reference server (`examples/inference_server.rs`), in this process and
//! as a child process: its API, its admin key check, graceful shutdown, and
//! that no API key leaves it; and the gRPC example
//! (`examples/grpc_inference.rs`) called by a tonic client.
//!
//! One test binary for all of them: `leaks` installs the process's `tracing`
//! subscriber and `metrics` recorder (and so sees every module's events), so
//! no other module of this crate may install either.

#[path = "../support/mod.rs"]
mod support;

/// The reference server, served in this process by `admin_key` and
/// `inference_server`.
#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/inference_server.rs"]
mod reference_server;

mod admin_key;
mod admin_keys;
mod admin_usage;
mod inference_server;
mod leaks;
mod shutdown;
mod tonic_inference;
