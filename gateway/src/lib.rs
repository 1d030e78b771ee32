//! tollgate-gateway: a rate-limiting gateway for OpenAI-compatible inference
//! APIs, built on tollgate.
//!
//! Run with `cargo run --release -p tollgate-gateway -- [--config FILE] [--listen ADDR] [--redis URL[,URL…]] [--redis-timeout MS] [--upstream URL] [--drain SECS]`
//! (`--help` lists every flag and environment variable with its default).
//!
//! With `--upstream URL` it forwards `/v1/*` to an OpenAI-compatible backend
//! (vLLM, llama.cpp server, Ollama) instead of the mock, behind the same
//! limits: see [`Upstream`] for streaming, settlement from the backend's
//! `usage`, errors, timeouts and credentials.
//!
//! In mock mode (the default) it serves a mock OpenAI-style inference API
//! behind tollgate:
//!
//! - `POST /v1/completions` with `{"model":"m","prompt":"…","max_tokens":N,"stream":false}`;
//!   `prompt` may also be strings, token ids or lists of token ids, as
//!   OpenAI takes it: each prompt of several is answered `n` times
//!   (choices `0..n` the first's, `n..2n` the second's), and each token id
//!   counts one prompt token
//! - `POST /v1/chat/completions` with `"messages":[{"role":"user","content":"…"}]` instead of `prompt`
//! - `GET /v1/models`: the models the config's plans name (`mock` when none)
//! - `GET /v1/models/{model}`: one of them (a name with `/` in it too), or
//!   OpenAI's 404 `model_not_found`
//! - `GET /health`, never limited
//!
//! Answers have OpenAI's shapes: `id`, `object`, `created` and `model` on
//! every response and chunk, `finish_reason` `length` when all of
//! `max_tokens` was produced, else `stop`. With `"stream": true` the answer
//! is server-sent events: for chat a `role` delta first, one chunk per token,
//! a chunk with the `finish_reason`, with `stream_options.include_usage` a
//! last chunk with `"choices": []` and the usage, then `data: [DONE]`. The
//! mock generates `max_tokens` tokens (default 16; `max_completion_tokens`,
//! the chat API's newer name for it, is read first when both are given, as
//! vLLM reads them), or
//! `mock_completion_tokens` when the request names it, `mock_token_ms` apart
//! (default 5) when streaming; `mock_fail_after: N` cuts a stream off after
//! N tokens, as a broken model would. `n` (1 to 128) asks for that many
//! choices, each with its `index` (streamed, each chunk carries one), and
//! the usage counts every choice's tokens; `max_tokens × n` may be at most
//! 100,000.
//!
//! The tokens reserved before the call are the answer's `prompt_tokens`
//! plus the maximum for every choice, the larger of `max_tokens` and
//! `max_completion_tokens` when both are given (a body that gives both is
//! never reserved less than either: servers differ in which they read).
//! A body the estimate would count otherwise than the mock serves it is a
//! 400 costing nothing, as OpenAI refuses it: a chat message part of the
//! Responses API (`input_text`, `output_text`), or a field of another API
//! (`system`, `instructions`, `max_output_tokens`, `n_predict`, `prompt`
//! beside a chat's `messages`, `messages` beside a completion's `prompt`).
//!
//! - `GET /metrics`: the decision counters (`tollgate_decisions_total`) in
//!   Prometheus text, never limited; requests to the limited routes only
//!   (a read of `GET /v1/usage`, whatever key it sends, is no decision)
//! - `GET /v1/usage`: the caller's own plan and how each of its limits
//!   stands (name, family, size, window, remaining, reset), for the key it
//!   sends (without one, under `[anonymous] mode = "ip"`, for its address);
//!   read without charging anything. `GET /v1/usage?model=NAME` shows the
//!   limits a request for that model is decided under: the model's own
//!   `[plans.models]` entry (found as a request's model is: `Big-Model:latest`
//!   finds `"big-model"`), else the plan's `"*"` entry. The answer's `model`
//!   names the entry shown (`null` when no model limits apply; `"*"` without
//!   `?model=` when the plan has that entry), and so does each model limit's
//!   `model`. A `model` that is empty or given twice is a 400, after the key
//!   is checked
//!
//! A request's head must arrive within `--header-timeout` (10 s; on a new
//! connection counted from its first byte, which must come within as long;
//! a head still unfinished then gets no answer, its connection is closed),
//! which also closes a connection (HTTP/2 too) idle that long; a body that sends nothing
//! for `--body-timeout` (30 s) is cut off (408, costing nothing where the
//! gateway was reading it for an estimate); a body read for its estimate (completions, chat completions) may be
//! at most 1 MiB (413, at once when its `content-length` says more) and must
//! arrive whole within `--body-deadline` (10 s; 408, costing nothing); the
//! bodies being read hold at most `--body-memory` MiB together (64), one key
//! or client at most a sixteenth of it but at least one body (past either,
//! 503 with `retry-after: 1`, costing nothing); at most `--max-connections` (1024)
//! are served at once, more wait to be accepted; a request's head may be at
//! most 16 KiB (431 beyond). It logs to stderr, filtered
//! by `RUST_LOG`, as JSON lines with `--log-json`.
//!
//! Only requests that match a route and its method are limited: a 404 or a
//! 405 costs nothing (it is a JSON error in the config's response style,
//! OpenAI's `Invalid URL (POST /v1/x)` in the demo), and only the POST
//! routes' bodies are read.
//! In upstream mode every `/v1/…` path and method is one matched route (an
//! AWS proxy resource, `/{proxy+}` with `ANY`): a request forwarded counts
//! against the throttle and quota whatever the backend answers, its own 404
//! or 405 included (it cost the backend work), and costs no tokens; the
//! gateway's own 404 (outside `/v1/`) and its refusals before forwarding
//! cost nothing.
//! - `/admin/…` usage and key administration, guarded by the `x-admin-key` header:
//!   - `GET /admin/usage?plan=NAME&start=YYYY-MM-DD&end=YYYY-MM-DD[&key=ID]` (AWS GetUsage):
//!     `end` is cut at today (the store's UTC day), so that each key has
//!     one `[used, remaining]` per day from `start` to the answer's `end`;
//!     a `start` after `end`, after today or before the kept history is a
//!     400; a `key` on another plan than `plan` a 404 that names the plan
//!     it is on. `&limit=N` (1 to 500) answers at most N keys, by id, and
//!     a `"position"` to pass back as `&position=…` for the next page while
//!     keys remain (AWS's `limit` and `position`); without them the report
//!     is whole and has no `position`. It holds the plan's registered keys
//!     (a day before a key existed reads `[0, remaining]`, as a day without
//!     traffic) and counts requests, as AWS's does: token budgets are read
//!     in `GET /admin/keys` and `GET /v1/usage`
//!   - `PATCH /admin/keys/ID/usage` with `{"remaining": N}` (AWS UpdateUsage)
//!   - `POST /admin/keys` with `{"id":…,"value":…,"plan":…}` adds a key (without `value`
//!     the gateway generates one and answers it once); with an array of
//!     them imports them all or none (the first bad one named: `index`, `id`)
//!   - `GET /admin/keys/ID` shows a key (never its value); `DELETE /admin/keys/ID` removes it
//!   - `PATCH /admin/keys/ID` with `{"enabled": false}`, `{"plan": "pro"}` or both, applied
//!     as one change (no request finds the key with one changed and not the other)
//!   - `POST /admin/keys/ID/reset` forgets the key's usage in its current window
//!   - `GET /admin/ui`: the usage dashboard (see [`Dashboard`]), a page that asks for the
//!     admin key and reads `GET /admin/plans`, `/admin/accounts`, `/admin/keys[?q=TEXT]`,
//!     `/admin/accounts/NAME/usage?start=…&end=…` and `/admin/traffic[?seconds=N]`
//!
//!   Their errors, the key check's 403 and a path, query or body axum cannot
//!   read included, are JSON in the config's response style. A key, plan or
//!   account named by the path or the query that is not there is a 404; a
//!   body that names a plan or an account the gateway does not have, or an
//!   id or a value already taken (`POST /admin/keys`, `PATCH
//!   /admin/keys/ID`), is a 409. A body (read
//!   only after the admin key is checked) may be at most 2 MB, 64 MiB for
//!   `POST /admin/keys` (a batch import; 413 beyond), and must arrive whole
//!   within `--body-deadline` (408 beyond), as an estimate's body must.
//!
//! With `--redis URL` the limits live in Redis, shared by every gateway
//! started with the same URL (several comma-separated URLs name the nodes of
//! a Redis Cluster); otherwise in this process. When `TOLLGATE_KEY_SECRET`
//! is set, it keys the names of the state in Redis (give every gateway the
//! same one).
//!
//! With no flags it listens on `127.0.0.1:3000` with the in-memory store and
//! the embedded demo configuration, `gateway/demo.toml`: plan `free` (2
//! requests/s, bursts of 5, 1/s and bursts of 2 on the chat route, 1000 a
//! day) with the key `demo-free-key`, plan `pro`, admin key `change-me`.
//!
//! ```text
//! curl -i -X POST localhost:3000/v1/completions -H 'Authorization: Bearer demo-free-key' \
//!      -H 'content-type: application/json' -d '{"model":"m","prompt":"hello"}'
//! ```
//!
//! The library target is what the binary runs ([`main`]); tests serve
//! [`app`] in their own process.

mod admin;
mod cli;
mod dashboard;
mod idle;
mod mock;
mod server;
mod traffic;
mod upstream;
mod usage;

pub use admin::AdminKey;
pub use cli::{
    Args, DEFAULT_BODY_DEADLINE, DEFAULT_BODY_MEMORY, DEFAULT_BODY_TIMEOUT, DEFAULT_DRAIN,
    DEFAULT_HEADER_TIMEOUT, DEFAULT_LISTEN, DEFAULT_LOG, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REDIS_TIMEOUT, DEFAULT_UPSTREAM_CONNECT_TIMEOUT, DEFAULT_UPSTREAM_TIMEOUT, Parsed,
    USAGE, parse_args,
};
pub use dashboard::Dashboard;
pub use server::{
    DEMO_CONFIG, Limits, app, app_with, app_with_limits, main, router, serve, serve_until,
    serve_with, upstream_router,
};
pub use traffic::Traffic;
pub use upstream::Upstream;
