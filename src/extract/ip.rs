//! The client address as the key: [`ClientIp`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::Extensions;
use http::header::{FORWARDED, HeaderName};
use ipnet::{IpNet, Ipv4Net};

use super::{Key, KeyError, KeyExtractor, RequestView};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// How many forwarded entries [`ClientIp`] examines by default.
const DEFAULT_MAX_HOPS: usize = 32;

/// The header a trusted proxy records the client address in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: <client>, <proxy1>, <proxy2>`: a comma-separated
    /// list of addresses. Entries may be surrounded by spaces and may carry a
    /// port (`192.0.2.1:8080`, `[2001:db8::1]:8080`).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=<client>, for=<proxy1>` ([RFC 7239]): the `for`
    /// parameter of each element. Values may be quoted and carry a port
    /// (`for="[2001:db8::1]:4711"`, `for="192.0.2.1:8080"`); `for=unknown`
    /// and obfuscated identifiers (`for=_hidden`) are not addresses.
    ///
    /// [RFC 7239]: https://www.rfc-editor.org/rfc/rfc7239
    Forwarded,
}

impl ForwardedHeader {
    /// The name of the header.
    pub fn name(&self) -> HeaderName {
        match self {
            ForwardedHeader::XForwardedFor => X_FORWARDED_FOR,
            ForwardedHeader::Forwarded => FORWARDED,
        }
    }
}

/// Uses the client's IP address as the key.
///
/// The peer address of the connection is read from the request extensions:
/// axum's `ConnectInfo<SocketAddr>` (with the `axum` feature; serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`), or a plain
/// [`SocketAddr`] extension. Neither hyper nor tonic inserts that one by
/// itself: with hyper, insert the address the listener accepted; with tonic,
/// copy `TcpConnectInfo::remote_addr()` from the request extensions into a
/// `SocketAddr` extension in a layer outside this one.
/// Without either, extraction fails with [`KeyError::MissingPeerAddr`].
///
/// # Proxies
///
/// By default no proxy is trusted: the key is the peer address and forwarded
/// headers are ignored, since any client can send them. Behind a reverse
/// proxy or load balancer, list its addresses with
/// [`trust_proxies`](Self::trust_proxies); otherwise every request appears
/// to come from the proxy.
///
/// Only when the peer is a trusted proxy is the forwarded header
/// ([`X-Forwarded-For`](ForwardedHeader::XForwardedFor) by default) read, and
/// it is read from the right, where the trusted proxies appended what they
/// saw: entries that are trusted proxies themselves are skipped, and the
/// first entry that is not is the client. Entries further left were written
/// by the client and are never used. If every entry is a trusted proxy, the
/// leftmost one is the client. An entry that is not an IP address (garbage,
/// `unknown`, an obfuscated identifier) ends the walk, and the last address
/// known good, the hop to its right or the peer, is the client. Several
/// header lines form one list, the last line rightmost; empty list elements
/// are skipped. At most [`max_hops`](Self::max_hops) entries are examined.
///
/// Make sure the trusted proxies append to the forwarded header (rather than
/// pass on the client's value as is or replace it with something the client
/// controls).
///
/// # Addresses
///
/// IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`) are treated as the IPv4
/// address, both when checking trust and in the key: an IPv4 client that
/// reaches a dual-stack listener (which reports it mapped) and an IPv4 one is
/// one client with one budget. The deprecated IPv4-compatible form
/// (`::192.0.2.1`) is an IPv6 address like any other. IPv6 clients are
/// grouped by their /64 network by default
/// ([`ipv6_prefix`](Self::ipv6_prefix)), since a single host usually owns a
/// whole /64 and could otherwise rotate addresses to evade a limit; the
/// grouping applies to an address taken from a forwarded header as to the
/// peer's.
///
/// Forwarded entries are compared as addresses, not as text: IPv6 in any
/// case, with or without leading zeros and `::` compression, is the same
/// address. A zone id (`fe80::1%eth0`) makes an entry no address.
///
/// Only the configured header is read, never both (nor `X-Real-IP` and the
/// like): a client cannot choose the one that suits it.
///
/// ```
/// use std::net::{IpAddr, SocketAddr};
/// use tollgate::extract::{ClientIp, Key, KeyExtractor, RequestView};
///
/// // Behind a load balancer in 10.0.0.0/8.
/// let extractor = ClientIp::new().trust_proxy("10.0.0.0/8".parse().unwrap());
///
/// let mut req = http::Request::builder()
///     .header("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.1.2.3")
///     .body(())
///     .unwrap();
/// req.extensions_mut().insert("10.0.0.1:41000".parse::<SocketAddr>().unwrap());
///
/// let view = RequestView::new(&req);
/// // 10.1.2.3 is a trusted proxy, 203.0.113.9 is not: it is the client, and
/// // the 198.51.100.7 it claims to forward for cannot be verified.
/// let client = IpAddr::from([203, 0, 113, 9]);
/// assert_eq!(extractor.client_addr(&view), Ok(client));
/// let key = extractor.extract(&view).unwrap();
/// assert_eq!(key, Key::ip(client));
/// ```
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Vec<IpNet>,
    header: ForwardedHeader,
    max_hops: usize,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

impl ClientIp {
    /// Uses the peer address, trusting no proxy.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            trusted: Vec::new(),
            header: ForwardedHeader::XForwardedFor,
            max_hops: DEFAULT_MAX_HOPS,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }

    /// Trusts the proxies in `nets` to report the address they received a
    /// request from.
    ///
    /// Addresses are checked after IPv4-mapped IPv6 addresses are taken as
    /// IPv4, so IPv4 proxies are listed with IPv4 networks (an IPv6 network,
    /// even `::/0`, covers no IPv4 address). IPv4-mapped IPv6 networks (within
    /// `::ffff:0:0/96`) are taken as the IPv4 networks they map.
    ///
    /// ```
    /// use tollgate::extract::ClientIp;
    ///
    /// let extractor = ClientIp::new().trust_proxies([
    ///     "10.0.0.0/8".parse().unwrap(),
    ///     "fd00::/8".parse().unwrap(),
    /// ]);
    /// # let _ = extractor;
    /// ```
    #[must_use]
    pub fn trust_proxies(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted.extend(nets.into_iter().map(canonical_net));
        self
    }

    /// Trusts the proxies in `net`; see [`trust_proxies`](Self::trust_proxies).
    #[must_use]
    pub fn trust_proxy(self, net: IpNet) -> Self {
        self.trust_proxies([net])
    }

    /// Sets the header trusted proxies record client addresses in
    /// ([`ForwardedHeader::XForwardedFor`] by default).
    #[must_use]
    pub fn forwarded_header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Sets how many forwarded entries are examined at most (32 by default),
    /// counted from the right; past that, the last address examined is the
    /// client. With 0, forwarded headers are ignored.
    #[must_use]
    pub fn max_hops(mut self, max_hops: usize) -> Self {
        self.max_hops = max_hops;
        self
    }

    /// Groups IPv6 clients by their network of this prefix length: the key is
    /// the client address with the bits past the prefix cleared.
    ///
    /// The default is 64, since a host usually owns a whole /64. 128 keys each
    /// address on its own; larger values are taken as 128.
    #[must_use]
    pub fn ipv6_prefix(mut self, prefix: u8) -> Self {
        self.ipv6_prefix = prefix.min(128);
        self
    }

    /// Groups IPv4 clients by their network of this prefix length, like
    /// [`ipv6_prefix`](Self::ipv6_prefix).
    ///
    /// The default is 32: each address on its own. Larger values are taken as 32.
    #[must_use]
    pub fn ipv4_prefix(mut self, prefix: u8) -> Self {
        self.ipv4_prefix = prefix.min(32);
        self
    }

    /// Returns the address of the client that sent `req`, before any grouping
    /// by prefix.
    ///
    /// IPv4-mapped IPv6 addresses are returned as IPv4 addresses.
    pub fn client_addr(&self, req: &RequestView<'_>) -> Result<IpAddr, KeyError> {
        let peer = peer_addr(req.extensions)
            .ok_or(KeyError::MissingPeerAddr)?
            .to_canonical();
        if !self.is_trusted(peer) {
            return Ok(peer);
        }

        let (parse, quoted): (fn(&[u8]) -> Entry, bool) = match self.header {
            ForwardedHeader::XForwardedFor => (parse_x_forwarded_for, false),
            ForwardedHeader::Forwarded => (parse_forwarded, true),
        };
        let entries = req
            .headers
            .get_all(self.header.name())
            .iter()
            .rev()
            .flat_map(|line| RevSplit::new(line.as_bytes(), b',', quoted));

        let mut client = peer;
        for entry in entries.take(self.max_hops) {
            match parse(entry) {
                Entry::Empty => {}
                Entry::Invalid => break,
                Entry::Addr(addr) => {
                    client = addr.to_canonical();
                    if !self.is_trusted(client) {
                        break;
                    }
                }
            }
        }
        Ok(client)
    }

    fn is_trusted(&self, addr: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&addr))
    }

    fn group(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.ipv4_prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

impl Default for ClientIp {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyExtractor for ClientIp {
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        self.client_addr(req).map(|addr| Key::ip(self.group(addr)))
    }
}

/// The peer address: axum's `ConnectInfo<SocketAddr>`, else a `SocketAddr`.
fn peer_addr(extensions: &Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(addr.ip());
    }
    extensions.get::<SocketAddr>().map(SocketAddr::ip)
}

/// An IPv4-mapped IPv6 network as the IPv4 network it maps; others unchanged.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        net => net,
    }
}

/// One forwarded entry.
enum Entry {
    /// An empty list element, skipped.
    Empty,
    /// Not an address: ends the walk.
    Invalid,
    Addr(IpAddr),
}

/// An `X-Forwarded-For` entry: an address, optionally with a port.
fn parse_x_forwarded_for(entry: &[u8]) -> Entry {
    match entry.trim_ascii() {
        [] => Entry::Empty,
        node => parse_node(node).map_or(Entry::Invalid, Entry::Addr),
    }
}

/// A `Forwarded` element: `pair *(";" pair)`, of which `for=<node>` is used.
fn parse_forwarded(element: &[u8]) -> Entry {
    let element = element.trim_ascii();
    if element.is_empty() {
        return Entry::Empty;
    }
    let mut node = None;
    for pair in RevSplit::new(element, b';', true) {
        let pair = pair.trim_ascii();
        if pair.is_empty() {
            continue;
        }
        let Some((name, value)) = split_once(pair, b'=') else {
            return Entry::Invalid;
        };
        if name.trim_ascii().eq_ignore_ascii_case(b"for") {
            if node.is_some() {
                // A parameter occurs at most once per element.
                return Entry::Invalid;
            }
            node = Some(value.trim_ascii());
        }
    }
    let node = match node {
        Some([b'"', quoted @ .., b'"']) => quoted,
        Some(node) => node,
        None => return Entry::Invalid,
    };
    parse_node(node).map_or(Entry::Invalid, Entry::Addr)
}

/// A node: `ipv4`, `ipv4:port`, `ipv6`, `[ipv6]` or `[ipv6]:port`.
fn parse_node(node: &[u8]) -> Option<IpAddr> {
    if let [b'[', rest @ ..] = node {
        let (addr, after) = split_once(rest, b']')?;
        let addr = parse::<Ipv6Addr>(addr)?;
        return match after {
            [] => Some(IpAddr::V6(addr)),
            [b':', port @ ..] if is_port(port) => Some(IpAddr::V6(addr)),
            _ => None,
        };
    }
    if let Some(addr) = parse::<IpAddr>(node) {
        return Some(addr);
    }
    let (addr, port) = rsplit_once(node, b':')?;
    let addr = parse::<Ipv4Addr>(addr)?;
    is_port(port).then_some(IpAddr::V4(addr))
}

/// A port number, or an obfuscated port (`_` followed by token characters, RFC 7239).
fn is_port(port: &[u8]) -> bool {
    match port {
        [b'_', rest @ ..] => {
            !rest.is_empty()
                && rest
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        _ => {
            (1..=5).contains(&port.len())
                && port.iter().all(u8::is_ascii_digit)
                && port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= u32::from(u16::MAX)
        }
    }
}

fn parse<T: FromStr>(bytes: &[u8]) -> Option<T> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn split_once(bytes: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == sep)?;
    let (head, tail) = bytes.split_at(at);
    Some((head, tail.get(1..)?))
}

fn rsplit_once(bytes: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().rposition(|&b| b == sep)?;
    let (head, tail) = bytes.split_at(at);
    Some((head, tail.get(1..)?))
}

/// Splits a list on `sep`, from the right, without allocating.
///
/// With `quoted`, separators inside quoted strings (`"..."`, with `\`
/// escapes) do not split. Each byte is looked at a bounded number of times,
/// whatever the input.
struct RevSplit<'a> {
    rest: Option<&'a [u8]>,
    sep: u8,
    quoted: bool,
}

impl<'a> RevSplit<'a> {
    fn new(list: &'a [u8], sep: u8, quoted: bool) -> Self {
        Self {
            rest: Some(list),
            sep,
            quoted,
        }
    }
}

impl<'a> Iterator for RevSplit<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let list = self.rest?;
        let mut in_quotes = false;
        let mut head = list;
        while let Some((&b, before)) = head.split_last() {
            if self.quoted && b == b'"' {
                // Scanning backwards, a quote inside a quoted string is
                // escaped if an odd number of backslashes precede it.
                let escaped =
                    in_quotes && before.iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1;
                if !escaped {
                    in_quotes = !in_quotes;
                }
            } else if b == self.sep && !in_quotes {
                let (rest, item) = list.split_at(before.len());
                self.rest = Some(rest);
                return item.get(1..);
            }
            head = before;
        }
        self.rest = None;
        Some(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "10.0.0.1:5000";

    fn request(peer: Option<&str>, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut req = http::Request::new(());
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        if let Some(peer) = peer {
            req.extensions_mut()
                .insert(peer.parse::<SocketAddr>().unwrap());
        }
        req
    }

    fn client(e: &ClientIp, peer: &str, headers: &[(&str, &str)]) -> IpAddr {
        let req = request(Some(peer), headers);
        e.client_addr(&RequestView::new(&req)).unwrap()
    }

    fn xff(e: &ClientIp, value: &str) -> IpAddr {
        client(e, PEER, &[("x-forwarded-for", value)])
    }

    fn fwd(e: &ClientIp, value: &str) -> IpAddr {
        client(e, PEER, &[("forwarded", value)])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(e: &ClientIp, peer: &str) -> Key<'static> {
        let req = request(Some(peer), &[]);
        e.extract(&RequestView::new(&req)).unwrap().into_owned()
    }

    fn behind_proxy() -> ClientIp {
        ClientIp::new().trust_proxy("10.0.0.0/8".parse().unwrap())
    }

    #[test]
    fn no_trusted_proxy_ignores_forwarded_headers() {
        let e = ClientIp::new();
        assert_eq!(xff(&e, "1.2.3.4"), ip("10.0.0.1"));
        let e = ClientIp::default().forwarded_header(ForwardedHeader::Forwarded);
        assert_eq!(fwd(&e, "for=1.2.3.4"), ip("10.0.0.1"));
    }

    #[test]
    fn untrusted_peer_ignores_forwarded_headers() {
        let e = behind_proxy();
        let addr = client(&e, "192.0.2.1:80", &[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(addr, ip("192.0.2.1"));
    }

    #[test]
    fn key_is_the_address() {
        let req = request(Some("192.0.2.1:80"), &[]);
        let key = ClientIp::new().extract(&RequestView::new(&req)).unwrap();
        assert_eq!(key, Key::ip(ip("192.0.2.1")));
    }

    #[test]
    fn rightmost_untrusted_entry_is_the_client() {
        let e = behind_proxy();
        assert_eq!(xff(&e, "9.9.9.9, 1.2.3.4"), ip("1.2.3.4"));
        assert_eq!(xff(&e, "1.2.3.4"), ip("1.2.3.4"));
        assert_eq!(xff(&e, " 1.2.3.4 "), ip("1.2.3.4"));
        assert_eq!(xff(&e, "9.9.9.9,1.2.3.4"), ip("1.2.3.4"));
    }

    #[test]
    fn trusted_proxy_chain_is_skipped() {
        let e = behind_proxy();
        assert_eq!(
            xff(&e, "9.9.9.9, 1.2.3.4, 10.0.0.3, 10.0.0.2"),
            ip("1.2.3.4")
        );
        let e = ClientIp::new().trust_proxies([
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]);
        assert_eq!(
            xff(&e, "9.9.9.9, 1.2.3.4, 2001:db8::7, 192.0.2.9, 10.0.0.2"),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn all_trusted_gives_the_leftmost() {
        let e = behind_proxy();
        assert_eq!(xff(&e, "10.0.0.5, 10.0.0.4, 10.0.0.3"), ip("10.0.0.5"));
    }

    #[test]
    fn no_header_gives_the_peer() {
        assert_eq!(client(&behind_proxy(), PEER, &[]), ip("10.0.0.1"));
        assert_eq!(xff(&behind_proxy(), ""), ip("10.0.0.1"));
    }

    #[test]
    fn unparseable_entry_stops_at_the_hop_to_its_right() {
        let e = behind_proxy();
        assert_eq!(xff(&e, "1.2.3.4, garbage, 10.0.0.2"), ip("10.0.0.2"));
        assert_eq!(xff(&e, "1.2.3.4, garbage"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, unknown, 10.0.0.2"), ip("10.0.0.2"));
        assert_eq!(xff(&e, "1.2.3.4, 1.2.3.4.5"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, 01.2.3.4"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, 1.2.3.4:"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, 1.2.3.4:65536"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, 1.2.3.4:+80"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, fe80::1%eth0"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, [1.2.3.4]"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, [::1"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, [::1]x"), ip("10.0.0.1"));
        assert_eq!(xff(&e, "1.2.3.4, 1.2.3.4 5.6.7.8"), ip("10.0.0.1"));
    }

    #[test]
    fn empty_elements_are_skipped() {
        let e = behind_proxy();
        assert_eq!(xff(&e, "1.2.3.4,, 10.0.0.2, "), ip("1.2.3.4"));
        assert_eq!(xff(&e, ",,,"), ip("10.0.0.1"));
    }

    #[test]
    fn ports_and_brackets() {
        let e = behind_proxy();
        assert_eq!(xff(&e, "1.2.3.4:8080"), ip("1.2.3.4"));
        assert_eq!(xff(&e, "2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(xff(&e, "[2001:db8::1]"), ip("2001:db8::1"));
        assert_eq!(xff(&e, "[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(xff(&e, "1.2.3.4, 10.0.0.9:1234"), ip("1.2.3.4"));
    }

    #[test]
    fn header_lines_form_one_list() {
        let e = behind_proxy();
        let headers = [
            ("x-forwarded-for", "9.9.9.9, 1.2.3.4"),
            ("x-forwarded-for", "10.0.0.3"),
            ("x-forwarded-for", "10.0.0.2"),
        ];
        assert_eq!(client(&e, PEER, &headers), ip("1.2.3.4"));
        let headers = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
        ];
        assert_eq!(client(&e, PEER, &headers), ip("5.6.7.8"));
    }

    #[test]
    fn forwarded_header() {
        let e = behind_proxy().forwarded_header(ForwardedHeader::Forwarded);
        assert_eq!(
            fwd(&e, "for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(
            fwd(&e, r#"for="[2001:db8:cafe::17]:4711""#),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(
            fwd(&e, r#"for="[2001:db8:cafe::17]""#),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(fwd(&e, r#"for="192.0.2.1:8080""#), ip("192.0.2.1"));
        assert_eq!(fwd(&e, r#"For="192.0.2.1""#), ip("192.0.2.1"));
        assert_eq!(fwd(&e, "FOR=192.0.2.1"), ip("192.0.2.1"));
        assert_eq!(fwd(&e, r#"for="192.0.2.1:_abc""#), ip("192.0.2.1"));
        assert_eq!(
            fwd(
                &e,
                r#"for=9.9.9.9, for="[2001:db8::1]:80";proto=https, for=10.0.0.7;by=10.0.0.1"#
            ),
            ip("2001:db8::1")
        );
        // X-Forwarded-For is not read.
        let headers = [("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")];
        assert_eq!(client(&e, PEER, &headers), ip("5.6.7.8"));
        let headers = [("forwarded", "for=1.2.3.4"), ("forwarded", "for=10.0.0.7")];
        assert_eq!(client(&e, PEER, &headers), ip("1.2.3.4"));
    }

    #[test]
    fn forwarded_quoted_separators() {
        let e = behind_proxy().forwarded_header(ForwardedHeader::Forwarded);
        assert_eq!(
            fwd(&e, r#"for=1.2.3.4;ext="a, b; c", for=10.0.0.7"#),
            ip("1.2.3.4")
        );
        assert_eq!(
            fwd(&e, r#"for=1.2.3.4;ext="a\", b", for=10.0.0.7"#),
            ip("1.2.3.4")
        );
        assert_eq!(
            fwd(&e, r#"for=1.2.3.4;ext="a\\", for=10.0.0.7"#),
            ip("1.2.3.4")
        );
        // An unterminated quote swallows the rest of the line: not an address.
        assert_eq!(
            fwd(&e, r#"for=1.2.3.4, for=10.0.0.7;ext="x"#),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn forwarded_unknown_and_obfuscated_stop() {
        let e = behind_proxy().forwarded_header(ForwardedHeader::Forwarded);
        assert_eq!(fwd(&e, "for=1.2.3.4, for=unknown"), ip("10.0.0.1"));
        assert_eq!(
            fwd(&e, r#"for=1.2.3.4, for="unknown", for=10.0.0.7"#),
            ip("10.0.0.7")
        );
        assert_eq!(
            fwd(&e, "for=1.2.3.4, for=_hidden, for=10.0.0.7"),
            ip("10.0.0.7")
        );
        assert_eq!(fwd(&e, r#"for=1.2.3.4, for="_gazonk""#), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_malformed_elements_stop() {
        let e = behind_proxy().forwarded_header(ForwardedHeader::Forwarded);
        // No `for`.
        assert_eq!(fwd(&e, "for=1.2.3.4, proto=https"), ip("10.0.0.1"));
        // Twice `for`.
        assert_eq!(
            fwd(&e, "for=1.2.3.4, for=5.6.7.8;for=10.0.0.7"),
            ip("10.0.0.1")
        );
        // No `=`.
        assert_eq!(fwd(&e, "for=1.2.3.4, for"), ip("10.0.0.1"));
        assert_eq!(fwd(&e, "for=1.2.3.4, 5.6.7.8"), ip("10.0.0.1"));
        assert_eq!(fwd(&e, r#"for=1.2.3.4, for=""#), ip("10.0.0.1"));
        assert_eq!(fwd(&e, r#"for=1.2.3.4, for="""#), ip("10.0.0.1"));
        // Empty elements and pairs are fine.
        assert_eq!(
            fwd(&e, "for=1.2.3.4;;proto=http, , for=10.0.0.7;"),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn ipv6_grouping() {
        let e = ClientIp::new();
        let a = key(&e, "[2001:db8:1:2::1]:80");
        let b = key(&e, "[2001:db8:1:2:ffff:ffff:ffff:ffff]:80");
        let c = key(&e, "[2001:db8:1:3::1]:80");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, Key::ip(ip("2001:db8:1:2::")));

        let e = ClientIp::new().ipv6_prefix(128);
        assert_ne!(key(&e, "[2001:db8::1]:80"), key(&e, "[2001:db8::2]:80"));
        let e = ClientIp::new().ipv6_prefix(200);
        assert_ne!(key(&e, "[2001:db8::1]:80"), key(&e, "[2001:db8::2]:80"));
        let e = ClientIp::new().ipv6_prefix(0);
        assert_eq!(key(&e, "[2001:db8::1]:80"), Key::ip(ip("::")));
        let e = ClientIp::new().ipv6_prefix(48);
        assert_eq!(
            key(&e, "[2001:db8:1:2::1]:80"),
            key(&e, "[2001:db8:1:3::1]:80")
        );

        // The address itself is not masked.
        let req = request(Some("[2001:db8::1]:80"), &[]);
        let addr = ClientIp::new().client_addr(&RequestView::new(&req));
        assert_eq!(addr, Ok(ip("2001:db8::1")));
    }

    #[test]
    fn ipv4_grouping() {
        let e = ClientIp::new();
        assert_ne!(key(&e, "192.0.2.1:80"), key(&e, "192.0.2.2:80"));
        let e = ClientIp::new().ipv4_prefix(24);
        assert_eq!(key(&e, "192.0.2.1:80"), key(&e, "192.0.2.200:80"));
        assert_eq!(key(&e, "192.0.2.1:80"), Key::ip(ip("192.0.2.0")));
        assert_ne!(key(&e, "192.0.2.1:80"), key(&e, "192.0.3.1:80"));
        let e = ClientIp::new().ipv4_prefix(0);
        assert_eq!(key(&e, "192.0.2.1:80"), Key::ip(ip("0.0.0.0")));
        let e = ClientIp::new().ipv4_prefix(99);
        assert_ne!(key(&e, "192.0.2.1:80"), key(&e, "192.0.2.2:80"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        let e = behind_proxy();
        // A mapped peer is trusted through the IPv4 network.
        let addr = client(
            &e,
            "[::ffff:10.0.0.1]:80",
            &[("x-forwarded-for", "::ffff:1.2.3.4")],
        );
        assert_eq!(addr, ip("1.2.3.4"));
        // A mapped forwarded entry is trusted through the IPv4 network.
        assert_eq!(xff(&e, "1.2.3.4, ::ffff:10.0.0.9"), ip("1.2.3.4"));
        assert_eq!(xff(&e, "1.2.3.4, [::ffff:10.0.0.9]:80"), ip("1.2.3.4"));
        // The key is the IPv4 key, not grouped as IPv6.
        let e = ClientIp::new();
        assert_eq!(key(&e, "[::ffff:192.0.2.1]:80"), Key::ip(ip("192.0.2.1")));
        assert_ne!(
            key(&e, "[::ffff:192.0.2.1]:80"),
            key(&e, "[::ffff:192.0.2.2]:80")
        );
        // A mapped network is trusted as the IPv4 network.
        let e = ClientIp::new().trust_proxy("::ffff:10.0.0.0/104".parse().unwrap());
        assert_eq!(xff(&e, "1.2.3.4"), ip("1.2.3.4"));
    }

    #[test]
    fn missing_peer() {
        let req = request(None, &[("x-forwarded-for", "1.2.3.4")]);
        let view = RequestView::new(&req);
        assert_eq!(
            behind_proxy().client_addr(&view),
            Err(KeyError::MissingPeerAddr)
        );
        assert_eq!(
            behind_proxy().extract(&view).unwrap_err(),
            KeyError::MissingPeerAddr
        );
        // Other extension types are not peer addresses.
        let mut req = http::Request::new(());
        req.extensions_mut().insert(ip("1.2.3.4"));
        let key = ClientIp::new().extract(&RequestView::new(&req));
        assert_eq!(key.unwrap_err(), KeyError::MissingPeerAddr);
    }

    #[test]
    fn socket_addr_extension() {
        let req = request(Some("[2001:db8::5]:443"), &[]);
        let addr = ClientIp::new().client_addr(&RequestView::new(&req));
        assert_eq!(addr, Ok(ip("2001:db8::5")));
    }

    #[cfg(feature = "axum")]
    #[test]
    fn axum_connect_info() {
        use axum::extract::ConnectInfo;

        let mut req = request(None, &[("x-forwarded-for", "1.2.3.4")]);
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        assert_eq!(
            behind_proxy().client_addr(&RequestView::new(&req)),
            Ok(ip("1.2.3.4"))
        );
        assert_eq!(
            ClientIp::new().client_addr(&RequestView::new(&req)),
            Ok(ip("10.0.0.1"))
        );
        // `ConnectInfo` wins over a plain `SocketAddr`.
        req.extensions_mut()
            .insert("192.0.2.1:80".parse::<SocketAddr>().unwrap());
        assert_eq!(
            ClientIp::new().client_addr(&RequestView::new(&req)),
            Ok(ip("10.0.0.1"))
        );
    }

    #[test]
    fn work_is_bounded() {
        let e = behind_proxy();
        // Thousands of trusted entries: the walk stops after `max_hops`.
        let entries: Vec<String> = (0..5000)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let value = entries.join(", ");
        assert_eq!(xff(&e, &value), ip(&entries[5000 - DEFAULT_MAX_HOPS]));
        assert_eq!(xff(&e.clone().max_hops(3), &value), ip(&entries[4997]));
        assert_eq!(xff(&e.clone().max_hops(0), &value), ip("10.0.0.1"));

        // Thousands of header lines.
        let headers: Vec<(&str, &str)> = entries
            .iter()
            .map(|v| ("x-forwarded-for", v.as_str()))
            .collect();
        assert_eq!(
            client(&e, PEER, &headers),
            ip(&entries[5000 - DEFAULT_MAX_HOPS])
        );

        // Thousands of empty elements, and a long entry.
        let value = format!("1.2.3.4{}", ",".repeat(10_000));
        assert_eq!(xff(&e, &value), ip("10.0.0.1"));
        let value = format!("1.2.3.4, {}", "9".repeat(60_000));
        assert_eq!(xff(&e, &value), ip("10.0.0.1"));

        let e = e.forwarded_header(ForwardedHeader::Forwarded);
        let value = entries
            .iter()
            .map(|v| format!("for={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        assert_eq!(fwd(&e, &value), ip(&entries[5000 - DEFAULT_MAX_HOPS]));
        let value = format!("for=1.2.3.4, for={}", "\\\"".repeat(20_000));
        assert_eq!(fwd(&e, &value), ip("10.0.0.1"));
    }

    #[test]
    fn extractor_bounds() {
        fn check<T: KeyExtractor + Clone + std::fmt::Debug>() {}
        check::<ClientIp>();
    }

    /// The walk, written plainly with allocations.
    fn reference(trusted: &[IpNet], peer: IpAddr, lines: &[String], max_hops: usize) -> IpAddr {
        let is_trusted = |a: IpAddr| trusted.iter().any(|n| n.contains(&a));
        if !is_trusted(peer) {
            return peer;
        }
        let all: Vec<&str> = lines.iter().flat_map(|l| l.split(',')).collect();
        let mut client = peer;
        for entry in all.iter().rev().take(max_hops) {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let Some(addr) = parse_node(entry.as_bytes()) else {
                break;
            };
            client = addr.to_canonical();
            if !is_trusted(client) {
                break;
            }
        }
        client
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn entry() -> impl Strategy<Value = String> {
            prop_oneof![
                (0u8..4, 0u8..4).prop_map(|(a, b)| format!("10.0.{a}.{b}")),
                (0u8..4).prop_map(|a| format!("192.0.2.{a}")),
                (0u8..4).prop_map(|a| format!("[::ffff:10.0.0.{a}]:80")),
                Just(String::new()),
                Just("garbage".to_owned()),
                "[ 0-9a-f:.\\[\\]\"=;_]{0,12}",
            ]
        }

        proptest! {
            #[test]
            fn matches_the_reference(
                lines in prop::collection::vec(prop::collection::vec(entry(), 0..6), 0..4),
                peer_trusted in any::<bool>(),
                max_hops in 0usize..12,
            ) {
                let trusted: Vec<IpNet> = vec!["10.0.0.0/16".parse().unwrap()];
                let e = ClientIp::new().trust_proxies(trusted.clone()).max_hops(max_hops);
                let peer = if peer_trusted { "10.0.0.1:1" } else { "192.0.2.99:1" };
                let lines: Vec<String> = lines.iter().map(|l| l.join(",")).collect();
                let headers: Vec<(&str, &str)> = lines.iter().map(|l| ("x-forwarded-for", l.as_str())).collect();
                let expected = reference(&trusted, peer.parse::<SocketAddr>().unwrap().ip(), &lines, max_hops);
                prop_assert_eq!(client(&e, peer, &headers), expected);
            }

            #[test]
            fn never_panics(value in prop::collection::vec(any::<u8>(), 0..200), forwarded in any::<bool>()) {
                let Ok(value) = http::HeaderValue::from_bytes(&value) else {
                    return Ok(());
                };
                let header = if forwarded { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
                let e = ClientIp::new().trust_proxy("0.0.0.0/0".parse().unwrap()).forwarded_header(header);
                let mut req = http::Request::new(());
                req.headers_mut().insert(header.name(), value);
                req.extensions_mut().insert("10.0.0.1:1".parse::<SocketAddr>().unwrap());
                let _ = e.extract(&RequestView::new(&req));
            }
        }
    }
}
