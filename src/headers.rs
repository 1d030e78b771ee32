//! Rate-limit headers: the IETF draft `RateLimit-Policy` / `RateLimit`, and
//! the legacy `X-RateLimit-*`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::{self, Write};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::gcra::{NANOS_PER_SEC, Nanos};
use crate::store::{Applied, LimitKind, MAX_LIMITS, Report};
use crate::sync::Mutex;

const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const OPENAI_LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const OPENAI_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
const OPENAI_RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const OPENAI_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const OPENAI_REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const OPENAI_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// Which rate-limit headers responses carry.
///
/// By default, the IETF draft headers (`draft-ietf-httpapi-ratelimit-headers`):
///
/// ```text
/// RateLimit-Policy: "throttle";q=5;w=3
/// RateLimit: "throttle";r=4;t=1
/// ```
///
/// `q` is the limit's size (a throttle's burst), `w` its window in seconds (the
/// time an empty bucket takes to refill), `r` the units left and `t` the seconds
/// until the limit is full again. These are Structured Fields integers, which
/// stop at 999,999,999,999,999: a larger number (a quota of up to 2^53) is
/// sent as that, so that the field still parses. `RateLimit-Policy` lists every limit that
/// applies to the request, on an allowed response and a rejection alike;
/// `RateLimit` shows the tightest one. The legacy
/// `X-RateLimit-Limit` / `-Remaining` / `-Reset` (seconds) can be added, and
/// all can be turned off.
///
/// For clients built on OpenAI's SDKs, [`openai`](Self::openai) adds the
/// headers they read to back off:
///
/// ```text
/// x-ratelimit-limit-requests: 5
/// x-ratelimit-remaining-requests: 4
/// x-ratelimit-reset-requests: 500ms
/// ```
///
/// and the same with `-tokens` for token limits; a reset is a duration as
/// OpenAI writes it (`1s`, `6m0s`, `1.5s`, `20ms`).
///
/// Each family reports its *defining* limit, the same one on every response
/// of a plan, whatever route is called and whichever limit is tightest at
/// the moment (a client that sizes its pace from `x-ratelimit-limit-*` must
/// not see it jump):
///
/// | family | defining limit, the first the plan (or key) has |
/// |---|---|
/// | requests | the plan's throttle, the account's throttle, the plan's quota, the account's quota, the stage throttle, the route's method override, the stage's override of the route, then the model's throttle and quota |
/// | tokens | the plan's per-minute token bucket, the account's, the daily and monthly token quotas (plan's, then account's), then the model's token budget |
///
/// On an allowed response, `remaining` and `reset` are that limit's. On a
/// rejection by any limit of a family (a concurrency cap counts requests),
/// the family reports its defining limit's size, `remaining` 0 and `reset`
/// the time until the request may pass; the other family is left out (its
/// state was not read).
///
/// On a rejection, `RateLimit-Policy` lists the same policies, in the same
/// order and with the same sizes, as an allowed response of the same caller
/// and route (whichever limit denied, in every response style and with
/// every store): the IETF draft asks that the policies a server announces
/// stay the same from one response to the next, and a client that learns
/// them from a 429 learns them all. `RateLimit` names the limit that
/// denied, alone, with `r=0` (nothing this request can use now) and `t` the
/// retry, in whole seconds rounded up: it always agrees with `Retry-After`.
/// (The draft lets `RateLimit` carry any of the policies; a denial reads
/// the state of the limit that denied, and the others' `r` would be
/// stale.)
///
/// ```text
/// HTTP/1.1 429 Too Many Requests
/// RateLimit-Policy: "throttle";q=5;w=3, "quota";q=1000;w=86400
/// RateLimit: "throttle";r=0;t=1
/// Retry-After: 1
/// ```
///
/// ```
/// use tollgate::HeaderStyle;
///
/// let style = HeaderStyle::ietf().x_ratelimit(true);
/// assert!(style.has_ietf() && style.has_x_ratelimit());
/// assert!(!HeaderStyle::none().has_ietf());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderStyle {
    ietf: bool,
    x_ratelimit: bool,
    openai: bool,
}

impl HeaderStyle {
    /// The IETF draft `RateLimit-Policy` and `RateLimit` headers (the default).
    pub const fn ietf() -> Self {
        HeaderStyle {
            ietf: true,
            x_ratelimit: false,
            openai: false,
        }
    }

    /// No rate-limit headers at all (`Retry-After` is still sent on rejections).
    pub const fn none() -> Self {
        HeaderStyle {
            ietf: false,
            x_ratelimit: false,
            openai: false,
        }
    }

    /// Turns the IETF headers on or off.
    #[must_use]
    pub const fn with_ietf(mut self, on: bool) -> Self {
        self.ietf = on;
        self
    }

    /// Turns `X-RateLimit-Limit`, `-Remaining` and `-Reset` on or off.
    #[must_use]
    pub const fn x_ratelimit(mut self, on: bool) -> Self {
        self.x_ratelimit = on;
        self
    }

    /// Turns the OpenAI-style `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
    /// headers on or off.
    #[must_use]
    pub const fn openai(mut self, on: bool) -> Self {
        self.openai = on;
        self
    }

    /// Whether the OpenAI-style headers are sent.
    pub const fn has_openai(&self) -> bool {
        self.openai
    }

    /// Whether the IETF headers are sent.
    pub const fn has_ietf(&self) -> bool {
        self.ietf
    }

    /// Whether the `X-RateLimit-*` headers are sent.
    pub const fn has_x_ratelimit(&self) -> bool {
        self.x_ratelimit
    }

    /// Whether any rate-limit header is sent on an allowed response.
    #[inline]
    pub(crate) const fn sends_any(&self) -> bool {
        self.ietf || self.x_ratelimit || self.openai
    }

    /// Writes the headers for `report` into `headers`.
    #[cfg(test)]
    pub(crate) fn write(&self, report: &Report, headers: &mut HeaderMap) {
        self.prepare(report).write(headers);
    }

    /// The headers for `report` (see [`prepare`](Self::prepare)); `None`
    /// when the style sends none, so that the response future neither
    /// formats nor writes nor drops anything for them.
    #[inline]
    pub(crate) fn prepared(&self, report: &Report) -> Option<Prepared> {
        if !self.sends_any() {
            return None;
        }
        Some(self.prepare(report))
    }

    /// The headers for `report`, formatted when the request is decided:
    /// every value in one shared buffer (see [`Prepared`]), so that a
    /// response future carries 64 bytes instead of the report, and no value
    /// is allocated on its own.
    pub(crate) fn prepare(&self, report: &Report) -> Prepared {
        if !(self.ietf || self.x_ratelimit || self.openai) {
            return Prepared::default();
        }
        let Some(tight) = report.tightest() else {
            return Prepared::default();
        };
        if self.ietf && !self.x_ratelimit && !self.openai {
            if let Some(p) = Prepared::ietf(report.items(), tight) {
                return p;
            }
        }
        self.prepare_slots(report, tight)
    }

    /// The headers for `report`, whose tightest limit is `tight`, slot by
    /// slot: any style, any policy.
    fn prepare_slots(&self, report: &Report, tight: &Applied) -> Prepared {
        let [requests, tokens] = match self.openai {
            true => defining(report.items()),
            false => [None, None],
        };
        Prepared::format(|out| {
            if self.ietf {
                policy_value(report.items(), |policy| match policy {
                    Policy::Interned(v) => out.policy = Some(v),
                    Policy::Shared(v) => out.value(Slot::Policy, v.as_bytes()),
                });
                out.ratelimit(tight.name(), tight.remaining, ceil_secs(tight.reset));
            }
            if self.x_ratelimit {
                out.int(Slot::XLimit, tight.quota);
                out.int(Slot::XRemaining, tight.remaining);
                out.int(Slot::XReset, ceil_secs(tight.reset));
            }
            for (a, first) in [(requests, Slot::LimitRequests), (tokens, Slot::LimitTokens)] {
                let Some(a) = a else { continue };
                let [limit, remaining, reset] = first.family();
                out.int(limit, a.quota);
                out.int(remaining, a.remaining);
                out.duration(reset, a.reset);
            }
        })
    }

    /// Writes the headers of a request rejected by `denied`, which may pass
    /// after `wait` (for a cost that never fits: when the limit is full
    /// again); `policies` holds every limit of the request (see
    /// `Acquire::policies`), none when its caller is no longer found:
    /// `RateLimit-Policy` announces them as an allowed response does, and
    /// each family's defining limit is read from them.
    pub(crate) fn write_denied(
        &self,
        denied: &Applied,
        wait: Nanos,
        policies: &[Applied],
        headers: &mut HeaderMap,
    ) {
        let policies = match policies {
            [] => std::slice::from_ref(denied),
            all => all,
        };
        if self.ietf {
            policy_value(policies, |policy| {
                let v = match policy {
                    Policy::Interned(v) => (*v).clone(),
                    Policy::Shared(v) => v.clone(),
                };
                headers.insert(RATELIMIT_POLICY, v);
            });
            let mut buf = HeaderBuf::new();
            buf.push(b"\"");
            buf.push(denied.name().as_bytes());
            buf.push(b"\";r=0;t=");
            buf.int(sf_int(ceil_secs(wait)));
            if let Some(v) = buf.value() {
                headers.insert(RATELIMIT, v);
            }
        }
        if self.x_ratelimit {
            headers.insert(X_LIMIT, HeaderValue::from(denied.quota));
            headers.insert(X_REMAINING, HeaderValue::from(0u64));
            headers.insert(X_RESET, HeaderValue::from(ceil_secs(wait)));
        }
        if self.openai {
            let [requests, tokens] = defining(policies);
            let (defining, first) = match Family::of(denied.kind) {
                Family::Requests => (requests, Slot::LimitRequests),
                Family::Tokens => (tokens, Slot::LimitTokens),
            };
            let [limit_name, remaining, reset] = first.family().map(Slot::name);
            let limit = defining.map_or(denied.quota, |a| a.quota);
            headers.insert(limit_name, HeaderValue::from(limit));
            headers.insert(remaining, HeaderValue::from(0u64));
            let mut buf = HeaderBuf::new();
            let _ = write_duration(&mut buf, wait);
            if let Some(v) = buf.value() {
                headers.insert(reset, v);
            }
        }
    }
}

/// What a limit counts, as OpenAI's headers group limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// Requests (throttles, request quotas, a concurrency cap).
    Requests,
    /// Tokens (token budgets).
    Tokens,
}

impl Family {
    /// The family of a limit of `kind`.
    pub(crate) fn of(kind: LimitKind) -> Self {
        if kind.counts_tokens() {
            Family::Tokens
        } else {
            Family::Requests
        }
    }
}

/// A limit's family and its rank as the family's defining limit (lower
/// ranks define first; see [`HeaderStyle`]); a concurrency cap defines no
/// family: its count says nothing about a pace.
fn defining_rank(kind: LimitKind) -> Option<(Family, u8)> {
    use LimitKind::*;
    let rank = match kind {
        Throttle | TokensMinute => 0,
        Account | AccountTokensMinute => 1,
        Quota | TokensDay => 2,
        AccountQuota | TokensMonth => 3,
        Stage | AccountTokensDay => 4,
        Method | AccountTokensMonth => 5,
        StageMethod | ModelTokensMinute => 6,
        // A model's limits define a family only when the plan's and the
        // account's do not: they differ from one request to the next.
        Model | ModelTokensDay => 7,
        ModelQuota | ModelTokensMonth => 8,
        Concurrency | ModelConcurrency => return None,
    };
    Some((Family::of(kind), rank))
}

/// The defining limit of each family among `items` (requests, then
/// tokens; see [`HeaderStyle`]): of each family's limits, the one of the
/// lowest rank.
#[inline]
fn defining(items: &[Applied]) -> [Option<&Applied>; 2] {
    let mut best: [Option<(u8, &Applied)>; 2] = [None, None];
    for a in items {
        let Some((family, rank)) = defining_rank(a.kind) else {
            continue;
        };
        let slot = match family {
            Family::Requests => &mut best[0],
            Family::Tokens => &mut best[1],
        };
        if slot.is_none_or(|(r, _)| rank < r) {
            *slot = Some((rank, a));
        }
    }
    best.map(|b| b.map(|(_, a)| a))
}

/// The headers a response can carry, in the order they are written
/// (`RateLimit-Policy` here only when it is not interned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Policy,
    RateLimit,
    XLimit,
    XRemaining,
    XReset,
    LimitRequests,
    RemainingRequests,
    ResetRequests,
    LimitTokens,
    RemainingTokens,
    ResetTokens,
}

impl Slot {
    const ALL: [Slot; 11] = [
        Slot::Policy,
        Slot::RateLimit,
        Slot::XLimit,
        Slot::XRemaining,
        Slot::XReset,
        Slot::LimitRequests,
        Slot::RemainingRequests,
        Slot::ResetRequests,
        Slot::LimitTokens,
        Slot::RemainingTokens,
        Slot::ResetTokens,
    ];

    fn name(self) -> HeaderName {
        match self {
            Slot::Policy => RATELIMIT_POLICY,
            Slot::RateLimit => RATELIMIT,
            Slot::XLimit => X_LIMIT,
            Slot::XRemaining => X_REMAINING,
            Slot::XReset => X_RESET,
            Slot::LimitRequests => OPENAI_LIMIT_REQUESTS,
            Slot::RemainingRequests => OPENAI_REMAINING_REQUESTS,
            Slot::ResetRequests => OPENAI_RESET_REQUESTS,
            Slot::LimitTokens => OPENAI_LIMIT_TOKENS,
            Slot::RemainingTokens => OPENAI_REMAINING_TOKENS,
            Slot::ResetTokens => OPENAI_RESET_TOKENS,
        }
    }

    /// The three slots of OpenAI's family whose first (limit) slot this is.
    fn family(self) -> [Slot; 3] {
        match self {
            Slot::LimitTokens => [Slot::LimitTokens, Slot::RemainingTokens, Slot::ResetTokens],
            _ => [
                Slot::LimitRequests,
                Slot::RemainingRequests,
                Slot::ResetRequests,
            ],
        }
    }
}

/// The rate-limit headers of one response, formatted and ready to write
/// (see [`HeaderStyle::prepare`]); the default writes nothing.
///
/// Every value lies in one buffer, a slice of a per-thread chunk of memory
/// that later responses' values share (see [`ARENA`]): a response's values
/// cost no allocation of their own, and the response future holds only the
/// buffer (40 bytes with the policy's pointer: every byte of a response
/// future is copied as it is moved).
///
/// The buffer holds either the `RateLimit` value alone (the usual response,
/// see [`ietf`](Self::ietf)), which opens with `"`, or [`SLOTTED`], then
/// where each slot's value ends (see [`Ends`]), then the values.
#[derive(Debug, Clone, Default)]
pub(crate) struct Prepared {
    /// The `RateLimit-Policy` value when it is interned (see
    /// [`policy_value`]); one that is not is in `values`.
    policy: Option<&'static HeaderValue>,
    values: Bytes,
}

/// Where each slot's value ends among the values: it starts where the
/// previous slot's ends. A slot without a header has an empty value.
type Ends = [u16; Slot::ALL.len()];

/// The first byte of a buffer of values by slot, which no `RateLimit`
/// value (a quoted name first) opens with.
const SLOTTED: u8 = 0;

/// The bytes ahead of the values in a buffer of values by slot: [`SLOTTED`],
/// then the [`Ends`], little-endian.
const SLOTTED_HEAD: usize = 1 + 2 * Slot::ALL.len();

/// How many bytes the values of one response usually take at most: a
/// policy not interned (most are within 256 bytes; a longer one, of a
/// request with many limits, makes the chunk grow), `RateLimit` and the
/// nine others, each a number or a duration of at most 20 bytes, and the
/// head of a buffer of values by slot.
const MAX_PREPARED: usize = 256 + 64 + 9 * 24 + SLOTTED_HEAD;

/// A chunk of memory the values of a thread's responses are cut from.
const ARENA_CHUNK: usize = 4 * 1024;

/// Writes the values of one [`Prepared`] into the thread's arena.
struct Formatter<'a> {
    /// The interned `RateLimit-Policy` value, if any.
    policy: Option<&'static HeaderValue>,
    ends: Ends,
    buf: &'a mut BytesMut,
    start: usize,
    /// The next slot that may be written: slots are written in order.
    next: usize,
}

impl Formatter<'_> {
    /// Starts `slot`'s value (the slots before it stay empty).
    #[inline]
    fn open(&mut self, slot: Slot) {
        let at = (self.buf.len() - self.start) as u16;
        for end in &mut self.ends[self.next..slot as usize] {
            *end = at;
        }
        self.next = slot as usize;
    }

    /// Ends the value opened last.
    #[inline]
    fn close(&mut self) {
        self.ends[self.next] = (self.buf.len() - self.start) as u16;
        self.next += 1;
    }

    #[inline]
    fn value(&mut self, slot: Slot, bytes: &[u8]) {
        self.open(slot);
        self.buf.extend_from_slice(bytes);
        self.close();
    }

    #[inline]
    fn int(&mut self, slot: Slot, n: u64) {
        self.value(slot, itoa::Buffer::new().format(n).as_bytes());
    }

    /// `"name";r=remaining;t=reset`, the IETF `RateLimit` value.
    #[inline]
    fn ratelimit(&mut self, name: &str, remaining: u64, reset_secs: u64) {
        self.open(Slot::RateLimit);
        self.buf.extend_from_slice(b"\"");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"\";r=");
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(sf_int(remaining)).as_bytes());
        self.buf.extend_from_slice(b";t=");
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(sf_int(reset_secs)).as_bytes());
        self.close();
    }

    /// A duration as OpenAI writes it.
    fn duration(&mut self, slot: Slot, n: Nanos) {
        self.open(slot);
        // Writing into a `BytesMut` cannot fail.
        let _ = write_duration(&mut *self.buf, n);
        self.close();
    }
}

thread_local! {
    /// The chunk this thread's response values are cut from.
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Runs `f` on the thread's chunk, with room in it for one response's
/// values.
#[inline]
fn in_arena<T>(f: impl FnOnce(&mut BytesMut) -> T) -> T {
    ARENA.with(|arena| {
        let mut buf = arena.borrow_mut();
        if buf.capacity() - buf.len() < MAX_PREPARED {
            // Reclaims the chunk when nothing else holds it.
            buf.reserve(ARENA_CHUNK);
        }
        f(&mut buf)
    })
}

impl Prepared {
    /// Formats the values `f` writes (in slot order) into the thread's
    /// chunk and takes them out as one shared buffer.
    ///
    /// A chunk no response holds any more is reused from its start; one
    /// still held by a response (a header map not yet dropped) is left to
    /// it, and a new chunk is allocated: one allocation for many responses.
    fn format(f: impl FnOnce(&mut Formatter<'_>)) -> Prepared {
        in_arena(|buf| {
            // The head, filled in once the values are written.
            let head = buf.len();
            buf.extend_from_slice(&[SLOTTED; SLOTTED_HEAD]);
            let mut out = Formatter {
                start: buf.len(),
                buf,
                policy: None,
                ends: [0; Slot::ALL.len()],
                next: 0,
            };
            f(&mut out);
            let at = (out.buf.len() - out.start) as u16;
            let (next, policy, mut ends) = (out.next, out.policy, out.ends);
            for end in &mut ends[next..] {
                *end = at;
            }
            let table = &mut buf[head + 1..head + SLOTTED_HEAD];
            for (bytes, end) in table.chunks_exact_mut(2).zip(ends) {
                bytes.copy_from_slice(&end.to_le_bytes());
            }
            Prepared {
                policy,
                values: buf.split().freeze(),
            }
        })
    }

    /// The headers of the usual response, the IETF ones alone: an interned
    /// `RateLimit-Policy` and the `RateLimit` value, formatted on the stack
    /// and copied into the thread's chunk at once, without the slot
    /// bookkeeping of [`format`](Self::format). `None` when the policy is not
    /// interned (its value goes in the buffer too: [`format`](Self::format)
    /// writes it).
    fn ietf(items: &[Applied], tight: &Applied) -> Option<Prepared> {
        let (mut policy, mut interned) = (None, true);
        policy_value(items, |p| match p {
            Policy::Interned(v) => policy = Some(*v),
            Policy::Shared(_) => interned = false,
        });
        if !interned {
            return None;
        }
        let mut value = ValueBuf::<RATELIMIT_MAX>::new();
        value.push(b"\"");
        value.push(tight.name().as_bytes());
        value.push(b"\";r=");
        value.int(sf_int(tight.remaining));
        value.push(b";t=");
        value.int(sf_int(ceil_secs(tight.reset)));
        let value = value.as_bytes()?;
        let values = in_arena(|buf| {
            buf.extend_from_slice(value);
            buf.split().freeze()
        });
        // `RateLimit` is the only value, and the buffer opens with it.
        debug_assert_ne!(values.first(), Some(&SLOTTED));
        Some(Prepared { policy, values })
    }

    /// Writes the headers into `headers`.
    pub(crate) fn write(self, headers: &mut HeaderMap) {
        if let Some(policy) = self.policy {
            headers.insert(RATELIMIT_POLICY, policy.clone());
        }
        let Some(&first) = self.values.first() else {
            return;
        };
        // The usual response: `RateLimit` is the only value in the buffer.
        if first != SLOTTED {
            if let Ok(v) = HeaderValue::from_maybe_shared(self.values) {
                headers.insert(RATELIMIT, v);
            }
            return;
        }
        let mut ends: Ends = [0; Slot::ALL.len()];
        for (end, bytes) in ends
            .iter_mut()
            .zip(self.values[1..SLOTTED_HEAD].chunks_exact(2))
        {
            *end = u16::from_le_bytes([bytes[0], bytes[1]]);
        }
        let mut rest = self.values;
        bytes::Buf::advance(&mut rest, SLOTTED_HEAD);
        let mut start = 0;
        for (slot, &end) in Slot::ALL.iter().zip(&ends) {
            let len = usize::from(end) - start;
            start = usize::from(end);
            if len == 0 {
                continue;
            }
            // The last value takes what is left, uncounted (the usual
            // response has only `RateLimit`).
            let value = if len == rest.len() {
                std::mem::take(&mut rest)
            } else {
                rest.split_to(len)
            };
            if let Ok(v) = HeaderValue::from_maybe_shared(value) {
                headers.insert(slot.name(), v);
            }
        }
    }
}

impl Default for HeaderStyle {
    fn default() -> Self {
        HeaderStyle::ietf()
    }
}

/// A duration as OpenAI's headers (and Go's `time.Duration`) write it, to the
/// millisecond, rounded up: `0s`, `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3.25s`.
fn write_duration(out: &mut impl Write, n: Nanos) -> fmt::Result {
    let ms = n.div_ceil(1_000_000);
    if ms == 0 {
        return out.write_str("0s");
    }
    if ms < 1_000 {
        return write!(out, "{ms}ms");
    }
    let (h, m, s, frac) = (
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1_000 % 60,
        ms % 1_000,
    );
    if h > 0 {
        write!(out, "{h}h")?;
    }
    if h > 0 || m > 0 {
        write!(out, "{m}m")?;
    }
    write!(out, "{s}")?;
    match frac {
        0 => {}
        f if f % 100 == 0 => write!(out, ".{}", f / 100)?,
        f if f % 10 == 0 => write!(out, ".{:02}", f / 10)?,
        f => write!(out, ".{f:03}")?,
    }
    out.write_str("s")
}

pub(crate) fn ceil_secs(n: Nanos) -> u64 {
    n.div_ceil(NANOS_PER_SEC)
}

/// A `RateLimit-Policy` value as the cache of [`policy_value`] keeps it.
#[derive(Debug, Clone)]
enum Policy {
    /// Kept for the life of the process (see [`intern`]): a response keeps
    /// a pointer to it, and its bytes are never counted.
    Interned(&'static HeaderValue),
    /// Past the bound on interned values: copied into each response's
    /// values.
    Shared(HeaderValue),
}

/// The most `RateLimit-Policy` values kept for the life of the process. A
/// value depends only on the sizes and windows of a set of limits, so a
/// service sees a handful; an administrator resizing plans for years would
/// see more, and past this bound a value is copied into each response's
/// values.
const MAX_INTERNED: usize = 1024;

/// The interned value equal to `v`, made (and kept for the life of the
/// process) if there is none yet and the bound allows.
fn intern(v: HeaderValue) -> Policy {
    static INTERNED: Mutex<Option<HashMap<&'static [u8], &'static HeaderValue>>> = Mutex::new(None);
    let mut interned = INTERNED.lock();
    let map = interned.get_or_insert_with(HashMap::new);
    if let Some(&kept) = map.get(v.as_bytes()) {
        return Policy::Interned(kept);
    }
    if map.len() >= MAX_INTERNED {
        return Policy::Shared(v);
    }
    let bytes: &'static [u8] = Box::leak(v.as_bytes().to_vec().into_boxed_slice());
    let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from_static(bytes)) else {
        return Policy::Shared(v);
    };
    let kept: &'static HeaderValue = Box::leak(Box::new(value));
    map.insert(bytes, kept);
    Policy::Interned(kept)
}

/// The `RateLimit-Policy` value of `items`.
///
/// It changes only when the set of limits or their sizes do, so the value of
/// the last few sets seen is kept per thread, interned (see [`intern`]),
/// rather than formatted for every response.
fn policy_value(items: &[Applied], f: impl FnOnce(&Policy)) {
    /// What a policy value depends on, per limit: its kind (which names
    /// it), size and window.
    type Key = ([(usize, usize, u64, u64); MAX_LIMITS], usize);
    const CACHED: usize = 4;
    /// The last sets seen, and where the next one goes.
    type Cache = ([Option<(Key, Policy)>; CACHED], usize);
    thread_local! {
        static CACHE: RefCell<Cache> = const { RefCell::new(([const { None }; CACHED], 0)) };
    }
    let part = |a: &Applied| (a.kind as usize, 0, a.quota, a.window_secs);
    // Compared item by item, without building a key: a hit (the usual case)
    // reads only as many entries as the request has limits.
    let matches = |k: &Key| k.1 == items.len() && k.0.iter().zip(items).all(|(k, a)| *k == part(a));
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, v)) = cache.0.iter().flatten().find(|(k, _)| matches(k)) {
            return f(v);
        }
        let Some(v) = format_policy(items) else {
            return;
        };
        let v = intern(v);
        f(&v);
        let mut key: Key = ([(0, 0, 0, 0); MAX_LIMITS], items.len());
        for (k, a) in key.0.iter_mut().zip(items) {
            *k = part(a);
        }
        let next = cache.1;
        cache.0[next] = Some((key, v));
        cache.1 = (next + 1) % CACHED;
    })
}

/// Formats a `RateLimit-Policy` value: `"throttle";q=5;w=3, "quota";q=1000;w=86400`.
///
/// On the heap: a request may be decided against [`MAX_LIMITS`] limits
/// (stage, account, plan, method and model), some 1.3 KB of value, and a
/// value is formatted only when a thread meets a new set of limits (see
/// [`policy_value`]) or for a rejection.
fn format_policy(items: &[Applied]) -> Option<HeaderValue> {
    let mut buf = Vec::with_capacity(items.len() * 48);
    for (i, a) in items.iter().enumerate() {
        if i > 0 {
            buf.extend_from_slice(b", ");
        }
        buf.push(b'"');
        buf.extend_from_slice(a.name().as_bytes());
        buf.extend_from_slice(b"\";q=");
        buf.extend_from_slice(itoa::Buffer::new().format(sf_int(a.quota)).as_bytes());
        if a.kind.is_concurrency() {
            // A cap on requests in flight has no window.
            buf.extend_from_slice(b";qu=\"concurrent-requests\"");
        } else {
            buf.extend_from_slice(b";w=");
            buf.extend_from_slice(itoa::Buffer::new().format(sf_int(a.window_secs)).as_bytes());
        }
    }
    HeaderValue::from_maybe_shared(Bytes::from(buf)).ok()
}

/// The largest integer a Structured Field holds (RFC 9651, section 3.3.1).
const SF_INT_MAX: u64 = 999_999_999_999_999;

/// `n` as an IETF header's integer: at most [`SF_INT_MAX`], which a larger
/// count is sent as (a strict parser refuses the whole field otherwise).
#[inline(always)]
fn sf_int(n: u64) -> u64 {
    n.min(SF_INT_MAX)
}

/// A small stack buffer for formatting a header value without a `String`.
type HeaderBuf = ValueBuf<256>;

/// The longest `RateLimit` value: `"` and the longest limit name
/// (`account-tokens-minute`, 21 bytes, rounded up), `";r=`, a number,
/// `;t=` and a number (20 digits at most each).
const RATELIMIT_MAX: usize = 1 + 24 + 4 + 20 + 3 + 20;

/// A stack buffer of `N` bytes for formatting a header value.
struct ValueBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    overflow: bool,
}

impl<const N: usize> ValueBuf<N> {
    fn new() -> Self {
        ValueBuf {
            buf: [0; N],
            len: 0,
            overflow: false,
        }
    }

    fn value(&self) -> Option<HeaderValue> {
        HeaderValue::from_bytes(self.as_bytes()?).ok()
    }

    /// The bytes written, `None` if some were lost past the buffer's end.
    #[inline]
    fn as_bytes(&self) -> Option<&[u8]> {
        if self.overflow {
            return None;
        }
        self.buf.get(..self.len)
    }

    /// Appends `bytes`; past the buffer's end, the value is lost (`value`
    /// gives `None`).
    #[inline]
    fn push(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len = end;
            }
            None => self.overflow = true,
        }
    }

    /// Appends `n` in decimal.
    #[inline]
    fn int(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }
}

impl<const N: usize> fmt::Write for ValueBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        if self.overflow {
            return Err(fmt::Error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(items: &[(&'static str, u64, u64, u64, Nanos)]) -> Report {
        let mut r = Report::default();
        for &(name, quota, window_secs, remaining, reset) in items {
            r.push(Applied {
                kind: LimitKind::named(name),
                quota,
                window_secs,
                remaining,
                reset,
            });
        }
        r
    }

    #[test]
    fn ietf_headers_list_every_limit_and_show_the_tightest() {
        let r = report(&[
            ("throttle", 5, 3, 4, 500_000_000),
            ("quota", 1000, 86_400, 2, 3_600 * NANOS_PER_SEC),
        ]);
        let mut h = HeaderMap::new();
        HeaderStyle::ietf().x_ratelimit(true).write(&r, &mut h);
        assert_eq!(
            h["ratelimit-policy"],
            "\"throttle\";q=5;w=3, \"quota\";q=1000;w=86400"
        );
        assert_eq!(h["ratelimit"], "\"quota\";r=2;t=3600");
        assert_eq!(h["x-ratelimit-limit"], "1000");
        assert_eq!(h["x-ratelimit-remaining"], "2");
        assert_eq!(h["x-ratelimit-reset"], "3600");
        let mut h = HeaderMap::new();
        HeaderStyle::none().write(&r, &mut h);
        assert!(h.is_empty());
    }

    /// A quota of 2^53 (the largest one) has 16 digits, one more than a
    /// Structured Field's integer holds: both IETF values say the largest
    /// integer instead, on the usual path and on the slots', and the
    /// legacy headers (plain numbers) the number itself.
    #[test]
    fn ietf_numbers_past_a_structured_fields_integer_are_sent_as_its_largest() {
        let big = 1u64 << 53;
        let r = report(&[("quota", big, 86_400, big - 1, 3_600 * NANOS_PER_SEC)]);
        let max = "999999999999999";
        for style in [HeaderStyle::ietf(), HeaderStyle::ietf().x_ratelimit(true)] {
            let mut h = HeaderMap::new();
            style.write(&r, &mut h);
            assert_eq!(h["ratelimit-policy"], format!("\"quota\";q={max};w=86400"));
            assert_eq!(h["ratelimit"], format!("\"quota\";r={max};t=3600"));
        }
        let mut h = HeaderMap::new();
        HeaderStyle::ietf().x_ratelimit(true).write(&r, &mut h);
        assert_eq!(h["x-ratelimit-limit"], big.to_string());
        assert_eq!(h["x-ratelimit-remaining"], (big - 1).to_string());
    }

    /// The `RateLimit-Policy` value of `items`, as a response gets it.
    fn policy_of(items: &[Applied]) -> HeaderValue {
        let mut got = None;
        policy_value(items, |p| got = Some(p.clone()));
        match got.expect("a policy value") {
            Policy::Interned(v) => v.clone(),
            Policy::Shared(v) => v,
        }
    }

    #[test]
    fn interned_policies_are_bounded_and_always_right() {
        // Past the bound, values are shared instead of kept: each is still
        // its own set's.
        let mut shared = 0;
        for n in 0..(MAX_INTERNED as u64 + 50) {
            let r = report(&[("throttle", 1_000_000 + n, 3, 1, 0)]);
            let want = format_policy(r.items()).unwrap();
            let got = intern(want.clone());
            shared += usize::from(matches!(got, Policy::Shared(_)));
            let got = match got {
                Policy::Interned(v) => v.clone(),
                Policy::Shared(v) => v,
            };
            assert_eq!(got, want);
        }
        assert!(shared >= 50, "{shared} values shared past the bound");
        // A response whose policy is not interned carries it all the same,
        // beside its other values.
        let r = report(&[
            ("throttle", 7_654_321, 3, 4, 500_000_000),
            ("quota", 1000, 86_400, 2, 3_600 * NANOS_PER_SEC),
        ]);
        let mut h = HeaderMap::new();
        HeaderStyle::ietf().x_ratelimit(true).write(&r, &mut h);
        assert_eq!(h["ratelimit-policy"], format_policy(r.items()).unwrap());
        assert_eq!(h["ratelimit"], "\"quota\";r=2;t=3600");
        assert_eq!(h["x-ratelimit-remaining"], "2");
        // An interned value is found again, not kept twice.
        let v = HeaderValue::from_static("\"throttle\";q=1;w=1");
        let (a, b) = (intern(v.clone()), intern(v));
        if let (Policy::Interned(a), Policy::Interned(b)) = (a, b) {
            assert!(std::ptr::eq(a, b));
        }
    }

    #[test]
    fn policy_values_are_kept_per_set_of_limits_and_never_mixed() {
        // More sets than the cache holds, seen in turn, twice: each value is
        // always its own set's, whether formatted or taken from the cache.
        type Item = (&'static str, u64, u64, u64, Nanos);
        let sets: Vec<Vec<Item>> = (1..=6)
            .map(|n| vec![("throttle", n, 3, 1, 0), ("quota", 1000, 86_400 * n, 1, 0)])
            .chain([
                vec![("throttle", 1, 3, 1, 0)],
                vec![("concurrency", 2, 0, 1, 0)],
            ])
            .collect();
        for _ in 0..2 {
            for set in &sets {
                let r = report(set);
                let want = format_policy(r.items()).unwrap();
                for _ in 0..2 {
                    assert_eq!(policy_of(r.items()), want);
                }
            }
        }
        let r = report(&[("concurrency", 2, 0, 1, 0)]);
        assert_eq!(
            policy_of(r.items()),
            "\"concurrency\";q=2;qu=\"concurrent-requests\""
        );
    }

    /// The headers `p` writes, in the map's order.
    fn written(p: Prepared) -> Vec<(HeaderName, HeaderValue)> {
        let mut h = HeaderMap::new();
        p.write(&mut h);
        h.into_iter().map(|(k, v)| (k.unwrap(), v)).collect()
    }

    #[test]
    fn the_ietf_shortcut_writes_what_the_slots_do() {
        type Item = (&'static str, u64, u64, u64, Nanos);
        let sets: [&[Item]; 6] = [
            &[("throttle", 5, 3, 4, 500_000_000)],
            &[("throttle", 0, 1, 0, 0)],
            &[(
                "account-tokens-minute",
                u64::MAX,
                u64::MAX,
                u64::MAX,
                u64::MAX,
            )],
            &[
                ("throttle", 5, 3, 4, 500_000_000),
                ("quota", 1000, 86_400, 2, 3_600 * NANOS_PER_SEC),
            ],
            &[("concurrency", 2, 0, 1, 0)],
            &[
                ("concurrency", 2, 0, 0, 0),
                (
                    "tokens-day",
                    9_000_000,
                    86_400,
                    123_456,
                    7 * NANOS_PER_SEC + 1,
                ),
            ],
        ];
        let style = HeaderStyle::ietf();
        for set in sets {
            let r = report(set);
            let tight = r.tightest().unwrap();
            let slots = written(style.prepare_slots(&r, tight));
            // `None` only past the bound on interned values, which another
            // test of this process may have reached first.
            match Prepared::ietf(r.items(), tight) {
                Some(short) => assert_eq!(written(short), slots, "{set:?}"),
                None => {
                    let mut shared = false;
                    policy_value(r.items(), |p| shared = matches!(p, Policy::Shared(_)));
                    assert!(shared, "{set:?}");
                }
            }
            assert_eq!(written(style.prepare(&r)), slots, "{set:?}");
            assert_eq!(slots.len(), 2);
        }
    }

    /// A rejection announces every policy it is given, as an allowed
    /// response of them does, and names the limit that denied; given none
    /// (a caller no longer found), the limit that denied alone.
    #[test]
    fn a_rejection_announces_every_policy_and_names_the_denial() {
        let allowed = report(&[
            ("throttle", 5, 3, 4, 500_000_000),
            ("quota", 1000, 86_400, 2, 3_600 * NANOS_PER_SEC),
            ("tokens-minute", 40_000, 60, 39_000, 1_500_000_000),
        ]);
        let mut want = HeaderMap::new();
        HeaderStyle::ietf().write(&allowed, &mut want);
        let policies = allowed.items();
        let denied = Applied {
            remaining: 0,
            ..policies[1]
        };
        let style = HeaderStyle::ietf().openai(true);
        let mut h = HeaderMap::new();
        style.write_denied(&denied, 7 * NANOS_PER_SEC, policies, &mut h);
        assert_eq!(h["ratelimit-policy"], want["ratelimit-policy"]);
        assert_eq!(h["ratelimit"], "\"quota\";r=0;t=7");
        // The requests family's defining limit is the throttle, not the
        // quota that denied; the tokens family is left out.
        assert_eq!(h["x-ratelimit-limit-requests"], "5");
        assert_eq!(h["x-ratelimit-reset-requests"], "7s");
        assert!(!h.contains_key("x-ratelimit-limit-tokens"));
        let mut h = HeaderMap::new();
        style.write_denied(&denied, 7 * NANOS_PER_SEC, &[], &mut h);
        assert_eq!(h["ratelimit-policy"], "\"quota\";q=1000;w=86400");
        assert_eq!(h["x-ratelimit-limit-requests"], "1000");
    }

    #[test]
    fn a_value_too_long_for_the_buffer_is_left_out() {
        let mut buf = HeaderBuf::new();
        for _ in 0..100 {
            buf.push(b"\"throttle\"");
        }
        assert!(buf.value().is_none());
    }

    #[test]
    fn durations_are_written_as_openai_writes_them() {
        let cases = [
            (0, "0s"),
            (1, "1ms"),
            (20_000_000, "20ms"),
            (999_000_001, "1s"),
            (1_000_000_000, "1s"),
            (1_500_000_000, "1.5s"),
            (1_250_000_000, "1.25s"),
            (1_005_000_000, "1.005s"),
            (60_000_000_000, "1m0s"),
            (360_000_000_000, "6m0s"),
            (3_723_250_000_000, "1h2m3.25s"),
            (3_600_000_000_000, "1h0m0s"),
        ];
        for (nanos, want) in cases {
            let mut buf = HeaderBuf::new();
            write_duration(&mut buf, nanos).unwrap();
            assert_eq!(buf.value().unwrap(), want, "{nanos} ns");
        }
    }

    #[test]
    fn openai_headers_show_the_defining_request_and_token_limits() {
        let r = report(&[
            ("throttle", 5, 3, 4, 500_000_000),
            ("quota", 1000, 86_400, 900, 3_600_000_000_000),
            ("tokens-minute", 40_000, 60, 39_000, 1_500_000_000),
        ]);
        let mut h = HeaderMap::new();
        HeaderStyle::none().openai(true).write(&r, &mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "5");
        assert_eq!(h["x-ratelimit-remaining-requests"], "4");
        assert_eq!(h["x-ratelimit-reset-requests"], "500ms");
        assert_eq!(h["x-ratelimit-limit-tokens"], "40000");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "39000");
        assert_eq!(h["x-ratelimit-reset-tokens"], "1.5s");
        assert!(!h.contains_key("ratelimit"));
        // Without token limits, no token headers.
        let mut h = HeaderMap::new();
        let r = report(&[("throttle", 5, 3, 0, 2_000_000_000)]);
        HeaderStyle::ietf().openai(true).write(&r, &mut h);
        assert_eq!(h["x-ratelimit-reset-requests"], "2s");
        assert!(!h.contains_key("x-ratelimit-limit-tokens"));
        assert!(h.contains_key("ratelimit"));
        assert!(HeaderStyle::ietf().openai(true).has_openai());
    }
}
