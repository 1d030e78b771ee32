//! The key registry at scale: loading a million keys, changing one key among
//! a million, the heap a registered key takes, and a registered key's
//! decision among a million.
//!
//! Run with `cargo bench --bench registry`. `TOLLGATE_REGISTRY_KEYS=100000
//! cargo bench --bench registry` scales the million down.
//!
//! - `load`: `Policy::builder()` with N keys, built (the config path), and
//!   `Admin::import_keys` of N keys into an empty policy (the admin path);
//!   printed once (a million keys are too slow for criterion's samples).
//! - `memory`: heap growth (bytes allocated minus freed, counted by a global
//!   allocator) of importing N keys, minus the bytes of their ids, per key;
//!   printed once.
//! - `admin/add_key`, `admin/set_enabled`, `admin/remove+add`: criterion, with
//!   N keys registered.
//! - `decide/registered`: `RateLimitLayer::check` of one registered key,
//!   with N keys registered (throttle-only plan).

// A global allocator is an `unsafe impl`; the library itself forbids unsafe code.
#![allow(unsafe_code)]
// criterion's macros make undocumented functions.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};

/// Bytes live on the heap (allocated minus freed).
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every method forwards to the system allocator unchanged; counting
// touches only a static atomic, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn keys_wanted() -> usize {
    std::env::var("TOLLGATE_REGISTRY_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn plan() -> UsagePlan {
    UsagePlan::new("bench").throttle(Throttle::new(1e9, 1_000_000).unwrap())
}

/// Key `i`: an id like a real one (`key-0000042`) and a 40-character value.
fn key(i: usize) -> ApiKey {
    ApiKey::new(format!("key-{i:07}"), format!("sk-{i:037x}"), "bench")
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn registry(c: &mut Criterion) {
    let n = keys_wanted();

    // Loading: the config path, then the admin path.
    let keys: Vec<ApiKey> = (0..n).map(key).collect();
    let t = Instant::now();
    let built = keys
        .iter()
        .cloned()
        .fold(Policy::builder().plan(plan()), |b, k| b.key(k))
        .build()
        .unwrap();
    println!("load/builder: {n} keys in {:.2?}", t.elapsed());
    drop(built);

    let layer = RateLimitLayer::new(Policy::builder().plan(plan()).build().unwrap());
    let admin = layer.admin();
    // Counted from before the batch is made: the import frees the batch,
    // so what is left is what the registry keeps.
    let start = LIVE.load(Ordering::Relaxed);
    let keys: Vec<ApiKey> = (0..n).map(key).collect();
    let id_bytes: usize = keys.iter().map(|k| k.id().len()).sum();
    let t = Instant::now();
    let imported = block_on(admin.import_keys(keys));
    let took = t.elapsed();
    assert_eq!(imported.unwrap(), n);
    let kept = LIVE.load(Ordering::Relaxed) - start;
    println!("load/import_keys: {n} keys in {took:.2?}");
    println!(
        "memory: {:.1} bytes per key beyond its id ({n} keys, {id_bytes} bytes of ids)",
        (kept - id_bytes as isize) as f64 / n as f64,
    );

    // One change among n keys.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let next = AtomicU64::new(n as u64);
    c.bench_function(&format!("admin/add_key/{n}"), |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
            rt.block_on(admin.add_key(key(i))).unwrap();
        })
    });
    let flip = AtomicU64::new(0);
    c.bench_function(&format!("admin/set_enabled/{n}"), |b| {
        b.iter(|| {
            let i = flip.fetch_add(1, Ordering::Relaxed);
            let id = format!("key-{:07}", i as usize % n);
            rt.block_on(admin.set_enabled(&id, i % 2 == 1)).unwrap();
        })
    });
    let cycle = AtomicU64::new(0);
    c.bench_function(&format!("admin/remove+add/{n}"), |b| {
        b.iter(|| {
            let i = cycle.fetch_add(1, Ordering::Relaxed) as usize % n;
            let k = key(i);
            rt.block_on(admin.remove_key(k.id())).unwrap();
            rt.block_on(admin.add_key(k)).unwrap();
        })
    });

    // A registered key's decision among n.
    for i in 0..n {
        rt.block_on(admin.set_enabled(&format!("key-{i:07}"), true))
            .unwrap();
    }
    let value = format!("sk-{:037x}", n / 2);
    assert!(layer.check(value.as_bytes(), 1).is_ok());
    c.bench_function(&format!("decide/registered/{n}"), |b| {
        b.iter(|| {
            layer
                .check(std::hint::black_box(value.as_bytes()), 1)
                .is_ok()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = registry
}
criterion_main!(benches);
