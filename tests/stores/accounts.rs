//! Accounts on every store: limits shared by all the keys of an account,
//! decided with each key's in one decision, in the order stage → account →
//! plan → method. A denial charges nothing anywhere: a request a later
//! limit denies gives the account (and the stage) back what it took, on a
//! Redis Cluster too, where the stage, the account and the key each live in
//! a slot of their own and are decided one after the other.

use std::time::Duration;

use tollgate::extract::ApiKeyHeader;
use tollgate::store::Store;
use tollgate::{
    Account, ApiKey, Date, ManualClock, Period, Policy, PolicyBuilder, Quota, RateLimitLayer,
    Reason, Stage, Throttle, TokenBudget, UsagePlan,
};

use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;
use crate::support::tokens;

type Layer<B> = RateLimitLayer<ApiKeyHeader, <B as Backend>::S>;

/// A policy on `clock` with keys `a` (value `va`) and `b` (`vb`) of account
/// `acme` on plan `p`, and `c` (`vc`) on `p` without an account.
pub(crate) fn policy(clock: &ManualClock, plan: UsagePlan, account: Account) -> PolicyBuilder {
    Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .account(account)
        .key(ApiKey::new("a", "va", "p").account("acme"))
        .key(ApiKey::new("b", "vb", "p").account("acme"))
        .key(ApiKey::new("c", "vc", "p"))
}

async fn layer<B: Backend>(b: &B, clock: &ManualClock, policy: PolicyBuilder) -> Layer<B> {
    RateLimitLayer::builder(policy.build().unwrap())
        .store(b.store(clock).await)
        .build()
}

/// The name of the limit that denied a request of `key`, or `None` when it
/// passed.
async fn denied_by<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, key: &[u8]) -> Option<String> {
    match l.decide(key, 1).await {
        Ok(_) => None,
        Err(r) => Some(r.limit().unwrap_or("none").to_owned()),
    }
}

/// Lets refunds sent in the background land (a cluster refunds the earlier
/// parts of a split decision after answering).
pub(crate) async fn refunds_land() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

pub(crate) fn day() -> Date {
    Date::new(2024, 5, 6).unwrap()
}

async fn two_keys_together_never_pass_the_account_throttle_or_quota<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").throttle(Throttle::new(100.0, 100).unwrap());
    let account = Account::new("acme")
        .throttle(Throttle::new(1.0, 3).unwrap())
        .quota(Quota::new(5, Period::Day).unwrap());
    let l = layer(b, &clock, policy(&clock, plan, account)).await;
    // Three at once between the two keys; the fourth waits for the account.
    assert_eq!(denied_by(&l, b"va").await, None);
    assert_eq!(denied_by(&l, b"vb").await, None);
    assert_eq!(denied_by(&l, b"va").await, None);
    let r = l.decide(b"vb", 1).await.unwrap_err();
    assert_eq!((r.reason(), r.limit()), (Reason::Limited, Some("account")));
    assert_eq!(r.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("account"));
    // A key of no account is not held by it.
    assert_eq!(denied_by(&l, b"vc").await, None);
    // The quota of 5 is the account's: two more, then neither key passes.
    clock.advance(Duration::from_secs(10));
    assert_eq!(denied_by(&l, b"vb").await, None);
    assert_eq!(denied_by(&l, b"va").await, None);
    let r = l.decide(b"va", 1).await.unwrap_err();
    assert_eq!(
        (r.reason(), r.limit()),
        (Reason::QuotaExceeded, Some("account-quota"))
    );
    assert_eq!(r.retry_after_secs(), Some(86_400 - 3_600 - 10));
    assert_eq!(denied_by(&l, b"vb").await.as_deref(), Some("account-quota"));
    let usage = l.admin().account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[5, 0]]);
}

async fn a_denial_by_the_plan_gives_the_account_and_the_stage_back_what_they_took<B: Backend>(
    b: &B,
) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 2).unwrap())
        .quota(Quota::new(100, Period::Day).unwrap());
    let account = Account::new("acme")
        .throttle(Throttle::new(1.0, 3).unwrap())
        .quota(Quota::new(10, Period::Day).unwrap());
    let stage = Stage::new().throttle(Throttle::new(1.0, 4).unwrap());
    let l = layer(b, &clock, policy(&clock, plan, account).stage(stage)).await;
    // a takes 2 of its plan's 2, of the account's 3 and of the stage's 4.
    assert_eq!(denied_by(&l, b"va").await, None);
    assert_eq!(denied_by(&l, b"va").await, None);
    // Denied by its plan: the stage and the account get back what it took.
    for _ in 0..3 {
        assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("throttle"));
        refunds_land().await;
    }
    // b finds the account's last unit, then the account denies it, and the
    // stage gets its unit back.
    assert_eq!(denied_by(&l, b"vb").await, None);
    assert_eq!(denied_by(&l, b"vb").await.as_deref(), Some("account"));
    refunds_land().await;
    // c (no account) finds the stage's last unit: 3 of 4 were kept.
    assert_eq!(denied_by(&l, b"vc").await, None);
    assert_eq!(denied_by(&l, b"vc").await.as_deref(), Some("stage"));
    refunds_land().await;
    // The account's quota counted the 3 requests it let through, no more;
    // the keys' quotas their own.
    let admin = l.admin();
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[3, 7]]);
    let keys = admin.usage("p", day(), day(), None).await.unwrap();
    assert_eq!(keys.items["a"], [[2, 98]]);
    assert_eq!(keys.items["b"], [[1, 99]]);
    assert_eq!(keys.items["c"], [[1, 99]]);
}

async fn a_used_up_plan_quota_gives_the_account_quota_back<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").quota(Quota::new(2, Period::Day).unwrap());
    let account = Account::new("acme").quota(Quota::new(3, Period::Day).unwrap());
    let l = layer(b, &clock, policy(&clock, plan, account)).await;
    assert_eq!(denied_by(&l, b"va").await, None);
    assert_eq!(denied_by(&l, b"va").await, None);
    for _ in 0..4 {
        assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("quota"));
        refunds_land().await;
    }
    assert_eq!(denied_by(&l, b"vb").await, None);
    assert_eq!(denied_by(&l, b"vb").await.as_deref(), Some("account-quota"));
    let admin = l.admin();
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[3, 0]]);
    // UpdateUsage for the account: both keys find the new room.
    assert_eq!(admin.set_account_remaining("acme", 1).await.unwrap(), 1);
    assert_eq!(denied_by(&l, b"vb").await, None);
    assert_eq!(denied_by(&l, b"vb").await.as_deref(), Some("account-quota"));
    // Resetting the account forgets its window, not the keys' own counts:
    // both keys have used their plan's 2 today.
    admin.reset_account("acme").await.unwrap();
    assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("quota"));
    assert_eq!(denied_by(&l, b"vb").await.as_deref(), Some("quota"));
    refunds_land().await;
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[0, 3]]);
}

/// A request its plan denies gives the account's quota back exactly what
/// it took, also when UpdateUsage raised what remains past the limit: the
/// denials leave the raise as it was (held at zero, they would take it).
async fn a_denial_by_the_plan_leaves_a_raised_account_quota_as_it_was<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").quota(Quota::new(1, Period::Day).unwrap());
    let account = Account::new("acme").quota(Quota::new(2, Period::Day).unwrap());
    let l = layer(b, &clock, policy(&clock, plan, account)).await;
    let admin = l.admin();
    assert_eq!(admin.set_account_remaining("acme", 10).await.unwrap(), 10);
    assert_eq!(denied_by(&l, b"va").await, None);
    for _ in 0..3 {
        assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("quota"));
        refunds_land().await;
    }
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[1, 9]]);
    // b's plan has room: the account still has 9.
    assert_eq!(denied_by(&l, b"vb").await, None);
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[2, 8]]);
}

/// A request its plan denies gives the account and the stage back what it
/// took also right after the account was reset: charged at the reset's
/// very instant or after it, the units are the new count's, and go back to
/// it. With what remains raised by UpdateUsage after that, the give-backs
/// leave the raise as it was.
async fn a_denial_by_the_plan_after_an_account_reset_gives_back_what_it_took<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    // a's plan allows one request a day; b's and c's, many.
    let plan = UsagePlan::new("p").quota(Quota::new(100, Period::Day).unwrap());
    let tight = UsagePlan::new("tight").quota(Quota::new(1, Period::Day).unwrap());
    let account = Account::new("acme")
        .throttle(Throttle::new(1.0, 3).unwrap())
        .quota(Quota::new(3, Period::Day).unwrap());
    let stage = Stage::new().throttle(Throttle::new(1.0, 4).unwrap());
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .plan(tight)
        .account(account)
        .stage(stage)
        .key(ApiKey::new("a", "va", "tight").account("acme"))
        .key(ApiKey::new("b", "vb", "p").account("acme"))
        .key(ApiKey::new("c", "vc", "p"));
    let l = layer(b, &clock, policy).await;
    let admin = l.admin();
    assert_eq!(denied_by(&l, b"va").await, None);
    admin.reset_account("acme").await.unwrap();
    // At the reset's instant, then after it: a's plan quota is used up.
    for step in [0, 1, 0] {
        clock.advance(Duration::from_millis(step));
        assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("quota"));
        refunds_land().await;
    }
    // The account is whole: b takes its bucket of 3 and its quota of 3,
    // and with a's one the stage's 4 are gone.
    for _ in 0..3 {
        assert_eq!(denied_by(&l, b"vb").await, None);
    }
    assert_eq!(denied_by(&l, b"vb").await.as_deref(), Some("account-quota"));
    assert_eq!(denied_by(&l, b"vc").await.as_deref(), Some("stage"));
    refunds_land().await;
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[3, 0]]);
    // Raised to 10 and the buckets full again: a's denials leave the 10.
    assert_eq!(admin.set_account_remaining("acme", 10).await.unwrap(), 10);
    clock.advance(Duration::from_secs(10));
    for _ in 0..3 {
        assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("quota"));
        refunds_land().await;
    }
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[3, 10]]);
    for _ in 0..3 {
        assert_eq!(denied_by(&l, b"vb").await, None);
    }
    assert_eq!(denied_by(&l, b"vb").await.as_deref(), Some("account"));
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[6, 7]]);
}

/// The same for tokens: a request its plan's day tokens deny, sent at the
/// instant of the account's reset, gives the account's bucket and day
/// tokens back what it took from the new count.
async fn a_token_denial_by_the_plan_after_an_account_reset_gives_back_what_it_took<B: Backend>(
    b: &B,
) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").tokens(TokenBudget::new().per_day(1_000).unwrap());
    let budget = TokenBudget::new()
        .per_minute(1_500)
        .unwrap()
        .per_day(1_500)
        .unwrap();
    let account = Account::new("acme").tokens(budget);
    let (mut svc, admin) = token_service(b, &clock, policy(&clock, plan, account)).await;
    assert_eq!(send(&mut svc, "va", 1_000, Some(1_000)).await, (200, None));
    admin.reset_account("acme").await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            send(&mut svc, "va", 500, None).await,
            (429, Some("tokens-day".to_owned()))
        );
        refunds_land().await;
    }
    // The account's 1500 are whole: b takes its own day's 1000 of them,
    // and after a reset of b's own limits the last 500.
    assert_eq!(send(&mut svc, "vb", 1_000, Some(1_000)).await, (200, None));
    admin.reset_key("b").await.unwrap();
    assert_eq!(send(&mut svc, "vb", 500, Some(500)).await, (200, None));
    assert_eq!(
        send(&mut svc, "vb", 1, None).await,
        (429, Some("account-tokens-day".to_owned()))
    );
}

async fn a_denial_by_the_account_charges_the_key_nothing<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 2).unwrap())
        .quota(Quota::new(100, Period::Day).unwrap());
    let account = Account::new("acme").quota(Quota::new(1, Period::Day).unwrap());
    let l = layer(b, &clock, policy(&clock, plan, account)).await;
    assert_eq!(denied_by(&l, b"va").await, None);
    for _ in 0..3 {
        assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("account-quota"));
        refunds_land().await;
    }
    let admin = l.admin();
    let keys = admin.usage("p", day(), day(), Some("a")).await.unwrap();
    assert_eq!(keys.items["a"], [[1, 99]], "the key's quota counted one");
    // With room in the account again, the key's bucket has exactly the one
    // unit the first request left: the denials took none.
    admin.set_account_remaining("acme", 10).await.unwrap();
    assert_eq!(denied_by(&l, b"va").await, None);
    assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("throttle"));
    // Unknown accounts and accounts without a quota are named.
    assert!(admin.account_usage("nope", day(), day()).await.is_err());
    assert!(admin.set_account_remaining("nope", 1).await.is_err());
}

/// A layer on `policy` whose estimate is the `x-estimate` header, in front
/// of a service that reports `x-actual` as the tokens used; and its admin.
pub(crate) async fn token_service<B: Backend>(
    b: &B,
    clock: &ManualClock,
    policy: PolicyBuilder,
) -> (
    impl tower::Service<
        http::Request<String>,
        Response = http::Response<tollgate::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
        Error = std::convert::Infallible,
    > + Clone,
    tollgate::Admin<B::S>,
) {
    let layer = RateLimitLayer::builder(policy.build().unwrap())
        .store(b.store(clock).await)
        .estimator(tokens::estimate)
        .build();
    let admin = layer.admin();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(tokens::report_actual);
    (svc, admin)
}

/// Sends a request of `key` and reads its body to the end (which settles
/// it); the status and the denying limit's name, if any.
pub(crate) async fn send<S>(
    svc: &mut S,
    key: &str,
    estimate: u32,
    actual: Option<u64>,
) -> (u16, Option<String>)
where
    S: tower::Service<
            http::Request<String>,
            Response = http::Response<tollgate::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
            Error = std::convert::Infallible,
        >,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(tokens::request(key, estimate, actual))
        .await
        .unwrap();
    let status = res.status().as_u16();
    let limit = res
        .extensions()
        .get::<tollgate::Rejection>()
        .and_then(|r| r.limit())
        .map(str::to_owned);
    let _ = res.into_body().collect().await.unwrap();
    (status, limit)
}

async fn token_settlement_reaches_the_account<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    // The plan has no token budget; the account has a day's and a minute's.
    let plan = UsagePlan::new("p").throttle(Throttle::new(100.0, 100).unwrap());
    let budget = TokenBudget::new()
        .per_minute(1_000)
        .unwrap()
        .per_day(100)
        .unwrap();
    let account = Account::new("acme").tokens(budget);
    let (mut svc, _) = token_service(b, &clock, policy(&clock, plan, account)).await;
    // a reserves 60 and uses 10: 50 go back to the account.
    assert_eq!(send(&mut svc, "va", 60, Some(10)).await, (200, None));
    refunds_land().await;
    // b finds them: 10 + 90 = 100.
    assert_eq!(send(&mut svc, "vb", 90, Some(90)).await, (200, None));
    assert_eq!(
        send(&mut svc, "va", 1, None).await,
        (429, Some("account-tokens-day".to_owned()))
    );
    // An under-estimate is charged to the account too: the next day, b
    // reserves 10 and uses 95, and a finds 5 left.
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(send(&mut svc, "vb", 10, Some(95)).await, (200, None));
    refunds_land().await;
    assert_eq!(
        send(&mut svc, "va", 6, None).await,
        (429, Some("account-tokens-day".to_owned()))
    );
    assert_eq!(send(&mut svc, "va", 5, None).await, (200, None));
    // The account's minute bucket (1000 a minute) is charged beside: a
    // key of no account has no token limit at all.
    assert_eq!(send(&mut svc, "vc", 5_000, None).await, (200, None));
}

async fn replacing_the_account_throttle_keeps_its_emptied_bucket_empty<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let account = Account::new("acme").throttle(Throttle::new(100.0, 10).unwrap());
    let l = layer(b, &clock, policy(&clock, UsagePlan::new("p"), account)).await;
    // The two keys empty the account's bucket of 10 together.
    let mut passed = 0;
    for key in [b"va", b"vb"].into_iter().cycle().take(20) {
        passed += usize::from(denied_by(&l, key).await.is_none());
    }
    assert_eq!(passed, 10);
    // Emptied at 100/s, now 1/s: still empty, as a plan's bucket stays
    // (`put_plan`); one more passes a second later.
    let slower = Account::new("acme").throttle(Throttle::new(1.0, 10).unwrap());
    l.admin().put_account(slower.clone()).await.unwrap();
    assert_eq!(l.admin().account("acme"), Some(slower));
    for key in [b"va", b"vb"].into_iter().cycle().take(20) {
        assert_eq!(denied_by(&l, key).await.as_deref(), Some("account"));
    }
    clock.advance(Duration::from_secs(1));
    assert_eq!(denied_by(&l, b"vb").await, None);
    assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("account"));
}

async fn a_key_the_resolver_answers_keeps_the_accounts_history<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").borrow(false);
    let account = Account::new("acme").quota(Quota::new(10, Period::Day).unwrap());
    // "vr" is the key "r" of the account, kept outside the policy.
    let lookup = |value: String| async move {
        Ok(match value.as_str() {
            "vr" => {
                tollgate::Resolution::Found(tollgate::ResolvedKey::new("r", "p").account("acme"))
            }
            _ => tollgate::Resolution::Unknown,
        })
    };
    let l = RateLimitLayer::builder(policy(&clock, plan, account).build().unwrap())
        .store(b.store(&clock).await)
        .resolver(tollgate::Resolver::new(lookup).clock(clock.clone()))
        .build();
    // Each day the resolved key uses the account first, then a registered
    // key: the account's days are all of its keys' together.
    for (key, n) in [(&b"vr"[..], 1), (b"va", 2)] {
        for _ in 0..n {
            assert_eq!(denied_by(&l, key).await, None);
        }
    }
    clock.advance(Duration::from_secs(86_400));
    for key in [&b"vr"[..], b"va"] {
        assert_eq!(denied_by(&l, key).await, None);
    }
    let next = Date::new(2024, 5, 7).unwrap();
    let usage = l.admin().account_usage("acme", day(), next).await.unwrap();
    assert_eq!(usage.days, vec![[3, 7], [2, 8]]);
}

/// A key of an account under a plan whose request quota, token day and
/// token month each have their twin in the account and in the plan's `"*"`
/// model entry: nine quotas, the most one request can have, decided
/// together (on a plan that answers a failed store 503).
async fn a_request_under_nine_quotas_is_decided_with_all_of_them<B: Backend>(b: &B) {
    use tollgate::{FailureMode, ModelLimits};
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let tokens = || {
        TokenBudget::new()
            .per_day(1_000)
            .unwrap()
            .per_month(10_000)
            .unwrap()
    };
    let plan = UsagePlan::new("p")
        .failure(FailureMode::Closed)
        .quota(Quota::new(3, Period::Day).unwrap())
        .tokens(tokens())
        .model(
            "*",
            ModelLimits::new()
                .quota(Quota::new(5, Period::Day).unwrap())
                .tokens(tokens()),
        );
    let account = Account::new("acme")
        .quota(Quota::new(100, Period::Month).unwrap())
        .tokens(tokens());
    let (mut svc, admin) = token_service(b, &clock, policy(&clock, plan, account)).await;
    for _ in 0..3 {
        assert_eq!(send(&mut svc, "va", 10, Some(10)).await, (200, None));
    }
    assert_eq!(
        send(&mut svc, "va", 10, None).await,
        (429, Some("quota".to_owned()))
    );
    refunds_land().await;
    let day = Date::new(2024, 5, 6).unwrap();
    let usage = admin.account_usage("acme", day, day).await.unwrap();
    assert_eq!(
        usage.days,
        [[3, 97]],
        "the account counted the three let in"
    );
}

/// An account whose quota limit is put anew between requests: the days
/// before the change keep what remained under the old limit, the days from
/// it report the new one, on every store alike, as a plan's do.
async fn an_account_limit_put_anew_shows_from_its_day<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").borrow(false);
    let account = |limit| Account::new("acme").quota(Quota::new(limit, Period::Month).unwrap());
    let l = layer(b, &clock, policy(&clock, plan, account(10))).await;
    let admin = l.admin();
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    for key in [b"va", b"vb", b"va"] {
        assert_eq!(denied_by(&l, key).await, None);
    }
    // Two days later the account's limit goes up to 20.
    clock.advance(Duration::from_secs(2 * 86_400));
    admin.put_account(account(20)).await.unwrap();
    let usage = admin.account_usage("acme", may(6), may(8)).await.unwrap();
    assert_eq!(usage.days, [[3, 7], [0, 7], [0, 17]]);
    assert_eq!(denied_by(&l, b"vb").await, None);
    clock.advance(Duration::from_secs(86_400));
    // And on the next day down to 5, read a day later.
    admin.put_account(account(5)).await.unwrap();
    clock.advance(Duration::from_secs(86_400));
    let usage = admin.account_usage("acme", may(6), may(10)).await.unwrap();
    assert_eq!(
        usage.days,
        [[3, 7], [0, 7], [1, 16], [0, 1], [0, 1]],
        "each day under the account's limit in force at its end"
    );
}

/// A request its plan denies on the first day of a new window of the
/// account's quota charges the account nothing, and leaves its report as a
/// day nobody used: after the account's limit is put anew, that day reads
/// alike on every store (on Redis the account's part of a denied decision
/// was never written, in memory it was charged and given back).
async fn a_denied_request_in_a_new_account_window_reads_alike_after_a_change<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .quota(Quota::new(1, Period::Month).unwrap())
        .borrow(false);
    let account = |limit| Account::new("acme").quota(Quota::new(limit, Period::Day).unwrap());
    let l = layer(b, &clock, policy(&clock, plan, account(10))).await;
    let admin = l.admin();
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    assert_eq!(denied_by(&l, b"va").await, None);
    clock.advance(Duration::from_secs(86_400));
    // The account's new day would hold it; the plan's month does not.
    assert_eq!(denied_by(&l, b"va").await.as_deref(), Some("quota"));
    refunds_land().await;
    clock.advance(Duration::from_secs(86_400));
    admin.put_account(account(20)).await.unwrap();
    let usage = admin.account_usage("acme", may(6), may(8)).await.unwrap();
    assert_eq!(
        usage.days,
        [[1, 9], [0, 10], [0, 20]],
        "a day nobody used reads the limit in force at its end"
    );
}

on_each_backend!(
    "accounts":
    two_keys_together_never_pass_the_account_throttle_or_quota,
    a_denial_by_the_plan_gives_the_account_and_the_stage_back_what_they_took,
    a_used_up_plan_quota_gives_the_account_quota_back,
    a_denial_by_the_plan_leaves_a_raised_account_quota_as_it_was,
    a_denial_by_the_plan_after_an_account_reset_gives_back_what_it_took,
    a_token_denial_by_the_plan_after_an_account_reset_gives_back_what_it_took,
    a_denial_by_the_account_charges_the_key_nothing,
    token_settlement_reaches_the_account,
    replacing_the_account_throttle_keeps_its_emptied_bucket_empty,
    a_key_the_resolver_answers_keeps_the_accounts_history,
    a_request_under_nine_quotas_is_decided_with_all_of_them,
    an_account_limit_put_anew_shows_from_its_day,
    a_denied_request_in_a_new_account_window_reads_alike_after_a_change,
);

/// On a Redis Cluster, where the stage, each account and each key live in
/// slots of their own: the same answers, split decisions and refunds.
#[tokio::test]
async fn redis_cluster_agrees_on_accounts() {
    if !require_redis() {
        return;
    }
    let cluster = Redis::cluster("accounts");
    two_keys_together_never_pass_the_account_throttle_or_quota(&cluster).await;
    a_denial_by_the_plan_gives_the_account_and_the_stage_back_what_they_took(&cluster).await;
    a_used_up_plan_quota_gives_the_account_quota_back(&cluster).await;
    a_denial_by_the_plan_leaves_a_raised_account_quota_as_it_was(&cluster).await;
    a_denial_by_the_plan_after_an_account_reset_gives_back_what_it_took(&cluster).await;
    a_token_denial_by_the_plan_after_an_account_reset_gives_back_what_it_took(&cluster).await;
    a_denial_by_the_account_charges_the_key_nothing(&cluster).await;
    token_settlement_reaches_the_account(&cluster).await;
    replacing_the_account_throttle_keeps_its_emptied_bucket_empty(&cluster).await;
    a_request_under_nine_quotas_is_decided_with_all_of_them(&cluster).await;
    an_account_limit_put_anew_shows_from_its_day(&cluster).await;
    a_denied_request_in_a_new_account_window_reads_alike_after_a_change(&cluster).await;
}

/// On a Redis Cluster deciding on Redis `TIME` (not a frozen clock): the
/// account is charged first, in its own slot, and the key's day count is
/// made a moment later by the same request, in another. An over-estimate
/// goes back to both: the key's count was made by this very charge, not
/// before it.
#[tokio::test]
async fn redis_cluster_refunds_a_plans_token_day_beside_the_accounts_on_redis_time() {
    if !require_redis() {
        return;
    }
    let cluster = crate::support::redis::RedisCluster::start();
    let store = tollgate::RedisStore::cluster_builder(cluster.urls())
        .prefix("refund-time")
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .tokens(TokenBudget::new().per_day(100).unwrap());
    let account = Account::new("acme").tokens(TokenBudget::new().per_day(1_000).unwrap());
    let policy = Policy::builder()
        .plan(plan)
        .account(account)
        .key(ApiKey::new("a", "va", "p").account("acme"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(tokens::estimate)
        .build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(tokens::report_actual);
    // The first request of the key's day reserves 60 and uses 10: 50 go
    // back to the plan's day, which then holds 90 more, not 40.
    assert_eq!(send(&mut svc, "va", 60, Some(10)).await, (200, None));
    refunds_land().await;
    assert_eq!(send(&mut svc, "va", 90, Some(90)).await, (200, None));
    assert_eq!(
        send(&mut svc, "va", 1, None).await,
        (429, Some("tokens-day".to_owned()))
    );
}
