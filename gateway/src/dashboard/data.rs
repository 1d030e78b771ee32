//! The admin JSON the dashboard reads, guarded by the admin key like every
//! admin route: plans and accounts with their limits, keys with today's
//! usage, an account's usage per day, and the recent decisions.

use axum::extract::{Path, Query, State};
use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate::store::Store;
use tollgate::{Date, Quota, Throttle, TokenBudget};

use super::time::{day_of, next_reset, rfc3339, seconds};
use crate::admin::{AdminState, Authorized, Styled, key_info_json};

/// The page's routes (open) and the JSON routes it reads (guarded).
pub(crate) fn routes<S: Store>() -> Router<AdminState<S>> {
    Router::new()
        .route("/admin/ui", get(super::page))
        .route("/admin/ui/app.js", get(super::script))
        .route("/admin/ui/app.css", get(super::style))
        .route("/admin/ui/icon.svg", get(super::icon))
        .route("/admin/plans", get(plans::<S>))
        .route("/admin/accounts", get(accounts::<S>))
        .route("/admin/accounts/{name}/usage", get(account_usage::<S>))
        .route("/admin/traffic", get(traffic::<S>))
}

/// Admin answers change with every request: never cached.
fn fresh(body: Value) -> Response {
    let mut res = Json(body).into_response();
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    res
}

/// The current second and UTC day by the store's clock.
fn now<S>(s: &AdminState<S>) -> (i64, Date) {
    let secs = seconds(s.dashboard.clock.wall());
    (secs, day_of(secs))
}

fn throttle_json(t: Option<Throttle>) -> Value {
    t.map_or(
        Value::Null,
        |t| json!({"rate": t.rate(), "burst": t.burst()}),
    )
}

fn quota_json(q: Option<Quota>, now: i64) -> Value {
    q.map_or(Value::Null, |q| {
        json!({
            "limit": q.limit(),
            "period": q.period().to_string(),
            "next_reset": rfc3339(next_reset(q.period(), now)),
        })
    })
}

fn tokens_json(t: Option<TokenBudget>) -> Value {
    t.map_or(Value::Null, |t| {
        json!({
            "per_minute": t.get_per_minute(),
            "per_day": t.get_per_day(),
            "per_month": t.get_per_month(),
        })
    })
}

/// `GET /admin/plans`: each plan of the config with its limits as they are
/// now, and how many keys it has.
async fn plans<S: Store>(_: Authorized, State(s): State<AdminState<S>>) -> Response {
    let (secs, _) = now(&s);
    let keys = s.admin.keys();
    let plans: Vec<Value> = s
        .dashboard
        .plans
        .iter()
        .filter_map(|name| s.admin.plan(name))
        .map(|p| {
            json!({
                "name": p.name(),
                "throttle": throttle_json(p.get_throttle()),
                "quota": quota_json(p.get_quota(), secs),
                "tokens": tokens_json(p.get_tokens()),
                "concurrency": p.get_concurrency(),
                "models": p.get_models().map(|(m, _)| m).collect::<Vec<_>>(),
                "shadow": p.is_shadow(),
                "keys": keys.iter().filter(|k| k.plan == p.name()).count(),
            })
        })
        .collect();
    fresh(json!({"now": rfc3339(secs), "plans": plans}))
}

/// `GET /admin/accounts`: each account of the config with its limits, its
/// keys, and today's use of its quota.
async fn accounts<S: Store>(_: Authorized, State(s): State<AdminState<S>>) -> Response {
    let (secs, today) = now(&s);
    let keys = s.admin.keys();
    let mut accounts = Vec::new();
    for name in s.dashboard.accounts.iter() {
        let Some(a) = s.admin.account(name) else {
            continue;
        };
        let today_usage = match a.get_quota() {
            Some(_) => match s.admin.account_usage(name, today, today).await {
                Ok(u) => u.days.last().map_or(
                    Value::Null,
                    |[used, remaining]| json!({"used": used, "remaining": remaining}),
                ),
                Err(e) => return s.admin_error(&e),
            },
            None => Value::Null,
        };
        accounts.push(json!({
            "name": a.name(),
            "throttle": throttle_json(a.get_throttle()),
            "quota": quota_json(a.get_quota(), secs),
            "tokens": tokens_json(a.get_tokens()),
            "keys": keys.iter().filter(|k| k.account.as_deref() == Some(name)).count(),
            "today": today_usage,
        }));
    }
    fresh(json!({"now": rfc3339(secs), "accounts": accounts}))
}

/// Above this many keys in one answer, `GET /admin/keys` leaves their token
/// budgets out (`"tokens": null`): each is one read of the store.
const TOKENS_FOR_AT_MOST: usize = 500;

#[derive(Deserialize)]
pub(crate) struct KeysQuery {
    /// Only keys whose id, plan or account holds this text.
    q: Option<String>,
}

/// `GET /admin/keys[?q=TEXT]`: every key (never its value) with today's use
/// of its plan's quota, what remains of the current window, and what
/// remains of each token budget (up to [`TOKENS_FOR_AT_MOST`] keys).
pub(crate) async fn keys<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(q): Styled<Query<KeysQuery>>,
) -> Response {
    let (secs, today) = now(&s);
    let needle = q.q.as_deref().unwrap_or("").to_lowercase();
    let keys: Vec<_> = s
        .admin
        .keys()
        .into_iter()
        .filter(|k| {
            needle.is_empty()
                || k.id.to_lowercase().contains(&needle)
                || k.plan.to_lowercase().contains(&needle)
                || k.account
                    .as_deref()
                    .is_some_and(|a| a.to_lowercase().contains(&needle))
        })
        .collect();
    // Today's usage per plan, one store read per plan with a quota.
    let mut today_of = std::collections::HashMap::new();
    let mut plans: Vec<&str> = keys.iter().map(|k| k.plan.as_str()).collect();
    plans.sort_unstable();
    plans.dedup();
    for plan in plans {
        let Some(quota) = s.admin.plan(plan).and_then(|p| p.get_quota()) else {
            continue;
        };
        match s.admin.usage(plan, today, today, None).await {
            Ok(report) => {
                for (id, days) in report.items {
                    if let Some(&[used, remaining]) = days.last() {
                        today_of.insert(id, (quota, used, remaining));
                    }
                }
            }
            Err(e) => return s.admin_error(&e),
        }
    }
    // Token budgets are read per key (a peek of its limits, charging
    // nothing): for a page's worth of keys, not for a whole registry.
    let mut tokens_of = std::collections::HashMap::new();
    if keys.len() <= TOKENS_FOR_AT_MOST {
        for k in &keys {
            if let Ok(standing) = s.limit.standing_by_id(&k.id).await {
                let budgets: Vec<Value> = standing
                    .limits()
                    .iter()
                    .filter(|a| a.kind().counts_tokens())
                    .map(|a| {
                        json!({
                            "name": a.name(),
                            "limit": a.limit(),
                            "remaining": a.remaining(),
                            "reset_ms": u64::try_from(a.reset().as_millis()).unwrap_or(u64::MAX),
                        })
                    })
                    .collect();
                tokens_of.insert(k.id.clone(), budgets);
            }
        }
    }
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            let mut v = key_info_json(k);
            v["tokens"] = tokens_of
                .get(&k.id)
                .map_or(Value::Null, |t| t.clone().into());
            v["quota"] = today_of
                .get(&k.id)
                .map_or(Value::Null, |(q, used, remaining)| {
                    json!({
                        "limit": q.limit(),
                        "period": q.period().to_string(),
                        "used": used,
                        "remaining": remaining,
                        "next_reset": rfc3339(next_reset(q.period(), secs)),
                    })
                });
            v
        })
        .collect();
    fresh(json!({"now": rfc3339(secs), "date": today.to_string(), "keys": keys}))
}

#[derive(Deserialize)]
struct RangeQuery {
    start: String,
    end: String,
}

/// `GET /admin/accounts/NAME/usage?start=YYYY-MM-DD&end=YYYY-MM-DD`: the
/// account's quota use per UTC day, all its keys together (GetUsage's shape
/// with the account as the one item).
async fn account_usage<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(Path(name)): Styled<Path<String>>,
    q: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            let why = crate::admin::query_message(&e, "usage needs start and end (YYYY-MM-DD)");
            return s.error(StatusCode::BAD_REQUEST, &why);
        }
    };
    let (Some(start), Some(end)) = (Date::parse(&q.start), Date::parse(&q.end)) else {
        return s.error(
            StatusCode::BAD_REQUEST,
            "start and end must be dates as YYYY-MM-DD",
        );
    };
    match s.admin.account_usage(&name, start, end).await {
        Ok(u) => fresh(json!({
            "account": u.account,
            "start": u.start.to_string(),
            "end": u.end.to_string(),
            "items": {u.account.clone(): u.days},
        })),
        Err(e) => s.admin_error(&e),
    }
}

#[derive(Deserialize)]
struct TrafficQuery {
    seconds: Option<usize>,
    top: Option<usize>,
}

/// `GET /admin/traffic[?seconds=N][&top=N]`: decisions per second by
/// outcome over the last N seconds (default 300, at most 600), and the keys
/// refused most in that time (default 10, at most 100).
async fn traffic<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(q): Styled<Query<TrafficQuery>>,
) -> Response {
    let seconds = q.seconds.unwrap_or(300);
    let top = q.top.unwrap_or(10).min(100);
    let mut body = s.dashboard.traffic.snapshot(seconds, top);
    if let Some(end) = body["end"].as_i64() {
        body["end"] = rfc3339(end).into();
    }
    fresh(body)
}
