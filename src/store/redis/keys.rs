//! How Redis keys are named.
//!
//! Keys: `{prefix}:{<tag>}:t:<limit id>` (a throttle's TAT; with `:x`
//! after it, the time of the throttle's last reset, see [`reset_mark`]),
//! `{prefix}:{<tag>}:q` (a quota window's count), `{prefix}:{<tag>}:h`
//! (daily usage history; a token budget's count and history add
//! `:<budget name>`, a model's quotas `:<quota name>:<limit id>`),
//! `{prefix}:{<tag>}:l:<quota id>` (a quota's limit log, one per quota of a
//! plan, tagged with a hash of `l\0<plan>`, or of an account, in the
//! account's slot), `{prefix}:{<tag>}:c` (the leases of requests in
//! flight under a plan's concurrency cap; a model's adds `:<limit id>`) and
//! `{prefix}:{<tag>}:s:<id>` (the marker of a settlement sent once, for 60 s:
//! see `retry`), where the tag is a 128-bit hash of the
//! plan and the subject (a key's public id, a client IP, a per-key key), of
//! `stage` for the limits every caller shares, or of `a\0<name>` for an
//! account's limits, which all its keys share (no plan or key hashes to
//! it: theirs start `p\0`). Every key of one (plan, subject) shares the
//! hash tag, so they land in one Redis Cluster slot; an account's keys
//! land in a slot of their own; no key name holds an API key's value or a client address. Throttle
//! state expires when its bucket is full again, a quota's count a day after
//! its window ends, the history and a limit log a month after `history_days`
//! without use, the
//! leases one lease after the last place was taken or renewed, and a reset mark the
//! throttle's span after the reset. Redis expires keys on its own clock: on
//! a [`ManualClock`](crate::ManualClock)'s time, which real time does not
//! move, a throttle, the leases and a reset mark last a day at least.

use std::fmt::Write as _;

use super::builder::NamingKey;
use super::store::Inner;
use crate::hash;
use crate::store::{Permit, QuotaRef, ThrottleRef};

impl Inner {
    /// The hash tag of a (plan, subject): every key of it lands in one slot.
    fn tag(&self, plan: Option<&str>, subject: &[u8]) -> String {
        format!("{}:{{{:032x}}}", self.prefix, self.scope(plan, subject))
    }

    /// The hash tag of an account's limits.
    fn account_tag(&self, account: &str) -> String {
        let scope = [b"a\0", account.as_bytes()].concat();
        let hash = match self.naming {
            Some(NamingKey(k0, k1)) => hash::keyed(k0, k1, &scope),
            None => hash::stable(&scope),
        };
        format!("{}:{{{hash:032x}}}", self.prefix)
    }

    /// The hash of a (plan, subject), which names its keys.
    pub(super) fn scope(&self, plan: Option<&str>, subject: &[u8]) -> u128 {
        let scope = match plan {
            Some(p) => [b"p\0", p.as_bytes(), b"\0", subject].concat(),
            None => b"stage".to_vec(),
        };
        match self.naming {
            Some(NamingKey(k0, k1)) => hash::keyed(k0, k1, &scope),
            None => hash::stable(&scope),
        }
    }

    /// The sorted set of leases of a (plan, subject)'s requests in flight
    /// under the plan's cap, or under a model's (named by its id).
    pub(super) fn cap_key(&self, permit: &Permit) -> String {
        let place = permit.place;
        match permit.cap {
            0 => format!("{}:{{{place:032x}}}:c", self.prefix),
            cap => format!("{}:{{{place:032x}}}:c:{cap:016x}", self.prefix),
        }
    }

    /// The count and history keys of a quota (a token budget's carry its name).
    pub(super) fn quota_keys(&self, q: &QuotaRef<'_>) -> [String; 2] {
        let tag = match q.account {
            Some(a) => self.account_tag(a),
            None => self.tag(Some(q.plan), q.subject),
        };
        if q.kind.is_model() {
            // A model's quotas, in the key's slot, apart per model by id.
            let name = q.name();
            let id = q.spec.salt;
            [
                format!("{tag}:q:{name}:{id:016x}"),
                format!("{tag}:h:{name}:{id:016x}"),
            ]
        } else if q.counts_tokens() {
            let name = q.name();
            [format!("{tag}:q:{name}"), format!("{tag}:h:{name}")]
        } else {
            [format!("{tag}:q"), format!("{tag}:h")]
        }
    }

    /// The limit log of a quota (its numbers before each change, see
    /// `Inner::requota`): one per quota of a plan or an account, shared by
    /// all their subjects, in a slot of its own (an account's in the
    /// account's).
    pub(super) fn limit_log_key(&self, q: &QuotaRef<'_>) -> String {
        let tag = match q.account {
            Some(a) => self.account_tag(a),
            None => {
                let scope = [b"l\0", q.plan.as_bytes()].concat();
                let hash = match self.naming {
                    Some(NamingKey(k0, k1)) => hash::keyed(k0, k1, &scope),
                    None => hash::stable(&scope),
                };
                format!("{}:{{{hash:032x}}}", self.prefix)
            }
        };
        format!("{tag}:l:{:016x}", q.spec.salt)
    }

    pub(super) fn throttle_key(&self, t: &ThrottleRef<'_>) -> String {
        let mut k = match t.account {
            Some(a) => self.account_tag(a),
            None => self.tag(t.plan, t.subject),
        };
        let _ = write!(k, ":t:{:016x}", t.limit.salt);
        k
    }
}

/// The key of the reset mark of the throttle whose key is `throttle_key`:
/// when `Admin::reset_key` last filled it (script mode "f"), read by a
/// refund (mode "r") so that a charge made before it gets nothing back.
/// Beside the throttle's key, with its hash tag: in its slot.
pub(super) fn reset_mark(throttle_key: &str) -> String {
    format!("{throttle_key}:x")
}
