//! The layer as hyper and tower drive it: a held place (a concurrency cap)
//! ends with the response body however the body ends (its end, its error,
//! a drop without a poll, a client that goes away mid-stream or before the
//! head, a `HEAD`, a 204 or 304 whose body is never sent); the body wrapper
//! passes frames, trailers, `size_hint` and `is_end_stream` through; the
//! inner service's readiness is the layer's, and a rejection never calls it.
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tollgate::{ApiKey, Policy, RateLimitLayer, RequestBody, Throttle, UsagePlan};
use tower::{Layer, Service, ServiceExt};

/// A key `k` under a plan whose only binding limit is one request in flight.
fn layer() -> RateLimitLayer {
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1000.0, 1000).unwrap())
        .concurrency(1);
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("one", "k", "p"))
        .build()
        .unwrap();
    RateLimitLayer::new(policy)
}

/// A body of one data frame, then trailers (or an error), with a size hint
/// of 1 to 7 bytes.
struct Odd {
    polled: usize,
    fail: bool,
}
impl Body for Odd {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.polled += 1;
        match self.polled {
            1 => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"ab"))))),
            2 if self.fail => Poll::Ready(Some(Err(std::io::Error::other("x")))),
            2 => {
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            _ => Poll::Ready(None),
        }
    }
    fn is_end_stream(&self) -> bool {
        self.polled >= 3
    }
    fn size_hint(&self) -> SizeHint {
        let mut h = SizeHint::new();
        h.set_lower(1);
        h.set_upper(7);
        h
    }
}

fn req() -> Request<Full<Bytes>> {
    Request::get("/")
        .header("x-api-key", "k")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn the_body_wrapper_passes_frames_and_hints_and_ends_the_hold_once() {
    let l = layer();
    for fail in [false, true] {
        let svc = l.layer(tower::service_fn(
            move |_r: Request<RequestBody<Full<Bytes>>>| async move {
                Ok::<_, Infallible>(Response::new(Odd { polled: 0, fail }))
            },
        ));
        let res = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.status(), 200);
        let mut b = res.into_body();
        assert_eq!(b.size_hint().lower(), 1);
        assert_eq!(b.size_hint().upper(), Some(7));
        assert!(!b.is_end_stream());
        // The place is held while the body is unfinished.
        assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 429);
        let f1 = b.frame().await.unwrap().unwrap();
        assert_eq!(f1.into_data().unwrap(), "ab");
        let f2 = b.frame().await.unwrap();
        if fail {
            assert!(f2.is_err());
        } else {
            assert!(f2.unwrap().is_trailers());
            assert!(b.frame().await.is_none());
            assert!(b.is_end_stream());
        }
        // Given back at the body's end or error, before the body is dropped.
        let r2 = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(r2.status(), 200, "fail={fail}");
        drop(r2);
        drop(b);
        // A body dropped without a poll gives it back too.
        let r3 = svc.clone().oneshot(req()).await.unwrap();
        drop(r3);
        assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 200);
    }
}

/// Counts its calls; ready only when its flag says so.
#[derive(Clone)]
struct NotReady(Arc<AtomicUsize>, bool);
impl Service<Request<RequestBody<Full<Bytes>>>> for NotReady {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.1 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
    fn call(&mut self, _: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(Full::new(Bytes::new()))))
    }
}

#[tokio::test]
async fn the_inner_readiness_is_the_layers_and_a_rejection_never_calls_it() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer().layer(NotReady(calls.clone(), false));
    let w = futures_poll(&mut svc);
    assert!(w.is_pending());
    let svc = layer().layer(NotReady(calls.clone(), true));
    let bad = Request::get("/")
        .header("x-api-key", "nope")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(svc.oneshot(bad).await.unwrap().status(), 403);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

fn futures_poll<S: Service<Request<Full<Bytes>>>>(s: &mut S) -> Poll<Result<(), S::Error>> {
    let w = std::task::Waker::noop();
    let mut cx = Context::from_waker(w);
    s.poll_ready(&mut cx)
}

#[tokio::test]
async fn a_head_request_on_an_endless_stream_holds_no_place() {
    use axum::Router;
    use axum::body::Body as AxBody;
    use axum::routing::get;
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                let s = tokio_stream::pending::<Result<Bytes, Infallible>>();
                AxBody::from_stream(s)
            }),
        )
        .route("/ok", get(|| async { "ok" }))
        .layer(layer());
    let base = crate::support::serve(app).await;
    let c = crate::support::client();
    let r = c
        .head(format!("{base}/"))
        .header("x-api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = c
        .get(format!("{base}/ok"))
        .header("x-api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "HEAD holds the place");
}

#[tokio::test]
async fn empty_204_and_304_answers_hold_no_place() {
    use axum::Router;
    use axum::body::Body as AxBody;
    use axum::routing::get;
    let app = Router::new()
        .route("/empty", get(|| async { AxBody::empty() }))
        .route(
            "/304",
            get(|| async {
                let s = tokio_stream::pending::<Result<Bytes, Infallible>>();
                (http::StatusCode::NOT_MODIFIED, AxBody::from_stream(s))
            }),
        )
        .route(
            "/204",
            get(|| async {
                let s = tokio_stream::pending::<Result<Bytes, Infallible>>();
                (http::StatusCode::NO_CONTENT, AxBody::from_stream(s))
            }),
        )
        .route("/ok", get(|| async { "ok" }))
        .layer(layer());
    let base = crate::support::serve(app).await;
    let c = crate::support::client();
    for _ in 0..5 {
        let r = c
            .get(format!("{base}/empty"))
            .header("x-api-key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for p in ["/304", "/204"] {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            c.get(format!("{base}{p}")).header("x-api-key", "k").send(),
        )
        .await
        .expect("answered")
        .unwrap();
        assert!(r.status().as_u16() == 304 || r.status().as_u16() == 204);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let c2 = crate::support::client();
        let r = c2
            .get(format!("{base}/ok"))
            .header("x-api-key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{p} holds the place");
    }
}

#[tokio::test]
async fn a_client_gone_mid_stream_or_before_the_head_gives_the_place_back() {
    use crate::support::server::{Hangup, send_and_hang_up, send_and_hold};
    use axum::Router;
    use axum::body::Body as AxBody;
    use axum::routing::get;
    use std::time::Duration;
    let l = layer();
    let app = Router::new()
        .route(
            "/stream",
            get(|| async {
                let first = tokio_stream::once(Ok::<_, Infallible>(Bytes::from_static(b"x")));
                let s = tokio_stream::StreamExt::chain(first, tokio_stream::pending());
                AxBody::from_stream(s)
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "late"
            }),
        )
        .route("/ok", get(|| async { "ok" }))
        .layer(l.clone());
    let base = crate::support::serve(app).await;
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let c = crate::support::client();
    let req = |p: &str| format!("GET {p} HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n\r\n").into_bytes();
    for hang in [Hangup::Reset, Hangup::Close] {
        for p in ["/stream", "/slow"] {
            if p == "/stream" {
                let (s, conn) = send_and_hold(addr, &req(p)).await.unwrap();
                assert_eq!(s, 200);
                assert_eq!(
                    c.get(format!("{base}/ok"))
                        .header("x-api-key", "k")
                        .send()
                        .await
                        .unwrap()
                        .status(),
                    429
                );
                if hang == Hangup::Reset {
                    conn.set_zero_linger().unwrap();
                }
                drop(conn);
            } else {
                send_and_hang_up(addr, &req(p), Duration::from_millis(100), hang)
                    .await
                    .unwrap();
            }
            let mut ok = false;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if c.get(format!("{base}/ok"))
                    .header("x-api-key", "k")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    == 200
                {
                    ok = true;
                    break;
                }
            }
            assert!(ok, "{p} {hang:?} never released");
        }
    }
}
