//! The in-memory decision for a key already tracked, through the public
//! `RateLimitLayer::check(key, 1)`, beside governor's keyed limiter on the same
//! workload.
//!
//! Every workload is a criterion group with two functions, `tollgate` and
//! `governor`, so the two sit side by side in the report:
//!
//! - `per_key_u64/{1,10k,1M}`: `Policy::per_key`, 8-byte keys (`u64::to_le_bytes`
//!   for tollgate, the `u64` itself for governor); tollgate's store has the
//!   default room (1M keys), 2M for the 1M-key workload;
//! - `direct/1`: tollgate's keyed decision on one 8-byte key beside governor's
//!   direct (unkeyed) limiter, `RateLimiter::direct` in its default
//!   configuration: what a key costs tollgate over a limiter that has none;
//! - `per_key_u64/10k_max_keys_32k`: the 10k workload with tollgate's store
//!   sized to the workload (`max_keys(32_768)`), to show the cost of a sparse table;
//! - `per_key_str/{1,10k,1M}`: `Policy::per_key`, short string keys (`key-00000042`);
//! - `per_key_u64_zipf/{10k,1M}` and `per_key_str_zipf/{10k,1M}`: the same
//!   stores and keys, visited in a Zipf-skewed order (s = 1.0: the hottest key
//!   takes about 10% of the decisions among 10k keys, 7% among 1M) instead of
//!   in turn;
//! - `registered_str/{1,10k}`: a policy of 10,000 registered `ApiKey`s (tollgate
//!   looks the key up in the registry first; governor, which has no registry,
//!   limits the same strings per key);
//! - `registered_full/{1,10k}`: the same registered keys on a full plan, a
//!   throttle and a monthly quota of 2^53 requests (which never denies), so
//!   tollgate also counts every decision against the key's quota. governor has
//!   no quotas: beside it is the same keyed limiter as in `registered_str`;
//! - `full_plan/1`: one registered key decided through `check` on two plans
//!   that differ only by a quota: `throttle_alone` (the throttle) and
//!   `full_plan` (the same throttle, a DAY quota of 2^53 requests and a method
//!   override). `check` has no route, so the override is configured and
//!   looked for but matches nothing, as for every caller of `check`. The line
//!   after the group gives `full_plan/throttle_alone`: what a quota adds to a
//!   decision, in units of the decision itself. A third function,
//!   `throttle_and_override`, is the throttle with the method override and no
//!   quota; its line gives what an override that matches nothing adds;
//! - `two_threads/{one_key,distinct_keys}`: two threads deciding at once, on one
//!   shared key or on a key each (8-byte keys); the figure is wall time per
//!   decision over both threads (the time one thread waits for one decision is
//!   twice that);
//! - `two_threads/{one_str_key,distinct_str_keys}`: the same with string keys;
//! - `coarse_u64/{1,10k_max_keys_32k}` and `coarse_str/1`: the per-key
//!   workloads with the store on `Clock::coarse(1 ms)`, which reads the time a
//!   background thread keeps instead of the CPU counter.
//!
//! With `TOLLGATE_COUNT=<workload>` set, the bench times nothing: it makes
//! `TOLLGATE_CALLS` decisions (default 10,000) on one key in `counted`, after
//! as many in `warm`, for callgrind to count (`--collect-atstart=no
//! --toggle-collect='decision::counted*'`). The workloads are `per_key_str`
//! (`Policy::per_key`, the key `key-00000000`) and `registered_str` (the
//! same string, one of 10,000 registered keys), each with a throttle alone,
//! and `full_plan` (that registered key on `full_plan/1`'s plan: the
//! throttle, a DAY quota and a method override, for target 2); the stores
//! read a [`ManualClock`] that never moves, so that no count depends on a ticker thread, unless `TOLLGATE_CLOCK=system`.
//!
//! Keys are generated once and inserted before measuring; the loop cycles
//! through them in order (or through the Zipf sequence). A key tollgate's store
//! refuses at insertion (every slot of its window holds a live key) is left out
//! of the workload for both limiters, with a line on stderr.
//!
//! The Zipf sequence is 1M draws from a fixed-seed generator, made before
//! timing starts; rank `r` is the `r`-th key. Both limiters hash their keys,
//! so a key's rank says nothing of where it is stored.
//!
//! After each group one line on stdout gives `ratio <group>: governor/tollgate
//! = X.XX` (above 1, tollgate is faster), from the mean time per decision of
//! each function. The means are taken from the samples criterion itself
//! measures: every function times its own loop with `iter_custom` and keeps
//! what each call measured; the last `SAMPLES` calls, after the warm-up, are
//! criterion's samples. The mean is computed as criterion's `mean` estimate
//! (the one in `estimates.json`; the middle figure of criterion's `time:` line
//! is the slope of a fit, and differs a little). So the ratio is of the same
//! samples as the report, and needs neither a second timing run nor
//! criterion's files on disk (which may be left from an earlier run, or not
//! written at all under `--profile-time`). The line goes on with the same
//! ratio of each function's fastest sample: on a shared host, where other
//! guests' work lengthens some samples and not others, it moves far less
//! between sittings than the mean. A function skipped by a filter, or run
//! once by `--test`, gives no line.
//!
//! The limit is one unit per second with a bucket of `u32::MAX`: no check in
//! the run is ever denied (this is asserted), and every key stays live (its
//! state is ahead of the clock), so the store never hands a key's slot to
//! another key and each decision finds an existing key. A fast rate (say 1e9/s)
//! would not deny either, but each key would go idle a nanosecond after its
//! decision and keys would evict each other from shared windows.

#[path = "support/registered.rs"]
mod registered;

use std::hash::Hash;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{Bencher, BenchmarkGroup, Criterion};
use governor::clock::DefaultClock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use registered::registered_policy;
use tollgate::{
    Clock, ManualClock, MemoryStore, Period, Policy, RateLimitLayer, Throttle, UsagePlan,
};

/// Requests per second of the limit under test.
const RATE: f64 = 1.0;
/// The bucket: far more than any run decides for one key.
const BURST: u32 = u32::MAX;
/// The largest workload.
const MANY: usize = 1_000_000;
/// The middle workload, and the number of registered keys.
const SOME: usize = 10_000;
/// Measured samples per function.
const SAMPLES: usize = 30;
/// The exponent of the Zipf skew.
const ZIPF_S: f64 = 1.0;
/// The length of a Zipf sequence.
const ZIPF_DRAWS: usize = 1_000_000;
/// The seed of every Zipf sequence, so that every run visits the same keys.
const ZIPF_SEED: u64 = 0x746f_6c6c_6761_7465;

type Governor<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

fn throttle() -> Throttle {
    Throttle::new(RATE, BURST).expect("a valid throttle")
}

fn plan() -> UsagePlan {
    UsagePlan::new("bench").throttle(throttle())
}

/// The throttle and a monthly quota far above what a run decides.
fn full_plan() -> UsagePlan {
    plan().quota(tollgate::Quota::new(1 << 53, Period::Month).expect("a valid quota"))
}

/// The throttle, a DAY quota far above what a run decides, and a method
/// override (which `check`, having no route, never matches).
fn day_plan() -> UsagePlan {
    plan()
        .quota(tollgate::Quota::new(1 << 53, Period::Day).expect("a valid quota"))
        .method(
            "/v1/completions/POST",
            Throttle::new(RATE, BURST).expect("a valid throttle"),
        )
}

/// The throttle and a method override, no quota.
fn override_plan() -> UsagePlan {
    plan().method(
        "/v1/completions/POST",
        Throttle::new(RATE, BURST).expect("a valid throttle"),
    )
}

fn quota() -> Quota {
    Quota::with_period(Duration::from_secs_f64(1.0 / RATE))
        .expect("a nonzero period")
        .allow_burst(NonZeroU32::new(BURST).expect("a nonzero burst"))
}

fn per_key_layer(max_keys: usize) -> RateLimitLayer {
    per_key_layer_on(max_keys, Clock::system())
}

fn per_key_layer_on(max_keys: usize, clock: Clock) -> RateLimitLayer {
    let store = MemoryStore::builder()
        .max_keys(max_keys)
        .clock(clock)
        .build()
        .expect("a valid store");
    RateLimitLayer::builder(Policy::per_key(plan()).unwrap())
        .store(store)
        .build()
}

fn registered_layer(values: &[String], plan: UsagePlan) -> RateLimitLayer {
    RateLimitLayer::new(registered_policy(values, plan))
}

fn governor<K: Hash + Eq + Clone>() -> Governor<K> {
    RateLimiter::keyed(quota())
}

/// The store's room for a workload of `n` keys: the default (1M) up to 500k
/// keys, twice `n` above.
fn max_keys_for(n: usize) -> usize {
    if n > 500_000 { 2 * n } else { 1_000_000 }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(SAMPLES)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
}

/// What one function's routine measured, call by call: `(iterations, time)`.
/// criterion calls the routine during its warm-up, then once per sample, so
/// the last `SAMPLES` calls are the samples of its report.
#[derive(Default)]
struct Samples(Vec<(u64, Duration)>);

impl Samples {
    fn record(&mut self, iters: u64, took: Duration) -> Duration {
        self.0.push((iters, took));
        took
    }

    /// The mean time per iteration over the measured samples, computed as
    /// criterion's `mean` estimate is: the mean of each sample's time per
    /// iteration. `None` when criterion did not take its samples (the
    /// function was filtered out, or run once by `--test`).
    fn mean(&self) -> Option<f64> {
        let measured = self.0.get(self.0.len().checked_sub(SAMPLES)?..)?;
        let sum: f64 = measured
            .iter()
            .map(|&(iters, took)| took.as_secs_f64() / iters as f64)
            .sum();
        Some(sum / measured.len() as f64)
    }

    /// The fastest measured sample's time per iteration: each sample is
    /// many iterations, so the fastest is the one no other work on the
    /// machine disturbed, and moves far less between sittings than the
    /// mean on a shared host.
    fn fastest(&self) -> Option<f64> {
        let measured = self.0.get(self.0.len().checked_sub(SAMPLES)?..)?;
        measured
            .iter()
            .map(|&(iters, took)| took.as_secs_f64() / iters as f64)
            .min_by(f64::total_cmp)
    }
}

/// Prints governor's mean time over tollgate's for `group`, when both ran,
/// then the same of their fastest samples.
fn print_ratio(group: &str, tollgate: &Samples, governor: &Samples) {
    print_pair(
        &format!("ratio {group}: governor/tollgate"),
        ("tollgate", tollgate),
        ("governor", governor),
    );
}

/// Prints `head = b/a (...)` of the two functions' mean times, then of their
/// fastest samples, when both ran.
fn print_pair(head: &str, (a_name, a): (&str, &Samples), (b_name, b): (&str, &Samples)) {
    let (Some(am), Some(bm), Some(af), Some(bf)) = (a.mean(), b.mean(), a.fastest(), b.fastest())
    else {
        return;
    };
    println!(
        "{head} = {:.2} ({a_name} {:.1} ns, {b_name} {:.1} ns); fastest samples {:.2} ({a_name} {:.1} ns, {b_name} {:.1} ns)",
        bm / am,
        am * 1e9,
        bm * 1e9,
        bf / af,
        af * 1e9,
        bf * 1e9,
    );
}

/// Cycles `decide` through `keys`, counting denials into `denied`. The loop is
/// criterion's own `iter` loop, timed here so that `samples` gets the figures.
fn cycle<T>(
    b: &mut Bencher<'_>,
    keys: &[T],
    denied: &mut u64,
    samples: &mut Samples,
    mut decide: impl FnMut(&T) -> bool,
) {
    let mut i = 0;
    b.iter_custom(|iters| {
        let start = Instant::now();
        for _ in 0..iters {
            let key = &keys[i];
            i += 1;
            if i == keys.len() {
                i = 0;
            }
            if !decide(black_box(key)) {
                *denied += 1;
            }
        }
        samples.record(iters, start.elapsed())
    });
}

/// Inserts `keys` (the first decision for each) and returns those the store
/// took: a store refuses a new key when every slot of its window holds a live
/// key. Refused keys are left out of the workload, for both limiters, and
/// reported on stderr.
fn tracked<T: Clone>(name: &str, keys: &[T], insert: impl Fn(&T) -> bool) -> Vec<T> {
    let taken: Vec<T> = keys.iter().filter(|k| insert(k)).cloned().collect();
    if taken.len() < keys.len() {
        eprintln!(
            "{name}: the store refused {} of {} keys at insertion; they are left out",
            keys.len() - taken.len(),
            keys.len()
        );
    }
    taken
}

/// Times tollgate's and governor's decision on the same keys in one criterion
/// group, checks that every decision passed, and prints the ratio.
fn side_by_side<T>(
    c: &mut Criterion,
    name: String,
    keys: &[T],
    tollgate: impl Fn(&T) -> bool,
    governor: impl Fn(&T) -> bool,
) {
    let mut group = c.benchmark_group(&name);
    configure(&mut group);
    let mut denied = 0;
    let (mut ours, mut theirs) = (Samples::default(), Samples::default());
    group.bench_function("tollgate", |b| {
        cycle(b, keys, &mut denied, &mut ours, &tollgate)
    });
    group.bench_function("governor", |b| {
        cycle(b, keys, &mut denied, &mut theirs, &governor)
    });
    group.finish();
    assert_eq!(
        denied, 0,
        "a check was denied: the workload is not all-pass"
    );
    print_ratio(&name, &ours, &theirs);
}

/// SplitMix64: a small, fast generator, good enough to draw a bench's keys.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform draw in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `ZIPF_DRAWS` ranks in `0..n`, rank `r` drawn with a weight of
/// `1 / (r + 1)^ZIPF_S`, by inverting the cumulative weights. Written here
/// rather than taken from a crate so the sequence is fixed by this file alone.
fn zipf_ranks(n: usize) -> Vec<usize> {
    let mut total = 0.0;
    let cumulative: Vec<f64> = (1..=n)
        .map(|k| {
            total += (k as f64).powf(-ZIPF_S);
            total
        })
        .collect();
    let mut rng = SplitMix64(ZIPF_SEED);
    (0..ZIPF_DRAWS)
        .map(|_| {
            let u = rng.unit() * total;
            cumulative.partition_point(|&c| c <= u).min(n - 1)
        })
        .collect()
}

/// `keys` in the order of a Zipf sequence over them.
fn zipf<T>(keys: &[T]) -> Vec<&T> {
    zipf_ranks(keys.len())
        .into_iter()
        .map(|r| &keys[r])
        .collect()
}

fn per_key_u64(c: &mut Criterion, all: &[u64]) {
    // (name, keys, tollgate's max_keys, also run Zipf-skewed)
    for (name, n, max_keys, skewed) in [
        ("1", 1, max_keys_for(1), false),
        ("10k", SOME, max_keys_for(SOME), true),
        ("10k_max_keys_32k", SOME, 32_768, false),
        ("1M", MANY, max_keys_for(MANY), true),
    ] {
        let layer = per_key_layer(max_keys);
        let gov = governor::<u64>();
        let keys = tracked(name, &all[..n], |k| {
            layer.check(&k.to_le_bytes(), 1).is_ok()
        });
        for k in &keys {
            assert!(gov.check_key(k).is_ok());
        }
        side_by_side(
            c,
            format!("per_key_u64/{name}"),
            &keys,
            |k| layer.check(&k.to_le_bytes(), 1).is_ok(),
            |k| gov.check_key(k).is_ok(),
        );
        if skewed {
            side_by_side(
                c,
                format!("per_key_u64_zipf/{name}"),
                &zipf(&keys),
                |k| layer.check(&k.to_le_bytes(), 1).is_ok(),
                |k| gov.check_key(k).is_ok(),
            );
        }
    }
}

/// `direct/1`: one key through tollgate's per-key policy, beside governor's
/// direct limiter, which keeps one state and takes no key.
fn direct(c: &mut Criterion, all: &[u64]) {
    let layer = per_key_layer(max_keys_for(1));
    let gov = RateLimiter::direct(quota());
    let keys = tracked("1", &all[..1], |k| layer.check(&k.to_le_bytes(), 1).is_ok());
    assert!(gov.check().is_ok());
    side_by_side(
        c,
        "direct/1".to_owned(),
        &keys,
        |k| layer.check(&k.to_le_bytes(), 1).is_ok(),
        |_| gov.check().is_ok(),
    );
}

fn per_key_str(c: &mut Criterion, all: &[String]) {
    for (name, n, skewed) in [("1", 1, false), ("10k", SOME, true), ("1M", MANY, true)] {
        let layer = per_key_layer(max_keys_for(n));
        let gov = governor::<String>();
        let keys = tracked(name, &all[..n], |k| layer.check(k.as_bytes(), 1).is_ok());
        for k in &keys {
            assert!(gov.check_key(k).is_ok());
        }
        side_by_side(
            c,
            format!("per_key_str/{name}"),
            &keys,
            |k| layer.check(k.as_bytes(), 1).is_ok(),
            |k| gov.check_key(k).is_ok(),
        );
        if skewed {
            side_by_side(
                c,
                format!("per_key_str_zipf/{name}"),
                &zipf(&keys),
                |k| layer.check(k.as_bytes(), 1).is_ok(),
                |k| gov.check_key(*k).is_ok(),
            );
        }
    }
}

/// `registered_str` (`plan()`) or `registered_full` (`full_plan()`).
fn registered(c: &mut Criterion, prefix: &str, plan: UsagePlan, all: &[String]) {
    let registered = &all[..SOME];
    let layer = registered_layer(registered, plan);
    for (name, n) in [("1", 1), ("10k", SOME)] {
        let keys = &registered[..n];
        let gov = governor::<String>();
        for k in keys {
            assert!(layer.check(k.as_bytes(), 1).is_ok());
            assert!(gov.check_key(k).is_ok());
        }
        side_by_side(
            c,
            format!("{prefix}/{name}"),
            keys,
            |k| layer.check(k.as_bytes(), 1).is_ok(),
            |k| gov.check_key(k).is_ok(),
        );
    }
}

/// `full_plan/1`: one registered key, on a throttle alone and on the full
/// plan, through `check`; prints the full plan's mean time over the
/// throttle's.
fn full_plan_group(c: &mut Criterion, all: &[String]) {
    let keys = &all[..1];
    let alone = registered_layer(keys, plan());
    let full = registered_layer(keys, day_plan());
    let overridden = registered_layer(keys, override_plan());
    for layer in [&alone, &full, &overridden] {
        assert!(layer.check(keys[0].as_bytes(), 1).is_ok());
    }
    let name = "full_plan/1";
    let mut group = c.benchmark_group(name);
    configure(&mut group);
    let mut denied = 0;
    let (mut throttle, mut plan) = (Samples::default(), Samples::default());
    group.bench_function("throttle_alone", |b| {
        cycle(b, keys, &mut denied, &mut throttle, |k| {
            alone.check(k.as_bytes(), 1).is_ok()
        })
    });
    group.bench_function("full_plan", |b| {
        cycle(b, keys, &mut denied, &mut plan, |k| {
            full.check(k.as_bytes(), 1).is_ok()
        })
    });
    let mut overrides = Samples::default();
    group.bench_function("throttle_and_override", |b| {
        cycle(b, keys, &mut denied, &mut overrides, |k| {
            overridden.check(k.as_bytes(), 1).is_ok()
        })
    });
    group.finish();
    assert_eq!(
        denied, 0,
        "a check was denied: the workload is not all-pass"
    );
    print_pair(
        &format!("ratio {name}: full_plan/throttle_alone"),
        ("throttle alone", &throttle),
        ("full plan", &plan),
    );
    print_pair(
        &format!("ratio {name}: throttle_and_override/throttle_alone"),
        ("throttle alone", &throttle),
        ("throttle and override", &overrides),
    );
}

/// Runs `decide(key)` `iters` times on each of two threads at once (thread `t`
/// on `keys[t]`) and returns the wall time per decision times `iters`, so that
/// criterion reports the wall time per decision over both threads.
fn two_threads<K: Sync>(
    iters: u64,
    keys: [&K; 2],
    denied: &AtomicU64,
    decide: impl Fn(&K) -> bool + Sync,
) -> Duration {
    let barrier = Barrier::new(2);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .iter()
            .map(|&key| {
                let (barrier, decide) = (&barrier, &decide);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let mut no = 0;
                    for _ in 0..iters {
                        if !decide(black_box(key)) {
                            no += 1;
                        }
                    }
                    let end = Instant::now();
                    denied.fetch_add(no, Ordering::Relaxed);
                    (start, end)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread panicked"))
            .collect()
    });
    let start = spans.iter().map(|s| s.0).min().expect("two threads");
    let end = spans.iter().map(|s| s.1).max().expect("two threads");
    (end - start) / 2
}

/// `two_threads/{one_key,distinct_keys}` on `all`'s first two keys, under the
/// names `names`; `check` is tollgate's decision for a key.
fn threads<K: Hash + Eq + Clone + Send + Sync>(
    c: &mut Criterion,
    names: [&str; 2],
    all: &[K],
    check: impl Fn(&RateLimitLayer, &K) -> bool + Sync,
) {
    for (name, keys) in names.into_iter().zip([[0, 0], [0, 1]]) {
        let layer = per_key_layer(max_keys_for(2));
        let gov = governor::<K>();
        for k in &all[..2] {
            assert!(check(&layer, k));
            assert!(gov.check_key(k).is_ok());
        }
        let keys = [&all[keys[0]], &all[keys[1]]];
        let name = format!("two_threads/{name}");
        let mut group = c.benchmark_group(&name);
        configure(&mut group);
        let denied = AtomicU64::new(0);
        let (mut ours, mut theirs) = (Samples::default(), Samples::default());
        group.bench_function("tollgate", |b| {
            b.iter_custom(|iters| {
                let took = two_threads(iters, keys, &denied, |k| check(&layer, k));
                ours.record(iters, took)
            })
        });
        group.bench_function("governor", |b| {
            b.iter_custom(|iters| {
                let took = two_threads(iters, keys, &denied, |k| gov.check_key(k).is_ok());
                theirs.record(iters, took)
            })
        });
        group.finish();
        assert_eq!(
            denied.into_inner(),
            0,
            "a check was denied: the workload is not all-pass"
        );
        print_ratio(&name, &ours, &theirs);
    }
}

/// The per-key workloads on a coarse clock.
fn coarse(c: &mut Criterion, ids: &[u64], strings: &[String]) {
    let clock = || Clock::coarse(Duration::from_millis(1));
    for (name, n, max_keys) in [
        ("1", 1, max_keys_for(1)),
        ("10k_max_keys_32k", SOME, 32_768),
    ] {
        let layer = per_key_layer_on(max_keys, clock());
        let gov = governor::<u64>();
        let keys = tracked(name, &ids[..n], |k| {
            layer.check(&k.to_le_bytes(), 1).is_ok()
        });
        for k in &keys {
            assert!(gov.check_key(k).is_ok());
        }
        side_by_side(
            c,
            format!("coarse_u64/{name}"),
            &keys,
            |k| layer.check(&k.to_le_bytes(), 1).is_ok(),
            |k| gov.check_key(k).is_ok(),
        );
    }
    let layer = per_key_layer_on(max_keys_for(1), clock());
    let gov = governor::<String>();
    let keys = tracked("1", &strings[..1], |k| layer.check(k.as_bytes(), 1).is_ok());
    for k in &keys {
        assert!(gov.check_key(k).is_ok());
    }
    side_by_side(
        c,
        "coarse_str/1".to_owned(),
        &keys,
        |k| layer.check(k.as_bytes(), 1).is_ok(),
        |k| gov.check_key(k).is_ok(),
    );
}

fn decision(c: &mut Criterion) {
    // Generated once for every workload: spread 64-bit ids, and short API keys.
    let ids: Vec<u64> = (0..MANY as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let strings: Vec<String> = (0..MANY).map(|i| format!("key-{i:08}")).collect();
    per_key_u64(c, &ids);
    direct(c, &ids);
    per_key_str(c, &strings);
    registered(c, "registered_str", plan(), &strings);
    registered(c, "registered_full", full_plan(), &strings);
    full_plan_group(c, &strings);
    threads(c, ["one_key", "distinct_keys"], &ids, |layer, k| {
        layer.check(&k.to_le_bytes(), 1).is_ok()
    });
    threads(
        c,
        ["one_str_key", "distinct_str_keys"],
        &strings,
        |layer, k| layer.check(k.as_bytes(), 1).is_ok(),
    );
    coarse(c, &ids, &strings);
}

/// Makes `calls` decisions on `key`, none of them counted: the store's
/// state and the caches are warm when `counted` begins.
#[inline(never)]
fn warm(layer: &RateLimitLayer, key: &[u8], calls: usize) -> usize {
    counted_loop(layer, key, calls)
}

/// Makes `calls` decisions on `key`: the function callgrind counts.
#[inline(never)]
fn counted(layer: &RateLimitLayer, key: &[u8], calls: usize) -> usize {
    counted_loop(layer, key, calls)
}

/// The decisions `calls` of `check` on `key` allowed.
#[inline(always)]
fn counted_loop(layer: &RateLimitLayer, key: &[u8], calls: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..calls {
        allowed += usize::from(layer.check(black_box(key), 1).is_ok());
    }
    allowed
}

/// `TOLLGATE_COUNT=<workload>`: decisions on one key for callgrind to
/// count, no timing (see the module's documentation).
fn count(workload: &str) {
    let calls: usize = std::env::var("TOLLGATE_CALLS")
        .map(|n| n.parse().expect("TOLLGATE_CALLS: a number of calls"))
        .unwrap_or(10_000);
    let clock = match std::env::var("TOLLGATE_CLOCK").as_deref() {
        Ok("system") => Clock::system(),
        Ok("manual") | Err(_) => Clock::from(ManualClock::new()),
        Ok(other) => panic!("TOLLGATE_CLOCK: `manual` or `system`, not {other:?}"),
    };
    let store = MemoryStore::builder()
        .clock(clock)
        .build()
        .expect("a valid store");
    let strings: Vec<String> = (0..SOME).map(|i| format!("key-{i:08}")).collect();
    let policy = match workload {
        "per_key_str" => Policy::per_key(plan()).expect("a valid policy"),
        "registered_str" => registered_policy(&strings, plan()),
        "full_plan" => registered_policy(&strings, day_plan()),
        other => {
            panic!("TOLLGATE_COUNT: `per_key_str`, `registered_str` or `full_plan`, not {other:?}")
        }
    };
    let layer = RateLimitLayer::builder(policy).store(store).build();
    let key = strings[0].as_bytes();
    let allowed = warm(&layer, key, calls) + counted(&layer, key, calls);
    assert_eq!(allowed, 2 * calls, "a check was denied");
    println!("{workload}: {calls} decisions counted");
}

fn main() {
    if let Ok(workload) = std::env::var("TOLLGATE_COUNT") {
        return count(&workload);
    }
    let mut c = Criterion::default().configure_from_args();
    decision(&mut c);
    c.final_summary();
}
