//! The layer in a plain hyper 1 server (no axum), built with
//! `tower::ServiceBuilder` and served through `TowerToHyperService`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tollgate::extract::{ClientIp, KeyExtractor};
use tollgate::{RateLimitLayer, RequestBody};
use tower::ServiceBuilder;

use crate::support::{BURST, KEY, client, frozen_store, header, per_key_policy, registered_policy};

/// A hyper service behind the layer takes the layer's
/// [`RequestBody`](tollgate::RequestBody) around hyper's body.
async fn hello(_req: Request<RequestBody<Incoming>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

/// Serves `layer` over `hello` with hyper on a loopback port, inserting the
/// peer address as a request extension when `peer_extension` is set.
async fn serve_hyper<K: KeyExtractor>(layer: RateLimitLayer<K>, peer_extension: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            let layer = layer.clone();
            tokio::spawn(async move {
                let svc = ServiceBuilder::new()
                    .map_request(move |mut req: Request<Incoming>| {
                        if peer_extension {
                            req.extensions_mut().insert::<SocketAddr>(peer);
                        }
                        req
                    })
                    .layer(layer)
                    .service_fn(hello);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn client_ip_from_the_peer_extension_gets_its_burst_then_429() {
    let (clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(ClientIp::new())
        .store(store)
        .build();
    let base = serve_hyper(layer, true).await;
    let c = client();

    for remaining in (0..BURST).rev() {
        // Forwarded headers from an untrusted peer change nothing.
        let res = c
            .get(&base)
            .header("x-forwarded-for", format!("198.51.100.{remaining}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "ratelimit-policy"), r#""throttle";q=5;w=3"#);
        assert!(
            header(&res, "ratelimit").starts_with(&format!(r#""throttle";r={remaining};"#)),
            "{:?}",
            res.headers()
        );
        assert_eq!(res.text().await.unwrap(), "hello");
    }
    let res = c.get(&base).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), "1");
    assert_eq!(header(&res, "content-type"), "application/json");
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"message":"Too Many Requests"}"#
    );

    clock.advance(Duration::from_millis(500));
    assert_eq!(c.get(&base).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(&base).send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn client_ip_without_the_peer_extension_is_a_clear_500() {
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(ClientIp::new())
        .build();
    let base = serve_hyper(layer, false).await;
    let res = client().get(&base).send().await.unwrap();
    assert_eq!(res.status(), 500);
    let body: serde_json::Value = res.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("SocketAddr"), "{message}");
}

#[tokio::test]
async fn api_keys_are_checked_in_a_hyper_server() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .build();
    let base = serve_hyper(layer, false).await;
    let c = client();

    let res = c.get(&base).send().await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(res.text().await.unwrap(), r#"{"message":"Forbidden"}"#);
    for _ in 0..BURST {
        let res = c.get(&base).header("x-api-key", KEY).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = c.get(&base).header("x-api-key", KEY).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=1"#);
}
