//! The command line: flags and their defaults.

use std::net::SocketAddr;
use std::time::Duration;

/// The default of `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";

/// The default of `--drain`.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// The default of `--redis-timeout`: the store's own default.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// The default of `--header-timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The default of `--body-timeout`.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The default of `--body-deadline`: the layer's own default.
pub const DEFAULT_BODY_DEADLINE: Duration = Duration::from_secs(10);

/// The default of `--body-memory`, in bytes.
pub const DEFAULT_BODY_MEMORY: usize = 64 << 20;

/// The default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The default of `--upstream-timeout`.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(600);

/// The default of `--upstream-connect-timeout`.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The log filter when `RUST_LOG` is not set.
pub const DEFAULT_LOG: &str = "warn,tollgate=info,tollgate_gateway=info";

/// What `--help` prints: every flag and environment variable, with its
/// default.
pub const USAGE: &str = "\
tollgate-gateway: a rate-limiting gateway for OpenAI-compatible inference APIs

Usage: tollgate-gateway [OPTIONS]

Options (`--flag value` or `--flag=value`, each flag at most once):
  --config FILE          plans, keys and limits (TOML)
                         [default: the embedded demo config, gateway/demo.toml]
  --listen ADDR          the address to serve on [default: 127.0.0.1:3000]
  --redis URL[,URL...]   keep the limits in Redis, shared by every gateway given
                         the same URL; several URLs name the nodes of a Redis
                         Cluster [default: none: the limits live in this process]
  --redis-timeout MS     how long a decision may wait for Redis before the
                         plan's failure mode decides it [default: 100]
  --drain SECS           how long the requests in flight may take to finish
                         after SIGTERM or SIGINT (a second signal cuts them
                         off at once) [default: 30]
  --header-timeout SECS  how long a request's head may take to arrive, on a
                         kept-alive connection or a new one (counted there from
                         its first byte, which may take as long); any
                         connection (HTTP/2 too) with no request open for as
                         long is closed [default: 10]
  --body-timeout SECS    how long a request body may send nothing before it is
                         cut off (408), and an answer may go unread before its
                         connection is dropped; a body read for its estimate
                         (completions, chat completions) may be at most 1 MiB
                         (413, at once when its content-length says more)
                         [default: 30]
  --body-deadline SECS   how long a body read for its estimate (completions,
                         chat completions; upstream mode: also responses,
                         embeddings, messages) or an admin request's body may
                         take to arrive whole, however steadily it comes (408
                         beyond, costing nothing) [default: 10]
  --body-memory MIB      the most the bodies being read for their estimates may
                         hold together, in MiB, one key or client at most a
                         sixteenth of it (at least one body); a body past
                         either is answered 503 at once (retry-after: 1,
                         costing nothing) [default: 64]
  --max-connections N    connections served at once; more wait to be accepted
                         [default: 1024]
  --upstream URL         forward /v1/* to this OpenAI-compatible backend (vLLM,
                         llama.cpp server, Ollama, TGI), with or without a
                         trailing /v1, instead of answering with the mock; the
                         client's key is never forwarded [default: none: the
                         mock answers]
  --upstream-key KEY     send the backend `Authorization: Bearer KEY`; prefer
                         TOLLGATE_UPSTREAM_KEY, which `ps` does not show
                         [default: none: no credential is sent]
  --upstream-timeout SECS
                         how long the backend may take to start answering
                         (504 beyond), and to send the next piece of an
                         answer (cut off beyond) [default: 600]
  --upstream-connect-timeout SECS
                         how long connecting to the backend may take (502
                         beyond) [default: 10]
  --log-json             log one JSON object a line [default: off: text]
  -h, --help             print this help and exit

Environment:
  TOLLGATE_KEY_SECRET    keys the names of the state in Redis; give every
                         gateway the same one [default: none]
  TOLLGATE_UPSTREAM_KEY  the backend's key, as --upstream-key (which wins when
                         both are given); never logged [default: none]
  RUST_LOG               the log filter; empty is the default, one that does
                         not parse an error
                         [default: warn,tollgate=info,tollgate_gateway=info]
";

/// What the command line asks for: to serve, or for help.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Parsed {
    /// Serve as the flags say.
    Run(Box<Args>),
    /// Print [`USAGE`] and exit.
    Help,
}

/// How to serve.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Args {
    /// Where to listen (`--listen`).
    pub listen: SocketAddr,
    /// The config file (`--config`); the embedded demo config when `None`.
    pub config: Option<String>,
    /// The Redis URL, or the comma-separated URLs of a Cluster's nodes
    /// (`--redis`); the in-memory store when `None`.
    pub redis: Option<String>,
    /// How long a decision may wait for Redis before the plan's failure
    /// mode decides it (`--redis-timeout`).
    pub redis_timeout: Duration,
    /// How long requests in flight may take to finish after a shutdown
    /// signal (`--drain`).
    pub drain: Duration,
    /// See [`Limits::header_timeout`](crate::Limits::header_timeout)
    /// (`--header-timeout`).
    pub header_timeout: Duration,
    /// See [`Limits::body_timeout`](crate::Limits::body_timeout)
    /// (`--body-timeout`).
    pub body_timeout: Duration,
    /// See [`Limits::body_deadline`](crate::Limits::body_deadline)
    /// (`--body-deadline`).
    pub body_deadline: Duration,
    /// See [`Limits::body_memory`](crate::Limits::body_memory)
    /// (`--body-memory`, given in MiB).
    pub body_memory: usize,
    /// See [`Limits::max_connections`](crate::Limits::max_connections)
    /// (`--max-connections`).
    pub max_connections: usize,
    /// Log JSON lines (`--log-json`).
    pub log_json: bool,
    /// The backend `/v1/*` is forwarded to (`--upstream`, with
    /// `--upstream-key`, `--upstream-timeout` and
    /// `--upstream-connect-timeout`); the mock answers when `None`.
    pub upstream: Option<crate::Upstream>,
}

impl Args {
    /// The serving limits the flags ask for.
    pub fn limits(&self) -> crate::Limits {
        crate::Limits {
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            body_deadline: self.body_deadline,
            body_memory: self.body_memory,
            max_connections: self.max_connections,
            ..crate::Limits::default()
        }
    }
}

/// The value of `flag` as a number of seconds, at least a millisecond (the
/// timers' resolution: less would be no time at all to them).
fn seconds(flag: &str, value: Option<String>) -> Result<Duration, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a number of seconds"))?;
    value
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| *d >= Duration::from_millis(1))
        .ok_or_else(|| format!("{flag} `{value}`: not a number of seconds of at least 0.001"))
}

/// Checks that every node of `--redis` is a Redis URL, before anything
/// connects: a typo is bad flags, not a store that is unavailable.
fn check_redis(urls: &str) -> Result<(), String> {
    let nodes: Vec<&str> = urls.split(',').map(str::trim).collect();
    let n = nodes.len();
    for (i, url) in nodes.iter().enumerate() {
        if url.is_empty() {
            return Err(match n {
                1 => "--redis: the URL is empty".to_owned(),
                _ => format!("--redis: URL {} of {n} is empty", i + 1),
            });
        }
        if let Err(e) = redis::Client::open(*url) {
            let which = match n {
                1 => String::new(),
                _ => format!(" (URL {} of {n})", i + 1),
            };
            // The crate's words, without its error kind's name, when they
            // say more than that the URL did not parse.
            let why = e.to_string().replace(&format!(" - {:?}", e.kind()), "");
            let why = match why.as_str() {
                "Redis URL did not parse" => String::new(),
                _ => format!(": {why}"),
            };
            return Err(format!(
                "--redis `{}`{which}: not a Redis URL{why} \
                 (redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] or unix:///PATH)",
                shown_url(url)
            ));
        }
    }
    Ok(())
}

/// `url` as an error may show it: what may hold a password (from `://` to
/// the last `@`) is left out.
fn shown_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    match url.find("://") {
        Some(scheme) if scheme < at => format!("{}…{}", &url[..scheme + 3], &url[at..]),
        _ => format!("…{}", &url[at..]),
    }
}

/// A flag's value: the one given inline (`--flag=value`) first, else the
/// next argument.
struct Values<'a, I> {
    inline: Option<String>,
    rest: &'a mut I,
}

impl<I: Iterator<Item = String>> Iterator for Values<'_, I> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.inline.take().or_else(|| self.rest.next())
    }
}

/// Reads the flags (without the program's name); the error says what is
/// wrong with them.
pub fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    let mut config = None;
    let mut redis = None;
    let mut redis_timeout = DEFAULT_REDIS_TIMEOUT;
    let mut drain = DEFAULT_DRAIN;
    let mut header_timeout = DEFAULT_HEADER_TIMEOUT;
    let mut body_timeout = DEFAULT_BODY_TIMEOUT;
    let mut body_deadline = DEFAULT_BODY_DEADLINE;
    let mut body_memory = DEFAULT_BODY_MEMORY;
    let mut max_connections = DEFAULT_MAX_CONNECTIONS;
    let mut log_json = false;
    let mut upstream = None;
    let mut upstream_key = None;
    let mut upstream_timeout = DEFAULT_UPSTREAM_TIMEOUT;
    let mut upstream_connect_timeout = DEFAULT_UPSTREAM_CONNECT_TIMEOUT;
    let mut seen = std::collections::HashSet::new();
    while let Some(arg) = args.next() {
        // `--flag=value` is `--flag value`, as most command lines take it.
        let (arg, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        // One of two values would be dropped without a word (a wrapper's
        // `--config` after the operator's): which one was meant is unknown.
        if !matches!(arg.as_str(), "-h" | "--help") && !seen.insert(arg.clone()) {
            return Err(format!("{arg} is given twice: give each flag once"));
        }
        let mut args = Values {
            inline,
            rest: &mut args,
        };
        match arg.as_str() {
            "--drain" => {
                let secs = args.next().ok_or("--drain needs a number of seconds")?;
                drain = secs
                    .parse::<f64>()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| format!("--drain `{secs}`: not a number of seconds"))?;
            }
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "--config" => config = Some(args.next().ok_or("--config needs a file")?),
            "--redis" => redis = Some(args.next().ok_or("--redis needs a URL")?),
            "--redis-timeout" => {
                let ms = args
                    .next()
                    .ok_or("--redis-timeout needs a number of milliseconds")?;
                redis_timeout = ms
                    .parse::<u64>()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        format!("--redis-timeout `{ms}`: not a number of milliseconds above 0")
                    })?;
            }
            "--header-timeout" => header_timeout = seconds("--header-timeout", args.next())?,
            "--body-timeout" => body_timeout = seconds("--body-timeout", args.next())?,
            "--body-deadline" => body_deadline = seconds("--body-deadline", args.next())?,
            "--body-memory" => {
                let mib = args.next().ok_or("--body-memory needs a number of MiB")?;
                body_memory = mib
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .and_then(|n| n.checked_mul(1 << 20))
                    .ok_or_else(|| format!("--body-memory `{mib}`: not a number of MiB above 0"))?;
            }
            "--max-connections" => {
                let n = args
                    .next()
                    .ok_or("--max-connections needs a number of connections")?;
                max_connections = n.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    format!("--max-connections `{n}`: not a number of connections above 0")
                })?;
            }
            "--log-json" => log_json = true,
            "--upstream" => upstream = Some(args.next().ok_or("--upstream needs a URL")?),
            // Never echoed back: the error names the flag, not the value.
            "--upstream-key" => {
                upstream_key = Some(args.next().ok_or("--upstream-key needs a key")?)
            }
            "--upstream-timeout" => upstream_timeout = seconds("--upstream-timeout", args.next())?,
            "--upstream-connect-timeout" => {
                upstream_connect_timeout = seconds("--upstream-connect-timeout", args.next())?;
            }
            "-h" | "--help" if args.inline.is_none() => return Ok(Parsed::Help),
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
        if args.inline.is_some() {
            return Err(format!("{arg} takes no value"));
        }
    }
    if let Some(urls) = &redis {
        check_redis(urls)?;
    }
    let listen = listen
        .parse()
        .map_err(|e| format!("--listen `{listen}`: {e}"))?;
    let upstream = match upstream {
        None if upstream_key.is_some() => {
            return Err("--upstream-key is for --upstream, which is not given".to_owned());
        }
        None => None,
        Some(url) => {
            let mut up = crate::Upstream::new(&url).map_err(|e| format!("--upstream: {e}"))?;
            if let Some(key) = upstream_key {
                up = up.key(&key).map_err(|e| format!("--upstream-key: {e}"))?;
            }
            Some(
                up.timeout(upstream_timeout)
                    .connect_timeout(upstream_connect_timeout),
            )
        }
    };
    Ok(Parsed::Run(Box::new(Args {
        listen,
        config,
        redis,
        redis_timeout,
        drain,
        header_timeout,
        body_timeout,
        body_deadline,
        body_memory,
        max_connections,
        log_json,
        upstream,
    })))
}
