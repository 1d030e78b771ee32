//! The tower layer, service and future, and the engine they share.

mod engine;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod outcome;
mod read;
mod rejected;
mod service;

pub use self::future::ResponseFuture;
pub use self::layer::{MethodStanding, RateLimitLayer, RateLimitLayerBuilder, Standing};
pub use self::service::RateLimit;

pub(crate) use self::engine::{BodyLimits, Peek, Shared, SharedState, Step};
