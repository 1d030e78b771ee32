//! Run with: cargo run --example grpc_inference [-- --listen ADDR] [--interceptor]
//!
//! A gRPC inference service, `inference.Inference/Complete`, limited per API
//! key taken from the `x-api-key` metadata (an HTTP/2 header, so
//! [`ApiKeyHeader`](tollgate::extract::ApiKeyHeader) reads it).
//!
//! There is no `.proto` build step: the messages derive `prost::Message` and
//! [`Inference`] dispatches the method path by hand, as tonic's generated code
//! does. `examples/inference.proto` describes the same service for clients in
//! other languages. The limits are applied in two forms:
//!
//! - **the layer**: `Server::builder().layer(RateLimitLayer::new(..))` decides
//!   every call before it reaches the service. A rejected call is answered
//!   trailers-only with `RESOURCE_EXHAUSTED` (or `UNAUTHENTICATED` for a bad
//!   key) and a `google.rpc.RetryInfo` that clients read with
//!   `tonic_types::StatusExt::get_details_retry_info`.
//! - **a check in code**: `Complete` charges the tokens a request asks for
//!   (known only once the message is decoded) against a plan's token budget
//!   by calling a second layer directly ([`charge_tokens`]): a denial names
//!   its token limit (`tokens-minute`) and carries the same details and
//!   trailers (`retry-after`, `retry-after-ms`, `grpc-retry-pushback-ms`) the
//!   layer sends. [`RateLimitLayer::check`] decides a key and a cost without
//!   a request; [`MetadataKeyLimit`] is a `tonic::service::Interceptor` that
//!   uses it to limit every call of a service by its metadata key
//!   (`--interceptor` serves that form), and [`rejection_status`] turns its
//!   rejection into the code, message, details and retry metadata the layer
//!   sends (not its `RateLimit` headers: a `Rejection` holds no report).
//!
//! The demo makes a few calls with the demo key, prints what they got, and
//! keeps serving on `--listen` (127.0.0.1:50051 by default) until Ctrl-C.

use std::convert::Infallible;
use std::future::{self, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use tokio::net::TcpListener;
use tollgate::{
    ApiKey, ConfigError, Policy, RateLimitLayer, Rejection, Throttle, TokenBudget, TokenEstimate,
    UsagePlan,
};
use tonic::body::Body;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, ServiceExt};

/// The demo's API key.
pub(crate) const DEMO_KEY: &str = "demo-key";

/// The full path of the `Complete` method.
pub(crate) const COMPLETE: &str = "/inference.Inference/Complete";

/// `inference.CompleteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CompleteRequest {
    #[prost(string, tag = "1")]
    pub(crate) prompt: String,
    /// Tokens to generate; 0 means the default, 16.
    #[prost(uint32, tag = "2")]
    pub(crate) max_tokens: u32,
}

/// `inference.CompleteReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CompleteReply {
    #[prost(string, tag = "1")]
    pub(crate) text: String,
    #[prost(message, optional, tag = "2")]
    pub(crate) usage: Option<Usage>,
}

/// `inference.Usage`: tokens of the prompt and of the completion.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub(crate) struct Usage {
    #[prost(uint32, tag = "1")]
    pub(crate) prompt_tokens: u32,
    #[prost(uint32, tag = "2")]
    pub(crate) completion_tokens: u32,
    #[prost(uint32, tag = "3")]
    pub(crate) total_tokens: u32,
}

/// The `inference.Inference` service: a mock that answers `max_tokens` tokens.
#[derive(Clone, Default)]
pub(crate) struct Inference {
    tokens: Option<RateLimitLayer>,
}

impl Inference {
    /// Charges each `Complete` call its estimated tokens (prompt tokens +
    /// `max_tokens`) against `tokens` (a layer whose plans have a
    /// [`TokenBudget`](tollgate::TokenBudget)), keyed by the `x-api-key` metadata.
    pub(crate) fn limit_tokens(mut self, tokens: RateLimitLayer) -> Self {
        self.tokens = Some(tokens);
        self
    }

    async fn complete(
        &self,
        req: tonic::Request<CompleteRequest>,
    ) -> Result<tonic::Response<CompleteReply>, Status> {
        let prompt_tokens = to_u32(req.get_ref().prompt.chars().count().div_ceil(4));
        let max_tokens = match req.get_ref().max_tokens {
            0 => 16,
            n => n,
        };
        if let Some(tokens) = &self.tokens {
            charge_tokens(
                tokens,
                req.metadata(),
                prompt_tokens.saturating_add(max_tokens),
            )
            .await?;
        }
        let text = vec!["token"; max_tokens as usize].join(" ");
        Ok(tonic::Response::new(CompleteReply {
            text,
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens: max_tokens,
                total_tokens: prompt_tokens.saturating_add(max_tokens),
            }),
        }))
    }
}

impl NamedService for Inference {
    const NAME: &'static str = "inference.Inference";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl tower::Service<http::Request<Body>> for Inference {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match req.uri().path() {
            COMPLETE => {
                let this = self.clone();
                let method = tower::service_fn(move |req| {
                    let this = this.clone();
                    async move { this.complete(req).await }
                });
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                    Ok(grpc.unary(method, req).await)
                })
            }
            _ => Box::pin(future::ready(Ok(Status::unimplemented("").into_http()))),
        }
    }
}

/// Decides a call of `cost` units for the `x-api-key` in `metadata`.
pub(crate) fn check_metadata(
    limit: &RateLimitLayer,
    metadata: &MetadataMap,
    cost: u32,
) -> Result<(), Status> {
    let key = metadata
        .get("x-api-key")
        .ok_or_else(|| Status::unauthenticated("Forbidden"))?;
    limit
        .check(key.as_bytes(), cost)
        .map_err(|rejection| rejection_status(&rejection))
}

/// Charges `tokens` to the `x-api-key` in `metadata` through the layer
/// `limit`, as a gRPC call of that key with a [`TokenEstimate`]: the layer
/// answers a denial trailers-only, and its headers become the `Status`
/// (code, message, `google.rpc` details, and the rest as metadata that
/// tonic sends as trailers), exactly what the layer in front sends.
pub(crate) async fn charge_tokens(
    limit: &RateLimitLayer,
    metadata: &MetadataMap,
    tokens: u32,
) -> Result<(), Status> {
    let key = metadata
        .get("x-api-key")
        .ok_or_else(|| Status::unauthenticated("Forbidden"))?;
    // A gRPC call is a POST: method overrides of the path apply to it.
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(COMPLETE)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("x-api-key", key.as_bytes())
        .extension(TokenEstimate(tokens))
        .body(Body::empty())
        .map_err(|_| Status::unauthenticated("Forbidden"))?;
    let admitted = tower::service_fn(|_: http::Request<tollgate::RequestBody<Body>>| async {
        Ok::<_, Infallible>(http::Response::new(Body::empty()))
    });
    let Ok(res) = limit.layer(admitted).oneshot(req).await;
    match Status::from_header_map(res.headers()) {
        // The layer's rejections carry a `grpc-status`; an admitted call none.
        Some(status) if status.code() != Code::Ok => Err(status),
        _ => Ok(()),
    }
}

/// The `tonic::Status` for a rejection: its gRPC code and message and, for
/// a limit, the retry delay and the limit that denied as error details,
/// and the wait as metadata (`grpc-retry-pushback-ms`, which gRPC's own
/// retry policies obey, `retry-after`, `retry-after-ms`, and
/// `x-should-retry: false` when a retry is not worth waiting for), just as
/// the layer sends them.
pub(crate) fn rejection_status(rejection: &Rejection) -> Status {
    let code = Code::from_i32(i32::from(rejection.grpc_status()));
    if code != Code::ResourceExhausted {
        return Status::new(code, rejection.message());
    }
    let mut details = ErrorDetails::new();
    if let Some(delay) = rejection.retry_after() {
        details.set_retry_info(Some(delay));
    }
    if let Some(limit) = rejection.limit() {
        details.add_quota_failure_violation(limit, rejection.message());
    }
    let mut status = Status::with_error_details(code, rejection.message(), details);
    let metadata = status.metadata_mut();
    let ms = rejection.retry_after_ms();
    if let (Some(secs), Some(ms)) = (rejection.retry_after_secs(), ms) {
        metadata.insert("retry-after", secs.into());
        metadata.insert("retry-after-ms", ms.into());
    }
    match ms {
        Some(ms) if rejection.should_retry() => {
            metadata.insert("grpc-retry-pushback-ms", ms.into());
        }
        _ => {
            metadata.insert("grpc-retry-pushback-ms", MetadataValue::from_static("-1"));
            metadata.insert("x-should-retry", MetadataValue::from_static("false"));
        }
    }
    status
}

/// The interceptor form: every call of the wrapped service costs `cost`
/// units of the `x-api-key` metadata's plan. An interceptor sees metadata,
/// not the method, so to limit methods apart, wrap each service with its own.
#[derive(Clone)]
pub(crate) struct MetadataKeyLimit {
    pub(crate) limit: RateLimitLayer,
    pub(crate) cost: u32,
}

impl Interceptor for MetadataKeyLimit {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        check_metadata(&self.limit, req.metadata(), self.cost)?;
        Ok(req)
    }
}

/// Serves `inference` on `listener` behind the rate-limit layer `requests`.
pub(crate) async fn serve_layered(
    listener: TcpListener,
    requests: RateLimitLayer,
    inference: Inference,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .layer(requests)
        .add_service(inference)
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}

/// Serves `inference` on `listener` with `limit` as its interceptor.
pub(crate) async fn serve_intercepted(
    listener: TcpListener,
    limit: MetadataKeyLimit,
    inference: Inference,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(InterceptedService::new(inference, limit))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}

/// A client channel to `addr`.
pub(crate) async fn connect(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
}

/// Calls `Complete` with `key` in the `x-api-key` metadata, if given.
pub(crate) async fn complete(
    channel: &Channel,
    key: Option<&str>,
    prompt: &str,
    max_tokens: u32,
) -> Result<CompleteReply, Status> {
    let mut req = tonic::Request::new(CompleteRequest {
        prompt: prompt.to_owned(),
        max_tokens,
    });
    if let Some(key) = key {
        let key = key
            .parse()
            .map_err(|_| Status::invalid_argument("key is not valid metadata"))?;
        req.metadata_mut().insert("x-api-key", key);
    }
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = ProstCodec::default();
    let reply = grpc
        .unary(req, PathAndQuery::from_static(COMPLETE), codec)
        .await?;
    Ok(reply.into_inner())
}

/// A policy with one plan, `throttle`, and the demo key in it.
pub(crate) fn demo_policy(throttle: Throttle) -> Result<Policy, ConfigError> {
    Policy::builder()
        .plan(UsagePlan::new("demo").throttle(throttle))
        .key(ApiKey::new("demo", DEMO_KEY, "demo"))
        .build()
}

/// A policy with one plan, a budget of `per_minute` tokens, and the demo
/// key in it.
pub(crate) fn token_policy(per_minute: u32) -> Result<Policy, ConfigError> {
    Policy::builder()
        .plan(UsagePlan::new("demo-tokens").tokens(TokenBudget::new().per_minute(per_minute)?))
        .key(ApiKey::new("demo", DEMO_KEY, "demo-tokens"))
        .build()
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The command line's help.
const USAGE: &str = "\
Usage: grpc_inference [--listen ADDR] [--interceptor]

Serves inference.Inference (examples/inference.proto), makes a few calls
with the demo key, prints what they got, and serves until Ctrl-C.

  --listen ADDR   address to serve on [default: 127.0.0.1:50051; port 0 picks a free port]
  --interceptor   limit calls with a tonic interceptor instead of the layer
  -h, --help      print this help
";

/// The command line.
#[derive(Debug, PartialEq)]
pub(crate) struct Args {
    /// Where to serve.
    pub(crate) listen: SocketAddr,
    /// Whether calls are limited by [`MetadataKeyLimit`] instead of the layer.
    pub(crate) interceptor: bool,
}

impl Args {
    /// Parses the arguments after the program name: `Ok(None)` for `--help`.
    pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>, String> {
        let mut parsed = Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            interceptor: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--interceptor" => parsed.interceptor = true,
                "--listen" => {
                    let value = args.next().ok_or("--listen needs an address")?;
                    parsed.listen = value
                        .parse()
                        .map_err(|_| format!("--listen: not an address: {value:?}"))?;
                }
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        Ok(Some(parsed))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{USAGE}");
            return Ok(());
        }
        Err(error) => {
            eprint!("grpc_inference: {error}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // Calls: bursts of 5, then 2 per second. Tokens: 180 a minute, 3 per second.
    let requests = RateLimitLayer::new(demo_policy(Throttle::new(2.0, 5)?)?);
    let tokens = RateLimitLayer::new(token_policy(180)?);
    let inference = Inference::default().limit_tokens(tokens);

    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    if args.interceptor {
        let limit = MetadataKeyLimit {
            limit: requests,
            cost: 1,
        };
        tokio::spawn(serve_intercepted(listener, limit, inference));
    } else {
        tokio::spawn(serve_layered(listener, requests, inference));
    }
    println!("inference.Inference on {addr}, key {DEMO_KEY}");

    // Each call asks for 1 + 40 tokens: the fifth finds too few tokens left
    // (the check in `Complete`), the sixth no call left (the layer or the
    // interceptor; the fifth call counted). Both tell when to retry.
    let channel = connect(addr).await?;
    for i in 1..=6 {
        match complete(&channel, Some(DEMO_KEY), "Hi!", 40).await {
            Ok(reply) => println!("call {i}: {:?}", reply.usage.unwrap_or_default()),
            Err(status) => {
                let retry = status.get_details_retry_info().and_then(|r| r.retry_delay);
                let limit = status
                    .get_details_quota_failure()
                    .and_then(|q| q.violations.into_iter().next())
                    .map(|v| v.subject);
                let pushback = status.metadata().get("grpc-retry-pushback-ms").cloned();
                println!(
                    "call {i}: {:?} ({}) by {limit:?}, retry in {retry:?} (pushback {pushback:?} ms)",
                    status.code(),
                    status.message()
                );
            }
        }
    }

    println!("serving until Ctrl-C");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
