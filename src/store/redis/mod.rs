//! The Redis store: one budget shared by every instance, one round trip per decision.

mod admin;
mod background;
mod builder;
mod cache;
mod call;
mod conn;
mod decide;
mod denials;
mod flights;
mod guards;
mod held;
mod keys;
mod local;
mod numbers;
// The local key registry (`Admin`) follows Redis through it; until it
// does, only the tests call it.
#[allow(dead_code)]
pub(crate) mod registry;
mod retry;
mod store;
mod time;

pub use self::builder::RedisStoreBuilder;
pub use self::store::RedisStore;
