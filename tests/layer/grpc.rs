//! The layer in a tonic server (`Server::builder().layer(..)`) in front of the
//! gRPC health service, called by a tonic client over HTTP/2.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_stream::StreamExt;
use tollgate::extract::{ClientIp, KeyExtractor};
use tollgate::{ApiKey, Policy, RateLimitLayer, UsagePlan};
use tonic::Code;
use tonic::transport::server::{TcpConnectInfo, TcpIncoming};
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::util::MapRequestLayer;

use crate::support::{
    BURST, DISABLED_KEY, KEY, OTHER_KEY, frozen_store, per_key_policy, registered_policy,
};

/// Serves the health service behind `layer` on a loopback port.
async fn serve_grpc<K: KeyExtractor>(layer: RateLimitLayer<K>) -> SocketAddr {
    serve_grpc_with(layer, false).await
}

/// Serves the health service behind `layer`; with `peer_extension`, an outer
/// layer copies the peer address from tonic's `TcpConnectInfo` into a
/// `SocketAddr` request extension.
async fn serve_grpc_with<K: KeyExtractor>(
    layer: RateLimitLayer<K>,
    peer_extension: bool,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let peer = MapRequestLayer::new(move |mut req: http::Request<tonic::body::Body>| {
        let remote = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr);
        if let (true, Some(remote)) = (peer_extension, remote) {
            req.extensions_mut().insert::<SocketAddr>(remote);
        }
        req
    });
    tokio::spawn(async move {
        Server::builder()
            .layer(peer)
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    addr
}

/// `Watch` for the whole server, with `key` in `x-api-key`: a
/// server-streaming call that stays open, its first message read.
async fn watch(
    client: &mut HealthClient<Channel>,
    key: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.metadata_mut().insert("x-api-key", key.parse().unwrap());
    let mut stream = client.watch(req).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    stream
}

async fn connect(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

/// Calls `Check` for the whole server, with `key` in `x-api-key` if given.
async fn check(client: &mut HealthClient<Channel>, key: Option<&str>) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(key) = key {
        req.metadata_mut().insert("x-api-key", key.parse().unwrap());
    }
    let res = client.check(req).await?;
    assert_eq!(res.get_ref().status, ServingStatus::Serving as i32);
    Ok(())
}

#[tokio::test]
async fn registered_key_gets_its_burst_then_resource_exhausted() {
    let (clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .build();
    let mut client = connect(serve_grpc(layer).await).await;

    for i in 0..BURST {
        check(&mut client, Some(KEY))
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
    }
    let status = check(&mut client, Some(KEY)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(!status.message().is_empty());
    let meta = status.metadata();
    assert_eq!(meta.get("retry-after").unwrap(), "1");
    assert_eq!(meta.get("ratelimit").unwrap(), r#""throttle";r=0;t=1"#);

    // Another key has its own budget; the connection still works.
    check(&mut client, Some(OTHER_KEY)).await.unwrap();

    clock.advance(Duration::from_millis(500));
    check(&mut client, Some(KEY)).await.unwrap();
    let status = check(&mut client, Some(KEY)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn key_problems_are_unauthenticated() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .build();
    let mut client = connect(serve_grpc(layer).await).await;

    for key in [None, Some("not-registered"), Some(DISABLED_KEY)] {
        let status = check(&mut client, key).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}: {status:?}");
        assert!(!status.message().is_empty(), "{key:?}");
    }
    check(&mut client, Some(KEY)).await.unwrap();
}

#[tokio::test]
async fn client_ip_works_behind_tonic_given_the_peer_address_as_an_extension() {
    let (clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(ClientIp::new())
        .store(store)
        .build();
    let mut client = connect(serve_grpc_with(layer, true).await).await;

    for i in 0..BURST {
        check(&mut client, None)
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
    }
    let status = check(&mut client, None).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    clock.advance(Duration::from_millis(500));
    check(&mut client, None).await.unwrap();
}

/// A server-streaming call holds its key's place under a concurrency cap of
/// 1 while it streams, over HTTP/2 on loopback, and gives it back when the
/// client cancels it (drops the stream: an RST_STREAM to the server).
#[tokio::test]
async fn a_streaming_call_holds_its_place_until_the_client_cancels_it() {
    let (_clock, store) = frozen_store();
    let policy = Policy::builder()
        .plan(UsagePlan::new("c").concurrency(1))
        .key(ApiKey::new("one", KEY, "c"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy).store(store).build();
    let mut client = connect(serve_grpc(layer).await).await;

    for round in 0..3 {
        let stream = watch(&mut client, KEY).await;
        let status = check(&mut client, Some(KEY)).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{round}: {status:?}"
        );
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1000"
        );
        drop(stream);
        // The server learns of the cancel when the RST_STREAM arrives.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match check(&mut client, Some(KEY)).await {
                Ok(()) => break,
                Err(s) if tokio::time::Instant::now() < deadline => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(s) => panic!("{round}: the place was not given back: {s:?}"),
            }
        }
    }
}
