//! AWS methodPaths (`"/v1/completions/POST"`): parsing and matching.
//!
//! A pattern matches a request's route and method; among the method
//! overrides that match a request, the most literal one applies. A
//! request's route is axum's `MatchedPath` when it has one, else its path.

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
}

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
            m => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| bad("the method is not a valid HTTP method"))?,
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
        Ok(MethodPath { segments, method })
    }

    /// How literal the pattern is: more literal patterns win.
    fn specificity(&self) -> usize {
        let segs = self.segments.as_ref().map_or(0, |s| {
            1 + 2 * s
                .iter()
                .filter(|s| matches!(s, Segment::Literal(_)))
                .count()
                + s.len()
        });
        2 * segs + usize::from(self.method.is_some())
    }

    fn matches(&self, route: &str, method: &Method) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(segments) = &self.segments else {
            return true;
        };
        // Empty parts are ignored: "/v1/completions/" is "/v1/completions".
        let mut parts = route.split('/').filter(|p| !p.is_empty());
        for seg in segments.iter() {
            match (seg, parts.next()) {
                (_, None) => return false,
                (Segment::Literal(lit), Some(part)) if **lit != *part => return false,
                _ => {}
            }
        }
        parts.next().is_none()
    }
}

/// A method override compiled for deciding.
#[derive(Debug, Clone)]
pub(crate) struct MethodLimit {
    pub(crate) path: MethodPath,
    pub(crate) limit: Limit,
}

/// The most literal override matching `route` and `method`.
fn match_method<'a>(methods: &'a [MethodLimit], route: &str, method: &Method) -> Option<&'a Limit> {
    let mut best: Option<(&MethodLimit, usize)> = None;
    for m in methods {
        if m.path.matches(route, method) {
            let s = m.path.specificity();
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
    let mut seen = std::collections::HashSet::new();
    methods
        .iter()
        .map(|(path, t)| {
            if !seen.insert(path.as_str()) {
                return Err(ConfigError::InvalidMethodPath {
                    path: path.clone(),
                    reason: "listed twice",
                });
            }
            Ok(MethodLimit {
                path: MethodPath::parse(path)?,
                limit: Limit::new(kind, t, owner, path),
            })
        })
        .collect()
}

/// The override among `methods` for the request's route and method. The
/// route is looked up only when there are overrides to match; without a
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
    match_method(methods, route_of(req), req.method)
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
        for bad in ["v1/POST", "/v1/", "/v1//x/POST", "/v1/PO ST"] {
            assert!(MethodPath::parse(bad).is_err(), "{bad}");
        }
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
            let l = match_method(&methods, route, m).unwrap();
            methods.iter().position(|x| x.limit.salt == l.salt).unwrap()
        };
        assert_eq!(pick("/v1/completions", &Method::POST), 2);
        assert_eq!(pick("/v1/completions", &Method::GET), 3);
        assert_eq!(pick("/v1/embeddings", &Method::POST), 1);
        assert_eq!(pick("/health", &Method::GET), 0);
        let dup = compile_methods(
            &[("/a/GET".into(), t), ("/a/GET".into(), t)],
            LimitKind::Method,
            "p",
        );
        assert!(dup.is_err());
    }
}
