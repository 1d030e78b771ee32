//! Usage plans, their limits, and API keys.

mod account;
mod compiled;
mod limits;
mod method;
pub(crate) mod model;
pub(crate) mod wire;

pub use self::account::Account;
pub(crate) use self::account::AccountLimits;
pub use self::compiled::LimitKind;
pub(crate) use self::compiled::{Concurrency, Earlier, Limit, ModelEntry, Plan, StageLimits};
pub use self::limits::{
    Anonymous, ApiKey, FailureMode, ModelLimits, Quota, Stage, Throttle, TokenBudget, UsagePlan,
};
#[cfg(feature = "config")]
pub(crate) use self::method::MethodPath;
pub(crate) use self::method::{method_limit, route_of};
