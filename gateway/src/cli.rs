//! The command line: flags and their defaults.

use std::net::SocketAddr;
use std::time::Duration;

/// The default of `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";

/// The default of `--drain`.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// The default of `--redis-timeout`: the store's own default.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// The log filter when `RUST_LOG` is not set.
pub const DEFAULT_LOG: &str = "warn,tollgate=info,tollgate_gateway=info";

/// What `--help` prints: every flag and environment variable, with its
/// default.
pub const USAGE: &str = "\
tollgate-gateway: a rate-limiting gateway for OpenAI-compatible inference APIs

Usage: tollgate-gateway [OPTIONS]

Options:
  --config FILE          plans, keys and limits (TOML)
                         [default: the embedded demo config, gateway/demo.toml]
  --listen ADDR          the address to serve on [default: 127.0.0.1:3000]
  --redis URL[,URL...]   keep the limits in Redis, shared by every gateway given
                         the same URL; several URLs name the nodes of a Redis
                         Cluster [default: none: the limits live in this process]
  --redis-timeout MS     how long a decision may wait for Redis before the
                         plan's failure mode decides it [default: 100]
  --drain SECS           how long the requests in flight may take to finish
                         after SIGTERM or SIGINT [default: 30]
  -h, --help             print this help and exit

Environment:
  TOLLGATE_KEY_SECRET    keys the names of the state in Redis; give every
                         gateway the same one [default: none]
  RUST_LOG               the log filter
                         [default: warn,tollgate=info,tollgate_gateway=info]
";

/// What the command line asks for: to serve, or for help.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Parsed {
    /// Serve as the flags say.
    Run(Args),
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
}

/// Reads the flags (without the program's name); the error says what is
/// wrong with them.
pub fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    let mut config = None;
    let mut redis = None;
    let mut redis_timeout = DEFAULT_REDIS_TIMEOUT;
    let mut drain = DEFAULT_DRAIN;
    while let Some(arg) = args.next() {
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
            "-h" | "--help" => return Ok(Parsed::Help),
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    let listen = listen
        .parse()
        .map_err(|e| format!("--listen `{listen}`: {e}"))?;
    Ok(Parsed::Run(Args {
        listen,
        config,
        redis,
        redis_timeout,
        drain,
    }))
}
