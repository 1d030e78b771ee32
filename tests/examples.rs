//! The examples a user copies, run as a user runs them: each binary (built
//! by `cargo test`, as every example is) starts on a free port and answers
//! one request, and `--help` prints its usage and exits 0.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

#[path = "support/redis.rs"]
mod redis;

/// The example's binary, beside this test's in the target directory.
fn example(name: &str) -> Command {
    let exe = std::env::current_exe().expect("the test's path");
    // target/<profile>/deps/examples-<hash> -> target/<profile>/examples/<name>
    let path: PathBuf = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the profile directory")
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: `cargo test --all-features` builds the examples \
         (or `cargo build --examples --all-features`)",
        path.display()
    );
    let mut command = Command::new(path);
    command.stdin(Stdio::null()).stderr(Stdio::inherit());
    command
}

/// Kills the example when the test ends, passing or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `name` with `args` and returns it with its stdout, read line by line.
fn start(name: &str, args: &[&str]) -> (Running, impl Iterator<Item = String>) {
    let mut child = example(name)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("start {name}: {error}"));
    let stdout: ChildStdout = child.stdout.take().expect("piped stdout");
    let lines = BufReader::new(stdout)
        .lines()
        .map(|line| line.expect("a line of output"));
    (Running(child), lines)
}

/// Starts an HTTP example on a free port and returns its base URL.
fn serve(name: &str, args: &[&str]) -> (Running, String) {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let (running, mut lines) = start(name, &all);
    let first = lines.next().unwrap_or_default();
    let url = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{name} printed {first:?}"))
        .to_owned();
    (running, url)
}

fn help(name: &str) {
    let output = example(name)
        .arg("--help")
        .output()
        .unwrap_or_else(|error| panic!("run {name} --help: {error}"));
    assert!(output.status.success(), "{name} --help: {}", output.status);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with("Usage: "),
        "{name} --help printed {text:?}"
    );
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client")
}

#[tokio::test]
async fn axum_api_keys_serves_a_key_and_refuses_none() {
    help("axum_api_keys");
    let (_running, url) = serve("axum_api_keys", &[]);
    let with_key = client()
        .get(format!("{url}/v1/hello"))
        .header("x-api-key", "demo-free-key")
        .send()
        .await
        .expect("a response");
    assert_eq!(with_key.status(), 200);
    assert!(with_key.headers().contains_key("ratelimit-policy"));
    let without = client()
        .get(format!("{url}/v1/hello"))
        .send()
        .await
        .expect("a response");
    assert_eq!(without.status(), 403);
}

#[tokio::test]
async fn axum_client_ip_limits_the_forwarded_client() {
    help("axum_client_ip");
    let (_running, url) = serve("axum_client_ip", &["--trust-proxy", "127.0.0.1/32"]);
    let get = |client_addr: &'static str| {
        let url = format!("{url}/");
        async move {
            client()
                .get(url)
                .header("x-forwarded-for", client_addr)
                .send()
                .await
                .expect("a response")
                .status()
        }
    };
    // A burst of 10 for one client, then it waits; another client does not.
    for _ in 0..10 {
        assert_eq!(get("203.0.113.7").await, 200);
    }
    assert_eq!(get("203.0.113.7").await, 429);
    assert_eq!(get("203.0.113.8").await, 200);
}

#[test]
fn grpc_inference_listens_where_told_and_limits_its_calls() {
    help("grpc_inference");
    let (_running, lines) = start("grpc_inference", &["--listen", "127.0.0.1:0"]);
    let lines: Vec<String> = lines
        .take_while(|line| !line.starts_with("serving"))
        .collect();
    assert!(
        lines[0].starts_with("inference.Inference on 127.0.0.1:"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|line| line.starts_with("call 1: Usage")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|line| line.contains("ResourceExhausted")),
        "{lines:?}"
    );
}

#[test]
fn grpc_inference_refuses_a_bad_flag() {
    let output = example("grpc_inference")
        .arg("--listen")
        .arg("nowhere")
        .stderr(Stdio::piped())
        .output()
        .expect("run grpc_inference");
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("--listen: not an address"), "{text}");
}

#[test]
fn redis_shared_shares_one_budget() {
    help("redis_shared");
    if !redis::require_redis() {
        return;
    }
    let server = redis::RedisServer::start();
    let output = example("redis_shared")
        .args(["--redis", &server.url()])
        .output()
        .expect("run redis_shared");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}: {text}", output.status);
    assert!(text.contains("5 of 8 passed"), "{text}");
}

#[test]
fn database_keys_admits_its_database_key_under_its_plan() {
    let output = example("database_keys")
        .output()
        .expect("run database_keys");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}: {text}", output.status);
    // The plan's burst of 2, then the throttle; a value that is no key.
    let statuses: Vec<&str> = text
        .lines()
        .map(|line| line.split(' ').nth(1).unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["200", "200", "429", "403"], "{text}");
}
