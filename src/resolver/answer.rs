//! What a resolver answers: a key, no key, or an error.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// A key found by a [`KeyResolver`](crate::KeyResolver): its public id, the
/// name of its plan, the account it belongs to, if any, and whether it is
/// enabled.
///
/// The id names the key's state: a resolved key shares its counters with a
/// key of the same id registered in the [`Policy`](crate::Policy), now or
/// later. While a key with its id is registered, it is that key: decided
/// under the registered key's plan and account, and refused when that key
/// is disabled (or when this answer says it is), as
/// [`Admin`](crate::Admin) changes them, at once, even while this answer
/// is cached; when that key is removed, the answer is dropped and asked for
/// again.
///
/// ```
/// use tollgate::ResolvedKey;
///
/// let key = ResolvedKey::new("team-7-key-1", "pro").account("team-7");
/// assert_eq!(key.id(), "team-7-key-1");
/// assert_eq!(key.plan(), "pro");
/// assert_eq!(key.get_account(), Some("team-7"));
/// assert!(key.is_enabled());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolvedKey {
    id: String,
    plan: String,
    account: Option<String>,
    enabled: bool,
}

impl ResolvedKey {
    /// An enabled key `id` bound to the plan named `plan`, in no account.
    pub fn new(id: impl Into<String>, plan: impl Into<String>) -> Self {
        ResolvedKey {
            id: id.into(),
            plan: plan.into(),
            account: None,
            enabled: true,
        }
    }

    /// The account (tenant, team) the key belongs to.
    pub fn account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// Enables or disables the key (a disabled key is answered 403).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The key's public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of the key's plan.
    pub fn plan(&self) -> &str {
        &self.plan
    }

    /// The account the key belongs to, if any.
    pub fn get_account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// Whether the key is enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
}

/// A [`KeyResolver`](crate::KeyResolver)'s answer for a key value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The value is a key.
    Found(ResolvedKey),
    /// The value is no key (answered 403, like an unregistered key).
    Unknown,
}

/// A [`KeyResolver`](crate::KeyResolver) could not answer: its source
/// failed, it took longer than the timeout, it had its most lookups in
/// flight, or it named a plan the policy does not have.
///
/// A request whose key could not be resolved is answered 503, or as
/// [`ResolverFallback`](crate::ResolverFallback) says.
///
/// ```
/// use tollgate::ResolveError;
///
/// let e = ResolveError::new("connection refused");
/// assert_eq!(e.to_string(), "key resolver failed: connection refused");
/// assert!(!e.is_timeout());
/// ```
#[derive(Clone)]
pub struct ResolveError {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Source(Arc<dyn Error + Send + Sync>),
    Timeout,
    Busy,
    UnknownPlan,
}

impl ResolveError {
    /// An error of the resolver's source (a database error, a message).
    pub fn new(source: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        ResolveError {
            kind: Kind::Source(Arc::from(source.into())),
        }
    }

    pub(crate) fn timeout() -> Self {
        ResolveError {
            kind: Kind::Timeout,
        }
    }

    pub(crate) fn busy() -> Self {
        ResolveError { kind: Kind::Busy }
    }

    pub(crate) fn unknown_plan() -> Self {
        ResolveError {
            kind: Kind::UnknownPlan,
        }
    }

    /// Whether the resolver took longer than its timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::Timeout)
    }

    /// Whether the value was not looked up because the resolver had its
    /// most lookups in flight ([`Resolver::max_in_flight`](crate::Resolver::max_in_flight)).
    pub fn is_busy(&self) -> bool {
        matches!(self.kind, Kind::Busy)
    }
}

impl fmt::Debug for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Source(e) => f.debug_tuple("ResolveError").field(e).finish(),
            Kind::Timeout => f.write_str("ResolveError::Timeout"),
            Kind::Busy => f.write_str("ResolveError::Busy"),
            Kind::UnknownPlan => f.write_str("ResolveError::UnknownPlan"),
        }
    }
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Source(e) => write!(f, "key resolver failed: {e}"),
            Kind::Timeout => f.write_str("key resolver timed out"),
            Kind::Busy => f.write_str("key resolver has its most lookups in flight"),
            Kind::UnknownPlan => f.write_str("key resolver named a plan the policy does not have"),
        }
    }
}

impl Error for ResolveError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.kind {
            Kind::Source(e) => Some(&**e as &(dyn Error + 'static)),
            Kind::Timeout | Kind::Busy | Kind::UnknownPlan => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_failed_and_keep_their_source() {
        let io = std::io::Error::other("database is locked");
        let e = ResolveError::new(io);
        assert_eq!(e.to_string(), "key resolver failed: database is locked");
        assert_eq!(e.source().unwrap().to_string(), "database is locked");
        assert!(ResolveError::timeout().is_timeout());
        assert_eq!(
            ResolveError::timeout().to_string(),
            "key resolver timed out"
        );
        assert!(ResolveError::unknown_plan().source().is_none());
        assert!(ResolveError::busy().is_busy() && !ResolveError::busy().is_timeout());
        assert_eq!(
            ResolveError::busy().to_string(),
            "key resolver has its most lookups in flight"
        );
        assert_eq!(
            format!("{:?}", ResolveError::timeout()),
            "ResolveError::Timeout"
        );
    }

    #[test]
    fn keys_are_built_with_setters() {
        let k = ResolvedKey::new("k1", "free").enabled(false);
        assert_eq!((k.id(), k.plan(), k.get_account()), ("k1", "free", None));
        assert!(!k.is_enabled());
    }
}
