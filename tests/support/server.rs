//! The gateway (`gateway/`, the `tollgate-gateway` binary) as a child process.
//!
//! [`ServerProcess::start`] builds the gateway binary once per test run
//! (same target directory and profile as the test), starts it on a free
//! loopback port and waits for its address; it keeps what the process
//! writes to stdout and stderr, can send it signals, and kills it when
//! dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// How long a server process has to print its listen address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The `tollgate-gateway` binary, built once per test run beside this test's
/// own executable (same target directory and profile). It is another package
/// of the workspace, so cargo does not build it for this crate's tests.
pub fn server_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        // target/<profile>/deps/<test>-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lies in <target>/<profile>/deps");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(name) => name.to_owned(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--quiet", "--package", "tollgate-gateway", "--bin"])
            .arg("tollgate-gateway")
            .args(["--profile", &profile])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "cargo build --package tollgate-gateway failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join(format!("tollgate-gateway{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// A gateway process. Dropping it kills the process (SIGKILL).
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Starts the gateway with `args` and `--listen 127.0.0.1:0`, and waits
    /// until it prints its address.
    pub fn start(args: &[&str]) -> ServerProcess {
        let mut child = Command::new(server_binary())
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the tollgate-gateway binary");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().expect("piped stderr");
            let stderr = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    stderr.lock().unwrap().push_str(&text);
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        {
            let pipe = child.stdout.take().expect("piped stdout");
            let stdout = Arc::clone(&stdout);
            std::thread::spawn(move || {
                // Keeps draining stdout after the address, so the pipe never fills.
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(addr) = line.strip_prefix("tollgate-gateway listening on http://") {
                        let _ = tx.send(addr.to_owned());
                    }
                    let mut out = stdout.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(addr) => addr.parse().expect("a socket address"),
            Err(_) => {
                let status = child.try_wait();
                let _ = child.kill();
                panic!(
                    "the server did not print its address within {STARTUP_TIMEOUT:?} (exit: {status:?})\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        ServerProcess {
            child,
            addr,
            stdout,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends the process `signal` (`"TERM"`, `"INT"`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} {pid}: {sent}");
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("query the server process")
            .is_none()
    }

    /// Panics unless the process is still running.
    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("query the server process");
        assert!(
            status.is_none(),
            "the server process exited: {status:?}\n{}",
            self.stderr()
        );
    }

    /// The process's exit status; panics if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("query the server process") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {limit:?}\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a new connection to the server is refused; panics if one
    /// is still accepted after `limit`.
    pub fn wait_refused(&self, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            match TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Instant::now();
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "new connections still accepted {limit:?} after the signal\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Fails only if the process has already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Starts the gateway on the Redis store at `redis` (several
    /// comma-separated URLs name the nodes of a Cluster) with the config
    /// file `config`.
    pub fn on_redis(redis: &str, config: &Path) -> ServerProcess {
        ServerProcess::on_redis_with(redis, config, &[])
    }

    /// [`on_redis`](Self::on_redis) with more arguments.
    pub fn on_redis_with(redis: &str, config: &Path, more: &[&str]) -> ServerProcess {
        let config = config.to_str().expect("a UTF-8 config path");
        let mut args = vec!["--redis", redis, "--config", config];
        args.extend_from_slice(more);
        ServerProcess::start(&args)
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 over a socket: requests as a test writes them byte by byte,
// clients that go away at a chosen moment, and answers read to the end
// without a client library (cheap enough for bursts of thousands).
// ---------------------------------------------------------------------------

/// The bytes of a `POST` of the JSON `body` to `path` with the API key `key`,
/// asking the server to close the connection after answering.
pub fn post_bytes(path: &str, key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// How a client goes away without reading its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hangup {
    /// An abortive close (`SO_LINGER` of zero): the peer gets a RST.
    Reset,
    /// An orderly close: the peer gets a FIN.
    Close,
}

/// Connects to `addr`, sends `request`, waits `after` and goes away as
/// `hangup` says, without reading a byte. A wait below a millisecond is
/// spun (yielding to the runtime), since timers count whole milliseconds.
pub async fn send_and_hang_up(
    addr: SocketAddr,
    request: &[u8],
    after: Duration,
    hangup: Hangup,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    if after >= Duration::from_millis(1) {
        tokio::time::sleep(after).await;
    } else {
        let until = Instant::now() + after;
        while Instant::now() < until {
            tokio::task::yield_now().await;
        }
    }
    if hangup == Hangup::Reset {
        stream.set_zero_linger()?;
    }
    drop(stream);
    Ok(())
}

/// An answer read whole from a connection closed after it.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    /// The status line and the headers.
    pub head: String,
    /// What followed the head, as sent (chunked encoding not undone).
    pub body: String,
}

impl RawAnswer {
    /// The first value of header `name` (any case), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` (one that asks for `connection: close`, as
/// [`post_bytes`] makes) on a new connection to `addr` and reads the answer
/// until the server closes the connection.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawAnswer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    parse_answer(&bytes)
}

/// Connects to `addr`, sends `request` and reads until the head of the
/// answer has come; returns the head's status and the open connection, so
/// that the request stays in flight (a stream) until it is dropped.
pub async fn send_and_hold(
    addr: SocketAddr,
    request: &[u8],
) -> std::io::Result<(u16, tokio::net::TcpStream)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while !bytes.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    Ok((parse_answer(&bytes)?.status, stream))
}

fn parse_answer(bytes: &[u8]) -> std::io::Result<RawAnswer> {
    let text = String::from_utf8_lossy(bytes);
    let bad = || std::io::Error::other(format!("not an HTTP answer: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    Ok(RawAnswer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}
