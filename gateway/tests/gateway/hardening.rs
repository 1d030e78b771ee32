//! What protects the gateway from slow and idle clients and tells operators
//! what it decided: header, body and idle timeouts and the connection cap
//! (served in this process with short limits, driven over raw sockets),
//! `GET /metrics` and JSON logs (the binary).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::MemoryStore;
use tollgate::config::Config;
use tollgate_gateway::Limits;

use crate::support::process::ServerProcess;

/// Serves the demo gateway with `limits` until the returned sender drops.
async fn start(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let config = Config::from_toml(tollgate_gateway::DEMO_CONFIG).unwrap();
    let app = tollgate_gateway::app(&config, MemoryStore::new()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve_with(
        listener,
        app,
        async {
            let _ = rx.await;
        },
        limits,
    ));
    (addr, tx)
}

fn limits(header: Duration, body: Duration, connections: usize) -> Limits {
    let mut l = Limits::default();
    l.header_timeout = header;
    l.body_timeout = body;
    l.max_connections = connections;
    l
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";

/// Reads from `stream` until the server closes it; returns what came and
/// how long it took. Panics after 5 s.
async fn read_until_closed(stream: &mut TcpStream, what: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: the connection is still open after 5 s"))
            .unwrap_or(0);
        if n == 0 {
            return (
                String::from_utf8_lossy(&bytes).into_owned(),
                start.elapsed(),
            );
        }
        bytes.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_slow_head_and_an_idle_connection_are_closed_after_the_header_timeout() {
    let (addr, _stop) = start(limits(
        Duration::from_millis(300),
        Duration::from_secs(30),
        16,
    ))
    .await;
    // Half a head, then nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut slow, "half a head").await;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // A kept-alive connection is answered, then closed once idle.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(HEALTH).await.unwrap();
    let (answer, took) = read_until_closed(&mut idle, "kept alive, idle").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // A connection that never sends a byte is closed too.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let (answer, _) = read_until_closed(&mut silent, "silent").await;
    assert!(!answer.contains("200 OK"), "{answer}");
}

/// An HTTP/2 connection with no stream open is closed after the header
/// timeout, as an idle HTTP/1 one is: a client that answers the gateway's
/// pings (as every HTTP/2 client does) could otherwise hold one of its
/// places for ever.
#[tokio::test]
async fn an_http2_connection_with_no_request_open_is_closed_after_the_header_timeout() {
    let (addr, _stop) = start(limits(
        Duration::from_millis(300),
        Duration::from_secs(30),
        16,
    ))
    .await;
    let (_sender, closed) = http2_client(addr).await;
    let opened = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("HTTP/2, no stream: the connection is still open after 5 s")
        .unwrap();
    assert!(
        closed - opened >= Duration::from_millis(250),
        "{:?}",
        closed - opened
    );
}

/// The same for an HTTP/2 client that ignores the `GOAWAY` and never
/// answers a ping (here: the preface, an empty `SETTINGS`, then nothing but
/// reading): it is dropped soon after the header timeout. Before, hyper
/// kept the connection open after its `GOAWAY` until a keep-alive ping went
/// unanswered, some 40 s later by default, so a client without a key held
/// a place four times as long as an idle HTTP/1 one.
#[tokio::test]
async fn an_http2_client_ignoring_goaway_and_pings_is_dropped_soon_after_the_header_timeout() {
    let (addr, _stop) = start(limits(
        Duration::from_millis(300),
        Duration::from_secs(30),
        16,
    ))
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut stream, "HTTP/2, no ping answered").await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
}

/// An HTTP/2 client connection (hyper's, which answers pings and settings)
/// to `addr`, and when the connection ends.
async fn http2_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<axum::body::Bytes>>,
    tokio::sync::oneshot::Receiver<Instant>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = closed_tx.send(Instant::now());
    });
    (sender, closed)
}

/// A request open longer than the header timeout (a completion streamed
/// over a second) is never cut by the idle watch; once it has ended, the
/// HTTP/2 connection it came on is closed after the timeout.
#[tokio::test]
async fn a_stream_longer_than_the_idle_timeout_is_sent_whole_then_the_connection_closes() {
    use http_body_util::{BodyExt, Full};

    let (addr, _stop) = start(limits(
        Duration::from_millis(300),
        Duration::from_secs(30),
        16,
    ))
    .await;
    let (mut sender, closed) = http2_client(addr).await;
    let body = r#"{"model":"m","prompt":"hi","max_tokens":12,"stream":true,"mock_token_ms":100}"#;
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("x-api-key", "demo-free-key")
        .header("content-type", "application/json")
        .body(Full::new(axum::body::Bytes::from(body)))
        .unwrap();
    let started = Instant::now();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    let ended = Instant::now();
    assert!(
        ended - started >= Duration::from_secs(1),
        "{:?}",
        ended - started
    );
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let closed = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert!(
        closed - ended >= Duration::from_millis(250),
        "{:?}",
        closed - ended
    );
}

/// Asks `addr` on HTTP/1, from a socket with a 4 KiB receive buffer, for a
/// completion of 100,000 tokens with `fields` added to its body, and asks
/// the server to close the connection after it.
async fn long_completion(addr: SocketAddr, fields: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let body = format!(
        r#"{{"model":"m","prompt":"hi","max_tokens":16,"mock_completion_tokens":100000,{fields}}}"#
    );
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-api-key: demo-free-key\r\n\
         content-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// A client that stops reading a streamed answer has its connection dropped
/// once nothing has been written for the body timeout; without that, the
/// server waits on the write for ever, holding the connection's place and
/// the request's.
#[tokio::test]
async fn a_client_that_stops_reading_an_answer_is_dropped_after_the_body_timeout() {
    let (addr, _stop) = start(limits(
        Duration::from_secs(10),
        Duration::from_millis(300),
        16,
    ))
    .await;
    // About 15 MB of events, more than the sockets' buffers hold.
    let mut stream = long_completion(addr, r#""stream":true,"mock_token_ms":0"#).await;
    let mut first = [0u8; 1024];
    let n = stream.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &first[..n]);
    // Stop reading for well past the timeout. The server's writes wait
    // only once its socket's send buffer (up to 4 MiB with Linux's default
    // `tcp_wmem`) is full, and a debug build on a busy machine makes the
    // events at a few MB/s (1.5 s was once too short: the buffer had not
    // filled): the pause must outlast that filling, then the timeout, then
    // the watch's next turn (at most another timeout).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut rest = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the connection ends");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
        }
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("[DONE]"),
        "the whole answer came: {} bytes",
        rest.len()
    );
    assert!(rest.len() < 10_000_000, "{} bytes", rest.len());
}

/// A client that reads an answer slowly but steadily keeps its connection,
/// however long the answer takes: here 400 KB in one piece (a non-streamed
/// completion) read 4 KiB at a time for about 2 s, with a body timeout of
/// 300 ms. Only a write that waits the whole timeout for a byte to be taken
/// drops the connection.
#[tokio::test]
async fn a_client_reading_slowly_but_steadily_gets_the_whole_answer() {
    let (addr, _stop) = start(limits(
        Duration::from_secs(10),
        Duration::from_millis(300),
        16,
    ))
    .await;
    let mut stream = long_completion(addr, r#""stream":false"#).await;
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the server keeps writing")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert!(
        answer.trim_end().ends_with('}'),
        "cut off after {} bytes",
        answer.len()
    );
    assert!(answer.len() > 400_000, "{} bytes", answer.len());
    assert!(
        started.elapsed() > Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
}

/// A body that stops sending mid-way, before the estimate's own bound on
/// its time (10 s), is cut off by the body timeout and answered 408,
/// costing nothing.
#[tokio::test]
async fn a_body_that_stops_sending_is_cut_off_and_costs_nothing() {
    let (addr, _stop) = start(limits(
        Duration::from_secs(10),
        Duration::from_millis(300),
        16,
    ))
    .await;
    for (path, header) in [
        ("/v1/completions", "x-api-key: demo-free-key"),
        ("/admin/keys", "x-admin-key: change-me"),
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\n{header}\r\ncontent-type: application/json\r\n\
             content-length: 100\r\nconnection: close\r\n\r\n{{\"model\":"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (answer, took) = read_until_closed(&mut stream, path).await;
        let status: u16 = answer
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{path}: no answer: {answer:?}"));
        // A body that stops arriving is a timeout (408), as one that does
        // not arrive whole within the estimate's bound is: it was a 400,
        // as if the client had sent something malformed.
        assert_eq!(status, 408, "{path}: {answer}");
        assert!(answer.contains("request_timeout"), "{path}: {answer}");
        assert!(took < Duration::from_secs(3), "{path}: {took:?}");
    }
    // The cut-off completion charged nothing: the whole burst of 5 is there.
    let client = reqwest::Client::new();
    for i in 0..5 {
        let res = client
            .post(format!("http://{addr}/v1/completions"))
            .header("x-api-key", "demo-free-key")
            .body(r#"{"model":"m","prompt":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{i}");
    }
}

/// `--body-deadline` sets how long a body read for its estimate may take to
/// arrive whole, however steadily it comes: a body that sends a byte every
/// 50 ms (never idle for the body timeout) is answered 408 once the
/// deadline has passed, and costs nothing. The bound was fixed at 10 s.
#[tokio::test]
async fn the_body_deadline_is_a_flag() {
    let server = ServerProcess::start(&["--body-deadline", "0.3"]);
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-api-key: demo-free-key\r\n\
              content-type: application/json\r\ncontent-length: 1000\r\n\r\n{",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            n = stream.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                assert!(started.elapsed() < Duration::from_secs(3), "no answer after 3 s");
                // The gateway may have answered and closed meanwhile.
                let _ = stream.write_all(b" ").await;
            }
        }
    }
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("within 300 ms"), "{answer}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Charged nothing: the whole burst of 5 is there.
    let client = reqwest::Client::new();
    for i in 0..5 {
        let res = client
            .post(server.url("/v1/completions"))
            .header("x-api-key", "demo-free-key")
            .body(r#"{"model":"m","prompt":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{i}");
    }
}

/// A body whose `content-length` announces more than an estimate reads
/// (1 MiB) is refused 413 at once, before a byte of it is asked for: on
/// HTTP/1 no `100 Continue` invites a client that sent `Expect:
/// 100-continue` (curl, for large bodies) to send it, and on HTTP/2 too.
/// The gateway's body timeout hid the announced length from the layer (its
/// body wrapper reported no size), so the gateway asked for the body, read
/// a megabyte of it and only then refused it; a client that announced the
/// body and waited for `100 Continue` waited for a 408.
#[tokio::test]
async fn a_body_announced_over_the_bound_is_refused_before_it_is_read() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use tokio_stream::wrappers::ReceiverStream;

    let (addr, _stop) = start(limits(Duration::from_secs(10), Duration::from_secs(10), 16)).await;
    for (path, key) in [
        ("/v1/completions", "x-api-key: demo-free-key"),
        (
            "/v1/chat/completions",
            "authorization: Bearer demo-free-key",
        ),
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\n{key}\r\ncontent-type: application/json\r\n\
             expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            (1 << 20) + 1
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (answer, took) = read_until_closed(&mut stream, path).await;
        assert!(
            answer.starts_with("HTTP/1.1 413 "),
            "{path}: {answer:?} after {took:?}"
        );
        assert!(answer.contains("request_too_large"), "{path}: {answer}");
        assert!(took < Duration::from_secs(3), "{path}: {took:?}");
    }

    type Chunk = Result<Frame<axum::body::Bytes>, std::convert::Infallible>;
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, StreamBody<ReceiverStream<Chunk>>>(io)
            .await
            .unwrap();
    tokio::spawn(conn);
    // The body never sends a byte.
    let (_tx, rx) = tokio::sync::mpsc::channel::<Chunk>(1);
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("x-api-key", "demo-free-key")
        .header("content-type", "application/json")
        .header("content-length", (2 << 20).to_string())
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(3), sender.send_request(req))
        .await
        .expect("HTTP/2: an answer before the body")
        .unwrap();
    assert_eq!(res.status(), 413);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("request_too_large"),
        "{body:?}"
    );
}

/// Connections that have sent only part of a head (no key, nothing the
/// gateway can hold a client to) keep at most a small buffer each: hyper's
/// default let each grow to about 400 KiB, so the 1,024 connections the
/// cap admits held some 400 MiB for a header timeout at a time. A head
/// past `Limits::max_head` is answered 431 and its connection closed.
#[tokio::test]
async fn unfinished_heads_hold_little_memory_and_a_huge_head_is_refused() {
    const CONNECTIONS: usize = 200;
    const PAD: usize = 200 * 1024;

    let server = ServerProcess::start(&[]);
    let before = server.resident_kib();
    let mut head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: ".to_vec();
    head.resize(head.len() + PAD, b'a');
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // The gateway may refuse the head and close before all of it is
        // written.
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&head)).await;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = server.resident_kib().saturating_sub(before) / 1024;
    assert!(
        grown < 16,
        "{CONNECTIONS} unfinished heads of {PAD} bytes grew the gateway by {grown} MiB"
    );
    drop(held);
    // A whole head past the bound is refused, one within it served.
    for (pad, status) in [(64 * 1024, "431"), (8 * 1024, "200")] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: {}\r\n\r\n",
            "a".repeat(pad)
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let (answer, _) = read_until_closed(&mut stream, "a large head").await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "a head with {pad} bytes of header: {answer}"
        );
    }
}

/// Timeouts too long for the clock to add (`--header-timeout 1e19`, or
/// `Duration::MAX` through [`Limits`]) mean "as good as never", not a panic:
/// hyper added the header timeout to the time each head began, which
/// overflowed, and every HTTP/1 connection's task panicked without an
/// answer.
#[tokio::test]
async fn timeouts_too_long_for_the_clock_serve_as_never() {
    use http_body_util::{BodyExt, Empty};

    let mut l = limits(Duration::MAX, Duration::MAX, 16);
    l.http2_keep_alive = Duration::MAX;
    let (addr, _stop) = start(l).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut stream, "HTTP/1").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/health"))
        .body(Empty::<axum::body::Bytes>::new())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("an HTTP/2 answer")
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"status":"ok"}"#);
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_place() {
    let (addr, _stop) = start(limits(Duration::from_secs(10), Duration::from_secs(30), 2)).await;
    // Two connections hold both places (each answered once, kept alive).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(HEALTH).await.unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // A third is queued by the kernel but not served.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(HEALTH).await.unwrap();
    let mut buf = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond the cap: {early:?}");
    // One place comes back: the third is served.
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a place is free")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}

/// The value of the `tollgate_decisions_total` series whose labels include
/// every one of `labels`, summed.
fn decisions(text: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("tollgate_decisions_total{"))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_count_each_decision_in_prometheus_text() {
    let server = ServerProcess::start(&[]);
    let client = reqwest::Client::new();
    let (mut allowed, mut rejected) = (0.0, 0.0);
    for _ in 0..8 {
        let res = client
            .post(server.url("/v1/completions"))
            .header("x-api-key", "demo-free-key")
            .body(r#"{"model":"m","prompt":"hi","max_tokens":1}"#)
            .send()
            .await
            .unwrap();
        match res.status().as_u16() {
            200 => allowed += 1.0,
            429 => rejected += 1.0,
            other => panic!("status {other}"),
        }
    }
    assert!(rejected >= 1.0, "the burst of 5 was not exceeded");
    let unknown = client
        .post(server.url("/v1/completions"))
        .header("x-api-key", "nobody")
        .body(r#"{"model":"m","prompt":"hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
    let res = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    let route = r#"route="/v1/completions""#;
    assert_eq!(
        decisions(&text, &[r#"plan="free""#, route, r#"outcome="allowed""#]),
        allowed,
        "{text}"
    );
    assert_eq!(
        decisions(
            &text,
            &[
                r#"plan="free""#,
                r#"outcome="rejected""#,
                r#"reason="limited""#
            ]
        ),
        rejected,
        "{text}"
    );
    assert_eq!(
        decisions(&text, &[r#"outcome="rejected""#, r#"reason="unknown_key""#]),
        1.0,
        "{text}"
    );
    // No key, and no key id, in any series.
    assert!(
        !text.contains("demo-free-key") && !text.contains("nobody"),
        "{text}"
    );
    assert!(!text.contains("free-1"), "{text}");
}

#[tokio::test]
async fn log_json_writes_one_json_object_a_line() {
    // Port 1 refuses connections: the startup check logs a warning.
    let server = ServerProcess::start(&["--log-json", "--redis", "redis://127.0.0.1:1/"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let stderr = server.stderr();
        if let Some(line) = stderr.lines().find(|l| l.contains("WARN")) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no warning logged: {stderr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(event["level"], "WARN", "{event}");
    assert_eq!(event["fields"]["redis"], "127.0.0.1:1", "{event}");
    assert!(event["timestamp"].is_string(), "{event}");
}

/// One HTTP/2 connection opening 200 completions with a valid key, each
/// body sent to just under the 1 MiB an estimate reads and never ended:
/// the gateway holds what it has read of each body, so the streams it lets
/// a connection open at once bound what one connection makes it hold. It
/// let 200 (hyper's default) hold about 200 MiB; the default limit, 32,
/// holds about 32 MiB, and the streams past it wait their turn.
#[tokio::test]
async fn one_http2_connection_holds_the_bodies_of_a_bounded_number_of_streams() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_stream::wrappers::ReceiverStream;

    type Chunk = Result<Frame<axum::body::Bytes>, std::convert::Infallible>;
    const STREAMS: usize = 200;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 15;

    let server = ServerProcess::start(&[]);
    let io = TokioIo::new(TcpStream::connect(server.addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, StreamBody<ReceiverStream<Chunk>>>(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let before = server.resident_kib();
    let chunk = axum::body::Bytes::from(vec![b' '; CHUNK]);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(CHUNKS);
        for _ in 0..CHUNKS {
            tx.try_send(Ok(Frame::data(chunk.clone()))).unwrap();
        }
        let req = http::Request::post(server.url("/v1/completions"))
            .header("authorization", "Bearer demo-free-key")
            .header("content-type", "application/json")
            .body(StreamBody::new(ReceiverStream::new(rx)))
            .unwrap();
        let mut sender = sender.clone();
        // Each body stays open (`tx` held) until the end of the test.
        streams.push((
            tx,
            tokio::spawn(async move { sender.send_request(req).await }),
        ));
    }
    // Long enough for the streams the gateway lets in to send every chunk.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = server.resident_kib().saturating_sub(before) / 1024;
    assert!(grown < 100, "the gateway grew by {grown} MiB");
    drop(streams);
}

/// The same over HTTP/2, where a client that stops reading never blocks a
/// write on the socket: it stops opening the stream's flow-control window
/// (hyper's client does when its body is not read), and the server has
/// nothing to send. The stream is cut off after the body timeout all the
/// same; without that it held its connection's place, and the key's
/// concurrency place, for as long as the client kept the connection.
#[tokio::test]
async fn an_http2_client_that_stops_reading_an_answer_is_cut_off_after_the_body_timeout() {
    use http_body_util::{BodyExt, Full};

    let (addr, _stop) = start(limits(
        Duration::from_secs(10),
        Duration::from_millis(300),
        16,
    ))
    .await;
    let (mut sender, closed) = http2_client(addr).await;
    // About 15 MB of events, far more than the client's windows (2 MiB a
    // stream, 5 MiB the connection).
    let body = r#"{"model":"m","prompt":"hi","max_tokens":16,"mock_completion_tokens":100000,"stream":true,"mock_token_ms":0}"#;
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("x-api-key", "demo-free-key")
        .header("content-type", "application/json")
        .body(Full::new(axum::body::Bytes::from(body)))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    // Unread until the gateway drops the connection: once the client's
    // windows are full, after the body timeout. Waited for rather than
    // slept on: on a starved machine the mock may take seconds to fill
    // the windows, and a client that reads before then never stalled.
    let cut = tokio::time::timeout(Duration::from_secs(60), closed).await;
    assert!(
        matches!(cut, Ok(Ok(_))),
        "the gateway kept the connection of a client that stopped reading"
    );
    let mut body = res.into_body();
    let mut got = 0usize;
    let mut done = false;
    let ended = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the stream ends");
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    got += data.len();
                    done |= String::from_utf8_lossy(data).contains("[DONE]");
                }
            }
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    assert!(
        ended.is_err() && !done,
        "the whole answer came: {got} bytes"
    );
    assert!(got < 10_000_000, "{got} bytes");
}

/// Starts a completion whose body announces `len` bytes and sends `sent` of
/// them (JSON whitespace after the fields, so the estimate stays small),
/// leaving the rest unsent.
async fn partial_completion(addr: SocketAddr, len: usize, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let fields = br#"{"model":"m","prompt":"hi""#;
    let mut bytes = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-api-key: demo-free-key\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(fields);
    bytes.resize(bytes.len() + sent - fields.len(), b' ');
    stream.write_all(&bytes).await.unwrap();
    stream
}

/// The status line's code of an answer read whole.
fn status_of(answer: &str) -> u16 {
    answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer: {answer:?}"))
}

/// The bodies read for estimates hold at most `--body-memory` MiB together:
/// many slow bodies, each within its own 1 MiB bound and its deadline, held
/// their sum (1024 connections × 32 streams × 1 MiB for 10 s). Past the
/// bound a body is answered 503 at once (`retry-after: 1`, costing
/// nothing), while small requests still pass and the memory comes back
/// when a body has been read.
#[tokio::test]
async fn the_bodies_being_read_hold_at_most_the_body_memory_together() {
    let server = ServerProcess::start(&["--body-memory", "1"]);
    let len = 1_000_000;
    let first = partial_completion(server.addr, len, 700_000).await;
    // A small request passes beside it (and the first body's bytes are
    // read meanwhile).
    let client = reqwest::Client::new();
    let small = || {
        client
            .post(server.url("/v1/completions"))
            .header("x-api-key", "demo-free-key")
            .body(r#"{"model":"m","prompt":"hi"}"#)
            .send()
    };
    assert_eq!(small().await.unwrap().status(), 200);
    let second = partial_completion(server.addr, len, 700_000).await;
    // Whichever body crossed the bound is answered at once, long before the
    // 10 s body deadline; the other is still being read.
    let (mut first, mut second) = (first, second);
    let started = Instant::now();
    let (busy, which) = tokio::select! {
        r = read_until_closed(&mut first, "first") => (r.0, 0),
        r = read_until_closed(&mut second, "second") => (r.0, 1),
    };
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(status_of(&busy), 503, "{busy}");
    assert!(busy.contains("server_busy"), "{busy}");
    assert!(
        busy.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{busy}"
    );
    let mut survivor = if which == 0 { second } else { first };
    survivor
        .write_all(&vec![b' '; len - 700_001])
        .await
        .unwrap();
    survivor.write_all(b"}").await.unwrap();
    let (answer, _) = read_until_closed(&mut survivor, "survivor").await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    // Read, its bytes are given back: another large body passes whole; and
    // the 503 charged nothing (3 of the burst of 5 used, 2 left).
    let mut last = partial_completion(server.addr, len, len - 1).await;
    last.write_all(b"}").await.unwrap();
    let (answer, _) = read_until_closed(&mut last, "last").await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(small().await.unwrap().status(), 200);
}

/// One caller cannot take the whole `--body-memory` for itself: its slow
/// bodies hold at most its share (a sixteenth, at least one whole body), and
/// past it its next body is answered 503, while another key's body is still
/// read and served. Before, one key holding two slow bodies of 700 KB
/// filled a budget of 2 MiB, and every other key's large body got 503.
#[tokio::test]
async fn one_callers_slow_bodies_leave_the_body_memory_to_the_others() {
    let server = ServerProcess::start(&["--body-memory", "2"]);
    let client = reqwest::Client::new();
    let added = client
        .post(server.url("/admin/keys"))
        .header("x-admin-key", "change-me")
        .json(&serde_json::json!({"id": "other-1", "value": "other-key-value", "plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201, "{}", added.text().await.unwrap());
    let len = 1_000_000;
    let mut first = partial_completion(server.addr, len, 700_000).await;
    // Its bytes are read before the second body comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = partial_completion(server.addr, len, 700_000).await;
    let started = Instant::now();
    let (busy, _) = read_until_closed(&mut second, "second").await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(status_of(&busy), 503, "{busy}");
    assert!(busy.contains("server_busy"), "{busy}");
    // Another key's large body is read whole and served meanwhile.
    let mut body = br#"{"model":"m","prompt":"hi""#.to_vec();
    body.resize(len - 1, b' ');
    body.push(b'}');
    let other = client
        .post(server.url("/v1/completions"))
        .header("x-api-key", "other-key-value")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "{}", other.text().await.unwrap());
    // The first caller's body, finished, is served too.
    first.write_all(&vec![b' '; len - 700_001]).await.unwrap();
    first.write_all(b"}").await.unwrap();
    let (answer, _) = read_until_closed(&mut first, "first").await;
    assert_eq!(status_of(&answer), 200, "{answer}");
}

/// An admin body (with the admin key) must arrive whole within
/// `--body-deadline`, as a body read for an estimate must: one that sends a
/// byte every 50 ms, never idle for the body timeout, is answered 408 once
/// the deadline has passed. It had only the body timeout between bytes, so
/// a trickle held its connection for as long as it kept trickling.
#[tokio::test]
async fn an_admin_body_must_arrive_within_the_body_deadline() {
    let server = ServerProcess::start(&["--body-deadline", "0.3"]);
    for path in ["/admin/keys", "/admin/keys/free-1"] {
        let method = if path == "/admin/keys" {
            "POST"
        } else {
            "PATCH"
        };
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nx-admin-key: change-me\r\n\
             content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                n = stream.read(&mut buf) => {
                    let n = n.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&buf[..n]);
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {
                    assert!(started.elapsed() < Duration::from_secs(3), "{path}: no answer after 3 s");
                    let _ = stream.write_all(b" ").await;
                }
            }
        }
        let took = started.elapsed();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{path}: {answer}");
        assert!(answer.contains("request_timeout"), "{path}: {answer}");
        assert!(answer.contains("within 300 ms"), "{path}: {answer}");
        assert!(took < Duration::from_secs(2), "{path}: {took:?}");
    }
}

/// An admin body whose `content-length` announces more than its route
/// takes (64 MiB for `POST /admin/keys`, a batch import; 2 MiB elsewhere)
/// is refused 413 at once, as JSON in the config's style, before a byte of
/// it is asked for: a client that waits for `100 Continue` gets no
/// invitation to send it, and one that sends it slowly waits for nothing.
/// The body was read until the limit passed, so such a request was held
/// until the body deadline and answered 408. A request without the admin
/// key is refused 403 before its body is looked at, whatever it announces.
#[tokio::test]
async fn an_admin_body_announced_over_the_bound_is_refused_before_it_is_read() {
    let (addr, _stop) = start(limits(Duration::from_secs(10), Duration::from_secs(10), 16)).await;
    let cases = [
        (
            "POST",
            "/admin/keys",
            65usize << 20,
            "x-admin-key: change-me",
            413,
        ),
        (
            "PATCH",
            "/admin/keys/free-1",
            3 << 20,
            "x-admin-key: change-me",
            413,
        ),
        (
            "POST",
            "/admin/keys",
            65 << 20,
            "x-admin-key: wrong-key!",
            403,
        ),
        ("POST", "/admin/keys", 65 << 20, "x-other: none", 403),
    ];
    for (method, path, len, key, status) in cases {
        for expect in ["", "expect: 100-continue\r\n"] {
            let what = format!("{method} {path} {key} {expect:?}");
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\n{key}\r\n\
                 content-type: application/json\r\n{expect}content-length: {len}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            // The body, sent slowly (a byte every 100 ms) unless the client
            // waits for `100 Continue`.
            let started = Instant::now();
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    n = stream.read(&mut buf) => {
                        let n = n.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        answer.extend_from_slice(&buf[..n]);
                    }
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        assert!(
                            started.elapsed() < Duration::from_secs(3),
                            "{what}: no answer after 3 s: {:?}",
                            String::from_utf8_lossy(&answer)
                        );
                        if expect.is_empty() {
                            let _ = stream.write_all(b" ").await;
                        }
                    }
                }
            }
            let took = started.elapsed();
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{what}: {answer}"
            );
            assert!(!answer.contains("100 Continue"), "{what}: {answer}");
            let code = if status == 413 {
                "request_too_large"
            } else {
                "invalid_admin_key"
            };
            assert!(answer.contains(code), "{what}: {answer}");
            assert!(
                answer.contains("content-type: application/json"),
                "{what}: {answer}"
            );
            assert!(took < Duration::from_secs(3), "{what}: {took:?}");
        }
    }
}

/// An admin body sent without a length (chunked) is refused 413 as soon as
/// it passes its route's bound, though it is not finished: the bytes past
/// the bound are never kept, and the client need not send the rest.
#[tokio::test]
async fn a_chunked_admin_body_is_refused_as_soon_as_it_passes_the_bound() {
    let (addr, _stop) = start(limits(Duration::from_secs(10), Duration::from_secs(10), 16)).await;
    for (method, path, bound) in [
        ("PATCH", "/admin/keys/free-1", 2usize << 20),
        ("POST", "/admin/keys", 64 << 20),
    ] {
        let what = format!("{method} {path}");
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nx-admin-key: change-me\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // Chunks of 1 MiB up to the bound, then one byte more; the body is
        // never ended.
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..bound / chunk.len() {
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await
                .unwrap();
            stream.write_all(&chunk).await.unwrap();
            stream.write_all(b"\r\n").await.unwrap();
        }
        stream.write_all(b"1\r\n ").await.unwrap();
        let (answer, took) = read_until_closed(&mut stream, &what).await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{what}: {answer}");
        assert!(answer.contains("request_too_large"), "{what}: {answer}");
        assert!(took < Duration::from_secs(3), "{what}: {took:?}");
    }
    // Within the bound the same chunked framing is read whole.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = br#"{"enabled":true}"#;
    let mut request = b"PATCH /admin/keys/free-1 HTTP/1.1\r\nhost: x\r\nx-admin-key: change-me\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        .to_vec();
    request.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let (answer, _) = read_until_closed(&mut stream, "within the bound").await;
    assert_eq!(status_of(&answer), 200, "{answer}");
}
