//! The gateway, served in this process (its library's `app`, on a manual
//! clock where a test needs one) and as a child process (the binary): its
//! API, its admin routes and admin key check, and graceful shutdown.

#[path = "../support/mod.rs"]
mod support;

mod admin_errors;
mod admin_key;
mod admin_keys;
mod admin_usage;
mod browser;
mod cli;
mod dashboard;
mod hardening;
mod mock;
mod shutdown;
mod upstream;
mod usage;
