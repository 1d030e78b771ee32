//! AWS methodPaths (`"/v1/completions/POST"`): parsing and matching.
//!
//! A pattern matches a request's route and method; among the method
//! overrides that match a request, the most literal one applies. A pattern
//! matches a request when it matches the request's path (the path the client
//! sent, percent-decoded, its dot segments resolved) or the route axum
//! matched (`MatchedPath`, such as `/users/{id}`), so that an override holds
//! for the path a client calls whatever routes serve it: a catch-all route
//! forwarding `/v1/…`, an encoded letter, a doubled slash or a `..` segment
//! do not take a request out of it.

use std::sync::Arc;

use http::Method;

use super::compiled::{Limit, LimitKind};
use super::limits::Throttle;
use crate::error::ConfigError;
use crate::extract::RequestView;

/// An AWS methodPath compiled for matching: `"/v1/completions/POST"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MethodPath {
    /// `None`: every route (`/*`).
    segments: Option<Box<[Segment]>>,
    /// `None`: every method.
    method: Option<Method>,
    /// The route itself (`/v1/completions`) when every segment is a
    /// literal: a route written as plainly (see [`is_plain`]) matches it
    /// exactly when it is the same string, with no splitting.
    literal: Option<Box<str>>,
}

/// The methods an override may name (any other is a mistake: see
/// [`MethodPath::parse`]).
const STANDARD: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Any,
}

impl MethodPath {
    pub(crate) fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &'static str| ConfigError::InvalidMethodPath {
            path: s.to_owned(),
            reason: why,
        };
        if !s.starts_with('/') {
            return Err(bad("must start with `/`"));
        }
        let (path, method) = s
            .rsplit_once('/')
            .ok_or_else(|| bad("must end with `/METHOD`"))?;
        let method = match method {
            "*" => None,
            "" => return Err(bad("must end with `/METHOD`")),
            // HTTP's own methods only: `/v1/completions` (the method
            // left out) would otherwise read as the extension method
            // `COMPLETIONS` on `/v1`, an override no request ever meets.
            m => Some(
                STANDARD
                    .iter()
                    .find(|s| s.as_str().eq_ignore_ascii_case(m))
                    .cloned()
                    .ok_or_else(|| {
                        bad("must end with `/METHOD`: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE or `*`")
                    })?,
            ),
        };
        let segments = match path {
            "/*" => None,
            "" | "/" => Some(Box::default()),
            p => Some(
                p.trim_start_matches('/')
                    .split('/')
                    .map(|seg| match seg {
                        "*" => Ok(Segment::Any),
                        "" => Err(bad("empty path segment")),
                        lit => Ok(Segment::Literal(lit.into())),
                    })
                    .collect::<Result<Box<[_]>, _>>()?,
            ),
        };
        let literal = segments.as_deref().filter(|s| !s.is_empty()).and_then(|s| {
            s.iter()
                .map(|seg| match seg {
                    Segment::Literal(lit) => Some(format!("/{lit}")),
                    Segment::Any => None,
                })
                .collect::<Option<String>>()
                .map(String::into_boxed_str)
        });
        Ok(MethodPath {
            segments,
            method,
            literal,
        })
    }

    /// How literal the pattern is for a request of `method`: more literal
    /// patterns win. Among patterns of one route, the request's own method
    /// wins over `GET` for a `HEAD` request, which wins over `*`.
    fn specificity(&self, method: &Method) -> usize {
        let segs = self.segments.as_ref().map_or(0, |s| {
            1 + 2 * s
                .iter()
                .filter(|s| matches!(s, Segment::Literal(_)))
                .count()
                + s.len()
        });
        let method = match &self.method {
            Some(m) if m == method => 2,
            Some(_) => 1,
            None => 0,
        };
        3 * segs + method
    }

    fn matches(&self, route: &str, method: &Method) -> bool {
        if self.method.as_ref().is_some_and(|m| !serves(m, method)) {
            return false;
        }
        let Some(segments) = &self.segments else {
            return true;
        };
        // The usual override names its route plainly, and the usual route
        // is written plainly (and not encoded): then they match when they
        // are equal.
        if let Some(literal) = &self.literal {
            if route == &**literal {
                return true;
            }
            if is_plain(route) {
                return false;
            }
        }
        Self::matches_segments(segments, route)
    }

    /// Whether `route`, split at `/` and its dot segments resolved, is
    /// `segments`.
    fn matches_segments(segments: &[Segment], route: &str) -> bool {
        // A `..` after an empty part (`/v1/chat//../completions`) is read
        // two ways: RFC 3986 (5.2.4), as a forwarding client's URL parser
        // resolves it, drops the empty part (`/v1/chat/completions`); a
        // server that merges slashes first drops the part before them
        // (`/v1/completions`). Either may be the backend's, so the
        // override holds under both; only such a path is read twice.
        let mut ambiguous = false;
        Self::resolved_is(segments, route, false, &mut ambiguous)
            || (ambiguous && Self::resolved_is(segments, route, true, &mut false))
    }

    /// Whether `route`, split at `/` and its dot segments resolved, is
    /// `segments`: with `empty_dropped`, a `..` drops an empty part before
    /// it as RFC 3986 does, else it drops the last part that is not empty
    /// (and `ambiguous` tells whether the two readings differed).
    fn resolved_is(
        segments: &[Segment],
        route: &str,
        empty_dropped: bool,
        ambiguous: &mut bool,
    ) -> bool {
        // Empty parts are ignored: "/v1/completions/" is "/v1/completions".
        // An encoded slash separates parts too, as the many servers that
        // decode a path before routing it read it. A `.` part is dropped
        // and a `..` part drops the part before it, as an HTTP client
        // building the URL of a forwarded request, or a server, resolves
        // them (RFC 3986, 5.2.4): `/v1/x/../completions` reaches the
        // backend's `/v1/completions`. Read from the end, a `..` is met
        // before the part it drops, so nothing needs keeping.
        let mut skip = 0usize;
        let mut parts = route
            .rsplit('/')
            .flat_map(|p| p.rsplit("%2F"))
            .flat_map(|p| p.rsplit("%2f"))
            .filter(move |p| match dots(p) {
                1 => false,
                2 => {
                    skip += 1;
                    false
                }
                _ if p.is_empty() => {
                    if skip > 0 {
                        *ambiguous = true;
                        skip -= usize::from(empty_dropped);
                    }
                    false
                }
                _ if skip > 0 => {
                    skip -= 1;
                    false
                }
                _ => true,
            });
        for seg in segments.iter().rev() {
            match (seg, parts.next()) {
                (_, None) => return false,
                (Segment::Literal(lit), Some(part)) if !segment_is(part, lit) => return false,
                _ => {}
            }
        }
        parts.next().is_none()
    }
}

/// How many dots the path part `part` is, when it is a dot segment (`.`
/// or `..`, either dot maybe percent-encoded, as URL parsers read `%2e`):
/// 1 or 2; else 0.
fn dots(part: &str) -> usize {
    let mut rest = part.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', rest @ ..] => rest,
            [b'%', b'2', b'e' | b'E', rest @ ..] => rest,
            _ => return 0,
        };
        dots += 1;
    }
    if dots > 2 { 0 } else { dots }
}

/// Whether a pattern of method `pattern` takes a request of `method`: its
/// own, and `GET` a `HEAD` too, which axum (as most servers) answers with
/// the `GET` handler.
fn serves(pattern: &Method, method: &Method) -> bool {
    pattern == method || (*pattern == Method::GET && *method == Method::HEAD)
}

/// Whether the route segment `part` is the literal `lit`, as written or
/// once percent-decoded (`%63ompletions` is `completions`, as the server
/// behind reads it; an encoded slash has split the segment already).
fn segment_is(part: &str, lit: &str) -> bool {
    if part == lit {
        return true;
    }
    let (mut part, mut lit) = (part.as_bytes(), lit.as_bytes());
    loop {
        let (byte, rest) = match part {
            [] => return lit.is_empty(),
            [b'%', hi, lo, rest @ ..] => match (hex(*hi), hex(*lo)) {
                (Some(hi), Some(lo)) => (hi << 4 | lo, rest),
                _ => (b'%', &part[1..]),
            },
            [b, rest @ ..] => (*b, rest),
        };
        match lit.split_first() {
            Some((&l, lit_rest)) if l == byte => (part, lit) = (rest, lit_rest),
            _ => return false,
        }
    }
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|d| d as u8)
}

/// Whether `route` is written plainly: `/` then parts separated by single
/// slashes, with no slash at the end, no part that starts with a dot, and
/// nothing percent-encoded. Split at `/` with its empty parts left out and
/// its dot segments resolved, such a route is the string itself again, so
/// it matches a pattern of literal segments exactly when it equals the
/// pattern's route.
fn is_plain(route: &str) -> bool {
    let bytes = route.as_bytes();
    bytes.first() == Some(&b'/')
        && bytes.last() != Some(&b'/')
        && !bytes.windows(2).any(|w| w == b"//" || w == b"/.")
        && !bytes.contains(&b'%')
}

/// A method override compiled for deciding.
#[derive(Debug, Clone)]
pub(crate) struct MethodLimit {
    pub(crate) path: MethodPath,
    pub(crate) limit: Limit,
    /// The methodPath as configured (`"/v1/completions/POST"`, `"/*/*"`):
    /// what a usage report names the override by.
    pub(crate) written: Arc<str>,
}

/// The most literal override matching `path` or `route` (when the request
/// has one) and `method`.
fn match_method<'a>(
    methods: &'a [MethodLimit],
    path: &str,
    route: Option<&str>,
    method: &Method,
) -> Option<&'a Limit> {
    let mut best: Option<(&MethodLimit, usize)> = None;
    for m in methods {
        if m.path.matches(path, method) || route.is_some_and(|r| m.path.matches(r, method)) {
            let s = m.path.specificity(method);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((m, s));
            }
        }
    }
    best.map(|(m, _)| &m.limit)
}

pub(super) fn compile_methods(
    methods: &[(String, Throttle)],
    kind: LimitKind,
    owner: &str,
) -> Result<Box<[MethodLimit]>, ConfigError> {
    let mut compiled: Vec<MethodLimit> = Vec::with_capacity(methods.len());
    for (path, t) in methods {
        let parsed = MethodPath::parse(path)?;
        // Compared as parsed: `/v1/x/POST` and `/v1/x/post` are one
        // override, of which only the first would ever apply.
        if compiled.iter().any(|m| m.path == parsed) {
            return Err(ConfigError::InvalidMethodPath {
                path: path.clone(),
                reason: "listed twice",
            });
        }
        compiled.push(MethodLimit {
            path: parsed,
            limit: Limit::new(kind, t, owner, path),
            written: path.as_str().into(),
        });
    }
    Ok(compiled.into_boxed_slice())
}

/// The override among `methods` for the request's path, route and method.
/// They are looked up only when there are overrides to match; without a
/// request (a direct check) none applies.
#[inline]
pub(crate) fn method_limit<'m>(
    methods: &'m [MethodLimit],
    req: Option<&RequestView<'_>>,
) -> Option<&'m Limit> {
    if methods.is_empty() {
        return None;
    }
    let req = req?;
    let path = path_of(req);
    let route = Some(route_of(req)).filter(|r| *r != path);
    match_method(methods, path, route, req.method)
}

/// The path the client sent: inside a router nested under a prefix, axum's
/// `OriginalUri` (the request's own URI lacks the prefix there).
fn path_of<'a>(req: &RequestView<'a>) -> &'a str {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(uri)) = req.extensions.get() {
        return uri.path();
    }
    req.uri.path()
}

/// The route of a request: axum's `MatchedPath` when present, else the path.
#[inline]
pub(crate) fn route_of<'a>(req: &RequestView<'a>) -> &'a str {
    #[cfg(feature = "axum")]
    if let Some(m) = req.extensions.get::<axum::extract::MatchedPath>() {
        return m.as_str();
    }
    req.uri.path()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(s: &str) -> MethodPath {
        MethodPath::parse(s).unwrap()
    }

    #[test]
    fn method_paths_match_like_aws() {
        let post = Method::POST;
        assert!(mp("/v1/completions/POST").matches("/v1/completions", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/completions", &Method::GET));
        assert!(!mp("/v1/completions/POST").matches("/v1/chat/completions", &post));
        assert!(mp("/v1/*/POST").matches("/v1/completions", &post));
        assert!(!mp("/v1/*/POST").matches("/v1/chat/completions", &post));
        assert!(mp("/*/*").matches("/v1/chat/completions", &Method::DELETE));
        assert!(mp("/*/*").matches("/", &post));
        assert!(mp("//GET").matches("/", &Method::GET));
        assert!(mp("/users/{id}/get").matches("/users/{id}", &Method::GET));
        assert!(mp("/v1/completions/POST").matches("/v1/completions/", &post));
        // A HEAD request is answered by the GET handler: GET takes it.
        assert!(mp("/v1/models/GET").matches("/v1/models", &Method::HEAD));
        assert!(mp("/v1/models/HEAD").matches("/v1/models", &Method::HEAD));
        assert!(!mp("/v1/models/HEAD").matches("/v1/models", &Method::GET));
        assert!(!mp("/v1/models/POST").matches("/v1/models", &Method::HEAD));
        // Percent-encoded letters are the letters.
        assert!(mp("/v1/completions/POST").matches("/v1/%63ompletions", &post));
        assert!(mp("/v1/completions/POST").matches("/%76%31/completion%73", &post));
        assert!(mp("/v1/*/POST").matches("/v1/%63ompletions", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/%63ompletion", &post));
        assert!(mp("/v1/chat/completions/POST").matches("/v1/chat%2Fcompletions", &post));
        assert!(mp("/v1/chat/completions/POST").matches("/v1%2fchat%2F%2Fcompletions", &post));
        assert!(!mp("/v1/*/POST").matches("/v1/chat%2Fcompletions", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/completions%", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/%6", &post));
        // Dot segments are resolved, plainly or encoded.
        assert!(mp("/v1/completions/POST").matches("/v1/./completions", &post));
        assert!(mp("/v1/completions/POST").matches("/v1/x/../completions", &post));
        assert!(mp("/v1/completions/POST").matches("/../v1/completions", &post));
        assert!(mp("/v1/completions/POST").matches("/v1/x/%2e%2E/completions/.", &post));
        assert!(mp("/v1/completions/POST").matches("/v1/a/b/../../completions", &post));
        assert!(mp("/v1/*/POST").matches("/v1/chat/../completions", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/completions/..", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/completions/x/..x", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/.../completions", &post));
        assert!(!mp("/v1/*/POST").matches("/v1/chat/completions/./", &post));
        // `a//..` is `a/` to RFC 3986 (a forwarding client's URL parser)
        // and `/` to a server that merges slashes first: both are read.
        assert!(mp("/v1/chat/completions/POST").matches("/v1/chat//../completions", &post));
        assert!(mp("/v1/completions/POST").matches("/v1/chat//../completions", &post));
        assert!(mp("/v1/chat/completions/POST").matches("/v1/chat/completions//..", &post));
        assert!(mp("/v1/chat/completions/POST").matches("/v1/chat%2F%2F..%2Fcompletions", &post));
        assert!(!mp("/v1/x/completions/POST").matches("/v1/chat//../completions", &post));
        assert!(mp("/a%zz/GET").matches("/a%zz", &Method::GET));
        assert!(mp("/a b/GET").matches("/a%20b", &Method::GET));
        for bad in ["v1/POST", "/v1/", "/v1//x/POST", "/v1/PO ST"] {
            assert!(MethodPath::parse(bad).is_err(), "{bad}");
        }
    }

    /// The comparison of a plain route with a literal pattern's route
    /// decides as splitting both would, for plain routes and odd ones
    /// (trailing and doubled slashes, none at the start, empty).
    #[test]
    fn literal_patterns_match_as_their_segments_do() {
        let patterns = [
            "/v1/completions/POST",
            "/v1/POST",
            "/a/b/c/GET",
            "/v1/*/POST",
            "//GET",
            "/*/*",
        ];
        let routes = [
            "/v1/completions",
            "/v1/completions/",
            "//v1//completions",
            "v1/completions",
            "/v1/completion",
            "/v1/completions/x",
            "/v1",
            "/v1/",
            "/a/b/c",
            "/a/b/c/",
            "/a//b/c",
            "/v1/%63ompletions",
            "/%61/b/c",
            "/a%2Fb/c",
            "/",
            "",
            "//",
            "/v1/./completions",
            "/v1/x/../completions",
            "/v1/completions/..",
            "/v1/.completions",
            "/a/b/c/.",
            "/a/x/../b/c",
            "/..",
        ];
        for pattern in patterns {
            let p = mp(pattern);
            for route in routes {
                let split = p
                    .segments
                    .as_deref()
                    .is_none_or(|s| MethodPath::matches_segments(s, route));
                let want = split && p.method.as_ref().is_none_or(|m| *m == Method::POST);
                assert_eq!(p.matches(route, &Method::POST), want, "{pattern} {route:?}");
            }
        }
        assert_eq!(
            mp("/v1/completions/POST").literal.as_deref(),
            Some("/v1/completions")
        );
        assert_eq!(mp("/v1/*/POST").literal, None);
        assert_eq!(mp("//GET").literal, None);
        assert_eq!(mp("/*/*").literal, None);
    }

    #[test]
    fn the_most_literal_override_wins() {
        let t = Throttle::new(1.0, 1).unwrap();
        let methods = compile_methods(
            &[
                ("/*/*".into(), t),
                ("/v1/*/POST".into(), t),
                ("/v1/completions/POST".into(), t),
                ("/v1/completions/*".into(), t),
            ],
            LimitKind::Method,
            "p",
        )
        .unwrap();
        let pick = |route: &str, m: &Method| {
            let l = match_method(&methods, route, None, m).unwrap();
            methods.iter().position(|x| x.limit.salt == l.salt).unwrap()
        };
        assert_eq!(pick("/v1/completions", &Method::POST), 2);
        assert_eq!(pick("/v1/completions", &Method::GET), 3);
        assert_eq!(pick("/v1/embeddings", &Method::POST), 1);
        assert_eq!(pick("/health", &Method::GET), 0);
        assert_eq!(pick("/v1/completions", &Method::HEAD), 3);
        // For a HEAD request: HEAD, then GET, then `*`.
        let of = |paths: &[&str]| {
            let listed: Vec<_> = paths.iter().map(|p| (p.to_string(), t)).collect();
            let methods = compile_methods(&listed, LimitKind::Method, "p").unwrap();
            let l = match_method(&methods, "/v1/models", None, &Method::HEAD).unwrap();
            methods.iter().position(|x| x.limit.salt == l.salt).unwrap()
        };
        assert_eq!(
            of(&["/v1/models/*", "/v1/models/GET", "/v1/models/HEAD"]),
            2
        );
        assert_eq!(
            of(&["/v1/models/HEAD", "/v1/models/GET", "/v1/models/*"]),
            0
        );
        assert_eq!(of(&["/v1/models/*", "/v1/models/GET"]), 1);
        assert_eq!(of(&["/v1/models/GET", "/v1/*/HEAD"]), 0);
        // Either the path or the route axum matched.
        let pick = |path: &str, route: &str, m: &Method| {
            let l = match_method(&methods, path, Some(route), m).unwrap();
            methods.iter().position(|x| x.limit.salt == l.salt).unwrap()
        };
        assert_eq!(pick("/v1/completions", "/v1/{*path}", &Method::POST), 2);
        assert_eq!(pick("/v1/x/y", "/v1/completions", &Method::POST), 2);
        assert_eq!(pick("/v2/x/y", "/v2/{*path}", &Method::POST), 0);
        for twice in [["/a/GET", "/a/GET"], ["/a/GET", "/a/get"], ["/*/*", "/*/*"]] {
            let dup = compile_methods(&twice.map(|p| (p.to_owned(), t)), LimitKind::Method, "p");
            assert!(
                matches!(
                    dup,
                    Err(ConfigError::InvalidMethodPath {
                        reason: "listed twice",
                        ..
                    })
                ),
                "{twice:?}"
            );
        }
        // A methodPath without its method, or with one HTTP does not
        // define, is refused rather than read as an extension method.
        for bad in [
            "/v1/completions",
            "/v1/chat/completions",
            "/a/FETCH",
            "/a/G-T",
        ] {
            let e = compile_methods(&[(bad.to_owned(), t)], LimitKind::Method, "p");
            assert!(
                matches!(&e, Err(ConfigError::InvalidMethodPath { reason, .. }) if reason.contains("/METHOD")),
                "{bad}: {e:?}"
            );
        }
        for good in ["/v1/completions/post", "/a/OPTIONS", "/a/Patch", "/*/*"] {
            assert!(
                compile_methods(&[(good.to_owned(), t)], LimitKind::Method, "p").is_ok(),
                "{good}"
            );
        }
        assert!(
            compile_methods(
                &[("/a/GET".into(), t), ("/a/POST".into(), t)],
                LimitKind::Method,
                "p"
            )
            .is_ok()
        );
    }
}
