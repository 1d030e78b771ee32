//! That no API key leaves the library or the gateway process (`leaks`), and
//! the gRPC example (`examples/grpc_inference.rs`) called by a tonic client.
//! (The gateway's own tests live in `gateway/tests/`.)
//!
//! One test binary for both: `leaks` installs the process's `tracing`
//! subscriber and `metrics` recorder (and so sees every module's events), so
//! no other module of this crate may install either.

#[path = "../support/mod.rs"]
mod support;

mod leaks;
mod tonic_inference;
