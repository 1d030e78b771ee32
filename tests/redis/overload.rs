//! Overload and disconnects, from the outside: real `redis-server` processes
//! (one server, or a Cluster of three) and gateway processes
//! (`gateway/`, the `tollgate-gateway` binary), driven over raw sockets.
//!
//! - **A disconnect storm**: clients that go away at every moment of a
//!   request (RST or FIN, at once or within 3 ms), and Redis stalled
//!   (SIGSTOP) while requests are in flight, leave no concurrency place
//!   taken in Redis: a place is given back whenever no response will hold it.
//! - **An overload burst** on three instances sharing one Redis: the requests
//!   the limits deny never push the store into a failure mode that admits
//!   them, and Redis counts exactly what was admitted.
//! - **Faults** that `redis_faults.rs` and `redis_store.rs` do not cover: the
//!   script flushed, every client connection killed, Redis out of memory,
//!   redis-server killed and restarted under the default failure mode, and a
//!   server started while nothing listens at its Redis address. Every
//!   request is answered, never a hang or a panic; once Redis is healthy it
//!   decides again (rate-limit headers, and its counts move); a failure is
//!   logged when it starts and when it ends.
//!
//! The servers run with the store's default timeout (100 ms, the default of
//! the gateway's `--redis-timeout`) and, unless a test says otherwise, the default
//! failure mode (no `failure` line). Each test takes the crate's `SERIAL`
//! lock: they stall Redis and load both cores.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

use crate::SERIAL;
use crate::support::redis::{RedisCluster, RedisServer, command, require_redis, scan};
use crate::support::server::{
    Hangup, RawAnswer, ServerProcess, exchange, post_bytes, send_and_hang_up, send_and_hold,
};

/// The store's default timeout.
const STORE_TIMEOUT: Duration = Duration::from_millis(100);
/// What a loaded two-core machine may add to the store's timeout before a
/// single request counts as hanging (as in `redis_store.rs`).
const SLACK: Duration = Duration::from_millis(400);
/// The longest Redis may take to decide again once it is healthy.
const RECOVERY: Duration = Duration::from_secs(10);
/// The longest a request of a storm or a burst may take to be answered: the
/// store's timeout plus the queueing of 2,500 connections on three debug
/// builds sharing two cores (up to 8 s measured), with room for a loaded CI
/// machine. Past it a request counts as hanging.
const HANG: Duration = Duration::from_secs(20);

/// A request that, when admitted, streams 40 tokens 25 ms apart: in flight
/// for a second unless its client goes away.
const STREAM: &str =
    r#"{"model":"m","prompt":"hi","max_tokens":40,"stream":true,"mock_token_ms":25}"#;
/// A request answered at once.
const QUICK: &str = r#"{"model":"m","prompt":"hi","max_tokens":1}"#;

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// The Redis a test runs on: one server, or the nodes of a Cluster.
struct Nodes<'a> {
    servers: Vec<&'a RedisServer>,
    /// What `--redis` takes.
    url: String,
}

impl<'a> Nodes<'a> {
    fn single(redis: &'a RedisServer) -> Self {
        Nodes {
            servers: vec![redis],
            url: redis.url(),
        }
    }

    fn cluster(cluster: &'a RedisCluster) -> Self {
        Nodes {
            servers: cluster.nodes().iter().collect(),
            url: cluster.urls().join(","),
        }
    }

    /// Every key matching `pattern`, with the node that holds it.
    fn scan(&self, pattern: &str) -> Vec<(SocketAddr, String)> {
        self.servers
            .iter()
            .flat_map(|s| scan(s.addr(), pattern).into_iter().map(|k| (s.addr(), k)))
            .collect()
    }

    /// Stops every node (SIGSTOP): commands get no reply.
    fn pause(&self) {
        tokio::task::block_in_place(|| self.servers.iter().for_each(|s| s.pause()));
    }

    fn resume(&self) {
        tokio::task::block_in_place(|| self.servers.iter().for_each(|s| s.resume()));
    }

    /// Script calls (`EVALSHA`, `EVAL`, `FCALL`) the nodes have run so far.
    fn script_calls(&self) -> u64 {
        self.servers
            .iter()
            .map(|s| {
                let info = command(s.addr(), &["INFO", "commandstats"]).expect("INFO commandstats");
                info.lines()
                    .filter_map(|line| {
                        let (name, fields) =
                            line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                        ["evalsha", "eval", "fcall"].contains(&name).then_some(())?;
                        fields
                            .split(',')
                            .find_map(|f| f.strip_prefix("calls="))?
                            .parse::<u64>()
                            .ok()
                    })
                    .sum::<u64>()
            })
            .sum()
    }
}

/// Writes a config file into `redis`'s own scratch directory (removed with it).
fn write_config(redis: &RedisServer, name: &str, toml: &str) -> PathBuf {
    let path = redis.dir().join(name);
    std::fs::write(&path, toml).expect("write the config file");
    path
}

fn integer(addr: SocketAddr, args: &[&str]) -> u64 {
    let reply = command(addr, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    match reply.as_str() {
        "(nil)" => 0,
        n => n
            .parse()
            .unwrap_or_else(|_| panic!("{args:?}: not a count: {reply:?}")),
    }
}

fn zcard(at: &(SocketAddr, String)) -> u64 {
    integer(at.0, &["ZCARD", &at.1])
}

/// The quota count (field `n` of each quota hash `…:q`) of every subject
/// on the servers at `addrs`, in ascending order.
fn quota_counts(addrs: &[SocketAddr]) -> Vec<u64> {
    let mut counts: Vec<u64> = addrs
        .iter()
        .flat_map(|&addr| {
            scan(addr, "tollgate:*:q")
                .into_iter()
                .map(move |k| (addr, k))
        })
        .map(|(addr, key)| integer(addr, &["HGET", &key, "n"]))
        .collect();
    counts.sort_unstable();
    counts
}

/// Sends `request` to `addr` and waits at most [`HANG`] for the whole answer.
async fn answer(addr: SocketAddr, request: &[u8]) -> Result<(RawAnswer, Duration), String> {
    let start = Instant::now();
    match tokio::time::timeout(HANG, exchange(addr, request)).await {
        Ok(Ok(ans)) => Ok((ans, start.elapsed())),
        Ok(Err(e)) => Err(format!("after {:?}: {e}", start.elapsed())),
        Err(_) => Err(format!("no answer within {HANG:?}")),
    }
}

/// Panics if the server has exited or panicked.
fn assert_alive(server: &mut ServerProcess) {
    server.assert_running();
    let stderr = server.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the server panicked:\n{stderr}"
    );
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// Waits past midnight UTC when it is less than two minutes away, so that
/// the daily quotas of a test stay in one window.
async fn away_from_midnight() {
    let left = 86_400 - unix_secs() % 86_400;
    if left < 120 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

/// A number from `i`, spread over all 64 bits (SplitMix64): the storm's
/// choices, the same on every run.
fn spread(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// 1. A disconnect storm
// ---------------------------------------------------------------------------

const STORM_CONFIG: &str = r#"
[[plans]]
name = "capped"
throttle = { rate = 10000.0, burst = 10000 }
concurrency = 2

[[keys]]
id = "storm-1"
value = "storm-key"
plan = "capped"

[[keys]]
id = "stall-1"
value = "stall-key"
plan = "capped"
"#;

/// Requests of the storm, each from a client that goes away.
const STORM: usize = 1_000;
/// Storm clients at a time.
const STORM_PARALLEL: usize = 24;
/// Script calls the storms must bring to the store: how many requests of a
/// storm are read before their client has gone depends on how busy the
/// machine is (a third of them on an idle one, 15 of 1,000 seen with other
/// builds running), so storms are sent until this many calls were made.
const STORM_CALLS: u64 = 50;
/// The most storms sent to reach [`STORM_CALLS`].
const STORM_ROUNDS: usize = 10;
/// Clients sending requests in a loop while Redis is stalled.
const STALL_CLIENTS: usize = 32;
/// How long Redis is stalled, one stall after the other: about the store's
/// timeout, around and above it, so that calls sent at every moment of a
/// stall meet their deadline just as Redis resumes.
const STALLS_MS: [u64; 12] = [90, 95, 100, 105, 110, 115, 120, 130, 150, 200, 205, 210];

/// Holds a request of `key` in flight and finds the lease set it takes a
/// place in: the one `…:c` key that is not in `known`, with one member.
/// Returns it and the held connection.
async fn lease_set(
    nodes: &Nodes<'_>,
    server: SocketAddr,
    key: &str,
    known: &[(SocketAddr, String)],
) -> ((SocketAddr, String), tokio::net::TcpStream) {
    let (status, held) = send_and_hold(server, &post_bytes("/v1/completions", key, STREAM))
        .await
        .expect("a held request");
    assert_eq!(status, 200, "a first request of {key}");
    let new: Vec<_> = nodes
        .scan("tollgate:*:c")
        .into_iter()
        .filter(|k| !known.contains(k))
        .collect();
    assert_eq!(
        new.len(),
        1,
        "the lease sets new with {key}'s request: {new:?}"
    );
    let set = new.into_iter().next().expect("one");
    assert_eq!(
        zcard(&set),
        1,
        "{key}'s lease set with its one request in flight"
    );
    (set, held)
}

/// Waits until each lease set is empty; panics with their sizes after `limit`.
async fn wait_empty(sets: &[(&str, &(SocketAddr, String))], limit: Duration, what: &str) {
    let start = Instant::now();
    loop {
        let sizes: Vec<_> = sets.iter().map(|(name, set)| (*name, zcard(set))).collect();
        if sizes.iter().all(|(_, n)| *n == 0) {
            eprintln!("{what}: lease sets empty {:?} after", start.elapsed());
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: places still taken in Redis {limit:?} later (members of each lease set): {sizes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`STORM`] requests of `key` to `server`, [`STORM_PARALLEL`] at a time,
/// each client going away without reading: RST at once, FIN at once, RST or
/// FIN after 0–3 ms. Returns how many could not even be sent.
async fn disconnect_storm(server: SocketAddr, key: &str) -> usize {
    let request: Arc<[u8]> = post_bytes("/v1/completions", key, STREAM).into();
    let slots = Arc::new(Semaphore::new(STORM_PARALLEL));
    let mut tasks = Vec::with_capacity(STORM);
    for i in 0..STORM {
        let slot = Arc::clone(&slots).acquire_owned().await.expect("open");
        let request = Arc::clone(&request);
        let r = spread(i as u64);
        let hangup = if r & 1 == 0 {
            Hangup::Reset
        } else {
            Hangup::Close
        };
        let after = if r & 2 == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros((r >> 8) % 3_001)
        };
        tasks.push(tokio::spawn(async move {
            let sent = send_and_hang_up(server, &request, after, hangup).await;
            drop(slot);
            sent.is_err()
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += usize::from(t.await.expect("a storm task"));
    }
    failed
}

/// Requests of `key` from [`STALL_CLIENTS`] clients in a loop while every
/// node is stalled (SIGSTOP) for each of [`STALLS_MS`] in turn; each is
/// answered (200, 429 or 503) within [`HANG`]. Returns the statuses.
async fn stalled_load(nodes: &Nodes<'_>, server: SocketAddr, key: &str) -> Vec<u16> {
    let stop = Arc::new(AtomicBool::new(false));
    let request: Arc<[u8]> = post_bytes("/v1/completions", key, QUICK).into();
    let clients: Vec<_> = (0..STALL_CLIENTS)
        .map(|c| {
            let (stop, request) = (Arc::clone(&stop), Arc::clone(&request));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut i = (c as u64) << 32;
                while !stop.load(Ordering::Relaxed) {
                    // A pause of 0–50 ms, so that the clients' calls are
                    // sent at every moment of a stall, not in waves.
                    i += 1;
                    tokio::time::sleep(Duration::from_micros(spread(i) % 50_000)).await;
                    let (ans, _) = answer(server, &request)
                        .await
                        .unwrap_or_else(|e| panic!("a request while Redis stalls: {e}"));
                    assert!(
                        [200, 429, 503].contains(&ans.status),
                        "a request while Redis stalls: {ans:?}"
                    );
                    statuses.push(ans.status);
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for ms in STALLS_MS {
        nodes.pause();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        nodes.resume();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.expect("a stall client"));
    }
    statuses
}

/// The storm on `nodes`: a plan with a cap of 2 in flight; `storm-key`'s
/// clients go away at every moment of their requests (storm after storm
/// until [`STORM_CALLS`] script calls reached the store), `stall-key`'s are
/// answered while Redis stalls. Afterwards both lease sets in Redis are
/// empty (releases are sent in the background: polled for a few seconds),
/// no other lease set holds a member, and each key's next request is
/// admitted and decided.
async fn storm_leaves_no_place(nodes: &Nodes<'_>, config: PathBuf) {
    let mut server = ServerProcess::on_redis(&nodes.url, &config);
    let addr = server.addr;

    // Where each key's places live, seen with one request in flight.
    let (storm_set, held_storm) = lease_set(nodes, addr, "storm-key", &[]).await;
    let (stall_set, held_stall) =
        lease_set(nodes, addr, "stall-key", std::slice::from_ref(&storm_set)).await;
    drop((held_storm, held_stall));
    let sets = [("storm-key", &storm_set), ("stall-key", &stall_set)];
    wait_empty(&sets, Duration::from_secs(2), "two held requests ended").await;

    // The storm reaches the store: it is not a storm of refused connections,
    // nor of requests gone before the server read them.
    let before = nodes.script_calls();
    let started = Instant::now();
    let (mut storms, mut unsent, mut calls) = (0, 0, 0);
    while calls < STORM_CALLS {
        assert!(
            storms < STORM_ROUNDS,
            "{calls} script calls for {storms} storms of {STORM} requests ({unsent} not sent)"
        );
        unsent += disconnect_storm(addr, "storm-key").await;
        storms += 1;
        calls = nodes.script_calls() - before;
    }
    let storm_took = started.elapsed();

    let started = Instant::now();
    let statuses = stalled_load(nodes, addr, "stall-key").await;
    let stall_took = started.elapsed();
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    eprintln!(
        "storm: {storms} × {STORM} requests ({unsent} not sent, {calls} script calls) in {storm_took:?}; \
         stalled: {} requests (200: {}, 429: {}, 503: {}) in {stall_took:?}; \
         members left at once: storm-key {}, stall-key {}",
        statuses.len(),
        count(200),
        count(429),
        count(503),
        zcard(&storm_set),
        zcard(&stall_set),
    );

    wait_empty(&sets, Duration::from_secs(5), "after the storm").await;
    let left: Vec<_> = nodes
        .scan("tollgate:*:c")
        .into_iter()
        .map(|set| {
            let n = zcard(&set);
            (set, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(
        left.is_empty(),
        "lease sets with members after the storm: {left:?}"
    );

    for key in ["storm-key", "stall-key"] {
        let (ans, _) = answer(addr, &post_bytes("/v1/completions", key, QUICK))
            .await
            .unwrap_or_else(|e| panic!("{key} after the storm: {e}"));
        assert_eq!(ans.status, 200, "{key} after the storm: {ans:?}");
        assert!(
            ans.header("ratelimit").is_some(),
            "{key} after the storm, not decided: {ans:?}"
        );
    }
    assert_alive(&mut server);
}

/// The storm on one redis-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_storm_leaves_no_concurrency_place_taken() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let config = write_config(&redis, "storm.toml", STORM_CONFIG);
    storm_leaves_no_place(&Nodes::single(&redis), config).await;
}

/// The storm on a Redis Cluster of three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_storm_leaves_no_concurrency_place_taken_on_a_cluster() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let config = write_config(&cluster.nodes()[0], "storm.toml", STORM_CONFIG);
    storm_leaves_no_place(&Nodes::cluster(&cluster), config).await;
}

// ---------------------------------------------------------------------------
// 2. An overload burst
// ---------------------------------------------------------------------------

/// Requests of a burst, all sent at once.
const BURST: usize = 2_500;
/// Instances sharing the Redis.
const INSTANCES: usize = 3;
/// The daily quota of each key.
const QUOTA: u64 = 100;

/// Plan `daily` (a quota of [`QUOTA`] a day under a throttle far above it,
/// with `failure` if given) and `keys` keys `burst-key-<i>`.
fn burst_config(keys: usize, failure: Option<&str>) -> String {
    let mut toml = String::from(
        "[[plans]]\nname = \"daily\"\nthrottle = { rate = 100000.0, burst = 100000 }\n",
    );
    toml += &format!("quota = {{ limit = {QUOTA}, period = \"DAY\" }}\n");
    if let Some(f) = failure {
        toml += &format!("failure = \"{f}\"\n");
    }
    for i in 0..keys {
        toml +=
            &format!("\n[[keys]]\nid = \"k-{i}\"\nvalue = \"burst-key-{i}\"\nplan = \"daily\"\n");
    }
    toml
}

/// What the burst got for one request.
#[derive(Debug)]
struct Reply {
    key: usize,
    status: u16,
    /// Whether it carries a `RateLimit` header.
    decided: bool,
    took: Duration,
}

/// A burst on `keys` keys: [`INSTANCES`] servers on one Redis, their store
/// timeout `timeout` milliseconds, [`BURST`] requests sent at once, spread
/// over the servers and the keys. Every
/// request is answered within [`HANG`], and no server exits or panics.
/// Returns the replies and the quota counts in Redis (ascending), read once
/// they add up to the answers 200 or after three seconds (an instance may
/// give back what it held in the background).
async fn burst(keys: usize, failure: Option<&str>, timeout: &str) -> (Vec<Reply>, Vec<u64>) {
    away_from_midnight().await;
    let redis = RedisServer::start();
    let config = write_config(&redis, "burst.toml", &burst_config(keys, failure));
    let mut servers: Vec<_> = (0..INSTANCES)
        .map(|_| ServerProcess::on_redis_with(&redis.url(), &config, &["--redis-timeout", timeout]))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();

    let started = Instant::now();
    let tasks: Vec<_> = (0..BURST)
        .map(|i| {
            let (addr, key) = (addrs[i % INSTANCES], i % keys);
            let request = post_bytes("/v1/completions", &format!("burst-key-{key}"), QUICK);
            tokio::spawn(async move { (key, answer(addr, &request).await) })
        })
        .collect();
    let mut replies = Vec::with_capacity(BURST);
    let mut failed = Vec::new();
    for t in tasks {
        match t.await.expect("a burst task") {
            (key, Ok((ans, took))) => replies.push(Reply {
                key,
                status: ans.status,
                decided: ans.header("ratelimit").is_some(),
                took,
            }),
            (key, Err(e)) => failed.push(format!("key {key}: {e}")),
        }
    }
    let took = started.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {BURST} requests got no answer: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );

    let ok = replies.iter().filter(|r| r.status == 200).count();
    let unmetered = replies
        .iter()
        .filter(|r| r.status == 200 && !r.decided)
        .count();
    let mut latencies: Vec<_> = replies.iter().map(|r| r.took).collect();
    latencies.sort_unstable();
    // Redis's counts once the instances have given back what they hold.
    let settle = Instant::now();
    let mut counts = quota_counts(&[redis.addr()]);
    while counts.iter().sum::<u64>() != ok as u64 && settle.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        counts = quota_counts(&[redis.addr()]);
    }
    eprintln!(
        "burst over {keys} key(s), failure {}: {BURST} requests answered in {took:?} \
         (median {:?}, slowest {:?}); 200: {ok}, of which without rate-limit headers: \
         {unmetered}; 429: {}; other: {}; Redis counts {counts:?}",
        failure.unwrap_or("(default)"),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        replies.iter().filter(|r| r.status == 429).count(),
        replies
            .iter()
            .filter(|r| ![200, 429].contains(&r.status))
            .count(),
    );
    for s in &mut servers {
        assert_alive(s);
    }
    (replies, counts)
}

/// The store timeout of the servers in the bursts judged by their counts.
/// Three debug-built servers on two cores answer 2,500 connections with a
/// median latency of about half a second, their own queueing: with the
/// default 100 ms most of their calls would time out for want of CPU to
/// read the reply, and be decided by the failure mode. The bursts test
/// what Redis and the store do under the burst, not that.
const ROOMY_TIMEOUT: &str = "5000";

/// 2,500 requests of one key with a quota of 100, at once, on three
/// instances: at most 100 are admitted, each decided by Redis, and Redis
/// counts exactly those. The 2,400 that the quota denies must not push the
/// store into a failure mode that admits them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_burst_admits_no_more_than_the_quota() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (replies, counts) = burst(1, None, ROOMY_TIMEOUT).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "statuses other than 200 and 429"
    );
    assert!(ok as u64 <= QUOTA, "{ok} admitted of a quota of {QUOTA}");
    assert_eq!(
        counts,
        [ok as u64],
        "Redis's count of the key, against the {ok} answers 200"
    );
}

/// The same burst spread over ten keys (250 requests each, a quota of 100
/// each): no key admitted past its quota, and Redis counts of each key
/// exactly what was admitted of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_burst_over_many_keys_admits_no_key_past_its_quota() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    const KEYS: usize = 10;
    let (replies, counts) = burst(KEYS, None, ROOMY_TIMEOUT).await;
    assert!(
        replies.iter().all(|r| [200, 429].contains(&r.status)),
        "statuses other than 200 and 429"
    );
    let mut admitted = vec![0u64; KEYS];
    for r in replies.iter().filter(|r| r.status == 200) {
        admitted[r.key] += 1;
    }
    assert!(
        admitted.iter().all(|&n| n <= QUOTA),
        "admitted per key, of a quota of {QUOTA} each: {admitted:?}"
    );
    let mut expected: Vec<u64> = admitted.iter().copied().filter(|&n| n > 0).collect();
    expected.sort_unstable();
    assert_eq!(
        counts, expected,
        "Redis's counts against what was admitted per key ({admitted:?})"
    );
}

/// The burst with `failure = "open"`: every request answered; how many were
/// let through unmetered is printed, not judged (that is what `open` means).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_burst_with_failure_open_is_answered() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (replies, counts) = burst(1, Some("open"), "100").await;
    let unmetered = replies
        .iter()
        .filter(|r| r.status == 200 && !r.decided)
        .count();
    println!(
        "failure open: {unmetered} of {BURST} let through without a decision; Redis counted {counts:?}"
    );
}

// ---------------------------------------------------------------------------
// 3. Faults
// ---------------------------------------------------------------------------

const FAULTS_CONFIG: &str = r#"
[[plans]]
name = "metered"
throttle = { rate = 10000.0, burst = 10000 }
quota = { limit = 1000000, period = "DAY" }

[[keys]]
id = "f-1"
value = "fault-key"
plan = "metered"
"#;

/// One server process on one redis-server (at `redis`).
struct Faults {
    server: ServerProcess,
    redis: SocketAddr,
}

impl Faults {
    /// The key's quota count in Redis (0 while it has none).
    fn count(&self) -> u64 {
        quota_counts(&[self.redis]).first().copied().unwrap_or(0)
    }

    /// One request, answered 200 (the default failure mode admits under a
    /// quota this large) within the store's timeout plus slack.
    async fn answered(&self, what: &str) -> RawAnswer {
        let request = post_bytes("/v1/completions", "fault-key", QUICK);
        let (ans, took) = answer(self.server.addr, &request)
            .await
            .unwrap_or_else(|e| panic!("a request {what}: {e}"));
        assert_eq!(ans.status, 200, "a request {what}: {ans:?}");
        assert!(
            took < STORE_TIMEOUT + SLACK,
            "a request {what} took {took:?}"
        );
        ans
    }

    /// Polls until a request is decided by Redis again: it carries a
    /// `RateLimit` header and Redis's count has moved past where it was.
    /// Returns how long that took.
    async fn decided_again(&self, what: &str) -> Duration {
        let before = self.count();
        let start = Instant::now();
        loop {
            let ans = self.answered(what).await;
            if ans.header("ratelimit").is_some() && self.count() > before {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < RECOVERY,
                "not decided by Redis within {RECOVERY:?} {what} (count {before}, now {}): {ans:?}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lines the server has logged at `level` from tollgate.
    fn logged(&self, level: &str) -> usize {
        self.server
            .stderr()
            .lines()
            .filter(|l| l.contains(level) && l.contains("tollgate"))
            .count()
    }

    /// Waits (up to two seconds, sending requests) until more than `before`
    /// lines at `level` from tollgate have been logged.
    async fn wait_logged(&self, level: &str, before: usize, what: &str) {
        let start = Instant::now();
        while self.logged(level) <= before {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "nothing logged at {level} by tollgate {what}:\n{}",
                self.server.stderr()
            );
            self.answered(what).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// On one redis-server with an append-only file, one server process with the
/// default failure mode, in turn: `maxmemory 1mb` with `noeviction` while
/// Redis holds more, a SIGKILL and restart, `SCRIPT FLUSH`, and
/// `CLIENT KILL TYPE normal`. Every request is answered 200 within the
/// timeout plus slack; after each fault Redis decides again; the
/// out-of-memory and the kill are logged as warnings when they start and at
/// info when they end. (That the append-only file keeps the counts is
/// `redis_faults.rs`'s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_answered_and_redis_decides_again_once_healthy() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    away_from_midnight().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let config = write_config(&redis, "faults.toml", FAULTS_CONFIG);
    let addr = redis.addr();
    let mut f = Faults {
        server: ServerProcess::on_redis(&redis.url(), &config),
        redis: addr,
    };
    f.decided_again("at first").await;

    // Out of memory: Redis holds 2 MiB more than it may, and evicts nothing.
    let (warned, informed) = (f.logged("WARN"), f.logged("INFO"));
    let filler = "x".repeat(2 << 20);
    command(addr, &["SET", "filler", &filler]).expect("SET filler");
    command(addr, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).expect("CONFIG SET");
    command(addr, &["CONFIG", "SET", "maxmemory", "1mb"]).expect("CONFIG SET maxmemory");
    let refused = command(addr, &["SET", "probe", "1"]);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("OOM")),
        "Redis should refuse writes: {refused:?}"
    );
    let before = f.count();
    for _ in 0..5 {
        f.answered("while Redis is out of memory").await;
    }
    assert_eq!(f.count(), before, "Redis counted while out of memory");
    f.wait_logged("WARN", warned, "while Redis is out of memory")
        .await;
    command(addr, &["CONFIG", "SET", "maxmemory", "0"]).expect("CONFIG SET maxmemory 0");
    command(addr, &["DEL", "filler"]).expect("DEL filler");
    let out_of_memory = f.decided_again("after out of memory").await;
    f.wait_logged("INFO", informed, "after out of memory").await;

    // SIGKILL, then a restart on the same port. (The recovery from the last
    // fault was logged: this one is a new failure.)
    let (warned, informed) = (f.logged("WARN"), f.logged("INFO"));
    tokio::task::block_in_place(|| redis.kill());
    for _ in 0..5 {
        f.answered("while Redis is down").await;
    }
    f.wait_logged("WARN", warned, "while Redis is down").await;
    tokio::task::block_in_place(|| redis.restart());
    let restarted = f.decided_again("after a restart").await;
    f.wait_logged("INFO", informed, "after a restart").await;

    // Faults the store may ride through without failing a call: what is
    // logged is not judged.
    command(addr, &["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH");
    let flushed = f.decided_again("after SCRIPT FLUSH").await;
    command(addr, &["CLIENT", "KILL", "TYPE", "normal"]).expect("CLIENT KILL");
    let clients_killed = f.decided_again("after CLIENT KILL TYPE normal").await;

    assert_alive(&mut f.server);
    eprintln!(
        "faults: decided again {out_of_memory:?} after out of memory, {restarted:?} after \
         a restart, {flushed:?} after SCRIPT FLUSH, {clients_killed:?} after CLIENT KILL"
    );
}

/// A server started while nothing listens at its Redis address warns that
/// Redis cannot be reached, serves anyway (every request answered 200 by the
/// default failure mode within the timeout plus slack), and once a
/// redis-server (without persistence, so without the script) starts there,
/// Redis decides again and the recovery is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_without_redis_warns_serves_and_recovers() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    away_from_midnight().await;
    let mut redis = RedisServer::start();
    let config = write_config(&redis, "faults.toml", FAULTS_CONFIG);
    tokio::task::block_in_place(|| redis.kill());
    let mut f = Faults {
        server: ServerProcess::on_redis(&redis.url(), &config),
        redis: redis.addr(),
    };
    let start = Instant::now();
    while !f.server.stderr().contains("cannot be reached") {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no warning that Redis cannot be reached:\n{}",
            f.server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warning = f.server.stderr();
    assert!(
        warning
            .lines()
            .any(|l| l.contains("WARN") && l.contains("cannot be reached")),
        "the startup message is not a warning:\n{warning}"
    );
    let informed = f.logged("INFO");
    for _ in 0..5 {
        f.answered("before Redis ever answered").await;
    }
    tokio::task::block_in_place(|| redis.restart());
    let started = f.decided_again("once Redis has started").await;
    f.wait_logged("INFO", informed, "once Redis has started")
        .await;
    assert_alive(&mut f.server);
    eprintln!("started without Redis: decided {started:?} after Redis started");
}
