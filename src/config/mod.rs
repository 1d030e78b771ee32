//! Plans and keys from a TOML file (feature `config`).
//!
//! The format, every field optional unless marked:
//!
//! ```toml
//! history_days = 90                                 # days of usage history kept per key
//! quota_status = 429                                # status of a used-up quota (e.g. 403)
//!
//! [[plans]]
//! name = "free"                                     # required
//! throttle = { rate = 2.0, burst = 5 }              # requests/s, bucket size
//! quota = { limit = 1000, period = "DAY" }          # DAY | WEEK | MONTH; optional offset, created, week_start
//! # A WEEK quota starts on Monday, or on `week_start`: "MONDAY" … "SUNDAY",
//! # in capitals as the period (only a WEEK quota takes one).
//! tokens = { per_minute = 40000 }                   # token budget (cost units); also per_day, per_month
//! concurrency = 2                                   # in-flight cap per key
//! failure = "local"                                 # local (default) | open | closed (store failures)
//! borrow = true                                     # a remote store may lend shares (default true)
//! shadow = false
//! [plans.methods]
//! "/v1/chat/completions/POST" = { rate = 1.0, burst = 2 }
//! [plans.models]                                    # limits per model, counted per key
//! "big-model" = { throttle = { rate = 0.5, burst = 2 }, tokens = { per_minute = 10000 }, concurrency = 1 }
//! "*" = { quota = { limit = 500, period = "DAY" } }  # every model the plan does not name
//! # A model's entry holds its other spellings: "Big-Model", "big-model:latest",
//! # "library/big-model"; naming one model twice so is an error.
//! # "small-model" = {} names a model without limits of its own: "*" does not
//! # apply to it. A "*" entry or a `tokens` table that sets no limit is an error.
//!
//! [[keys]]
//! id = "free-1"                                     # required: public id
//! value = "demo-free-key"                           # required: the secret clients send
//! plan = "free"                                     # required
//! enabled = true
//!
//! [stage]                                           # shared by all callers together
//! throttle = { rate = 100.0, burst = 200 }
//! [stage.methods]
//! "/v1/chat/completions/POST" = { rate = 20.0, burst = 40 }
//!
//! [anonymous]                                       # requests without a key
//! mode = "forbid"                                   # forbid (403) | ip (limit by client IP)
//! throttle = { rate = 1.0, burst = 5 }              # required with mode = "ip"
//! trusted_proxies = ["127.0.0.1/32"]
//!
//! [admin]
//! key = "change-me"                                 # the x-admin-key of admin routes: at least 8 characters
//!
//! [response]
//! style = "aws"                                     # aws (default) | openai: statuses and bodies of rejections
//! max_retry_secs = 60                               # a retry further away says x-should-retry: false
//! ```
//!
//! A quota's `offset` is deducted in the window holding the day `created`
//! (a TOML date, `created = 2026-12-06`: the UTC day the plan was created);
//! without `created`, in the window in which the policy is built, which a
//! process restarted in a later window takes for the plan's first window
//! again.
//!
//! Unknown fields and bad values are errors that name the line, the column
//! and the field's path (`plans[0].throttle.rate`). A value of the wrong
//! type is named by its type, never shown: it may be a secret in the wrong
//! place.
//!
//! ```
//! use tollgate::config::Config;
//!
//! let config = Config::from_toml(r#"
//! [[plans]]
//! name = "free"
//! throttle = { rate = 2.0, burst = 5 }
//!
//! [[keys]]
//! id = "free-1"
//! value = "demo-free-key"
//! plan = "free"
//! "#).unwrap();
//! let policy = config.policy().unwrap();
//!
//! let err = Config::from_toml("[[plans]]\nname = \"free\"\nthrottle = { rate = -1.0, burst = 5 }\n")
//!     .unwrap_err();
//! assert_eq!((err.line(), err.path()), (3, "plans[0].throttle.rate"));
//! ```
//!
//! # Building the layer
//!
//! [`Config::policy`] holds the plans, accounts and keys;
//! [`RateLimitLayerBuilder::config`](crate::RateLimitLayerBuilder::config)
//! gives the layer what the file says of its answers: `quota_status`,
//! `[response] style` and `max_retry_secs`, and with `style = "openai"`
//! OpenAI's `x-ratelimit-*-{requests,tokens}` headers. Where keys come from
//! is the builder's choice, not the file's (the extractor is a type): a file
//! with `style = "openai"` goes with
//! [`openai()`](crate::RateLimitLayerBuilder::openai) before `config`, so
//! that keys come from `Authorization: Bearer` as OpenAI's SDKs send them
//! (or `x-api-key`). `config` sets each of its settings as the file says,
//! the defaults of those it leaves out included (a file without
//! `[response]` answers in the `aws` style): call the builder's own
//! [`style`](crate::RateLimitLayerBuilder::style),
//! [`quota_status`](crate::RateLimitLayerBuilder::quota_status),
//! [`max_retry`](crate::RateLimitLayerBuilder::max_retry) or
//! [`headers`](crate::RateLimitLayerBuilder::headers) after it to override
//! the file.
//!
//! ```
//! use tollgate::config::Config;
//! use tollgate::{RateLimitLayer, ResponseStyle};
//!
//! let config = Config::from_toml(r#"
//! quota_status = 403
//!
//! [[plans]]
//! name = "free"
//! quota = { limit = 1, period = "DAY" }
//!
//! [[keys]]
//! id = "free-1"
//! value = "sk-demo"
//! plan = "free"
//!
//! [response]
//! style = "openai"
//! "#)?;
//! let layer = RateLimitLayer::builder(config.policy()?)
//!     .openai() // keys from `Authorization: Bearer` or `x-api-key`
//!     .config(&config) // the file's style, quota status and retry bound
//!     .build();
//! layer.check(b"sk-demo", 1).unwrap();
//! let rejected = layer.check(b"sk-demo", 1).unwrap_err();
//! assert_eq!(rejected.style(), ResponseStyle::OpenAi);
//! assert_eq!(rejected.status(), 403);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod check;
mod document;
mod error;
mod load;
mod location;

pub use self::error::ConfigFileError;
pub use self::load::Config;
