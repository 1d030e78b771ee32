//! The Redis store against real `redis-server` processes: its Lua script, the
//! store from the outside (reference server processes sharing one Redis),
//! faults between the store and Redis, and the test harness that starts the
//! servers.

#[path = "../support/mod.rs"]
mod support;

mod redis_faults;
mod redis_harness;
mod redis_script;
mod redis_store;
