//! Client addresses from hostile `X-Forwarded-For` and `Forwarded` headers.
//!
//! Shared by the `forwarded` fuzz target and `tests/layer/fuzz_corpora.rs`.
//!
//! Input: byte 0 picks the header (bit 0) and the peer (bits 1-2), byte 1 is
//! `max_hops`, byte 2 the IPv4 and byte 3 the IPv6 grouping prefix; the rest,
//! split on `\n`, are the header's lines (lines that are no valid header
//! value are dropped).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::HeaderValue;
use tollgate::extract::{ClientIp, ForwardedHeader, Key, KeyExtractor, RequestView};

/// The trusted proxies: an IPv4 and an IPv6 network, and an IPv4-mapped one.
const TRUSTED: [&str; 3] = ["10.0.0.0/8", "fd00::/8", "::ffff:172.16.0.0/108"];

/// Peers: trusted IPv4, trusted IPv6, trusted as IPv4-mapped IPv6, untrusted.
const PEERS: [&str; 4] = [
    "10.0.0.1:4000",
    "[fd00::1]:4000",
    "[::ffff:172.16.0.9]:4000",
    "192.0.2.99:4000",
];

/// Checks the extracted client against the documented walk, that it
/// is keyed by its network, round-trips through a header naming it, and that
/// X-Forwarded-For and the same hops written as `Forwarded` agree.
pub(crate) fn check(data: &[u8]) {
    let Some(([flags, max_hops, v4_prefix, v6_prefix], rest)) = data.split_first_chunk::<4>()
    else {
        return;
    };
    let header = if flags & 1 == 0 {
        ForwardedHeader::XForwardedFor
    } else {
        ForwardedHeader::Forwarded
    };
    let peer: SocketAddr = PEERS[usize::from(flags >> 1) & 3].parse().unwrap();
    let lines: Vec<HeaderValue> = rest
        .split(|&b| b == b'\n')
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    let extractor = ClientIp::new()
        .trust_proxies(TRUSTED.iter().map(|n| n.parse().unwrap()))
        .forwarded_header(header)
        .max_hops(usize::from(*max_hops))
        .ipv4_prefix(*v4_prefix)
        .ipv6_prefix(*v6_prefix);

    let client = client_of(&extractor, header, peer, &lines);
    assert_eq!(
        client,
        client.to_canonical(),
        "IPv4-mapped addresses are IPv4"
    );
    if !is_trusted(peer.ip()) {
        assert_eq!(
            client,
            peer.ip().to_canonical(),
            "untrusted peer's header used"
        );
    }
    if header == ForwardedHeader::XForwardedFor {
        let values: Vec<&[u8]> = lines.iter().map(HeaderValue::as_bytes).collect();
        let expected = reference(peer.ip(), &values, usize::from(*max_hops));
        assert_eq!(client, expected, "X-Forwarded-For walk");
    }

    // The key is the client's network.
    let key = key(&extractor, header, peer, &lines);
    assert_eq!(key, Key::ip(group(client, *v4_prefix, *v6_prefix)));

    // The client, written into the header alone, is extracted again.
    if *max_hops > 0 && is_trusted(peer.ip()) {
        let node = match (header, client) {
            (ForwardedHeader::XForwardedFor, c) => c.to_string(),
            (_, IpAddr::V4(v4)) => format!("for={v4}"),
            (_, IpAddr::V6(v6)) => format!("for=\"[{v6}]\""),
        };
        let line = HeaderValue::from_str(&node).unwrap();
        assert_eq!(client_of(&extractor, header, peer, &[line]), client);
    }

    // The same hops as `Forwarded` elements give the same client, where the
    // entries hold nothing that would need quoting differently.
    if header == ForwardedHeader::XForwardedFor
        && lines
            .iter()
            .all(|l| !l.as_bytes().iter().any(|b| b"\"\\;=".contains(b)))
    {
        let forwarded: Vec<HeaderValue> = lines
            .iter()
            .map(|line| {
                let elements: Vec<Vec<u8>> = line
                    .as_bytes()
                    .split(|&b| b == b',')
                    .map(|entry| match entry.trim_ascii() {
                        [] => Vec::new(),
                        node => [&b"for=\""[..], node, b"\""].concat(),
                    })
                    .collect();
                HeaderValue::from_bytes(&elements.join(&b',')).unwrap()
            })
            .collect();
        let as_forwarded = extractor
            .clone()
            .forwarded_header(ForwardedHeader::Forwarded);
        assert_eq!(
            client_of(&as_forwarded, ForwardedHeader::Forwarded, peer, &forwarded),
            client,
            "X-Forwarded-For and Forwarded disagree"
        );
    }
}

fn request(header: ForwardedHeader, peer: SocketAddr, lines: &[HeaderValue]) -> http::Request<()> {
    let mut req = http::Request::new(());
    for line in lines {
        req.headers_mut().append(header.name(), line.clone());
    }
    req.extensions_mut().insert(peer);
    req
}

fn client_of(
    extractor: &ClientIp,
    header: ForwardedHeader,
    peer: SocketAddr,
    lines: &[HeaderValue],
) -> IpAddr {
    let req = request(header, peer, lines);
    extractor
        .client_addr(&RequestView::new(&req))
        .expect("the peer address is set")
}

fn key(
    extractor: &ClientIp,
    header: ForwardedHeader,
    peer: SocketAddr,
    lines: &[HeaderValue],
) -> Key<'static> {
    let req = request(header, peer, lines);
    extractor
        .extract(&RequestView::new(&req))
        .expect("the peer address is set")
        .into_owned()
}

fn is_trusted(addr: IpAddr) -> bool {
    let addr = addr.to_canonical();
    ["10.0.0.0/8", "fd00::/8", "172.16.0.0/12"]
        .iter()
        .any(|net| contains(net, addr))
}

/// Whether `net` (`addr/len`) holds `addr`, without the `ipnet` crate.
fn contains(net: &str, addr: IpAddr) -> bool {
    let (base, len) = net.split_once('/').unwrap();
    let len: u32 = len.parse().unwrap();
    match (base.parse::<IpAddr>().unwrap(), addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The documented X-Forwarded-For walk, written plainly with allocations:
/// from the right, skip empty entries and trusted proxies; the first other
/// address is the client, anything that is not an address stops the walk.
fn reference(peer: IpAddr, lines: &[&[u8]], max_hops: usize) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return peer;
    }
    let entries: Vec<&[u8]> = lines
        .iter()
        .flat_map(|line| line.split(|&b| b == b','))
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev().take(max_hops) {
        let entry = entry.trim_ascii();
        if entry.is_empty() {
            continue;
        }
        let Some(addr) = std::str::from_utf8(entry).ok().and_then(node) else {
            break;
        };
        client = addr.to_canonical();
        if !is_trusted(client) {
            break;
        }
    }
    client
}

/// `ipv4`, `ipv4:port`, `ipv6`, `[ipv6]` or `[ipv6]:port`.
fn node(s: &str) -> Option<IpAddr> {
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let addr: Ipv6Addr = addr.parse().ok()?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(port))
            .then_some(IpAddr::V6(addr));
    }
    if let Ok(addr) = s.parse() {
        return Some(addr);
    }
    let (addr, p) = s.rsplit_once(':')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    port(p).then_some(IpAddr::V4(addr))
}

/// A port number, or `_` and an obfuscated port (RFC 7239).
fn port(p: &str) -> bool {
    match p.strip_prefix('_') {
        Some(obfuscated) => {
            !obfuscated.is_empty()
                && obfuscated
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        }
        None => {
            (1..=5).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok()
        }
    }
}

/// The address with the bits past the prefix cleared.
fn group(addr: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4_prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6_prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}
