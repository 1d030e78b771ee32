//! The gateway binary as a child process, for the root crate's tests and
//! the gateway's: each includes this file with `#[path]` beside its own
//! `server_binary()` (the parent module's), which says where the binary is.
//!
//! [`ServerProcess::start`] starts it on a free loopback port and waits for
//! its address; it keeps what the process writes to stdout and stderr, can
//! send it signals, and kills it when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a server process has to print its listen address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

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
        ServerProcess::start_with_env(args, &[])
    }

    /// As [`start`](Self::start), with environment variables `env` set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let mut child = Command::new(super::server_binary())
            .args(args)
            .envs(env.iter().copied())
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

    /// The process's resident memory, in KiB (Linux: `/proc/PID/status`).
    pub fn resident_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read the process's status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in the process's status")
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
