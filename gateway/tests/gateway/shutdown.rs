//! Graceful shutdown of the gateway, from the outside: the
//! `tollgate-gateway` binary as a child process, a stream under way,
//! then SIGTERM (or SIGINT, as Ctrl-C). The stream must finish with every
//! token, new connections must be refused at once, the process must exit 0,
//! and with the Redis store the stream's tokens must be settled in Redis
//! (and its place under the concurrency cap given back) before it exits.
//!
//! The Redis test runs a real `redis-server` (see `tests/support/redis.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::process::ServerProcess;
use crate::support::redis::{RedisServer, command, require_redis};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client")
}

/// Tokens the streamed completion generates, and the pause between them.
const TOKENS: u64 = 30;
const TOKEN_MS: u64 = 50;

/// A streamed completion of `TOKENS` tokens, `TOKEN_MS` apart, of a prompt of
/// one token that asks for (and reserves) 100: its estimate is 101 tokens,
/// what it uses 31, so its settlement gives back 70.
fn stream_body() -> String {
    serde_json::json!({
        "model": "m",
        "prompt": "hi",
        "max_tokens": 100,
        "mock_completion_tokens": TOKENS,
        "mock_token_ms": TOKEN_MS,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// What the stream is settled at: one prompt token and every completion token.
const STREAMED: u64 = 1 + TOKENS;

/// Opens the stream and reads its first chunk: the request is admitted and
/// its response under way.
async fn open_stream(server: &ServerProcess, key: &str) -> (reqwest::Response, String) {
    let mut res = client()
        .post(server.url("/v1/completions"))
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(stream_body())
        .send()
        .await
        .expect("open the stream");
    assert_eq!(res.status(), 200, "{}", server.stderr());
    let first = res
        .chunk()
        .await
        .expect("a first chunk")
        .expect("not the end");
    (res, String::from_utf8_lossy(&first).into_owned())
}

/// Reads the rest of the stream and checks it is whole: one event per token,
/// one with the `finish_reason`, one with the usage, then `[DONE]`.
async fn finish_stream(res: reqwest::Response, text: String) {
    finish_stream_then(res, text, || {}).await;
}

/// [`finish_stream`], calling `near_end` once the event before the last
/// token's has arrived (the stream then ends `TOKEN_MS` later).
async fn finish_stream_then(mut res: reqwest::Response, mut text: String, near_end: impl FnOnce()) {
    let mut near_end = Some(near_end);
    while let Some(chunk) = res.chunk().await.expect("the stream continues to its end") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.matches("data: ").count() as u64 >= TOKENS - 1 {
            if let Some(f) = near_end.take() {
                f();
            }
        }
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert_eq!(events.len() as u64, TOKENS + 3, "{text}");
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let finish: Value = serde_json::from_str(events[events.len() - 3]).expect("a JSON event");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop", "{finish}");
    let last: Value = serde_json::from_str(events[events.len() - 2]).expect("a JSON event");
    assert_eq!(last["usage"]["completion_tokens"], TOKENS, "{last}");
    assert_eq!(last["usage"]["total_tokens"], STREAMED, "{last}");
}

/// One key whose plan has a token budget and a cap of one request in flight.
const CONFIG: &str = r#"
[[plans]]
name = "llm"
throttle = { rate = 100.0, burst = 100 }
quota = { limit = 1000, period = "DAY" }
tokens = { per_day = 100000 }
concurrency = 1

[[keys]]
id = "llm-1"
value = "llm-key"
plan = "llm"

[admin]
key = "admin-secret"
"#;

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("shutdown.toml");
    std::fs::write(&path, CONFIG).expect("write the config file");
    path
}

/// SIGTERM or SIGINT in the middle of a stream, with the in-memory store.
async fn drains_on(signal: &str) {
    let dir =
        std::env::temp_dir().join(format!("tollgate-shutdown-{}-{signal}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir);
    let mut server = ServerProcess::start(&["--config", config.to_str().unwrap()]);
    let (stream, first) = open_stream(&server, "llm-key").await;

    let signalled = Instant::now();
    server.signal(signal);
    // The listening socket closes at once ...
    let refused = server.wait_refused(Duration::from_secs(2));
    // ... while the stream, far from its end, keeps the process alive.
    assert!(
        refused.duration_since(signalled) < Duration::from_millis(TOKENS * TOKEN_MS / 2),
        "refused only {:?} after SIG{signal}",
        refused.duration_since(signalled)
    );
    assert!(
        server.running(),
        "the process exited with a stream in flight\n{}",
        server.stderr()
    );
    finish_stream(stream, first).await;

    let status = server.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "exit status after SIG{signal}: {status}\n{}",
        server.stderr()
    );
    assert!(
        server.stderr().contains("shutting down"),
        "{}",
        server.stderr()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_stream_finish_refuses_new_connections_and_exits_0() {
    drains_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_does_the_same() {
    drains_on("INT").await;
}

/// A stream that outlasts `--drain` is cut off when the deadline passes:
/// the process exits at the deadline, not at the stream's end, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_the_drain_deadline_is_cut_off() {
    let dir = std::env::temp_dir().join(format!("tollgate-shutdown-{}-drain", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir);
    let mut server =
        ServerProcess::start(&["--config", config.to_str().unwrap(), "--drain", "0.3"]);
    let (mut stream, _) = open_stream(&server, "llm-key").await;
    let signalled = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(5));
    let took = signalled.elapsed();
    // The stream needs 1.5 s to end; the deadline is 0.3 s.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(TOKENS * TOKEN_MS),
        "exited {took:?} after SIGTERM\n{}",
        server.stderr()
    );
    assert!(!status.success(), "{status}");
    assert!(server.stderr().contains("cut off"), "{}", server.stderr());
    // The client sees its stream end before its last token.
    let mut rest = String::new();
    while let Ok(Some(chunk)) = stream.chunk().await {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!rest.contains("[DONE]"), "{rest}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A second SIGTERM or SIGINT during the drain cuts it short, as the
/// `--drain` deadline would: an operator who presses Ctrl-C again does not
/// have to wait for the last stream (or send SIGKILL, which settles
/// nothing). Before, the second signal was ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_the_drain_short() {
    for (first, second) in [("TERM", "TERM"), ("INT", "INT"), ("TERM", "INT")] {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-shutdown-{}-second-{first}-{second}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = write_config(&dir);
        let mut server =
            ServerProcess::start(&["--config", config.to_str().unwrap(), "--drain", "30"]);
        let (mut stream, _) = open_stream(&server, "llm-key").await;
        server.signal(first);
        server.wait_refused(Duration::from_secs(2));
        assert!(server.running(), "{}", server.stderr());
        let signalled = Instant::now();
        server.signal(second);
        let status = server.wait_exit(Duration::from_secs(5));
        let took = signalled.elapsed();
        // The stream needs 1.5 s to end.
        assert!(
            took < Duration::from_millis(TOKENS * TOKEN_MS / 2),
            "SIG{first} then SIG{second}: exited {took:?} after the second\n{}",
            server.stderr()
        );
        assert!(!status.success(), "{status}");
        assert!(server.stderr().contains("cut off"), "{}", server.stderr());
        let mut rest = String::new();
        while let Ok(Some(chunk)) = stream.chunk().await {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(!rest.contains("[DONE]"), "{rest}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The `n` of the quota hash named `*:q:<name>`: what the window counted.
fn window_count(redis: &RedisServer, name: &str) -> u64 {
    let keys = command(redis.addr(), &["KEYS", &format!("tollgate:*:q:{name}")]).expect("KEYS");
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(keys.len(), 1, "one {name} window: {keys:?}");
    command(redis.addr(), &["HGET", keys[0], "n"])
        .expect("HGET")
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_the_stream_is_settled_and_its_place_given_back_before_exit() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let config = write_config(redis.dir());
    let config = config.to_str().unwrap();
    // A store timeout well above the pause below, so that a loaded machine
    // does not time the settlement out (which leaves the estimate charged).
    let mut a = ServerProcess::start(&[
        "--redis",
        &redis.url(),
        "--redis-timeout",
        "1000",
        "--config",
        config,
    ]);
    let (stream, first) = open_stream(&a, "llm-key").await;
    // Admitted: its whole estimate is reserved while it runs.
    assert_eq!(window_count(&redis, "tokens-day"), 101);

    a.signal("TERM");
    a.wait_refused(Duration::from_secs(2));
    // Redis holds writes for 60 ms from one token before the end: the
    // settlement, sent when the stream ends 50 ms later, waits for Redis
    // (well within the store's timeout of 1 s). A process that exited
    // without waiting for it would lose it every time, not just when the
    // race goes badly.
    let addr = redis.addr();
    finish_stream_then(stream, first, || {
        command(addr, &["CLIENT", "PAUSE", "60", "WRITE"]).expect("CLIENT PAUSE");
    })
    .await;
    let status = a.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status: {status}\n{}", a.stderr());

    // The settlement reached Redis before the process exited: the day's
    // token count is what was streamed, not the estimate.
    assert_eq!(
        window_count(&redis, "tokens-day"),
        STREAMED,
        "{}",
        a.stderr()
    );
    // And the place under the cap of one was given back: another instance
    // admits the key at once (a lost release would hold it for 5 minutes).
    let b = ServerProcess::start(&["--redis", &redis.url(), "--config", config]);
    let res = client()
        .post(b.url("/v1/completions"))
        .header("x-api-key", "llm-key")
        .header("content-type", "application/json")
        .body(r#"{"model":"m","prompt":"hi","max_tokens":1}"#)
        .send()
        .await
        .expect("a completion through B");
    let status = res.status();
    let body = res.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    // The request quota counted both requests; B reports it from Redis.
    // (Around midnight UTC they may fall on two days: the range spans both.)
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    let today = tollgate::Date::from_days((secs / 86_400) as i64);
    let yesterday = tollgate::Date::from_days(today.days() - 1);
    let usage = client()
        .get(b.url(&format!(
            "/admin/usage?plan=llm&start={yesterday}&end={today}&key=llm-1"
        )))
        .header("x-admin-key", "admin-secret")
        .send()
        .await
        .expect("usage through B");
    assert_eq!(usage.status(), 200);
    let usage: Value = usage.json().await.unwrap();
    let days = usage["items"]["llm-1"].as_array().expect("days").clone();
    let used: i64 = days.iter().map(|d| d[0].as_i64().unwrap()).sum();
    assert_eq!(used, 2, "{usage}");
    assert_eq!(window_count(&redis, "tokens-day"), STREAMED + 2);
}

/// A stream cut off at the `--drain` deadline, with the Redis store, is
/// settled at what it produced and its place under the concurrency cap is
/// given back before the process exits, as a client that hangs up has: the
/// process is not crashing, it ends the response itself. Before, the
/// stream ended with the runtime, after the store had been waited for: its
/// whole estimate stayed charged and its place held the key's cap of one
/// until its lease lapsed (minutes), so no other instance admitted the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_stream_cut_off_at_the_deadline_is_settled_and_its_place_given_back() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let config = write_config(redis.dir());
    let config = config.to_str().unwrap();
    let mut a = ServerProcess::start(&[
        "--redis",
        &redis.url(),
        "--redis-timeout",
        "1000",
        "--config",
        config,
        "--drain",
        "0.3",
    ]);
    let (_stream, _) = open_stream(&a, "llm-key").await;
    assert_eq!(window_count(&redis, "tokens-day"), 101);
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "{status}");
    assert!(a.stderr().contains("cut off"), "{}", a.stderr());
    // Settled at what was streamed before the cut (the prompt's token and
    // a few of the 30), not left at the estimate.
    let settled = window_count(&redis, "tokens-day");
    assert!(
        settled < STREAMED,
        "{settled} tokens charged\n{}",
        a.stderr()
    );
    // The place under the cap of one is free: another instance admits the
    // key at once.
    let b = ServerProcess::start(&["--redis", &redis.url(), "--config", config]);
    let res = client()
        .post(b.url("/v1/completions"))
        .header("x-api-key", "llm-key")
        .header("content-type", "application/json")
        .body(r#"{"model":"m","prompt":"hi","max_tokens":1}"#)
        .send()
        .await
        .expect("a completion through B");
    let status = res.status();
    let body = res.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// `RedisStore::drained` itself, in process: it waits for a settlement (and
/// a release) that Redis holds back, and returns at once when nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_waits_for_the_settlement_redis_holds_back() {
    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::response::Response;
    use axum::routing::get;
    use tollgate::{
        ApiKey, Policy, RateLimitLayer, RedisStore, TokenBudget, UsagePlan, UsedTokens,
    };

    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        // Longer than Redis is held back: the settlement must not time out.
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("a Redis store");
    // Idle: nothing to wait for.
    tokio::time::timeout(Duration::from_secs(1), store.drained())
        .await
        .expect("drained() on an idle store returns at once");

    let policy = Policy::builder()
        .plan(
            UsagePlan::new("llm")
                .tokens(TokenBudget::new().per_day(1_000).unwrap())
                .concurrency(1),
        )
        .key(ApiKey::new("llm-1", "llm-key", "llm"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store.clone())
        .estimator(|_: &tollgate::extract::RequestView<'_>| 10)
        .build();
    // The handler's body is a stream the test ends; it used 3 tokens.
    type Chunks = tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let body = Arc::new(Mutex::new(Some(rx)));
    let handler = move || {
        let rx: Option<Chunks> = body.lock().unwrap().take();
        async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx.expect("one request"));
            let mut res = Response::new(Body::from_stream(stream));
            res.extensions_mut().insert(UsedTokens(3));
            res
        }
    };
    let app = Router::new().route("/", get(handler)).layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
    let mut res = client()
        .get(format!("http://{addr}/"))
        .header("x-api-key", "llm-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.chunk().await.unwrap().as_deref(), Some(&b"first"[..]));
    assert_eq!(window_count(&redis, "tokens-day"), 10, "the estimate");

    // Redis holds writes back; the body ends; its settlement and release wait.
    command(redis.addr(), &["CLIENT", "PAUSE", "400", "WRITE"]).expect("CLIENT PAUSE");
    drop(tx);
    assert_eq!(res.chunk().await.unwrap(), None);
    assert_eq!(window_count(&redis, "tokens-day"), 10, "not settled yet");
    store.drained().await;
    assert_eq!(
        window_count(&redis, "tokens-day"),
        3,
        "settled when drained"
    );
    let places = command(redis.addr(), &["KEYS", "tollgate:*:c"]).expect("KEYS");
    for key in places.lines().filter(|k| !k.is_empty()) {
        let held = command(redis.addr(), &["ZCARD", key]).expect("ZCARD");
        assert_eq!(held, "0", "{key} still holds a place");
    }
}

/// Connections that have no request in flight do not hold the drain: one
/// that has sent nothing and one halfway through a request's head are
/// closed at the signal, and the process exits 0 at once, well within a
/// `--drain` shorter than the header timeout that would otherwise close
/// them. (Before, both held the process until the deadline, which then
/// reported requests in flight cut off and exited 1.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_do_not_hold_the_drain() {
    use std::io::{Read, Write};
    let mut server = ServerProcess::start(&["--drain", "2", "--header-timeout", "60"]);
    let mut silent = std::net::TcpStream::connect(server.addr).unwrap();
    let mut half = std::net::TcpStream::connect(server.addr).unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")
        .unwrap();
    // The server accepts in order: once a later connection is answered,
    // both are being served.
    let res = client().get(server.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);

    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", server.stderr());
    assert!(!server.stderr().contains("cut off"), "{}", server.stderr());
    for conn in [&mut silent, &mut half] {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        // Closed without an answer: nothing was asked in full.
        let _ = conn.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
}

/// With `--log-json`, what the gateway says about its shutdown is in the
/// log, one JSON object a line like every other event: the signal, and a
/// stream cut off at the `--drain` deadline (an error). Before, both were
/// plain text lines among the JSON ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_json_the_shutdown_is_logged_as_json() {
    let dir = std::env::temp_dir().join(format!("tollgate-shutdown-{}-json", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir);
    let mut server = ServerProcess::start(&[
        "--config",
        config.to_str().unwrap(),
        "--drain",
        "0.3",
        "--log-json",
    ]);
    let (_stream, _) = open_stream(&server, "llm-key").await;
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "{status}");
    let stderr = server.stderr();
    let events: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let said = |level: &str, what: &str| {
        events.iter().any(|e| {
            e["level"] == level
                && e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(what))
        })
    };
    assert!(said("INFO", "shutting down"), "{stderr}");
    assert!(said("ERROR", "cut off"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An answer the gateway has made whole but the client has not read yet
/// (its last bytes wait on the socket, behind a client slow to read) is
/// delivered in full after SIGTERM: the connection is closed only once no
/// answer waits on it, not as soon as its request is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_waiting_for_a_slow_reader_is_delivered_whole_after_sigterm() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("tollgate-shutdown-slow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("slow.toml");
    std::fs::write(
        &config,
        r#"
[[plans]]
name = "open"
throttle = { rate = 100.0, burst = 100 }

[[keys]]
id = "k"
value = "slow-reader-key"
plan = "open"
"#,
    )
    .unwrap();
    let mut server = ServerProcess::start(&["--config", config.to_str().unwrap(), "--drain", "20"]);
    // Some 100,000 events at once: megabytes, more than the sockets hold.
    let body = serde_json::json!({
        "model": "m",
        "prompt": "hi",
        "max_tokens": 100_000,
        "mock_token_ms": 0,
        "stream": true,
    })
    .to_string();
    let mut conn = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nx-api-key: slow-reader-key\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // The answer is made and fills the sockets; nothing is read yet.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(got.len() > 4_000_000, "{} bytes", got.len());
    assert!(
        text.ends_with("data: [DONE]\n\n\r\n0\r\n\r\n"),
        "the answer was cut off after {} bytes: {:?}",
        got.len(),
        &text[text.len().saturating_sub(80)..]
    );
    let status = server.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "{status}\n{}", server.stderr());
    std::fs::remove_dir_all(&dir).unwrap();
}
