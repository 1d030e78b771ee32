//! A client cannot change the identity an IP-keyed limit counts it under by
//! sending forwarding headers: a real axum server on a loopback port, real
//! HTTP clients bound to chosen loopback addresses (127.0.0.1 plays the
//! trusted proxy, 127.0.0.2 a client that connects directly), a frozen
//! clock, and a throttle of bursts of 5.
//!
//! `tests/layer/http.rs` already shows that an untrusted peer's `X-Forwarded-For`
//! and `Forwarded` are ignored, and that entries prepended to
//! `X-Forwarded-For` behind a trusted proxy do not count. This file adds the
//! headers other gateways use (`X-Real-IP`, `True-Client-IP`…), every form
//! of forged entry at once, a direct client that is not the trusted proxy,
//! `Forwarded` behind a trusted proxy, split header lines, and the limits of
//! anonymous requests in a policy built from a configuration file.

use std::net::IpAddr;

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use tollgate::RateLimitLayer;
use tollgate::config::Config;
use tollgate::extract::{ClientIp, ForwardedHeader};

use crate::support::{BURST, frozen_store, ip_app, ok, pass_then_429, serve, statuses};

/// An HTTP client whose connections come from `local` (a loopback address).
fn client_from(local: &str) -> reqwest::Client {
    let local: IpAddr = local.parse().unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .local_address(local)
        .build()
        .unwrap()
}

/// The headers that some proxy, CDN or framework reads a client address
/// from. A client can send any of them.
const CLIENT_ADDRESS_HEADERS: [&str; 9] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-original-forwarded-for",
];

/// The `i`th forged header set: one header of [`CLIENT_ADDRESS_HEADERS`],
/// or all of them, or several lines of one, each claiming an address of its
/// own (IPv4, IPv6, loopback, the trusted proxy's own address).
fn forged(req: reqwest::RequestBuilder, i: usize) -> reqwest::RequestBuilder {
    let v4 = format!("198.51.100.{}", i + 1);
    let v6 = format!("2001:db8:{:x}::1", i + 1);
    let value = |name: &str, addr: &str| match name {
        "forwarded" => format!("for=\"{addr}\""),
        _ => addr.to_owned(),
    };
    let n = CLIENT_ADDRESS_HEADERS.len();
    match i % (n + 4) {
        k if k < n => {
            let name = CLIENT_ADDRESS_HEADERS[k];
            req.header(name, value(name, &v4))
        }
        k if k == n => CLIENT_ADDRESS_HEADERS
            .iter()
            .fold(req, |req, name| req.header(*name, value(name, &v4))),
        k if k == n + 1 => req
            .header("x-forwarded-for", format!("{v4}, 127.0.0.1"))
            .header("x-forwarded-for", "127.0.0.1")
            .header("forwarded", format!("for=\"[{v6}]:443\", for=127.0.0.1")),
        k if k == n + 2 => req
            .header("x-forwarded-for", format!("[{v6}]:8080"))
            .header("x-real-ip", v6.clone())
            .header("forwarded", "for=unknown"),
        _ => req
            .header("x-forwarded-for", format!("{v4}:1234, {v6}, 10.0.0.1"))
            .header("forwarded", format!("for={v4};proto=https;by=127.0.0.1")),
    }
}

/// Every forged header set, one after the other, from one peer: all are
/// counted as that peer, which gets its burst of 5 and no more.
async fn assert_forgeries_share_the_peers_budget(base: &str, peer: &reqwest::Client) {
    let forgeries = CLIENT_ADDRESS_HEADERS.len() + 4;
    let n = forgeries.max(BURST as usize + 1);
    let got = statuses(n, |i| forged(peer.get(base), i)).await;
    assert_eq!(got, pass_then_429(BURST as usize, n - BURST as usize));
    // The forged addresses were not charged either: no header moved a
    // request to another identity, so the peer stays refused whatever it
    // claims, and so does a plain request.
    for i in 0..forgeries {
        let status = forged(peer.get(base), i).send().await.unwrap().status();
        assert_eq!(status, 429, "forgery {i}");
    }
    assert_eq!(peer.get(base).send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn without_trusted_proxies_no_header_changes_the_identity() {
    for extractor in [
        ClientIp::new(),
        ClientIp::new().forwarded_header(ForwardedHeader::Forwarded),
        // Trusting a network the peer is not in changes nothing either.
        ClientIp::new().trust_proxy("10.0.0.0/8".parse().unwrap()),
    ] {
        let base = serve(ip_app(extractor.clone())).await;
        let one = client_from("127.0.0.1");
        assert_forgeries_share_the_peers_budget(&base, &one).await;

        // The key is the peer address: another peer has its own budget,
        // whatever it claims.
        let two = client_from("127.0.0.2");
        let got = statuses(BURST as usize + 1, |i| forged(two.get(&base), i)).await;
        assert_eq!(got, pass_then_429(BURST as usize, 1), "{extractor:?}");
    }
}

#[tokio::test]
async fn anonymous_limits_from_a_config_without_proxies_ignore_every_header() {
    let config = Config::from_toml(
        r#"
[[plans]]
name = "free"
[anonymous]
mode = "ip"
throttle = { rate = 1.0, burst = 5 }
"#,
    )
    .unwrap();
    let (clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(config.policy_with_clock(clock).unwrap())
        .store(store)
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    assert_forgeries_share_the_peers_budget(&base, &client_from("127.0.0.1")).await;
    let other = client_from("127.0.0.2");
    assert_eq!(other.get(&base).send().await.unwrap().status(), 200);
}

/// The address the trusted proxy (the client at 127.0.0.1) saw and appended.
const REAL: &str = "203.0.113.7";

#[tokio::test]
async fn behind_a_trusted_proxy_a_prepended_entry_does_not_change_the_identity() {
    let base = serve(ip_app(
        ClientIp::new().trust_proxy("127.0.0.1/32".parse().unwrap()),
    ))
    .await;
    let proxy = client_from("127.0.0.1");

    // The client wrote the left part (anything it likes); the proxy appended
    // the address it saw, on the right, in the same line or a line of its own.
    let through_proxy = |i: usize| {
        let fake = format!("198.51.100.{}", i + 1);
        let req = proxy.get(&base);
        match i % 7 {
            0 => req.header("x-forwarded-for", format!("{fake}, {REAL}")),
            1 => req.header("x-forwarded-for", format!("{fake},{fake}, {REAL}")),
            // The client claims to be a proxy itself.
            2 => req.header("x-forwarded-for", format!("{fake}, 127.0.0.1, {REAL}")),
            3 => req
                .header("x-forwarded-for", format!("{fake}, 127.0.0.1"))
                .header("x-forwarded-for", REAL),
            // Headers the extractor does not read, even behind a proxy.
            4 => req
                .header("x-real-ip", fake)
                .header("forwarded", "for=192.0.2.1")
                .header("x-forwarded-for", REAL),
            // A proxy chain ending in the trusted proxy again.
            5 => req.header("x-forwarded-for", format!("{fake}, {REAL}, 127.0.0.1")),
            _ => req.header("x-forwarded-for", format!("[2001:db8::{}], {REAL}", i + 1)),
        }
    };
    let got = statuses(10, through_proxy).await;
    assert_eq!(got, pass_then_429(BURST as usize, 5));

    // The forged addresses and the proxy itself were not charged.
    let xff = |addr: &'static str| proxy.get(&base).header("x-forwarded-for", addr);
    assert_eq!(statuses(1, |_| xff("198.51.100.1")).await, [StatusCode::OK]);
    assert_eq!(statuses(1, |_| xff("2001:db8::7")).await, [StatusCode::OK]);
    assert_eq!(statuses(1, |_| proxy.get(&base)).await, [StatusCode::OK]);
    // A garbage entry between the forgery and the proxy's entry stops the
    // walk at the proxy's entry: still the real client.
    assert_eq!(
        statuses(1, |_| xff("198.51.100.1, garbage, 203.0.113.7")).await,
        [StatusCode::TOO_MANY_REQUESTS]
    );
}

#[tokio::test]
async fn a_client_that_bypasses_the_trusted_proxy_is_keyed_by_its_own_address() {
    let base = serve(ip_app(
        ClientIp::new().trust_proxy("127.0.0.1/32".parse().unwrap()),
    ))
    .await;
    // 127.0.0.2 is not the trusted proxy: whatever it claims, it is 127.0.0.2.
    let direct = client_from("127.0.0.2");
    assert_forgeries_share_the_peers_budget(&base, &direct).await;

    // What it claimed to be was not charged: the same address forwarded by
    // the proxy has its whole burst.
    let proxy = client_from("127.0.0.1");
    let got = statuses(BURST as usize + 1, |_| {
        proxy.get(&base).header("x-forwarded-for", "198.51.100.1")
    })
    .await;
    assert_eq!(got, pass_then_429(BURST as usize, 1));
}

#[tokio::test]
async fn behind_a_trusted_proxy_forwarded_reads_only_the_rightmost_untrusted_element() {
    let base = serve(ip_app(
        ClientIp::new()
            .trust_proxy("127.0.0.1/32".parse().unwrap())
            .forwarded_header(ForwardedHeader::Forwarded),
    ))
    .await;
    let proxy = client_from("127.0.0.1");
    let through_proxy = |i: usize| {
        let fake = format!("198.51.100.{}", i + 1);
        let req = proxy.get(&base);
        match i % 6 {
            0 => req.header("forwarded", format!("for={fake}, for={REAL}")),
            1 => req.header(
                "forwarded",
                format!(
                    "for=\"[2001:db8::{}]:80\";proto=https, for=\"{REAL}:4711\"",
                    i + 1
                ),
            ),
            // A quoted comma in the client's part does not split it.
            2 => req.header(
                "forwarded",
                format!("for={fake};ext=\"x, for=192.0.2.9\", for={REAL};by=127.0.0.1"),
            ),
            3 => req
                .header("forwarded", format!("for={fake}, for=127.0.0.1"))
                .header("forwarded", format!("for={REAL}")),
            4 => req
                .header("x-forwarded-for", fake)
                .header("x-real-ip", "192.0.2.1")
                .header("forwarded", format!("for={REAL}")),
            _ => req.header(
                "forwarded",
                format!("for={fake}, for={REAL}, for=127.0.0.1"),
            ),
        }
    };
    let got = statuses(9, through_proxy).await;
    assert_eq!(got, pass_then_429(BURST as usize, 4));
    // The forged addresses were not charged.
    let fwd = |v: &'static str| proxy.get(&base).header("forwarded", v);
    assert_eq!(
        statuses(1, |_| fwd("for=198.51.100.1")).await,
        [StatusCode::OK]
    );
    assert_eq!(
        statuses(1, |_| fwd("for=192.0.2.9")).await,
        [StatusCode::OK]
    );
}

/// One IPv4 client reaching the same layer through an IPv4 listener and a
/// dual-stack IPv6 one (where it appears as `::ffff:127.0.0.1`) is one
/// identity with one budget; a proxy trusted by its IPv4 network is trusted
/// through either; and an address a trusted proxy forwards is the same
/// identity however it is written (IPv4-mapped, with a port, IPv6 in any
/// case or compression), grouped by /64 as a peer address is.
#[tokio::test]
async fn one_client_is_one_identity_over_ipv4_and_a_dual_stack_listener() {
    let Ok(dual) = tokio::net::TcpListener::bind("[::]:0").await else {
        eprintln!("no IPv6 on this machine: skipped");
        return;
    };
    let app = ip_app(ClientIp::new().trust_proxy("127.0.0.1/32".parse().unwrap()));
    let v4 = serve(app.clone()).await;
    let port = dual.local_addr().unwrap().port();
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(dual, app).await.unwrap();
    });
    // The same IPv4 connection source, reaching the dual-stack listener.
    let v6 = format!("http://127.0.0.1:{port}");
    let c = client_from("127.0.0.1");
    if c.get(&v6).send().await.is_err() {
        eprintln!("the [::] listener takes no IPv4 connections here: skipped");
        return;
    }
    // One request already spent on the dual-stack listener.
    let got = statuses(BURST as usize, |i| {
        c.get(if i % 2 == 0 { &v4 } else { &v6 })
    })
    .await;
    assert_eq!(got, pass_then_429(BURST as usize - 1, 1));

    let forwarded = |i: usize, value: &'static str| {
        c.get(if i % 2 == 0 { &v4 } else { &v6 })
            .header("x-forwarded-for", value)
    };
    let same_v4 = [
        "203.0.113.7",
        "::ffff:203.0.113.7",
        "203.0.113.7:1234",
        "[::ffff:203.0.113.7]:80",
        "198.51.100.1, 203.0.113.7",
        "::FFFF:CB00:7107",
    ];
    let got = statuses(same_v4.len(), |i| forwarded(i, same_v4[i])).await;
    assert_eq!(got, pass_then_429(BURST as usize, 1));
    let same_64 = [
        "2001:db8:1:2::1",
        "2001:DB8:1:2::FFFF",
        "2001:0db8:0001:0002:0000:0000:0000:0007",
        "[2001:db8:1:2:aaaa::]:4711",
        "2001:db8:1:2:1:2:3:4",
        "[2001:db8:1:2::9]",
    ];
    let got = statuses(same_64.len(), |i| forwarded(i, same_64[i])).await;
    assert_eq!(got, pass_then_429(BURST as usize, 1));
    // Another /64 is another client.
    assert_eq!(
        forwarded(0, "2001:db8:1:3::1")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}
