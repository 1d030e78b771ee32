//! The gateway (`gateway/`, the `tollgate-gateway` binary) as a child process.
//!
//! [`ServerProcess::start`] builds the gateway binary once per test run
//! (same target directory and profile as the test), starts it on a free
//! loopback port and waits for its address; it keeps what the process
//! writes to stdout and stderr, can send it signals, and kills it when
//! dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

#[path = "process.rs"]
mod process;

#[allow(unused_imports)]
pub use self::process::ServerProcess;

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
