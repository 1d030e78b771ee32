//! After warm-up (the key already tracked), deciding allocates nothing.
//!
//! A counting global allocator counts, per thread, every call to `alloc`,
//! `alloc_zeroed` and `realloc`; each test runs on its own thread, so the
//! counts of parallel tests never mix. This counts and does not time.

// A global allocator is an `unsafe impl`; the library itself forbids unsafe code.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::observe::{DecisionEvent, Outcome};
use tollgate::{ApiKey, Period, Policy, Quota, RateLimitLayer, Reason, Throttle, UsagePlan};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to the system allocator unchanged; counting
// touches only a const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made on this thread while `f` runs.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const CHECKS: usize = 10_000;

fn generous() -> Throttle {
    Throttle::new(1.0, u32::MAX).unwrap()
}

fn tight() -> Throttle {
    // One an hour, a bucket of one: after the first check, every check is denied.
    Throttle::new(1.0 / 3600.0, 1).unwrap()
}

fn registered() -> RateLimitLayer {
    RateLimitLayer::new(registered_policy())
}

fn registered_policy() -> Policy {
    (0..1_000)
        .fold(
            Policy::builder()
                .plan(UsagePlan::new("generous").throttle(generous()))
                .plan(UsagePlan::new("tight").throttle(tight()))
                .plan(
                    UsagePlan::new("quota")
                        .throttle(generous())
                        .quota(Quota::new(1 << 40, Period::Month).unwrap()),
                )
                .key(ApiKey::new("tight-1", "tight-key", "tight"))
                .key(ApiKey::new("quota-1", "quota-key", "quota")),
            |b, i| {
                b.key(ApiKey::new(
                    format!("id-{i}"),
                    format!("key-{i:08}"),
                    "generous",
                ))
            },
        )
        .build()
        .unwrap()
}

fn per_key(t: Throttle) -> RateLimitLayer {
    RateLimitLayer::new(Policy::per_key(UsagePlan::new("p").throttle(t)).unwrap())
}

/// Runs `CHECKS` checks of `key` after one warm-up check, returning the allocations.
fn measure(layer: &RateLimitLayer, key: &[u8], expect: Option<Reason>) -> u64 {
    let _ = layer.check(key, 1);
    allocations(|| {
        for _ in 0..CHECKS {
            let got = black_box(layer.check(black_box(key), 1))
                .err()
                .map(|r| r.reason());
            assert_eq!(got, expect);
        }
    })
}

#[test]
fn the_counter_sees_allocations() {
    let n = allocations(|| {
        for _ in 0..CHECKS {
            black_box(Vec::<u8>::with_capacity(1));
        }
    });
    assert_eq!(n, CHECKS as u64);
}

#[test]
fn allowed_checks_allocate_nothing() {
    assert_eq!(measure(&per_key(generous()), b"client-7", None), 0);
    let layer = registered();
    assert_eq!(measure(&layer, b"key-00000042", None), 0);
    assert_eq!(measure(&layer, b"quota-key", None), 0, "with a quota");
}

#[test]
fn denied_checks_allocate_nothing() {
    assert_eq!(
        measure(&per_key(tight()), b"client-7", Some(Reason::Limited)),
        0
    );
    let layer = registered();
    assert_eq!(measure(&layer, b"tight-key", Some(Reason::Limited)), 0);
    assert_eq!(measure(&layer, b"no-such-key", Some(Reason::UnknownKey)), 0);
}

#[test]
fn an_observer_that_does_not_allocate_adds_no_allocation() {
    let allowed = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let (a, r) = (Arc::clone(&allowed), Arc::clone(&rejected));
    let layer = RateLimitLayer::builder(registered_policy())
        .observer(move |e: &DecisionEvent<'_>| {
            // Reads every field, as a real observer would.
            black_box((e.plan(), e.key_id(), e.route(), e.limit()));
            let counter = match e.outcome() {
                Outcome::Allowed => &a,
                _ => &r,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .build();
    assert_eq!(measure(&layer, b"key-00000042", None), 0);
    assert_eq!(measure(&layer, b"quota-key", None), 0, "with a quota");
    assert_eq!(measure(&layer, b"tight-key", Some(Reason::Limited)), 0);
    assert_eq!(measure(&layer, b"no-such-key", Some(Reason::UnknownKey)), 0);
    // Every check was seen, warm-ups included (the tight key's first passes).
    let per_key = CHECKS as u64 + 1;
    assert_eq!(allowed.load(Ordering::Relaxed), 2 * per_key + 1);
    assert_eq!(rejected.load(Ordering::Relaxed), 2 * per_key - 1);
}

/// Allocations per request through the whole layer (the tower service, its
/// response future and the response's headers); the request and the inner
/// service's response (with a `content-type`, as a real service's has, so
/// its header map already holds room for more) are made before counting.
fn through_the_layer(layer: RateLimitLayer, key: &str, expect: u16, keep: bool) -> f64 {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    use tower::{Layer, Service};

    type Res = http::Response<http_body_util::Empty<bytes::Bytes>>;
    let answers: std::cell::RefCell<Vec<Res>> = std::cell::RefCell::new(
        (0..=CHECKS)
            .map(|_| {
                http::Response::builder()
                    .header("content-type", "application/json")
                    .body(http_body_util::Empty::new())
                    .unwrap()
            })
            .collect(),
    );
    let mut svc = layer.layer(tower::service_fn(|_req| {
        let res = answers.borrow_mut().pop().expect("an answer made before");
        std::future::ready(Ok::<_, std::convert::Infallible>(res))
    }));
    let request = || {
        http::Request::builder()
            .header("x-api-key", key)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let mut cx = Context::from_waker(Waker::noop());
    let mut once = |req| {
        let fut = pin!(svc.call(req));
        match fut.poll(&mut cx) {
            Poll::Ready(Ok(res)) => {
                assert_eq!(res.status(), expect);
                res
            }
            other => panic!("not answered at once: {:?}", other.map(|r| r.map(|_| ()))),
        }
    };
    drop(once(request()));
    let requests: Vec<_> = (0..CHECKS).map(|_| request()).collect();
    let mut responses = Vec::with_capacity(CHECKS);
    let n = allocations(|| {
        for req in requests {
            let res = once(req);
            if keep {
                responses.push(res);
            }
        }
    });
    n as f64 / CHECKS as f64
}

#[test]
fn the_layer_allocates_at_most_once_per_allowed_request() {
    // The header values are cut from a per-thread chunk: with every
    // response still held, a new chunk (two allocations) every few dozen
    // responses; with each response dropped before the next (as a server
    // does once it has written the head), the chunk is reused: none.
    let held = through_the_layer(registered(), "key-00000042", 200, true);
    let dropped = through_the_layer(registered(), "key-00000042", 200, false);
    let layer = RateLimitLayer::builder(registered_policy())
        .headers(tollgate::HeaderStyle::none())
        .build();
    let without = through_the_layer(layer, "key-00000042", 200, true);
    eprintln!(
        "allocations per allowed request: {held} with headers and every response held, \
         {dropped} with each dropped, {without} without headers"
    );
    assert!(held <= 0.1, "{held} with the default headers");
    assert_eq!(dropped, 0.0, "with the default headers, responses dropped");
    assert_eq!(without, 0.0, "with no headers");
}
