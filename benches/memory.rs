//! Memory: bytes per tracked key, and the process's peak while many distinct
//! clients arrive at the store's key cap, for tollgate's `MemoryStore` beside
//! governor's keyed limiter.
//!
//! Run with `cargo bench --bench memory` (full sizes: 1M keys, then 10M
//! clients against a cap of 1M). `TOLLGATE_MEMORY_KEYS=100000 cargo bench
//! --bench memory` scales every size down (10× as many clients as keys). A
//! word after `--` runs only the cases whose name contains it, e.g.
//! `cargo bench --bench memory -- governor`.
//!
//! Each case runs in a child process of its own (this binary again, with
//! `TOLLGATE_MEMORY_CASE` set), so that the peak resident size (`VmHWM`) a case
//! reports is its own and not an earlier case's.
//!
//! **Bytes per key** (`keys_*` cases). The keys are generated first; then the
//! limiter is built and decides once for each key. A counting global allocator
//! gives the heap growth: bytes allocated minus bytes freed, as requested
//! (`Layout::size`; the system allocator's own headers are not in it, but are
//! in the resident size, also shown). For tollgate the table's
//! `allocated_bytes()` is shown too; the heap figure also holds the layer, the
//! page index and the insertion locks.
//!
//! **At the cap** (`cap_*` cases). tollgate: `max_keys(N)` and `10 N` requests
//! from `10 N` distinct IPv4 clients through the tower service with the real
//! `ClientIp` extractor (the peer address as a `SocketAddr` request extension,
//! as a hyper server would insert it); refusals are counted by
//! `Rejection::reason()` in an `on_rejection` hook that answers with the
//! default response. governor: `check_key(&IpAddr)` on the same addresses (the
//! key `tower_governor`'s peer-IP extractor uses), with no `retain_recent()`.
//!
//! **Registered keys on a quota** (`registered_quota`, tollgate only): `N`
//! registered keys on the throttle below and a DAY quota, with the default
//! 90 days of usage history; the heap the registry takes, then what deciding
//! once for each key adds (its throttle's slot and its quota's counter, whose
//! history is most of it).
//!
//! The throttle is one request an hour with a bucket of 10, for both limiters:
//! a key's state stays live for an hour after its one request, longer than any
//! run, so no key goes idle and gives its slot up during the run. (With one
//! request a second, a key that made one request is idle again a second later,
//! and the cap would not bind.)

// A global allocator is an `unsafe impl`; the library itself forbids unsafe code.
#![allow(unsafe_code)]

#[path = "support/registered.rs"]
mod registered;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{Quota, RateLimiter};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use registered::registered_policy;
use tollgate::extract::ClientIp;
use tollgate::{
    DefaultOnRejection, MemoryStore, OnRejection, Policy, RateLimitLayer, Reason, Rejection,
    Throttle, UsagePlan,
};
use tower::{Layer, Service, ServiceExt};

// ---- counting allocator -------------------------------------------------

/// Bytes live on the heap (allocated minus freed), and the most ever live.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

struct Counting;

fn grow(n: isize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every method forwards to the system allocator unchanged; counting
// touches only static atomics, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size() as isize);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grow(new_size as isize - layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Restarts the heap peak from what is live now.
fn reset_peak() {
    PEAK.store(heap(), Ordering::Relaxed);
}

fn heap_peak() -> isize {
    PEAK.load(Ordering::Relaxed)
}

// ---- process memory -----------------------------------------------------

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: impl Into<f64>) -> String {
    format!("{:.1}", bytes.into() / (1024.0 * 1024.0))
}

// ---- the limits -----------------------------------------------------------

/// One request an hour, a bucket of 10: a key stays live for an hour.
const PERIOD: Duration = Duration::from_secs(3600);
const BURST: u32 = 10;

fn plan() -> UsagePlan {
    let throttle = Throttle::new(1.0 / PERIOD.as_secs_f64(), BURST).expect("a valid throttle");
    UsagePlan::new("bench").throttle(throttle)
}

fn store(max_keys: usize) -> MemoryStore {
    MemoryStore::builder()
        .max_keys(max_keys)
        .build()
        .expect("a valid store")
}

fn quota() -> Quota {
    Quota::with_period(PERIOD)
        .expect("a nonzero period")
        .allow_burst(NonZeroU32::new(BURST).expect("a nonzero burst"))
}

// ---- bytes per key ------------------------------------------------------

fn u64_key(i: usize) -> u64 {
    i as u64
}

fn str_key(i: usize) -> String {
    format!("key-{i:08}")
}

/// One row of the bytes-per-key table.
struct KeysRow {
    name: &'static str,
    keys: usize,
    tracked: usize,
    refused: usize,
    /// Key bytes the limiter holds per key (inline and on the heap).
    key_bytes: usize,
    table: Option<usize>,
    heap: isize,
    rss: i64,
}

impl KeysRow {
    fn print(&self) {
        let per = |b: f64| b / self.tracked as f64;
        let heap_per = per(self.heap as f64);
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {:.1} | {} | {:.1} |",
            self.name,
            self.keys,
            self.tracked,
            self.refused,
            self.table
                .map_or("—".to_string(), |t| format!("{:.1}", per(t as f64))),
            heap_per,
            self.key_bytes,
            heap_per - self.key_bytes as f64,
            mib(self.rss as f64),
            per(self.rss as f64),
        );
    }
}

/// Decides once for each of `n` keys through a store sized for `max_keys`.
fn keys_tollgate<T>(
    name: &'static str,
    n: usize,
    max_keys: usize,
    key: impl Fn(usize) -> T,
    bytes: impl Fn(&T) -> &[u8],
) {
    let keys: Vec<T> = (0..n).map(key).collect();
    let (heap0, rss0) = (heap(), rss().0);
    let store = store(max_keys);
    let layer = RateLimitLayer::builder(Policy::per_key(plan()).expect("a valid policy"))
        .store(store.clone())
        .build();
    let mut refused = 0;
    for k in &keys {
        match layer.check(bytes(k), 1) {
            Ok(()) => {}
            Err(r) if r.reason() == Reason::KeyCapacity => refused += 1,
            Err(r) => panic!("unexpected rejection: {r}"),
        }
    }
    let (heap1, rss1) = (heap(), rss().0);
    let tracked = store.tracked_keys();
    assert_eq!(tracked + refused, n, "every key is tracked or refused");
    KeysRow {
        name,
        keys: n,
        tracked,
        refused,
        key_bytes: 0,
        table: Some(store.allocated_bytes()),
        heap: heap1 - heap0,
        rss: rss1 as i64 - rss0 as i64,
    }
    .print();
}

/// `n` registered keys on a throttle and a DAY quota, with the default 90
/// days of usage history: the heap the registry takes, then what deciding
/// once for each key adds (its throttle's slot and its quota's counter).
fn registered_quota(n: usize) {
    let values: Vec<String> = (0..n).map(str_key).collect();
    let (heap0, rss0) = (heap(), rss().0);
    let plan =
        plan().quota(tollgate::Quota::new(1 << 40, tollgate::Period::Day).expect("a valid quota"));
    let policy = registered_policy(&values, plan);
    // Room for every key's throttle: a full table refuses a few keys.
    let store = store(2 * n);
    let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
    let (heap1, rss1) = (heap(), rss().0);
    for v in &values {
        if let Err(r) = layer.check(v.as_bytes(), 1) {
            panic!("unexpected rejection: {r}");
        }
    }
    let (heap2, rss2) = (heap(), rss().0);
    let per = |b: f64| b / n as f64;
    println!(
        "| {n} | {:.1} | {:.1} | {:.1} | {:.1} |",
        per((heap1 - heap0) as f64),
        per((heap2 - heap1) as f64),
        per(rss1 as f64 - rss0 as f64),
        per(rss2 as f64 - rss1 as f64),
    );
}

fn keys_governor<T: std::hash::Hash + Eq + Clone>(
    name: &'static str,
    n: usize,
    key: impl Fn(usize) -> T,
    key_bytes: usize,
) {
    let keys: Vec<T> = (0..n).map(key).collect();
    let (heap0, rss0) = (heap(), rss().0);
    let limiter = RateLimiter::keyed(quota());
    for k in &keys {
        assert!(limiter.check_key(k).is_ok(), "a first request passes");
    }
    let (heap1, rss1) = (heap(), rss().0);
    assert_eq!(limiter.len(), n);
    KeysRow {
        name,
        keys: n,
        tracked: limiter.len(),
        refused: 0,
        key_bytes,
        table: None,
        heap: heap1 - heap0,
        rss: rss1 as i64 - rss0 as i64,
    }
    .print();
}

// ---- at the cap ---------------------------------------------------------

/// The `i`th client: distinct for every `i` below 2^32 - 2^24.
fn client(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0100_0000u32 + i as u32))
}

fn sample_header() {
    println!(
        "| case | requests | keys held | refused (KeyCapacity) | heap MiB | heap peak MiB | VmRSS MiB | VmHWM MiB | s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
}

fn sample(name: &str, requests: usize, held: usize, refused: u64, start: Instant) {
    let (rss, hwm) = rss();
    println!(
        "| {name} | {requests} | {held} | {refused} | {} | {} | {} | {} | {:.1} |",
        mib(heap() as f64),
        mib(heap_peak() as f64),
        mib(rss as f64),
        mib(hwm as f64),
        start.elapsed().as_secs_f64(),
    );
}

/// Counts rejections by reason and answers with the default response.
#[derive(Default)]
struct Refusals {
    capacity: AtomicU64,
    other: AtomicU64,
}

fn cap_tollgate(cap: usize, requests: usize) {
    let refusals = Arc::new(Refusals::default());
    let counted = Arc::clone(&refusals);
    let store = store(cap);
    let layer = RateLimitLayer::builder(Policy::per_key(plan()).expect("a valid policy"))
        .extractor(ClientIp::new())
        .store(store.clone())
        .on_rejection(move |r: &Rejection| {
            let counter = if r.reason() == Reason::KeyCapacity {
                &counted.capacity
            } else {
                &counted.other
            };
            counter.fetch_add(1, Ordering::Relaxed);
            DefaultOnRejection.response(r)
        })
        .build();
    let mut svc = layer.layer(tower::service_fn(
        |_req: Request<tollgate::RequestBody<String>>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        },
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let start = Instant::now();
    sample("tollgate", 0, 0, 0, start);
    let mut ok = 0;
    rt.block_on(async {
        for i in 0..requests {
            let mut req = Request::new(String::new());
            req.extensions_mut()
                .insert(SocketAddr::new(client(i), 40_000));
            let res = svc
                .ready()
                .await
                .expect("ready")
                .call(req)
                .await
                .expect("infallible");
            match res.status() {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                s => panic!("unexpected status {s}"),
            }
            if (i + 1) % cap == 0 {
                let refused = refusals.capacity.load(Ordering::Relaxed);
                sample("tollgate", i + 1, store.tracked_keys(), refused, start);
            }
        }
    });
    let capacity = refusals.capacity.load(Ordering::Relaxed);
    assert_eq!(
        refusals.other.load(Ordering::Relaxed),
        0,
        "only KeyCapacity refusals"
    );
    assert_eq!(ok + capacity as usize, requests);
    eprintln!(
        "tollgate: {ok} allowed, {capacity} refused (KeyCapacity), table {} MiB of {} slots",
        mib(store.allocated_bytes() as f64),
        store.capacity()
    );
}

fn cap_governor(cap: usize, requests: usize) {
    let limiter = RateLimiter::keyed(quota());
    let start = Instant::now();
    sample("governor", 0, 0, 0, start);
    for i in 0..requests {
        assert!(
            limiter.check_key(&client(i)).is_ok(),
            "a first request passes"
        );
        if (i + 1) % cap == 0 {
            sample("governor", i + 1, limiter.len(), 0, start);
        }
    }
}

// ---- driver ---------------------------------------------------------------

const CASES: [&str; 8] = [
    "keys_tollgate_u64",
    "keys_tollgate_str",
    "keys_tollgate_sparse",
    "keys_governor_u64",
    "keys_governor_str",
    "cap_tollgate",
    "cap_governor",
    "registered_quota",
];

fn run(case: &str, keys: usize) {
    reset_peak();
    match case {
        "keys_tollgate_u64" => keys_tollgate(
            "tollgate, u64 (8 B)",
            keys,
            keys,
            |i| u64_key(i).to_le_bytes(),
            |k| k,
        ),
        "keys_tollgate_str" => keys_tollgate(
            "tollgate, `key-00000042` (12 B)",
            keys,
            keys,
            str_key,
            |k| k.as_bytes(),
        ),
        // A store far from full: keys hash all over the table, so pages are
        // touched long before they fill.
        "keys_tollgate_sparse" => keys_tollgate(
            "tollgate, u64, 1% of max_keys",
            keys / 100,
            keys,
            |i| u64_key(i).to_le_bytes(),
            |k| k,
        ),
        "keys_governor_u64" => keys_governor("governor, `u64`", keys, u64_key, 8),
        // The `String` (24 B) in the map and its 12-byte buffer.
        "keys_governor_str" => keys_governor("governor, `String`", keys, str_key, 24 + 12),
        "cap_tollgate" => cap_tollgate(keys, 10 * keys),
        "cap_governor" => cap_governor(keys, 10 * keys),
        "registered_quota" => registered_quota(keys),
        _ => panic!("unknown case {case}"),
    }
}

fn main() {
    let keys: usize = std::env::var("TOLLGATE_MEMORY_KEYS")
        .ok()
        .map_or(1_000_000, |v| {
            v.parse().expect("TOLLGATE_MEMORY_KEYS is a number")
        });
    if let Ok(case) = std::env::var("TOLLGATE_MEMORY_CASE") {
        run(&case, keys);
        return;
    }
    // `cargo bench` passes `--bench`; any other word selects cases.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let selected =
        |case: &str| filter.is_empty() || filter.iter().any(|f| case.contains(f.as_str()));
    let exe = std::env::current_exe().expect("this binary");
    let child = |case: &str| {
        let status = Command::new(&exe)
            .env("TOLLGATE_MEMORY_CASE", case)
            .env("TOLLGATE_MEMORY_KEYS", keys.to_string())
            .status()
            .expect("runs a case");
        assert!(status.success(), "{case} failed");
    };

    let cases: Vec<&str> = CASES.into_iter().filter(|c| selected(c)).collect();
    if cases.iter().any(|c| c.starts_with("keys_")) {
        println!("\nBytes per tracked key, {keys} keys (per key = bytes / keys held):\n");
        println!(
            "| limiter, key | keys | held | refused | table B/key | heap B/key | key B held | heap B/key beyond the key | RSS growth MiB | RSS B/key |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for case in cases.iter().filter(|c| c.starts_with("keys_")) {
            child(case);
        }
    }
    if cases.iter().any(|c| c.starts_with("cap_")) {
        println!(
            "\n{} distinct IPv4 clients, one request each; tollgate's store has max_keys({keys}):\n",
            10 * keys
        );
        sample_header();
        for case in cases.iter().filter(|c| c.starts_with("cap_")) {
            child(case);
        }
    }
    if cases.contains(&"registered_quota") {
        println!(
            "\n{keys} registered keys on a throttle and a DAY quota (90 days of history), bytes per key:\n"
        );
        println!(
            "| keys | heap: registry | heap: decided once (throttle, quota counter) | RSS: registry | RSS: decided once |"
        );
        println!("|---:|---:|---:|---:|---:|");
        child("registered_quota");
    }
}
