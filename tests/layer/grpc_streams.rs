//! Client-, server- and bidi-streaming gRPC calls through the layer in a
//! tonic server, called by a tonic client over HTTP/2 on loopback: what a
//! rejection looks like on the wire, how long a call holds its place under
//! a concurrency cap, how its tokens settle, and what a deadline or a
//! failed store does to it.

use std::convert::Infallible;
use std::future::{self, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tollgate::cost::TokenUsage;
use tollgate::extract::{KeyExtractor, RequestView};
use tollgate::store::{LimitKind, Store};
use tollgate::{
    ApiKey, FailureMode, Policy, RateLimitLayer, RedisStore, Throttle, TokenBudget, UsagePlan,
};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tonic_types::StatusExt;

use crate::support::redis::{RedisServer, require_redis};
use crate::support::{BURST, KEY, frozen_store, registered_policy};

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
struct Num {
    #[prost(uint32, tag = "1")]
    n: u32,
}

/// Unary: answers its message after `n` milliseconds.
const ECHO: &str = "/streams.Streams/Echo";
/// Server streaming: `n` messages, one token each, reported as it sends them.
const COUNT: &str = "/streams.Streams/Count";
/// Client streaming: the sum of the messages, once the client ends its stream.
const SUM: &str = "/streams.Streams/Sum";
/// Bidi streaming: each message back as it comes.
const CHAT: &str = "/streams.Streams/Chat";

type NumStream = Pin<Box<dyn Stream<Item = Result<Num, Status>> + Send>>;

/// The service, its methods dispatched by hand as tonic's generated code
/// does; counts the calls that reach it.
#[derive(Clone, Default)]
struct Streams {
    calls: Arc<AtomicU32>,
}

impl NamedService for Streams {
    const NAME: &'static str = "streams.Streams";
}

impl tower::Service<http::Request<Body>> for Streams {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Num, Num>::default());
        match req.uri().path() {
            ECHO => Box::pin(async move {
                let method = tower::service_fn(|r: tonic::Request<Num>| async move {
                    tokio::time::sleep(Duration::from_millis(u64::from(r.get_ref().n))).await;
                    Ok::<_, Status>(tonic::Response::new(r.into_inner()))
                });
                Ok(grpc.unary(method, req).await)
            }),
            COUNT => Box::pin(async move {
                let method = tower::service_fn(|r: tonic::Request<Num>| async move {
                    // The layer's handle for the tokens used, which tonic
                    // copies into the request's extensions.
                    let usage = r.extensions().get::<TokenUsage>().cloned();
                    let (tx, rx) = mpsc::channel(1);
                    tokio::spawn(async move {
                        for i in 0..r.get_ref().n {
                            if tx.send(Ok(Num { n: i })).await.is_err() {
                                return;
                            }
                            if let Some(usage) = &usage {
                                usage.add(1);
                            }
                            // A token at a time, as a model makes them.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    });
                    let stream: NumStream = Box::pin(ReceiverStream::new(rx));
                    Ok::<_, Status>(tonic::Response::new(stream))
                });
                Ok(grpc.server_streaming(method, req).await)
            }),
            SUM => Box::pin(async move {
                let method =
                    tower::service_fn(|r: tonic::Request<tonic::Streaming<Num>>| async move {
                        let mut messages = r.into_inner();
                        let mut sum = 0;
                        while let Some(m) = messages.next().await {
                            sum += m?.n;
                        }
                        Ok::<_, Status>(tonic::Response::new(Num { n: sum }))
                    });
                Ok(grpc.client_streaming(method, req).await)
            }),
            CHAT => Box::pin(async move {
                let method =
                    tower::service_fn(|r: tonic::Request<tonic::Streaming<Num>>| async move {
                        let stream: NumStream = Box::pin(r.into_inner());
                        Ok::<_, Status>(tonic::Response::new(stream))
                    });
                Ok(grpc.streaming(method, req).await)
            }),
            _ => Box::pin(future::ready(Ok(Status::unimplemented("").into_http()))),
        }
    }
}

/// Serves [`Streams`] behind `layer` on a loopback port.
async fn serve<K: KeyExtractor, S: Store>(layer: RateLimitLayer<K, S>) -> (SocketAddr, Streams) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Streams::default();
    let served = service.clone();
    tokio::spawn(async move {
        Server::builder()
            .layer(layer)
            .add_service(served)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (addr, service)
}

/// A ready tonic client of `addr`.
async fn client(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

fn codec() -> ProstCodec<Num, Num> {
    ProstCodec::default()
}

fn request<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(key) = key {
        req.metadata_mut().insert("x-api-key", key.parse().unwrap());
    }
    req
}

async fn echo(client: &mut tonic::client::Grpc<Channel>, key: &str) -> Result<(), Status> {
    client.ready().await.unwrap();
    let path = PathAndQuery::from_static(ECHO);
    client
        .unary(request(Num { n: 0 }, Some(key)), path, codec())
        .await?;
    Ok(())
}

/// A call that waits on `stream` for its messages: one, then nothing until
/// the stream is dropped.
fn pending_messages() -> (mpsc::Sender<Num>, ReceiverStream<Num>) {
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(Num { n: 1 }).unwrap();
    (tx, ReceiverStream::new(rx))
}

/// Retries `echo` for up to 2 s until it passes: a cancel reaches the
/// server when its RST_STREAM does.
async fn passes_soon(client: &mut tonic::client::Grpc<Channel>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match echo(client, KEY).await {
            Ok(()) => return,
            Err(s) if tokio::time::Instant::now() < deadline => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{what}: {s:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("{what}: the place was not given back: {s:?}"),
        }
    }
}

/// A plan that lets one call of its key in at a time.
fn one_at_a_time() -> Policy {
    Policy::builder()
        .plan(UsagePlan::new("one").concurrency(1))
        .key(ApiKey::new("one", KEY, "one"))
        .build()
        .unwrap()
}

/// A rejection is a trailers-only answer: one HEADERS frame that ends the
/// stream, with nothing after it, read before any message of the call. A
/// client-streaming call whose client has not ended its stream learns it
/// at once, and the service is never called.
#[tokio::test]
async fn a_rejection_ends_the_call_in_its_headers_before_a_message_is_read() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .build();
    let (addr, service) = serve(layer).await;

    // Plain HTTP/2, to see the frames.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let call = |key: &str| {
        http::Request::post(format!("http://{addr}{SUM}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-api-key", key)
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap()
    };
    for _ in 0..BURST {
        let res = h2.send_request(call(KEY)).await.unwrap();
        let trailers = res.into_body().collect().await.unwrap();
        assert_eq!(trailers.trailers().unwrap()["grpc-status"], "0");
    }
    for (key, code) in [
        (KEY, Code::ResourceExhausted),
        ("nobody", Code::Unauthenticated),
    ] {
        let res = h2.send_request(call(key)).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.body().is_end_stream(), "{key}: HEADERS with END_STREAM");
        let status = Status::from_header_map(res.headers()).unwrap();
        assert_eq!(status.code(), code, "{status:?}");
        if code == Code::ResourceExhausted {
            assert!(status.get_details_retry_info().is_some(), "{status:?}");
        }
        let (_, body) = res.into_parts();
        let rest = body.collect().await.unwrap();
        assert!(rest.trailers().is_none() && rest.to_bytes().is_empty());
    }
    let reached = service.calls.load(Ordering::SeqCst);
    assert_eq!(reached, BURST);

    // A tonic client still streaming its messages.
    let mut client = client(addr).await;
    for (key, code) in [
        (KEY, Code::ResourceExhausted),
        ("nobody", Code::Unauthenticated),
    ] {
        let (_open, messages) = pending_messages();
        client.ready().await.unwrap();
        let path = PathAndQuery::from_static(SUM);
        let got = tokio::time::timeout(
            Duration::from_secs(2),
            client.client_streaming(request(messages, Some(key)), path, codec()),
        )
        .await
        .expect("answered before the client ends its stream");
        assert_eq!(got.unwrap_err().code(), code);
    }
    assert_eq!(service.calls.load(Ordering::SeqCst), reached);
}

/// Under a concurrency cap of 1, a client-streaming call holds its key's
/// place until its answer ends, and a bidi call until it ends or its client
/// drops it; then the place is free again.
#[tokio::test]
async fn client_and_bidi_streams_hold_their_place_until_the_answer_ends() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(one_at_a_time())
        .store(store)
        .build();
    let (addr, _) = serve(layer).await;
    let mut client = client(addr).await;

    // Client streaming: held while the client streams, free once answered.
    let (tx, rx) = mpsc::channel(4);
    let mut summing = client.clone();
    summing.ready().await.unwrap();
    let sum = tokio::spawn(async move {
        let path = PathAndQuery::from_static(SUM);
        summing
            .client_streaming(request(ReceiverStream::new(rx), Some(KEY)), path, codec())
            .await
    });
    tx.send(Num { n: 2 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = echo(&mut client, KEY).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "1000"
    );
    tx.send(Num { n: 3 }).await.unwrap();
    drop(tx);
    assert_eq!(sum.await.unwrap().unwrap().into_inner().n, 5);
    passes_soon(&mut client, "client streaming").await;

    // Bidi, ended by both sides.
    for cancel in [false, true] {
        let (tx, rx) = mpsc::channel(4);
        client.ready().await.unwrap();
        let path = PathAndQuery::from_static(CHAT);
        let mut answers = client
            .streaming(request(ReceiverStream::new(rx), Some(KEY)), path, codec())
            .await
            .unwrap()
            .into_inner();
        tx.send(Num { n: 7 }).await.unwrap();
        assert_eq!(answers.next().await.unwrap().unwrap().n, 7);
        let status = echo(&mut client, KEY).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        if cancel {
            // Both halves: a client that only stops reading keeps the call
            // open on the wire while its own stream is open.
            drop(answers);
            drop(tx);
        } else {
            drop(tx);
            assert!(answers.next().await.is_none(), "the server ends its stream");
        }
        passes_soon(&mut client, &format!("bidi, cancelled: {cancel}")).await;
    }
}

/// A server stream's tokens are settled when it ends, at what its handler
/// reported through the request's `TokenUsage`, and when its client cancels
/// it, at what the handler had sent by then.
#[tokio::test]
async fn a_server_stream_settles_its_reported_tokens_when_it_ends_or_is_cancelled() {
    const ESTIMATE: u32 = 100;
    let (_clock, store) = frozen_store();
    let policy = Policy::builder()
        .plan(UsagePlan::new("t").tokens(TokenBudget::new().per_minute(1_000).unwrap()))
        .key(ApiKey::new("one", KEY, "t"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(|_: &RequestView<'_>| ESTIMATE)
        .build();
    let (addr, _) = serve(layer.clone()).await;
    let mut client = client(addr).await;
    let tokens_left = || async {
        let standing = layer.standing(KEY.as_bytes()).await.unwrap();
        let tokens = standing
            .limits()
            .iter()
            .find(|l| l.kind() == LimitKind::TokensMinute);
        tokens.unwrap().remaining()
    };

    client.ready().await.unwrap();
    let path = PathAndQuery::from_static(COUNT);
    let mut stream = client
        .server_streaming(request(Num { n: 5 }, Some(KEY)), path.clone(), codec())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.next().await.unwrap().unwrap().n, 0);
    // The estimate is held while the stream is open.
    assert_eq!(tokens_left().await, 1_000 - u64::from(ESTIMATE));
    while let Some(m) = stream.next().await {
        m.unwrap();
    }
    let settled = async {
        while tokens_left().await != 1_000 - 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), settled)
        .await
        .expect("5 tokens charged in all");

    // Cancelled after 3 messages: what was sent is charged, a few more at
    // most (the handler goes on until it sees the cancel).
    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(request(Num { n: 1_000 }, Some(KEY)), path, codec())
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    let settled = async {
        loop {
            let left = tokens_left().await;
            if left > 995 - u64::from(ESTIMATE) {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let left = tokio::time::timeout(Duration::from_secs(2), settled)
        .await
        .expect("the cancelled stream settled");
    let charged = 995 - left;
    assert!((3..=10).contains(&charged), "{charged} tokens charged");
}

/// A call dropped at its `grpc-timeout` deadline (tonic's server applies
/// it around the layer) gives its place back: the next call passes.
#[tokio::test]
async fn a_call_dropped_at_its_deadline_gives_its_place_back() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(one_at_a_time())
        .store(store)
        .build();
    let (addr, _) = serve(layer).await;
    let mut client = client(addr).await;

    for _ in 0..3 {
        let mut req = request(Num { n: 2_000 }, Some(KEY));
        req.set_timeout(Duration::from_millis(50));
        client.ready().await.unwrap();
        let path = PathAndQuery::from_static(ECHO);
        let status = client.unary(req, path, codec()).await.unwrap_err();
        // tonic's server answers an expired deadline CANCELLED.
        assert!(
            matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
            "{status:?}"
        );
        passes_soon(&mut client, "after a deadline").await;
    }
}

/// A store that fails under `failure = "closed"` is UNAVAILABLE (14), with
/// no retry details: a gRPC retry policy that retries UNAVAILABLE backs off
/// by its own schedule.
#[tokio::test]
async fn a_failed_store_under_closed_is_unavailable() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("closed")
                .throttle(Throttle::new(10.0, 10).unwrap())
                .failure(FailureMode::Closed),
        )
        .key(ApiKey::new("one", KEY, "closed"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy).store(store).build();
    let (addr, service) = serve(layer).await;
    let mut client = client(addr).await;
    echo(&mut client, KEY).await.unwrap();

    redis.pause();
    let status = echo(&mut client, KEY).await.unwrap_err();
    redis.resume();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "Service Unavailable");
    assert!(status.details().is_empty(), "{status:?}");
    for name in ["grpc-retry-pushback-ms", "retry-after", "x-should-retry"] {
        assert!(status.metadata().get(name).is_none(), "{name}: {status:?}");
    }
    assert_eq!(service.calls.load(Ordering::SeqCst), 1);
}
