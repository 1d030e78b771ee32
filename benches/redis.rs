//! Decisions per second through `RedisStore` against a local `redis-server`,
//! beside `redis-benchmark` sending the same script call (the ceiling).
//!
//! Run with `cargo bench --bench redis --features redis`.
//!
//! The bench starts its own `redis-server` on a free loopback port (no
//! persistence) and a multi-thread tokio runtime with one worker per core.
//! Each run spawns 1, 8 or 64 tasks; each task loops
//! `RateLimitLayer::decide(key, 1)` until a shared deadline, on keys drawn
//! at random from a set of per-key keys (as `redis-benchmark -r` draws its
//! keys; a sweep in order would line the tasks up behind each other on the
//! same keys). Every decision is timed. Before and after each run the bench
//! reads `INFO commandstats` and `/proc`, and prints per decision the
//! commands clients sent (round trips), the `EVALSHA`s among them and the
//! commands the script called; Redis's own time per `EVALSHA`; Redis's CPU
//! time per round trip; and the CPU use of `redis-server`, of the bench and
//! of the whole machine. Commandstats count a script's commands as well as
//! the client's: the names `script.lua` passes to `redis.call` are counted as
//! the script's.
//!
//! Runs (1, 8 and 64 tasks):
//!
//! 1. **allowed**, over 10,000 keys: `Throttle::new(1.0, 1_000_000)` per
//!    key, a bucket no run empties, so every decision is allowed (asserted)
//!    and every key's state stays in Redis: each call reads and writes it.
//!    The keys are filled before the first run.
//!    Then **hot key**: one key under `Throttle::new(1e6, 1_000_000)` (no
//!    run empties it) decided by three instances (three stores, as three
//!    replicas), with 3, 24 and 63 tasks spread over them: borrowing
//!    answers most decisions from shares.
//! 2. **denied**, over 10,000 keys and over 100 of them:
//!    `Throttle::new(0.01, 1)` (one request per 100 s), each key emptied
//!    before the runs, so every decision is denied (asserted); with the
//!    over-limit cache off (`over_limit_cache(Duration::ZERO)`) and on (the
//!    default: a denial is answered locally until its retry time, at most
//!    1 s).
//! 3. **ceiling**: `redis-benchmark` sending the call the store sends. The
//!    call is not rebuilt by hand: the bench captures one real decision's
//!    command with `redis-cli MONITOR` and replays it with the first 12
//!    characters of the key's hash tag replaced by `__rand_int__` (`-r
//!    10000`: 10,000 keys of the same length), and its deadline moved an hour
//!    ahead (see [`replayable`]). A first pass fills the keys. Each run sends
//!    as many calls as tollgate decided in its run of the same concurrency,
//!    and is checked in `INFO commandstats` (every call ran the script, none
//!    failed). One more row uses one connection with 64 calls pipelined
//!    (`-c 1 -P 64`), the shape nearest the store's one multiplexed
//!    connection.
//!
//! Every run lasts `TOLLGATE_BENCH_SECS` seconds (default 5); the whole bench
//! takes about a minute and a half. Plans fail closed with a timeout of 1 s,
//! so a store failure shows as a `StoreUnavailable` rejection (the `fail`
//! column) instead of a silent allow.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tollgate::{
    FailureMode, Policy, RateLimitLayer, Reason, RedisStore, Rejection, Throttle, UsagePlan,
};

#[path = "../tests/support/redis.rs"]
mod redis_support;

use redis_support::{RedisServer, command, require_redis};

/// Keys the decisions spread over.
const KEYS: usize = 10_000;
/// Concurrent tasks of the tollgate runs and clients of the ceiling runs.
const CONCURRENCY: [usize; 3] = [1, 8, 64];
/// Keys of the denied runs on a small hot set.
const HOT_KEYS: usize = 100;
/// Concurrency of the warm-up that fills (or empties) every key.
const WARM_CONCURRENCY: usize = 64;
/// Seconds per run, unless `TOLLGATE_BENCH_SECS` says otherwise.
const DEFAULT_SECS: f64 = 5.0;
/// Clock ticks per second of `/proc` CPU times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

type Layer = Arc<RateLimitLayer<tollgate::extract::ApiKeyHeader, RedisStore>>;

fn main() {
    if !require_redis() {
        return;
    }
    let secs = std::env::var("TOLLGATE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(DEFAULT_SECS);
    let run_for = Duration::from_secs_f64(secs);
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let keys: Arc<[Vec<u8>]> = (0..KEYS)
        .map(|i| format!("tenant-{i:05}").into_bytes())
        .collect();
    let hot: Arc<[Vec<u8>]> = keys[..HOT_KEYS].into();
    let redis_pid = server.pid().expect("a running redis-server");
    let bench = Bench {
        rt: &rt,
        addr: server.addr(),
        redis_pid,
        run_for,
        in_script: script_commands(),
    };

    println!(
        "redis-server {} on {}, {} cores, tokio workers: one per core, {secs} s per run",
        redis_version(server.addr()),
        server.addr(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!("{}", Run::header());

    // Allowed: one unit per second with a bucket no run empties, so every
    // key's state stays in Redis (read and written by every call).
    let generous = Throttle::new(1.0, 1_000_000).expect("a valid throttle");
    let allowed = layer(&rt, &server, "allowed", generous, None);
    warm(&rt, &allowed, &keys, "allowed");
    let captured = capture_call(&rt, &allowed, server.port());
    let mut tollgate_rates = Vec::new();
    for c in CONCURRENCY {
        let r = bench.run(&allowed, &keys, c);
        assert_eq!(
            r.tally.allowed, r.tally.total,
            "every decision of the allowed runs must be allowed: {:?}",
            r.tally
        );
        println!("{}", r.line(&format!("allowed 10k c={c}")));
        tollgate_rates.push((c, r.per_sec()));
    }

    // A hot key far from its limits, decided by three instances (stores of
    // their own): borrowing answers most decisions from shares.
    // A bucket that refills a million a second: no run empties it.
    let hot_throttle = Throttle::new(1_000_000.0, 1_000_000).expect("a valid throttle");
    let instances: Vec<Layer> = (0..3)
        .map(|_| layer(&rt, &server, "hot", hot_throttle, None))
        .collect();
    let one: Arc<[Vec<u8>]> = keys[..1].into();
    for c in [3, 24, 63] {
        let r = bench.run_on(&instances, &one, c);
        assert_eq!(r.tally.allowed, r.tally.total, "{:?}", r.tally);
        println!("{}", r.line(&format!("hot key 3 instances c={c}")));
    }
    for l in &instances {
        rt.block_on(l.store().drained());
    }

    // Denied: one request per 100 s, every key emptied first. Both layers
    // use the plan "denied", so they decide on the same Redis keys.
    let tiny = Throttle::new(0.01, 1).expect("a valid throttle");
    let uncached = layer(&rt, &server, "denied", tiny, Some(Duration::ZERO));
    let cached = layer(&rt, &server, "denied", tiny, None);
    warm(&rt, &uncached, &keys, "denied");
    for (name, layer) in [("cache off", &uncached), ("cache on", &cached)] {
        for (set, keys) in [("10k", &keys), ("100", &hot)] {
            for c in [1, 64] {
                let r = bench.run(layer, keys, c);
                assert_eq!(
                    r.tally.limited, r.tally.total,
                    "every decision of the denied runs must be denied: {:?}",
                    r.tally
                );
                println!("{}", r.line(&format!("denied {set} {name} c={c}")));
            }
        }
    }

    // The ceiling: redis-benchmark sending the captured call.
    println!();
    if !runs("redis-benchmark") {
        println!("redis-benchmark is not on PATH: no ceiling");
        return;
    }
    let spread = replayable(&captured, server.addr());
    println!("captured call: {}", shell_words(&captured));
    println!("ceiling call:  {}", shell_words(&spread));
    // Fill the ceiling's keys first, as the warm-up filled tollgate's.
    let one_pipelined = ["-c", "1", "-P", "64"].map(String::from).to_vec();
    bench.ceiling(&server, &one_pipelined, 5 * KEYS as u64, &spread);
    println!("{}", Ceiling::header());
    let mut shapes: Vec<(String, Vec<String>, f64)> = tollgate_rates
        .iter()
        .map(|&(c, rate)| (format!("-c {c}"), vec!["-c".into(), c.to_string()], rate))
        .collect();
    let rate_64 = tollgate_rates.last().map_or(0.0, |r| r.1);
    shapes.push(("-c 1 -P 64".into(), one_pipelined, rate_64));
    for (label, shape, tollgate_rate) in shapes {
        let calls = ((tollgate_rate * secs) as u64).max(10_000);
        let c = bench.ceiling(&server, &shape, calls, &spread);
        println!("{}", c.line(&label, tollgate_rate));
    }
    println!(
        "(tollgate/ceiling: tollgate's decisions/s at the same concurrency over the ceiling's \
         calls/s; the -P 64 row is against tollgate at c=64)"
    );
    drop(server);
}

/// What every run needs.
struct Bench<'a> {
    rt: &'a Runtime,
    addr: SocketAddr,
    redis_pid: u32,
    run_for: Duration,
    /// Commands the script calls (lower case), told apart from the client's.
    in_script: Vec<String>,
}

/// The commands `script.lua` calls with `redis.call`, in lower case.
fn script_commands() -> Vec<String> {
    let script = include_str!("../src/store/redis/script.lua");
    let mut names: Vec<String> = script
        .split("redis.call('")
        .skip(1)
        .filter_map(|rest| rest.split_once('\''))
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A per-key layer of plan `plan` with `throttle`, failing closed, on a new
/// store; `cache` sets the over-limit cache's longest answer (the default
/// when `None`). Plans of different names count on different Redis keys.
fn layer(
    rt: &Runtime,
    server: &RedisServer,
    plan: &str,
    throttle: Throttle,
    cache: Option<Duration>,
) -> Layer {
    let plan = UsagePlan::new(plan)
        .throttle(throttle)
        .failure(FailureMode::Closed);
    let policy = Policy::per_key(plan).expect("a valid policy");
    let mut builder = RedisStore::builder(server.url()).timeout(Duration::from_secs(1));
    if let Some(cache) = cache {
        builder = builder.over_limit_cache(cache);
    }
    let store = rt.block_on(builder.build()).expect("a Redis store");
    Arc::new(RateLimitLayer::builder(policy).store(store).build())
}

/// One decision per key, `WARM_CONCURRENCY` at a time; each must be allowed
/// (it fills an allowed key's state, and empties a denied key's bucket).
fn warm(rt: &Runtime, layer: &Layer, keys: &Arc<[Vec<u8>]>, what: &'static str) {
    rt.block_on(async {
        let tasks: Vec<_> = (0..WARM_CONCURRENCY)
            .map(|t| {
                let (layer, keys) = (Arc::clone(layer), Arc::clone(keys));
                tokio::spawn(async move {
                    for key in keys.iter().skip(t).step_by(WARM_CONCURRENCY) {
                        let r = layer.decide(key, 1).await;
                        assert!(r.is_ok(), "warm-up of the {what} keys: {r:?}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("a warm-up task");
        }
    });
}

/// The command one decision sends, as `redis-cli MONITOR` shows it.
fn capture_call(rt: &Runtime, layer: &Layer, port: u16) -> Vec<String> {
    let mut monitor = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "MONITOR"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run redis-cli MONITOR");
    let mut lines = BufReader::new(monitor.stdout.take().expect("piped stdout")).lines();
    let mut next = || {
        lines
            .next()
            .expect("a line from MONITOR")
            .expect("MONITOR output")
    };
    assert_eq!(next(), "OK", "MONITOR did not start");
    rt.block_on(layer.decide(b"monitor-probe", 1))
        .expect("the probe is allowed");
    let line = loop {
        let line = next();
        if line.contains("\"EVALSHA\"") {
            break line;
        }
    };
    // We started it; it only ends when killed.
    let _ = monitor.kill();
    let _ = monitor.wait();
    let args = parse_monitor(&line);
    assert_eq!(
        args.first().map(String::as_str),
        Some("EVALSHA"),
        "a decision is one EVALSHA: {line}"
    );
    args
}

/// The arguments of a MONITOR line: `<time> [<db> <client>] "arg" "arg" …`,
/// each quoted as `sdscatrepr` writes it.
fn parse_monitor(line: &str) -> Vec<String> {
    let rest = &line[line.find("] ").expect("a MONITOR line") + 2..];
    let mut args = Vec::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut arg = String::new();
        loop {
            match chars.next().expect("a closed quote") {
                '"' => break,
                '\\' => match chars.next().expect("an escape") {
                    'n' => arg.push('\n'),
                    'r' => arg.push('\r'),
                    't' => arg.push('\t'),
                    'x' => {
                        let hex: String = chars.by_ref().take(2).collect();
                        arg.push(char::from(
                            u8::from_str_radix(&hex, 16).expect("a hex escape"),
                        ));
                    }
                    other => arg.push(other),
                },
                c => arg.push(c),
            }
        }
        args.push(arg);
    }
    args
}

/// The captured call made replayable: `__rand_int__` in place of the first
/// 12 characters of its key's hash tag (the same length, 10,000 different
/// keys), and its deadline, if it has one (`ARGV[2]` empty: Redis `TIME`;
/// `ARGV[3]`: microseconds of `TIME`), an hour after Redis's `TIME` now
/// instead of one timeout after the capture. The script checks the deadline
/// as before, and passes.
fn replayable(call: &[String], addr: SocketAddr) -> Vec<String> {
    assert_eq!(call[2], "1", "a per-key throttle call names one key");
    let mut spread = call.to_vec();
    let key = &call[3];
    let open = key.find('{').expect("a hash tag") + 1;
    spread[3] = format!("{}__rand_int__{}", &key[..open], &key[open + 12..]);
    // EVALSHA, sha, numkeys, the key: ARGV[1] is at index 4.
    let argv = 4;
    if spread[argv + 1].is_empty() && !spread[argv + 2].is_empty() {
        let time = command(addr, &["TIME"]).expect("Redis TIME");
        let (s, us) = time.split_once('\n').expect("seconds and microseconds");
        let now_us = s.parse::<u64>().expect("seconds") * 1_000_000
            + us.parse::<u64>().expect("microseconds");
        spread[argv + 2] = (now_us + 3_600_000_000).to_string();
    }
    spread
}

/// Arguments as one shell line (empty arguments as `""`).
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty() {
                "\"\"".to_owned()
            } else if a.contains(['{', '}', ' ']) {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A xorshift64 generator: cheap, and enough to spread keys.
struct Xorshift(u64);

impl Xorshift {
    fn new(seed: u64) -> Self {
        Xorshift((seed + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n as u64) as usize
    }
}

/// Outcomes and latencies of one run.
#[derive(Debug, Default)]
struct Tally {
    total: u64,
    allowed: u64,
    limited: u64,
    unavailable: u64,
    other: u64,
    latency: Histogram,
}

impl Tally {
    fn record(&mut self, r: &Result<(), Rejection>, nanos: u64) {
        self.total += 1;
        match r {
            Ok(()) => self.allowed += 1,
            Err(e) if e.reason() == Reason::Limited => self.limited += 1,
            Err(e) if e.reason() == Reason::StoreUnavailable => self.unavailable += 1,
            Err(_) => self.other += 1,
        }
        self.latency.record(nanos);
    }

    fn merge(&mut self, other: &Tally) {
        self.total += other.total;
        self.allowed += other.allowed;
        self.limited += other.limited;
        self.unavailable += other.unavailable;
        self.other += other.other;
        self.latency.merge(&other.latency);
    }
}

/// A log-linear latency histogram: 32 buckets per power of two (about 3%).
#[derive(Debug)]
struct Histogram {
    counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; 60 * 32],
        }
    }
}

impl Histogram {
    fn bucket(nanos: u64) -> usize {
        if nanos < 32 {
            return nanos as usize;
        }
        let exp = 63 - nanos.leading_zeros() as usize;
        (exp - 4) * 32 + ((nanos >> (exp - 5)) & 31) as usize
    }

    /// The middle of bucket `i`, in nanoseconds.
    fn value(i: usize) -> f64 {
        if i < 32 {
            return i as f64;
        }
        let (exp, sub) = (i / 32 + 4, (i % 32) as u64);
        let low = (32 + sub) << (exp - 5);
        low as f64 + (1u64 << (exp - 5)) as f64 / 2.0
    }

    fn record(&mut self, nanos: u64) {
        self.counts[Self::bucket(nanos)] += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// The `q` quantile in microseconds.
    fn quantile_us(&self, q: f64) -> f64 {
        let total: u64 = self.counts.iter().sum();
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i) / 1000.0;
            }
        }
        0.0
    }
}

/// One timed run and what Redis and the machine did meanwhile.
struct Run {
    tally: Tally,
    elapsed: Duration,
    commands: Commands,
    cpu: Cpu,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.tally.total as f64 / self.elapsed.as_secs_f64()
    }

    fn header() -> String {
        format!(
            "{:<28} {:>11} {:>8} {:>8} {:>6} {:>7} {:>8} {:>10} {:>7} {:>8} {:>6} {:>6} {:>6} {:>4}",
            "run",
            "decisions/s",
            "p50 µs",
            "p99 µs",
            "trips",
            "trips/s",
            "EVALSHA",
            "in-script",
            "µs/call",
            "µs/trip",
            "redis%",
            "bench%",
            "all%",
            "fail"
        )
    }

    /// Trips (client commands), EVALSHA and in-script commands are per
    /// decision, trips/s per second; µs/call is Redis's own time per EVALSHA (commandstats),
    /// µs/trip Redis's CPU time per client command; CPU is per cent of one
    /// core for Redis and the bench, of all cores for the machine; fail
    /// counts store failures and unexpected rejections.
    fn line(&self, label: &str) -> String {
        let d = self.tally.total.max(1) as f64;
        format!(
            "{label:<28} {:>11.0} {:>8.1} {:>8.1} {:>6.3} {:>7.0} {:>8.3} {:>10.3} {:>7.1} {:>8.1} {:>6.0} {:>6.0} {:>6.0} {:>4}",
            self.per_sec(),
            self.tally.latency.quantile_us(0.5),
            self.tally.latency.quantile_us(0.99),
            self.commands.client as f64 / d,
            self.commands.client as f64 / self.elapsed.as_secs_f64(),
            self.commands.evalsha as f64 / d,
            self.commands.in_script as f64 / d,
            self.commands.usec_per_evalsha(),
            self.cpu.redis_us_per(self.commands.client),
            self.cpu.redis_pct(),
            self.cpu.own_pct(),
            self.cpu.machine_pct(),
            self.tally.unavailable + self.tally.other,
        )
    }
}

impl Bench<'_> {
    /// `c` tasks deciding until the deadline.
    fn run(&self, layer: &Layer, keys: &Arc<[Vec<u8>]>, c: usize) -> Run {
        self.run_on(std::slice::from_ref(layer), keys, c)
    }

    /// `c` tasks deciding until the deadline, task `t` through instance
    /// `t % instances.len()` (each a store of its own, as replicas are).
    fn run_on(&self, instances: &[Layer], keys: &Arc<[Vec<u8>]>, c: usize) -> Run {
        let before = (self.commandstats(), CpuTimes::read(self.redis_pid));
        let start = Instant::now();
        let deadline = start + self.run_for;
        let tally = self.rt.block_on(async {
            let tasks: Vec<_> = (0..c)
                .map(|t| {
                    let layer = Arc::clone(&instances[t % instances.len()]);
                    let keys = Arc::clone(keys);
                    tokio::spawn(async move {
                        let mut tally = Tally::default();
                        let mut random = Xorshift::new(t as u64);
                        loop {
                            let t0 = Instant::now();
                            if t0 >= deadline {
                                break tally;
                            }
                            let key = &keys[random.below(keys.len())];
                            let r = layer.decide(key, 1).await;
                            tally.record(&r, t0.elapsed().as_nanos() as u64);
                        }
                    })
                })
                .collect();
            let mut all = Tally::default();
            for t in tasks {
                all.merge(&t.await.expect("a bench task"));
            }
            all
        });
        let elapsed = start.elapsed();
        let after = (self.commandstats(), CpuTimes::read(self.redis_pid));
        Run {
            tally,
            elapsed,
            commands: after.0.since(&before.0, &self.in_script),
            cpu: after.1.since(&before.1, elapsed),
        }
    }

    /// Runs `redis-benchmark` with `shape` (`-c`, `-P`) for `calls` calls of
    /// `call`, and checks in `INFO commandstats` that each ran the script.
    fn ceiling(
        &self,
        server: &RedisServer,
        shape: &[String],
        calls: u64,
        call: &[String],
    ) -> Ceiling {
        let before = (self.commandstats(), CpuTimes::read(self.redis_pid));
        let start = Instant::now();
        let out = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
            .args(shape)
            .args(["-n", &calls.to_string(), "-r", &KEYS.to_string(), "--csv"])
            .args(call)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-benchmark");
        let elapsed = start.elapsed();
        let after = (self.commandstats(), CpuTimes::read(self.redis_pid));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "redis-benchmark failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let commands = after.0.since(&before.0, &self.in_script);
        // Every client may have a call (or a pipeline) in flight when the
        // count is reached, so a few more than `calls` can be sent.
        assert!(
            commands.evalsha >= calls && commands.failed == 0,
            "every redis-benchmark call must run the script without error: \
             {calls} sent, {commands:?}"
        );
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
        // "p95_latency_ms","p99_latency_ms","max_latency_ms", read from the end.
        let row: Vec<f64> = stdout
            .lines()
            .last()
            .expect("a CSV row")
            .rsplit("\",\"")
            .take(7)
            .map(|f| f.trim_matches('"').parse().expect("a number"))
            .collect();
        Ceiling {
            per_sec: row[6],
            p50_ms: row[3],
            p99_ms: row[1],
            commands,
            cpu: after.1.since(&before.1, elapsed),
        }
    }

    fn commandstats(&self) -> CommandStats {
        CommandStats::read(self.addr)
    }
}

/// What `redis-benchmark` measured.
struct Ceiling {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    commands: Commands,
    cpu: Cpu,
}

impl Ceiling {
    fn header() -> String {
        format!(
            "{:<28} {:>11} {:>8} {:>8} {:>7} {:>8} {:>6} {:>7} {:>6} {:>16}",
            "ceiling (redis-benchmark)",
            "calls/s",
            "p50 µs",
            "p99 µs",
            "µs/call",
            "µs/trip",
            "redis%",
            "client%",
            "all%",
            "tollgate/ceiling"
        )
    }

    fn line(&self, label: &str, tollgate_rate: f64) -> String {
        format!(
            "{label:<28} {:>11.0} {:>8.0} {:>8.0} {:>7.1} {:>8.1} {:>6.0} {:>7.0} {:>6.0} {:>16.2}",
            self.per_sec,
            self.p50_ms * 1000.0,
            self.p99_ms * 1000.0,
            self.commands.usec_per_evalsha(),
            self.cpu.redis_us_per(self.commands.client),
            self.cpu.redis_pct(),
            self.cpu.children_pct(),
            self.cpu.machine_pct(),
            tollgate_rate / self.per_sec,
        )
    }
}

/// Calls per command from `INFO commandstats`.
struct CommandStats {
    /// name -> (calls, usec, failed_calls)
    commands: HashMap<String, (u64, u64, u64)>,
}

impl CommandStats {
    fn read(addr: SocketAddr) -> Self {
        let info = command(addr, &["INFO", "commandstats"]).expect("INFO commandstats");
        let mut commands = HashMap::new();
        for line in info.lines() {
            let Some((name, fields)) = line.trim().split_once(':') else {
                continue;
            };
            let Some(name) = name.strip_prefix("cmdstat_") else {
                continue;
            };
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            commands.insert(
                name.to_owned(),
                (field("calls"), field("usec"), field("failed_calls")),
            );
        }
        CommandStats { commands }
    }

    /// What was served since `before`. Commandstats count the commands a
    /// script calls as well as the client's: those named in the script
    /// (`in_script`) are counted apart. This bench's `INFO` and
    /// `redis-benchmark`'s `CONFIG GET` at start are left out.
    fn since(&self, before: &CommandStats, in_script: &[String]) -> Commands {
        let mut c = Commands::default();
        for (name, &(calls, usec, failed)) in &self.commands {
            let (b_calls, b_usec, b_failed) =
                before.commands.get(name).copied().unwrap_or((0, 0, 0));
            let calls = calls - b_calls;
            c.failed += failed - b_failed;
            if name == "evalsha" {
                c.evalsha = calls;
                c.evalsha_usec = usec - b_usec;
            }
            if in_script.contains(name) {
                c.in_script += calls;
            } else if name != "info" && name != "config|get" {
                c.client += calls;
            }
        }
        c
    }
}

/// Commands Redis served during a run.
#[derive(Debug, Default)]
struct Commands {
    /// Commands from clients: each is one round trip.
    client: u64,
    evalsha: u64,
    evalsha_usec: u64,
    /// Commands the script called.
    in_script: u64,
    failed: u64,
}

impl Commands {
    /// Redis's own time per `EVALSHA` (the script included), in microseconds.
    fn usec_per_evalsha(&self) -> f64 {
        self.evalsha_usec as f64 / self.evalsha.max(1) as f64
    }
}

/// CPU clock ticks of `redis-server`, of this process and of the machine.
struct CpuTimes {
    redis: u64,
    own: u64,
    /// Of this process's children that were waited for (`redis-benchmark`).
    children: u64,
    busy: u64,
    total: u64,
}

impl CpuTimes {
    fn read(redis_pid: u32) -> Self {
        let (busy, total) = machine_ticks();
        let (own, children) = process_ticks("/proc/self/stat");
        CpuTimes {
            redis: process_ticks(&format!("/proc/{redis_pid}/stat")).0,
            own,
            children,
            busy,
            total,
        }
    }

    fn since(&self, before: &CpuTimes, elapsed: Duration) -> Cpu {
        let secs = |now: u64, then: u64| (now - then) as f64 / TICKS_PER_SEC;
        Cpu {
            redis: secs(self.redis, before.redis),
            own: secs(self.own, before.own),
            children: secs(self.children, before.children),
            busy: (self.busy - before.busy) as f64,
            total: (self.total - before.total).max(1) as f64,
            elapsed: elapsed.as_secs_f64(),
        }
    }
}

/// CPU use over a run: seconds of CPU of `redis-server`, of the bench and of
/// its waited-for children, and the machine's busy share of all cores.
struct Cpu {
    redis: f64,
    own: f64,
    children: f64,
    busy: f64,
    total: f64,
    elapsed: f64,
}

impl Cpu {
    /// `redis-server`'s CPU time over wall time (100% = one core).
    fn redis_pct(&self) -> f64 {
        100.0 * self.redis / self.elapsed
    }

    /// `redis-server`'s CPU time per one of `n` commands, in microseconds.
    fn redis_us_per(&self, n: u64) -> f64 {
        self.redis * 1e6 / n.max(1) as f64
    }

    /// The bench process's CPU time over wall time (100% = one core).
    fn own_pct(&self) -> f64 {
        100.0 * self.own / self.elapsed
    }

    /// Waited-for children's CPU time over wall time (100% = one core).
    fn children_pct(&self) -> f64 {
        100.0 * self.children / self.elapsed
    }

    /// Busy share of all cores of the machine (100% = every core).
    fn machine_pct(&self) -> f64 {
        100.0 * self.busy / self.total
    }
}

/// utime + stime of a process, and cutime + cstime (its waited-for
/// children's), from its `/proc/<pid>/stat`.
fn process_ticks(path: &str) -> (u64, u64) {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // "pid (comm) state ppid …": utime, stime, cutime and cstime are fields
    // 14 to 17, counted from 1.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(11) + field(12), field(13) + field(14))
}

/// Busy and total ticks of all cores from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    // idle and iowait.
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn redis_version(addr: SocketAddr) -> String {
    let info = command(addr, &["INFO", "server"]).unwrap_or_default();
    info.lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))
        .unwrap_or("?")
        .to_owned()
}

/// Whether `program --version` runs.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
