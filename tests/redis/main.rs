//! The Redis store against real `redis-server` processes: its Lua script, the
//! store from the outside (gateway processes sharing one Redis),
//! faults between the store and Redis, and the test harness that starts the
//! servers.

#[path = "../support/mod.rs"]
mod support;

mod borrowing;
mod client;
mod cluster;
mod in_flight;
mod lease;
mod outage;
mod overload;
mod redis_faults;
mod redis_harness;
mod redis_script;
mod redis_store;
mod shared_registry;

/// The tests that time requests (`redis_faults` and `redis_store`), one at a
/// time: they pause, kill and slow down Redis, and each would disturb the
/// other's latency bounds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
