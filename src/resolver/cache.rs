//! The resolver's configuration, and the caches in front of it: bounded,
//! keyed by a keyed hash of the value, with one lookup for concurrent misses.
//! Found keys and values that are no key are held apart, so that guesses
//! never make way for keys in use.

use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{UnitWeighter, Weighter};

use super::{KeyResolver, Resolution, ResolveError, ResolvedKey};
use crate::clock::Clock;
use crate::gcra::Nanos;
use crate::hash::{self, BuildDigestHasher, Digest};
use crate::keys::Key;

/// Default time a found key is cached.
const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// Default time a value that is no key is cached.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Default number of cached answers.
const CAPACITY: usize = 100_000;
/// Default bound of a lookup.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Default most lookups in flight.
const MAX_IN_FLIGHT: usize = 32;

/// How a request is answered when its key could not be resolved (the
/// resolver failed or timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ResolverFallback {
    /// `503 {"message":"Service Unavailable"}` (gRPC: `UNAVAILABLE`), with
    /// [`Reason::ResolverUnavailable`](crate::Reason::ResolverUnavailable).
    #[default]
    Unavailable,
    /// As an unknown key: `403 {"message":"Forbidden"}`, with
    /// [`Reason::UnknownKey`](crate::Reason::UnknownKey).
    UnknownKey,
}

/// A [`KeyResolver`] and how its answers are cached, for
/// [`RateLimitLayerBuilder::resolver`](crate::RateLimitLayerBuilder::resolver).
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Resolution, Resolver, ResolverFallback};
///
/// let resolver = Resolver::new(|_value: String| async { Ok(Resolution::Unknown) })
///     .positive_ttl(Duration::from_secs(300))
///     .negative_ttl(Duration::from_secs(30))
///     .capacity(10_000)
///     .timeout(Duration::from_millis(250))
///     .fallback(ResolverFallback::UnknownKey);
/// # let _ = resolver;
/// ```
///
/// Lookups are bounded with tokio's timer: the layer must serve on a tokio
/// runtime with time enabled (axum's and tonic's are).
#[must_use]
pub struct Resolver {
    resolver: Arc<dyn KeyResolver>,
    positive_ttl: Duration,
    negative_ttl: Duration,
    capacity: usize,
    timeout: Duration,
    max_in_flight: usize,
    fallback: ResolverFallback,
    clock: Option<Clock>,
}

impl Resolver {
    /// Asks `resolver` for key values the policy does not hold, caching found
    /// keys for 60 s and values that are no key for 10 s, at most 100 000
    /// of each, each lookup bounded by 1 s, at most 32 lookups in flight, a
    /// failure answered 503.
    pub fn new(resolver: impl KeyResolver) -> Self {
        Resolver {
            resolver: Arc::new(resolver),
            positive_ttl: POSITIVE_TTL,
            negative_ttl: NEGATIVE_TTL,
            capacity: CAPACITY,
            timeout: TIMEOUT,
            max_in_flight: MAX_IN_FLIGHT,
            fallback: ResolverFallback::default(),
            clock: None,
        }
    }

    /// How long a found key is cached (default 60 s). A key disabled or
    /// moved at its source is seen within this time.
    pub fn positive_ttl(mut self, ttl: Duration) -> Self {
        self.positive_ttl = ttl;
        self
    }

    /// How long a value that is no key is cached (default 10 s). A key
    /// created at its source is seen within this time.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// How many answers the cache holds at most: up to `capacity` found
    /// keys, and apart from them up to `capacity` values that are no key
    /// (default 100 000 each; at least 1). When either is full, its answers
    /// used least lately make way; values that are no key, however many
    /// are sent and however often, do not push out the keys in use.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// How long a request waits for a lookup, its own or another request's
    /// for the same value (default 1 s). Past it the lookup is a failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The most lookups the resolver has in flight at once (default 32;
    /// at least 1). A request whose value needs one more lookup makes none:
    /// it is answered at once as a failed lookup is (503, or as
    /// [`fallback`](Self::fallback) says), never queued behind lookups that
    /// may answer after the timeout. A flood of values nobody registered,
    /// each a lookup of its own, so holds at most this many lookups (and
    /// connections of a database pool), however slow the source is; keys
    /// whose answers are cached are decided as ever, and requests that wait
    /// for a lookup of their own value already in flight make none. A
    /// lookup counts until it answers, fails, panics or times out. Set it
    /// to what the source serves at once, below the size of a database
    /// pool that the rest of the application uses too.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// How a request is answered when its key could not be resolved
    /// (default [`ResolverFallback::Unavailable`], 503).
    pub fn fallback(mut self, fallback: ResolverFallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// The clock that times the cache's entries (default: the system
    /// clock). Give it a [`ManualClock`](crate::ManualClock) in tests.
    pub fn clock(mut self, clock: impl Into<Clock>) -> Self {
        self.clock = Some(clock.into());
        self
    }

    /// Makes the cache.
    pub(crate) fn build(self) -> Resolving {
        Resolving {
            resolver: self.resolver,
            cache: bounded(self.capacity, FoundWeighter),
            unknown: bounded(self.capacity, UnitWeighter),
            positive_ttl: nanos(self.positive_ttl),
            negative_ttl: nanos(self.negative_ttl),
            timeout: self.timeout,
            in_flight: InFlight::new(self.max_in_flight),
            fallback: self.fallback,
            clock: self.clock.unwrap_or_default(),
        }
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("positive_ttl", &self.positive_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("capacity", &self.capacity)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An answer, as the layer uses it.
#[derive(Clone)]
pub(crate) enum Answer {
    Found(Arc<Found>),
    Unknown,
    Failed(ResolveError),
}

/// A found key, with what deciding for it needs at hand.
pub(crate) struct Found {
    pub(crate) key: ResolvedKey,
    pub(crate) id: Arc<str>,
    /// Where the key's state lives: the digest of its id, as for a
    /// registered key.
    pub(crate) state: Digest,
    /// Where the registered key with this id is, if one has it, as last
    /// found (the registry finds ids under its lock, which a request must
    /// not take each time): found again only once the registry has changed.
    /// See the engine's `registered_place`.
    pub(crate) registered: ArcSwap<Registered>,
}

/// Where a found key's id is registered, as the registry was at one
/// [`generation`](crate::keys::Registry::generation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Registered {
    /// The registry's generation then; `None` before it was first asked.
    pub(crate) generation: Option<u64>,
    /// The place of the registered key with the id, if one had it.
    pub(crate) place: Option<Key>,
}

impl Answer {
    fn of(result: Result<Resolution, ResolveError>) -> Self {
        match result {
            Ok(Resolution::Found(key)) => Answer::Found(Arc::new(Found {
                id: key.id().into(),
                state: hash::id_digest(key.id().as_bytes()),
                registered: ArcSwap::from_pointee(Registered {
                    generation: None,
                    place: None,
                }),
                key,
            })),
            Ok(Resolution::Unknown) => Answer::Unknown,
            Err(e) => Answer::Failed(e),
        }
    }
}

#[derive(Clone)]
struct Entry {
    /// On the cache's clock.
    expires: Nanos,
    answer: Answer,
}

/// Weighs the found keys' cache: a found key 1, any other answer 0. Another
/// answer is there only for the requests that wait for its lookup, and is
/// taken out by the lookup right after it is put there (with no wait in
/// between); weighing nothing, it makes no found key make way for it, and
/// a flood of guesses or failures pushes out none of the keys in use.
#[derive(Clone, Copy)]
struct FoundWeighter;

impl Weighter<Digest, Entry> for FoundWeighter {
    #[inline]
    fn weight(&self, _: &Digest, entry: &Entry) -> u64 {
        matches!(entry.answer, Answer::Found(_)).into()
    }
}

type AnswerCache = Cache<Digest, Entry, FoundWeighter, BuildDigestHasher>;

/// A cache of at most `capacity` entries of weight 1, keyed by digests.
fn bounded<V: Clone, W: Weighter<Digest, V> + Clone>(
    capacity: usize,
    weighter: W,
) -> Cache<Digest, V, W, BuildDigestHasher> {
    Cache::with(
        capacity,
        capacity as u64,
        weighter,
        BuildDigestHasher::default(),
        DefaultLifecycle::default(),
    )
}

/// Values that are no key, each with when its answer expires.
type UnknownCache = Cache<Digest, Nanos, UnitWeighter, BuildDigestHasher>;

/// A lookup the layer waits for.
pub(crate) type Lookup = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// The resolver and its cache, shared by every clone of a layer.
pub(crate) struct Resolving {
    resolver: Arc<dyn KeyResolver>,
    /// Found keys; and, while their lookup runs and for the requests that
    /// wait for it, every answer.
    cache: AnswerCache,
    /// Values that are no key, apart: a flood of guesses churns this cache
    /// only.
    unknown: UnknownCache,
    positive_ttl: Nanos,
    negative_ttl: Nanos,
    timeout: Duration,
    /// The lookups in flight, and their bound.
    in_flight: InFlight,
    pub(crate) fallback: ResolverFallback,
    clock: Clock,
}

/// Counts the lookups in flight against their bound.
struct InFlight {
    now: AtomicUsize,
    max: usize,
    /// Whether a lookup was refused since one last had room: the bound's
    /// being reached is logged once when it starts and once when it ends.
    full: AtomicBool,
}

impl InFlight {
    fn new(max: usize) -> Self {
        InFlight {
            now: AtomicUsize::new(0),
            max,
            full: AtomicBool::new(false),
        }
    }

    /// A place for one more lookup, given back when it is dropped; `None`
    /// when all are taken.
    fn take(&self) -> Option<Place<'_>> {
        let taken = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            if !self.full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_in_flight = self.max,
                    "key resolver has its most lookups in flight: values to look up are refused"
                );
            }
            return None;
        }
        if self.full.load(Ordering::Relaxed) && self.full.swap(false, Ordering::Relaxed) {
            tracing::info!("key resolver has room for lookups again");
        }
        Some(Place(&self.now))
    }
}

/// A lookup's place among those in flight.
struct Place<'a>(&'a AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Resolving {
    /// The cached answer for the value of `digest`, if there is a fresh one.
    /// A failure is never cached.
    #[inline]
    pub(crate) fn cached(&self, digest: Digest) -> Option<Answer> {
        let now = self.clock.nanos();
        if let Some(entry) = self.cache.get(&digest) {
            let fresh = now < entry.expires && !matches!(entry.answer, Answer::Failed(_));
            return fresh.then_some(entry.answer);
        }
        let expires = self.unknown.get(&digest)?;
        (now < expires).then_some(Answer::Unknown)
    }

    /// Looks `value` (whose digest is `digest`) up: in the cache, else
    /// through the resolver, once for all requests that wait for it.
    pub(crate) fn lookup(self: &Arc<Self>, digest: Digest, value: &str) -> Lookup {
        let this = Arc::clone(self);
        let value = value.to_owned();
        Box::pin(async move { this.load(digest, &value).await })
    }

    async fn load(&self, digest: Digest, value: &str) -> Answer {
        // A timeout too long to add to now (`Duration::MAX`) means no
        // deadline: thirty years stand for it, as in tokio's own `timeout`.
        let start = tokio::time::Instant::now();
        let deadline = start
            .checked_add(self.timeout)
            .unwrap_or_else(|| start + Duration::from_secs(30 * 365 * 86_400));
        // A stale entry makes way for a new lookup; a fresh one that another
        // request put there meanwhile stays.
        let now = self.clock.nanos();
        self.cache.remove_if(&digest, |e| e.expires <= now);
        if self
            .unknown
            .get(&digest)
            .is_some_and(|expires| now < expires)
        {
            return Answer::Unknown;
        }
        // Either another request is looking the value up (wait for its
        // answer, even a failure: one lookup for all), or this one does.
        let guard =
            match tokio::time::timeout_at(deadline, self.cache.get_value_or_guard_async(&digest))
                .await
            {
                Err(_) => return Answer::Failed(ResolveError::timeout()),
                Ok(Ok(entry)) => return entry.answer,
                Ok(Err(guard)) => guard,
            };
        // Past the bound, failed at once (the waiters with it): never
        // queued behind lookups that may answer after the timeout. The place
        // is held until the lookup has ended, or its future is dropped.
        let answer = match self.in_flight.take() {
            None => Answer::Failed(ResolveError::busy()),
            Some(_place) => match tokio::time::timeout_at(deadline, self.ask(value)).await {
                Ok(result) => Answer::of(result),
                Err(_) => Answer::Failed(ResolveError::timeout()),
            },
        };
        let ttl = match &answer {
            Answer::Found(_) => self.positive_ttl,
            Answer::Unknown => self.negative_ttl,
            Answer::Failed(_) => 0,
        };
        let expires = self.clock.nanos().saturating_add(ttl);
        let entry = Entry {
            expires,
            answer: answer.clone(),
        };
        // The requests waiting now get the answer from the guard.
        let _ = guard.insert(entry);
        match &answer {
            Answer::Found(_) => {}
            // Kept with the other values that are no key (before it leaves
            // the found keys' cache, so that it is always in one of them).
            Answer::Unknown => {
                self.unknown.insert(digest, expires);
                self.cache
                    .remove_if(&digest, |e| matches!(e.answer, Answer::Unknown));
            }
            // A failure is theirs only: the next request asks again.
            Answer::Failed(e) => {
                self.cache
                    .remove_if(&digest, |e| matches!(e.answer, Answer::Failed(_)));
                tracing::debug!(error = %e, "key lookup failed");
            }
        }
        answer
    }

    /// The resolver's answer for `value`. A resolver that panics (making
    /// its future or polling it) has failed: the request is answered as for
    /// any failure (503, or the fallback), and the requests waiting for the
    /// same lookup get that answer too, instead of the connection being cut
    /// with no response. The panic's message is not kept: it may hold the
    /// value.
    async fn ask(&self, value: &str) -> Result<Resolution, ResolveError> {
        let panicked = || ResolveError::new("the resolver panicked");
        let Ok(mut resolving) = catch_unwind(AssertUnwindSafe(|| self.resolver.resolve(value)))
        else {
            return Err(panicked());
        };
        poll_fn(
            |cx| match catch_unwind(AssertUnwindSafe(|| resolving.as_mut().poll(cx))) {
                Ok(poll) => poll,
                // Never polled again: the lookup has ended.
                Err(_) => Poll::Ready(Err(panicked())),
            },
        )
        .await
    }

    /// Drops the cached answer `found` for the value of `digest` (not an
    /// answer another request put there since): the value is looked up
    /// again.
    pub(crate) fn forget(&self, digest: Digest, found: &Arc<Found>) {
        self.cache.remove_if(
            &digest,
            |e| matches!(&e.answer, Answer::Found(f) if Arc::ptr_eq(f, found)),
        );
    }

    /// Every key found on `plan` that the cache holds, fresh or stale: a
    /// stale answer's key may still have state in the store (a bucket not
    /// yet refilled) and be found again. Each shard of the cache is locked
    /// only while one entry is read, so lookups go on meanwhile.
    pub(crate) fn found_on(&self, plan: &str) -> Vec<Arc<Found>> {
        self.cache
            .iter()
            .filter_map(|(_, entry)| match entry.answer {
                Answer::Found(found) if found.key.plan() == plan => Some(found),
                _ => None,
            })
            .collect()
    }

    /// How many answers the caches hold.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.cache.len() + self.unknown.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::clock::ManualClock;

    /// A resolver that counts its calls, sleeps `delay`, and knows `good`.
    fn counting(delay: Duration) -> (Arc<AtomicUsize>, impl KeyResolver) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let resolver = move |value: String| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                Ok(match value.as_str() {
                    "good" => Resolution::Found(ResolvedKey::new("key-1", "free").account("acme")),
                    "off" => Resolution::Found(ResolvedKey::new("key-2", "free").enabled(false)),
                    _ => Resolution::Unknown,
                })
            }
        };
        (calls, resolver)
    }

    fn digest(v: &str) -> Digest {
        hash::digest(v.as_bytes())
    }

    async fn look(r: &Arc<Resolving>, v: &str) -> Answer {
        r.lookup(digest(v), v).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_make_one_lookup() {
        let (calls, resolver) = counting(Duration::from_millis(50));
        let r = Arc::new(Resolver::new(resolver).build());
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let r = Arc::clone(&r);
                tokio::spawn(async move { look(&r, "good").await })
            })
            .collect();
        for t in tasks {
            let Answer::Found(found) = t.await.unwrap() else {
                panic!("not found");
            };
            assert_eq!(&*found.id, "key-1");
            assert_eq!(found.state, hash::id_digest(b"key-1"));
            assert_eq!(found.key.get_account(), Some("acme"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Then from the cache, without waiting.
        assert!(matches!(r.cached(digest("good")), Some(Answer::Found(_))));
        assert!(r.cached(digest("other")).is_none());
    }

    #[tokio::test]
    async fn found_keys_and_unknown_values_expire_after_their_ttls() {
        let clock = ManualClock::new();
        let (calls, resolver) = counting(Duration::ZERO);
        let r = Arc::new(
            Resolver::new(resolver)
                .positive_ttl(Duration::from_secs(60))
                .negative_ttl(Duration::from_secs(10))
                .clock(clock.clone())
                .build(),
        );
        assert!(matches!(look(&r, "good").await, Answer::Found(_)));
        assert!(matches!(look(&r, "nope").await, Answer::Unknown));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        clock.advance(Duration::from_millis(9_999));
        assert!(matches!(r.cached(digest("nope")), Some(Answer::Unknown)));
        clock.advance(Duration::from_millis(1));
        assert!(r.cached(digest("nope")).is_none());
        assert!(r.cached(digest("good")).is_some());
        assert!(matches!(look(&r, "nope").await, Answer::Unknown));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        clock.advance(Duration::from_secs(50));
        assert!(r.cached(digest("good")).is_none());
        assert!(matches!(look(&r, "good").await, Answer::Found(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(r.cached(digest("good")).is_some());
    }

    #[tokio::test]
    async fn the_longest_timeout_is_no_deadline() {
        let (calls, resolver) = counting(Duration::ZERO);
        let r = Arc::new(Resolver::new(resolver).timeout(Duration::MAX).build());
        assert!(matches!(look(&r, "good").await, Answer::Found(_)));
        assert!(matches!(look(&r, "nope").await, Answer::Unknown));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_capacity() {
        let (calls, resolver) = counting(Duration::ZERO);
        let r = Arc::new(Resolver::new(resolver).capacity(100).build());
        for i in 0..2_000 {
            look(&r, &format!("guess-{i}")).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2_000);
        assert!(r.len() <= 100, "{} cached", r.len());
        assert!(r.len() >= 50, "{} cached", r.len());
    }

    /// A cache full of keys in use: values that are no key, and lookups
    /// that fail, come and go without making any of the keys be asked again.
    #[tokio::test]
    async fn guesses_and_failures_push_no_key_out_of_a_full_cache() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let resolver = move |value: String| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match value.strip_prefix("key-") {
                    Some(id) => Ok(Resolution::Found(ResolvedKey::new(id, "free"))),
                    None if value.starts_with("fail-") => Err(ResolveError::new("down")),
                    None => Ok(Resolution::Unknown),
                }
            }
        };
        let r = Arc::new(Resolver::new(resolver).capacity(64).build());
        for i in 0..64 {
            assert!(matches!(
                look(&r, &format!("key-{i}")).await,
                Answer::Found(_)
            ));
        }
        // The keys the cache holds (its shards may leave a few out): in use.
        let held: Vec<String> = (0..64)
            .map(|i| format!("key-{i}"))
            .filter(|k| r.cached(digest(k)).is_some())
            .collect();
        assert!(held.len() >= 48, "{}", held.len());
        let before = calls.load(Ordering::SeqCst);
        for i in 0..200 {
            assert!(matches!(
                look(&r, &format!("guess-{i}")).await,
                Answer::Unknown
            ));
            assert!(matches!(
                look(&r, &format!("fail-{i}")).await,
                Answer::Failed(_)
            ));
            for k in &held {
                if r.cached(digest(k)).is_none() {
                    assert!(matches!(look(&r, k).await, Answer::Found(_)));
                }
            }
        }
        // One call per guess and per failure, none for the keys.
        assert_eq!(calls.load(Ordering::SeqCst) - before, 400);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_resolver_times_out_within_the_bound() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let hang = move |_: String| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<Resolution, ResolveError>>()
        };
        let r = Arc::new(
            Resolver::new(hang)
                .timeout(Duration::from_millis(100))
                .build(),
        );
        let start = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let r = Arc::clone(&r);
                tokio::spawn(async move { look(&r, "good").await })
            })
            .collect();
        for t in tasks {
            let Answer::Failed(e) = t.await.unwrap() else {
                panic!("answered");
            };
            assert!(e.is_timeout());
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
        // The waiters shared the one lookup's failure; nothing was cached.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(r.cached(digest("good")).is_none());
        assert_eq!(r.len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_past_the_bound_fail_at_once_and_give_their_place_back() {
        let (calls, resolver) = counting(Duration::from_millis(200));
        let r = Arc::new(Resolver::new(resolver).max_in_flight(3).build());
        let start = Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let r = Arc::clone(&r);
                tokio::spawn(
                    async move { (look(&r, &format!("guess-{i}")).await, start.elapsed()) },
                )
            })
            .collect();
        let mut busy = 0;
        for t in tasks {
            match t.await.unwrap() {
                (Answer::Unknown, took) => assert!(took >= Duration::from_millis(200)),
                (Answer::Failed(e), took) => {
                    assert!(e.is_busy(), "{e}");
                    assert!(took < Duration::from_millis(150), "{took:?}");
                    busy += 1;
                }
                (Answer::Found(_), _) => panic!("found"),
            }
        }
        assert_eq!((calls.load(Ordering::SeqCst), busy), (3, 17));
        // Nothing of the refused values was cached; the places are free.
        assert_eq!(r.in_flight.now.load(Ordering::SeqCst), 0);
        // A lookup that times out gives its place back too.
        let hang = |_: String| std::future::pending::<Result<Resolution, ResolveError>>();
        let r = Arc::new(
            Resolver::new(hang)
                .max_in_flight(1)
                .timeout(Duration::from_millis(50))
                .build(),
        );
        for _ in 0..3 {
            let Answer::Failed(e) = look(&r, "good").await else {
                panic!("answered");
            };
            assert!(e.is_timeout());
        }
        assert_eq!(r.in_flight.now.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_failure_is_not_cached() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let failing = move |_: String| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err(ResolveError::new("database is down")) }
        };
        let r = Arc::new(Resolver::new(failing).build());
        for n in 1..=2 {
            let Answer::Failed(e) = look(&r, "good").await else {
                panic!("answered");
            };
            assert_eq!(e.to_string(), "key resolver failed: database is down");
            assert_eq!(calls.load(Ordering::SeqCst), n);
            assert!(r.cached(digest("good")).is_none());
        }
    }

    #[test]
    fn defaults() {
        let r = Resolver::new(|_: String| async { Ok(Resolution::Unknown) });
        assert_eq!(r.positive_ttl, Duration::from_secs(60));
        assert_eq!(r.negative_ttl, Duration::from_secs(10));
        assert_eq!(r.capacity, 100_000);
        assert_eq!(r.timeout, Duration::from_secs(1));
        assert_eq!(r.max_in_flight, 32);
        assert_eq!(r.fallback, ResolverFallback::Unavailable);
        let r = r.capacity(0).max_in_flight(0);
        assert_eq!((r.capacity, r.max_in_flight), (1, 1));
    }
}
