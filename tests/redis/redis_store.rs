//! The Redis store from the outside: gateway processes sharing one
//! `redis-server`, the commands Redis sees per decision, and what clients get
//! while Redis is paused, killed and restarted.
//!
//! Every test runs a real `redis-server` (see `tests/support/redis.rs`) and a real
//! HTTP client. The tests that need server processes run the
//! `tollgate-gateway` binary, built (or found up to date) by `cargo build`
//! the first time it is needed. The tests of this file and of
//! `redis_faults.rs` run one at a time (the crate's `SERIAL` lock), so that
//! timing assertions are not disturbed by each other.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};
use tollgate::{
    ApiKey, Date, FailureMode, Period, Policy, Quota, RateLimitLayer, RedisStore, Stage, Throttle,
    UsagePlan,
};

use crate::SERIAL;
use crate::support::redis::{RedisServer, command, require_redis};
use crate::support::server::ServerProcess;

/// The store's default timeout.
const STORE_TIMEOUT: Duration = Duration::from_millis(100);
/// What a loaded two-core machine may add to the store's timeout before a
/// request counts as hanging.
const SLACK: Duration = Duration::from_millis(400);
/// The longest any one HTTP request of these tests may take at all.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

const COMPLETION: &str = r#"{"model":"m","prompt":"hi","max_tokens":1}"#;
const SERVICE_UNAVAILABLE: &str = r#"{"message":"Service Unavailable"}"#;
const TOO_MANY_REQUESTS: &str = r#"{"message":"Too Many Requests"}"#;
const LIMIT_EXCEEDED: &str = r#"{"message":"Limit Exceeded"}"#;

// ---------------------------------------------------------------------------
// The gateway as a child process
// ---------------------------------------------------------------------------

/// Starts the gateway on the Redis store at `redis_url` with the
/// config file `config` (see `tests/support/server.rs`).
fn start_server(redis_url: &str, config: &Path) -> ServerProcess {
    let config = config.to_str().expect("a UTF-8 config path");
    ServerProcess::start(&["--redis", redis_url, "--config", config])
}

/// Writes a config file into the Redis server's own scratch directory
/// (removed with the server).
fn write_config(redis: &RedisServer, name: &str, toml: &str) -> PathBuf {
    let path = redis.dir().join(name);
    std::fs::write(&path, toml).expect("write the config file");
    path
}

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("an HTTP client")
}

/// What a test needs of one response.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    /// The `RateLimit` header, if any.
    ratelimit: Option<String>,
    /// The `RateLimit-Policy` header, if any.
    policy: Option<String>,
    retry_after: Option<u64>,
    body: String,
    /// How long the request took, from send to the whole body.
    took: Duration,
}

impl Answer {
    fn limited(&self) -> bool {
        self.ratelimit.is_some()
    }
}

async fn complete(client: &reqwest::Client, url: &str, key: &str) -> Answer {
    let start = Instant::now();
    let res = client
        .post(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(COMPLETION)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = res.status().as_u16();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().expect("an ASCII header").to_owned())
    };
    let ratelimit = header("ratelimit");
    let policy = header("ratelimit-policy");
    let retry_after = header("retry-after").map(|v| v.parse().expect("whole seconds"));
    let body = res
        .text()
        .await
        .unwrap_or_else(|e| panic!("body of POST {url}: {e}"));
    Answer {
        status,
        ratelimit,
        policy,
        retry_after,
        body,
        took: start.elapsed(),
    }
}

/// Sends an admin request; returns the status and the JSON body.
async fn admin(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client
        .request(method, url)
        .header("x-admin-key", "admin-secret");
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let res = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Today, UTC.
fn today() -> Date {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    Date::from_days((secs / 86_400) as i64)
}

/// Calls per command from `INFO commandstats` (`cmdstat_<name>:calls=N,…`).
fn command_calls(addr: SocketAddr) -> HashMap<String, u64> {
    let info = command(addr, &["INFO", "commandstats"]).expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// How many more calls each command had in `after` than in `before`; only
/// commands that grew.
fn grown(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> HashMap<String, u64> {
    after
        .iter()
        .filter_map(|(name, &n)| {
            let d = n - before.get(name).copied().unwrap_or(0);
            (d > 0).then(|| (name.clone(), d))
        })
        .collect()
}

/// The marker that ends a [`Monitor`] recording.
const MONITOR_END: &str = "tollgate-monitor-end";

/// Records, through `MONITOR`, the commands clients send to a Redis server
/// (the commands a script runs are shown as coming from `lua`, and
/// `INFO commandstats` counts them too, so only `MONITOR` tells round trips
/// apart from a script's own calls).
struct Monitor {
    addr: SocketAddr,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Monitor {
    fn start(addr: SocketAddr) -> Monitor {
        let stream = std::net::TcpStream::connect(addr).expect("connect for MONITOR");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        (&stream)
            .write_all(b"*1\r\n$7\r\nMONITOR\r\n")
            .expect("send MONITOR");
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).expect("MONITOR's reply");
        assert_eq!(ok.trim_end(), "+OK");
        let thread = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in reader.lines() {
                let line = line.expect("a MONITOR line (is the end marker lost?)");
                if line.contains(MONITOR_END) {
                    break;
                }
                lines.push(line);
            }
            lines
        });
        Monitor { addr, thread }
    }

    /// Stops recording; returns, in order, the name (lower case) of each
    /// command a client sent, scripts' own calls left out.
    fn stop(self) -> Vec<String> {
        command(self.addr, &["ECHO", MONITOR_END]).expect("the end marker");
        let lines = self.thread.join().expect("the MONITOR reader");
        lines
            .iter()
            .filter_map(|line| {
                // +1700000000.123456 [0 127.0.0.1:54321] "evalsha" "…" …
                let (source, rest) = line.split_once(" [")?.1.split_once("] ")?;
                if source.ends_with(" lua") {
                    return None;
                }
                let name = rest.strip_prefix('"')?.split('"').next()?;
                Some(name.to_ascii_lowercase())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// 1. Two instances, one budget
// ---------------------------------------------------------------------------

const SHARED_CONFIG: &str = r#"
[[plans]]
name = "slow"
borrow = false
throttle = { rate = 0.01, burst = 10 }

[[plans]]
name = "daily"
borrow = false
throttle = { rate = 1000.0, burst = 1000 }
quota = { limit = 15, period = "DAY" }

[[keys]]
id = "slow-1"
value = "slow-key-1"
plan = "slow"

[[keys]]
id = "slow-2"
value = "slow-key-2"
plan = "slow"

[[keys]]
id = "daily-1"
value = "daily-key-1"
plan = "daily"
"#;

/// Two gateways on one Redis admit, together, what one alone
/// would: a throttle's burst exactly (sequentially and concurrently), and
/// never more than a quota's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_budget() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let config = write_config(&redis, "redis_shared.toml", SHARED_CONFIG);
    let mut a = start_server(&redis.url(), &config);
    let mut b = start_server(&redis.url(), &config);
    let urls = [a.url("/v1/completions"), b.url("/v1/completions")];
    let http = client();

    // Alternately, one at a time: the first 10 pass, whichever instance
    // they reach, and the remaining count goes down across both.
    let mut statuses = Vec::new();
    for i in 0..30 {
        let ans = complete(&http, &urls[i % 2], "slow-key-1").await;
        if ans.status == 200 {
            let rl = ans.ratelimit.as_deref().expect("a RateLimit header");
            let remaining = 9 - i as i64;
            assert!(
                rl.starts_with(&format!("\"throttle\";r={remaining};")),
                "request {i}: {rl}"
            );
        } else {
            assert_eq!(ans.status, 429, "request {i}: {ans:?}");
            assert_eq!(ans.body, TOO_MANY_REQUESTS);
            assert!(ans.retry_after.is_some_and(|s| s > 0), "{ans:?}");
        }
        statuses.push(ans.status);
    }
    let expected: Vec<u16> = (0..30).map(|i| if i < 10 { 200 } else { 429 }).collect();
    assert_eq!(statuses, expected, "slow-1 across two instances");

    // All at once, half to each instance: still exactly one burst.
    let burst = |key: &'static str, n: usize| {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let http = http.clone();
                let url = urls[i % 2].clone();
                tokio::spawn(async move { complete(&http, &url, key).await })
            })
            .collect();
        async move {
            let mut answers = Vec::new();
            for t in tasks {
                answers.push(t.await.expect("a request task"));
            }
            answers
        }
    };
    let answers = burst("slow-key-2", 40).await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(admitted, 10, "slow-2, concurrently: {answers:?}");
    assert!(answers.iter().all(|a| a.status == 200 || a.status == 429));

    // A DAY quota of 15 under a wide throttle: never more than 15 in all.
    let day = today();
    let answers = burst("daily-key-1", 40).await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    if today() == day {
        assert_eq!(admitted, 15, "daily-1, concurrently: {answers:?}");
    }
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.status, 429, "{a:?}");
        assert_eq!(a.body, LIMIT_EXCEEDED);
    }
    for (i, url) in urls.iter().enumerate() {
        let ans = complete(&http, url, "daily-key-1").await;
        assert_eq!(ans.status, 429, "instance {i} after the quota: {ans:?}");
    }

    a.assert_running();
    b.assert_running();
}

// ---------------------------------------------------------------------------
// 2. One round trip per decision
// ---------------------------------------------------------------------------

/// Serves `/v1/completions` behind a layer on `store` on a loopback port;
/// returns the route's URL.
async fn serve_in_process(policy: Policy, store: RedisStore) -> String {
    let layer = RateLimitLayer::builder(policy).store(store).build();
    let app = Router::new()
        .route("/v1/completions", post(|| async { "ok" }))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("the bound address");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    format!("http://{addr}/v1/completions")
}

/// Every allowed request is one `EVALSHA`, whatever the number of limits
/// (stage, plan, method override and quota); the script is loaded once; a
/// key Redis has denied is answered without asking Redis again, for at most
/// the over-limit cache's time (1 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_decision_and_none_for_a_denied_key() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let never = |burst| Throttle::new(0.01, burst).expect("a valid throttle");
    let policy = Policy::builder()
        // A stage that refills within 10 s: a used-up DAY quota outlasts any
        // wait it could ask, so the quota's denial may be answered locally.
        .stage(Stage::new().throttle(Throttle::new(1_000.0, 10_000).expect("a valid throttle")))
        .plan(
            UsagePlan::new("wide")
                .throttle(never(1_000))
                .method("/v1/completions/POST", never(1_000))
                .quota(Quota::new(100_000, Period::Day).expect("a valid quota")),
        )
        .plan(
            UsagePlan::new("tight")
                .throttle(never(1_000))
                .quota(Quota::new(2, Period::Day).expect("a valid quota")),
        )
        .plan(UsagePlan::new("throttled").throttle(never(2)))
        .key(ApiKey::new("wide-1", "wide-key", "wide"))
        .key(ApiKey::new("tight-1", "tight-key", "tight"))
        .key(ApiKey::new("throttled-1", "throttled-key", "throttled"))
        .build()
        .expect("a valid policy");
    // Keys per process: the commands Redis sees are the decisions' alone.
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .build()
        .await
        .expect("a Redis store");
    assert_eq!(store.timeout(), STORE_TIMEOUT);
    let url = serve_in_process(policy, store).await;
    let http = client();

    let fresh = command_calls(redis.addr());
    // The first decision connects and loads the script.
    let monitor = Monitor::start(redis.addr());
    let first = complete(&http, &url, "wide-key").await;
    let sent = monitor.stop();
    let count = |name: &str| sent.iter().filter(|c| *c == name).count();
    assert_eq!(count("evalsha"), 1, "the first decision: {sent:?}");
    assert!(count("eval") <= 1, "the first decision: {sent:?}");
    assert!(
        sent.iter().all(|c| {
            ["evalsha", "eval", "client", "hello", "select", "ping"].contains(&c.as_str())
        }),
        "the first decision sent more than the script and connection setup: {sent:?}"
    );
    assert_eq!(first.status, 200, "{first:?}");
    let policy_header = first.policy.as_deref().expect("a RateLimit-Policy header");
    for name in ["stage", "throttle", "method", "quota"] {
        assert!(
            policy_header.contains(&format!("\"{name}\"")),
            "{name} in {policy_header}"
        );
    }

    const N: u64 = 50;
    let before = command_calls(redis.addr());
    let monitor = Monitor::start(redis.addr());
    for i in 0..N {
        let ans = complete(&http, &url, "wide-key").await;
        assert_eq!(ans.status, 200, "request {i}: {ans:?}");
        assert!(ans.limited(), "request {i} was decided: {ans:?}");
    }
    let sent = monitor.stop();
    let after = command_calls(redis.addr());
    let d = grown(&before, &after);
    assert_eq!(d.get("evalsha"), Some(&N), "EVALSHA calls for {N} requests");
    assert_eq!(d.get("eval"), None, "the script was loaded again: {d:?}");
    assert_eq!(
        sent.len() as u64,
        N,
        "commands sent for {N} decisions (4 limits each): {sent:?}"
    );
    assert!(sent.iter().all(|c| c == "evalsha"), "{sent:?}");
    let total = grown(&fresh, &after);
    assert!(
        total.get("eval").copied().unwrap_or(0) <= 1,
        "the script was loaded more than once: {total:?}"
    );

    // A key whose quota is used up: 2 pass, the third is denied by Redis;
    // from then on the instance answers it alone, exactly as Redis would
    // (nothing can pass the quota before its window ends).
    for i in 0..2 {
        let ans = complete(&http, &url, "tight-key").await;
        assert_eq!(ans.status, 200, "tight request {i}: {ans:?}");
    }
    let denied = complete(&http, &url, "tight-key").await;
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.body, LIMIT_EXCEEDED);
    let retry = denied.retry_after.expect("a Retry-After header");
    assert!((1..=86_400).contains(&retry), "{denied:?}");
    let denied_at = Instant::now();

    const M: usize = 20;
    let monitor = Monitor::start(redis.addr());
    for i in 0..M {
        let ans = complete(&http, &url, "tight-key").await;
        assert_eq!(ans.status, 429, "cached denial {i}: {ans:?}");
        assert_eq!(ans.body, LIMIT_EXCEEDED);
        assert!(
            ans.retry_after.is_some_and(|s| s > 0 && s <= retry),
            "cached denial {i}: {ans:?}"
        );
    }
    let cached_for = denied_at.elapsed();
    let sent = monitor.stop();
    assert!(
        cached_for < Duration::from_millis(900),
        "the {M} requests took {cached_for:?}: too slow to tell the cache from Redis"
    );
    assert_eq!(
        sent,
        Vec::<String>::new(),
        "a denied key reached Redis within its retry time"
    );

    // A throttled key is asked of Redis each time: its wait grows whenever
    // a cheaper request passes in between, which only Redis knows.
    for i in 0..2 {
        let ans = complete(&http, &url, "throttled-key").await;
        assert_eq!(ans.status, 200, "throttled request {i}: {ans:?}");
    }
    let before = command_calls(redis.addr());
    for i in 0..3 {
        let ans = complete(&http, &url, "throttled-key").await;
        assert_eq!(ans.status, 429, "throttled denial {i}: {ans:?}");
        assert_eq!(ans.body, TOO_MANY_REQUESTS);
    }
    let d = grown(&before, &command_calls(redis.addr()));
    assert_eq!(d.get("evalsha"), Some(&3), "throttle denials: {d:?}");

    // The cache answers for at most a second: then Redis is asked again,
    // and still denies.
    tokio::time::sleep(Duration::from_millis(1_100).saturating_sub(denied_at.elapsed())).await;
    let before = command_calls(redis.addr());
    let ans = complete(&http, &url, "tight-key").await;
    assert_eq!(ans.status, 429, "{ans:?}");
    let d = grown(&before, &command_calls(redis.addr()));
    assert_eq!(d.get("evalsha"), Some(&1), "after the cache's time: {d:?}");
}

// ---------------------------------------------------------------------------
// 3. Faults
// ---------------------------------------------------------------------------

const FAULTS_CONFIG: &str = r#"
[[plans]]
name = "lenient"
borrow = false
throttle = { rate = 10000.0, burst = 10000 }
quota = { limit = 1000000, period = "DAY" }
failure = "open"

[[plans]]
name = "strict"
borrow = false
throttle = { rate = 10000.0, burst = 10000 }
failure = "closed"

[[plans]]
name = "tight"
borrow = false
throttle = { rate = 0.01, burst = 5 }
failure = "closed"

[[keys]]
id = "open-1"
value = "open-key"
plan = "lenient"

[[keys]]
id = "closed-1"
value = "closed-key"
plan = "strict"

[[keys]]
id = "tight-1"
value = "tight-key-1"
plan = "tight"

[[keys]]
id = "tight-2"
value = "tight-key-2"
plan = "tight"

[admin]
key = "admin-secret"
"#;

/// One request of the load sent during the fault test.
#[derive(Debug)]
struct Sample {
    open: bool,
    start: Instant,
    end: Instant,
    answer: Answer,
}

/// Sends requests for `key` in a loop until `stop`, a few milliseconds apart.
fn load(
    http: reqwest::Client,
    url: String,
    key: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            let answer = complete(&http, &url, key).await;
            samples.push(Sample {
                open: key == "open-key",
                start,
                end: Instant::now(),
                answer,
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples
    })
}

/// Polls until a request for `key` is decided by Redis again (it carries a
/// `RateLimit` header); returns how long that took.
async fn wait_for_decisions(http: &reqwest::Client, url: &str, key: &str) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(10);
    loop {
        let ans = complete(http, url, key).await;
        assert!(
            ans.took < STORE_TIMEOUT + SLACK,
            "a request while waiting for Redis took {:?}",
            ans.took
        );
        if ans.status == 200 && ans.limited() {
            return start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "decisions did not resume within 10 s; last answer {ans:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The admin usage report of `open-1` today: its status, and how long it took.
async fn usage_report(http: &reqwest::Client, server: &ServerProcess) -> (u16, Value, Duration) {
    let day = today();
    let url = server.url(&format!(
        "/admin/usage?plan=lenient&start={day}&end={day}&key=open-1"
    ));
    let start = Instant::now();
    let (status, body) = admin(http, reqwest::Method::GET, &url, None).await;
    (status, body, start.elapsed())
}

/// While Redis cannot answer, the admin routes say so at once: 503.
async fn assert_usage_unavailable(http: &reqwest::Client, server: &ServerProcess, what: &str) {
    let (status, body, took) = usage_report(http, server).await;
    assert_eq!(status, 503, "usage report, Redis {what}: {body}");
    assert!(
        took < STORE_TIMEOUT + SLACK,
        "usage report, Redis {what}: took {took:?}"
    );
}

/// A burst of `key` is cut at the plan's burst of 5.
async fn assert_burst_cut(http: &reqwest::Client, url: &str, key: &str) {
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let ans = complete(http, url, key).await;
        assert!(
            ans.status != 429 || ans.body == TOO_MANY_REQUESTS,
            "{ans:?}"
        );
        statuses.push(ans.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "a burst of {key}"
    );
}

/// Checks the samples that lie wholly within `[from, to]`, while Redis could
/// not answer: open-plan requests pass without rate-limit headers,
/// closed-plan requests get 503 with its JSON body; there are a few of each.
fn assert_failure_modes(samples: &[Sample], from: Instant, to: Instant, what: &str) {
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= from && s.end <= to)
        .collect();
    let (open, closed): (Vec<&Sample>, Vec<&Sample>) = during.iter().partition(|s| s.open);
    assert!(
        open.len() >= 3 && closed.len() >= 3,
        "too few requests while Redis was {what}: {} open, {} closed",
        open.len(),
        closed.len()
    );
    for s in open {
        assert_eq!(s.answer.status, 200, "open plan, Redis {what}: {s:?}");
        assert!(
            !s.answer.limited(),
            "open plan, Redis {what}: rate-limit headers without a decision: {s:?}"
        );
    }
    for s in closed {
        assert_eq!(s.answer.status, 503, "closed plan, Redis {what}: {s:?}");
        assert_eq!(s.answer.body, SERVICE_UNAVAILABLE, "{s:?}");
        assert!(!s.answer.limited(), "{s:?}");
    }
}

/// Redis paused (SIGSTOP), then killed and restarted: every request is
/// answered within the store's timeout plus slack, as each plan's failure
/// mode says; decisions resume when Redis does; the server never crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_kill_and_restart_are_answered_by_the_failure_mode() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let config = write_config(&redis, "redis_faults.toml", FAULTS_CONFIG);
    let mut server = start_server(&redis.url(), &config);
    let url = server.url("/v1/completions");
    let http = client();

    // Connected and deciding before the load starts.
    wait_for_decisions(&http, &url, "open-key").await;

    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = ["open-key", "open-key", "closed-key", "closed-key"]
        .into_iter()
        .map(|key| load(http.clone(), url.clone(), key, Arc::clone(&stop)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Paused: the connection stays open, commands get no reply.
    let pausing = Instant::now();
    tokio::task::block_in_place(|| redis.pause());
    let paused = Instant::now();
    assert_usage_unavailable(&http, &server, "paused").await;
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(paused.elapsed())).await;
    let resuming = Instant::now();
    tokio::task::block_in_place(|| redis.resume());
    let after_pause = wait_for_decisions(&http, &url, "open-key").await;
    let resumed = Instant::now();
    assert_burst_cut(&http, &url, "tight-key-1").await;

    // Killed: connections are refused.
    let killing = Instant::now();
    tokio::task::block_in_place(|| redis.kill());
    let killed = Instant::now();
    assert_usage_unavailable(&http, &server, "down").await;
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(killed.elapsed())).await;
    let restarting = Instant::now();
    // The new server has neither the data nor the script.
    tokio::task::block_in_place(|| redis.restart());
    let after_restart = wait_for_decisions(&http, &url, "open-key").await;
    wait_for_decisions(&http, &url, "closed-key").await;
    let restarted = Instant::now();
    assert_burst_cut(&http, &url, "tight-key-2").await;
    let (status, body, _) = usage_report(&http, &server).await;
    assert_eq!(status, 200, "usage report after the restart: {body}");
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for l in loaders {
        samples.extend(l.await.expect("a load task"));
    }

    // Nothing hangs: every request is answered within the timeout + slack.
    let slowest = samples
        .iter()
        .max_by_key(|s| s.answer.took)
        .expect("some requests");
    assert!(
        slowest.answer.took < STORE_TIMEOUT + SLACK,
        "a request took {:?} ({} requests in all): {slowest:?}",
        slowest.answer.took,
        samples.len()
    );
    // Before the fault, and once Redis is back, every request is decided.
    let decided = |s: &&Sample| {
        s.end <= pausing || (s.start >= resumed && s.end <= killing) || s.start >= restarted
    };
    for s in samples.iter().filter(decided) {
        assert_eq!(s.answer.status, 200, "Redis up: {s:?}");
        assert!(s.answer.limited(), "Redis up, no RateLimit header: {s:?}");
    }
    assert_failure_modes(&samples, paused, resuming, "paused");
    assert_failure_modes(&samples, killed, restarting, "down");

    server.assert_running();
    let health = http
        .get(server.url("/health"))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(health.status(), 200);
    drop(http);
    server.signal("INT");
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "the server's exit status: {status}\n{}",
        server.stderr()
    );
    eprintln!(
        "faults: {} requests; decisions resumed {after_pause:?} after SIGCONT, \
         {after_restart:?} after the restart; slowest request {:?}",
        samples.len(),
        slowest.answer.took
    );
}

/// A request refused with 503 because Redis did not answer in time must not
/// use up the key's budget when Redis later runs the command it was sent: an
/// `EVALSHA` that timed out stays in the connection, and Redis runs it when
/// it resumes; the call's deadline makes it decide nothing then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_for_a_timeout_is_not_charged_later() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("tight")
                .throttle(Throttle::new(0.01, 10).expect("a valid throttle"))
                .failure(FailureMode::Closed)
                .borrow(false),
        )
        .key(ApiKey::new("t-1", "tight-key", "tight"))
        .build()
        .expect("a valid policy");
    // Keys per process: the commands Redis sees are the decisions' alone.
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .build()
        .await
        .expect("a Redis store");
    let url = serve_in_process(policy, store).await;
    let http = client();
    assert_eq!(complete(&http, &url, "tight-key").await.status, 200);

    tokio::task::block_in_place(|| redis.pause());
    for i in 0..5 {
        let ans = complete(&http, &url, "tight-key").await;
        assert_eq!(ans.status, 503, "request {i} while paused: {ans:?}");
    }
    tokio::task::block_in_place(|| redis.resume());
    wait_until_idle(&redis);

    let mut admitted = 0;
    for _ in 0..12 {
        if complete(&http, &url, "tight-key").await.status == 200 {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 9,
        "of a burst of 10, one was used before the pause; the five 503s must cost nothing"
    );
}

/// Waits until Redis has run what was queued while it was paused (its
/// replies to the store's connection are written).
fn wait_until_idle(redis: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while command(redis.addr(), &["PING"]).as_deref() != Ok("PONG") {
        assert!(
            Instant::now() < deadline,
            "Redis did not answer after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
}

// ---------------------------------------------------------------------------
// 4. Admin routes over Redis; a restarted instance loses nothing
// ---------------------------------------------------------------------------

const ADMIN_CONFIG: &str = r#"
[[plans]]
name = "metered"
borrow = false
throttle = { rate = 1000.0, burst = 1000 }
quota = { limit = 100, period = "DAY" }

[[keys]]
id = "m-1"
value = "metered-secret-value"
plan = "metered"

[admin]
key = "admin-secret"
"#;

/// Usage read and set through the admin routes lives in Redis: another
/// instance reports and enforces it, and so does a new process after the
/// first one is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_lives_in_redis_and_survives_a_restarted_instance() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let config = write_config(&redis, "redis_admin.toml", ADMIN_CONFIG);
    let mut a = start_server(&redis.url(), &config);
    let mut b = start_server(&redis.url(), &config);
    let http = client();
    let day = today();
    let usage_path = format!("/admin/usage?plan=metered&start={day}&end={day}&key=m-1");
    let usage = |server: &ServerProcess| {
        let url = server.url(&usage_path);
        let http = http.clone();
        async move {
            let (status, v) = admin(&http, reqwest::Method::GET, &url, None).await;
            assert_eq!(status, 200, "{v}");
            v["items"]["m-1"].clone()
        }
    };

    for i in 0..7 {
        let ans = complete(&http, &a.url("/v1/completions"), "metered-secret-value").await;
        assert_eq!(ans.status, 200, "request {i} through A: {ans:?}");
    }
    assert_eq!(usage(&a).await, json!([[7, 93]]), "through A");
    assert_eq!(usage(&b).await, json!([[7, 93]]), "through B");
    for i in 0..3 {
        let ans = complete(&http, &b.url("/v1/completions"), "metered-secret-value").await;
        assert_eq!(ans.status, 200, "request {i} through B: {ans:?}");
    }
    assert_eq!(usage(&a).await, json!([[10, 90]]), "through A");

    // UpdateUsage through B; A enforces it.
    let (status, v) = admin(
        &http,
        reqwest::Method::PATCH,
        &b.url("/admin/keys/m-1/usage"),
        Some(json!({"remaining": 2})),
    )
    .await;
    assert_eq!((status, v), (200, json!({"id": "m-1", "remaining": 2})));
    assert_eq!(usage(&a).await[0][1], json!(2), "remaining through A");
    let statuses: Vec<u16> = {
        let mut s = Vec::new();
        for _ in 0..3 {
            s.push(
                complete(&http, &a.url("/v1/completions"), "metered-secret-value")
                    .await
                    .status,
            );
        }
        s
    };
    assert_eq!(statuses, [200, 200, 429], "through A after UpdateUsage");

    // A crashes; a new process on the same Redis sees the exhausted quota.
    a.assert_running();
    drop(a);
    let c = start_server(&redis.url(), &config);
    assert_eq!(usage(&c).await, json!([[12, 0]]), "through a new process");
    let ans = complete(&http, &c.url("/v1/completions"), "metered-secret-value").await;
    assert_eq!(ans.status, 429, "{ans:?}");
    assert_eq!(ans.body, LIMIT_EXCEEDED);

    // C remembers that denial; a quota raised through B is seen by C within
    // the over-limit cache's time (1 s), not at the end of the window.
    let raised = Instant::now();
    let (status, v) = admin(
        &http,
        reqwest::Method::PATCH,
        &b.url("/admin/keys/m-1/usage"),
        Some(json!({"remaining": 3})),
    )
    .await;
    assert_eq!((status, v), (200, json!({"id": "m-1", "remaining": 3})));
    loop {
        let ans = complete(&http, &c.url("/v1/completions"), "metered-secret-value").await;
        if ans.status == 200 {
            break;
        }
        assert_eq!(ans.body, LIMIT_EXCEEDED, "{ans:?}");
        assert!(
            raised.elapsed() < Duration::from_millis(1_500),
            "C still denies {:?} after the quota was raised through B",
            raised.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(usage(&b).await, json!([[13, 2]]), "through B");

    // No Redis key names the API key's value or its id.
    let keys = command(redis.addr(), &["KEYS", "*"]).expect("KEYS *");
    assert!(!keys.is_empty(), "no keys in Redis");
    for k in keys.lines() {
        assert!(k.starts_with("tollgate:"), "{k}");
        assert!(
            !k.contains("metered-secret-value") && !k.contains("m-1"),
            "{k}"
        );
    }
    b.assert_running();
}
