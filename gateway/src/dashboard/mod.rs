//! The usage dashboard: a page embedded in the binary (`GET /admin/ui`,
//! its script and its style sheet) and the admin JSON it reads.
//!
//! The page carries no secret: it asks for the admin key, keeps it in the
//! tab's session storage and sends it as `x-admin-key` with every data call,
//! which the admin routes check as they check any other. Its content
//! security policy allows scripts and styles from the gateway only (no
//! inline ones, nothing remote), and the script writes ids and names as
//! text, never as markup.

mod data;
mod time;

pub(crate) use self::data::{keys, routes};

use std::sync::Arc;

use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use tollgate::Clock;
use tollgate::config::Config;

use crate::traffic::Traffic;

/// What the dashboard reads beside the layer's own state: the names of the
/// config's plans and accounts, the clock that tells the UTC day, and the
/// recent decisions. Clones share the same [`Traffic`].
#[derive(Debug, Clone)]
pub struct Dashboard {
    plans: Arc<[String]>,
    accounts: Arc<[String]>,
    clock: Clock,
    traffic: Traffic,
}

impl Dashboard {
    /// The dashboard of `config`, telling time by `clock` (the store's).
    pub fn new(config: &Config, clock: Clock) -> Dashboard {
        Dashboard {
            plans: config.plans().iter().map(|p| p.name().to_owned()).collect(),
            accounts: config
                .accounts()
                .iter()
                .map(|a| a.name().to_owned())
                .collect(),
            traffic: Traffic::new(clock.clone()),
            clock,
        }
    }

    /// The observer that counts the decisions the dashboard shows: the
    /// layer's, beside the metrics observer.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }
}

/// Where scripts, styles and data may come from: the gateway itself, and
/// never inline code; no plugins, no framing, no `<base>`.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; form-action 'none'; base-uri 'none'; \
    frame-ancestors 'none'";

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");
const ICON: &str = include_str!("ui/icon.svg");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// `GET /admin/ui`: the page (no secret in it; open to anyone).
pub(crate) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /admin/ui/app.js`.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /admin/ui/icon.svg`: the tab's icon (so that the browser does not
/// ask for a `/favicon.ico` the gateway does not have).
pub(crate) async fn icon() -> Response {
    asset("image/svg+xml", ICON)
}

/// `GET /admin/ui/app.css`.
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
