//! The layer in front of real services: in axum routers, a plain hyper server
//! and a tonic server on loopback ports, driven by real HTTP and gRPC clients;
//! what its observers see; hostile input and forged forwarding headers; and
//! the committed fuzz corpora, replayed through the fuzz targets' checks.
//!
//! One test binary for all of them: `observe` installs the process's `metrics`
//! recorder, so no other module of this crate may install one.

#[path = "../support/mod.rs"]
mod support;

mod body;
mod floods;
mod fuzz_corpora;
mod grpc;
mod grpc_streams;
mod hostile;
mod http;
mod hyper_server;
mod observe;
mod openai;
mod resolver;
mod resolver_postgres;
mod spoofing;
mod standing;
mod streams;
mod tokenizer;
