//! Real `redis-server` processes for integration tests.
//!
//! The test crates use it as `support::redis`. It depends on nothing else of
//! `support`, so that the Redis benchmark (`benches/redis.rs`) includes this
//! file alone, with `#[path = "../tests/support/redis.rs"]`: keep it so.
//!
//! [`RedisServer`] starts a standalone server and [`RedisCluster`] a cluster
//! of three masters. Every server runs as a child process of the test, on a
//! free loopback port, with its own temporary directory and no persistence
//! (unless started with [`RedisServer::start_with`]); the machine's own Redis
//! (such as one on port 6379) is never used. Dropping a server or a cluster
//! kills its processes (SIGKILL), waits for them and removes their
//! directories. [`command`] is a minimal RESP client over
//! `std::net::TcpStream`, enough to send commands and read simple strings,
//! errors, integers, bulk strings and arrays.
//!
//! # When Redis is not installed
//!
//! Every test that needs Redis starts with
//!
//! ```ignore
//! if !require_redis() {
//!     return;
//! }
//! ```
//!
//! [`require_redis`] returns `true` when both `redis-server` and `redis-cli`
//! run. When they do not, it **panics** with a message saying how to install
//! them (`apt-get install redis-server`, `brew install redis`), in CI and
//! out: a test that needs Redis must never pass without running. Setting the
//! environment variable `TOLLGATE_SKIP_REDIS=1` skips those tests instead:
//! it prints a notice to stderr and returns `false`, and the test returns
//! early.

// Also for the benchmark, which includes this file as a module of its own.
#![allow(dead_code, unreachable_pub)]

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// How long a starting server has to answer `PING`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new cluster has to report `cluster_state:ok` on every node.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(15);
/// Connect, read and write timeout of [`command`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of each readiness probe while a server starts.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Ports tried when a server fails to bind the one it was given.
const PORT_ATTEMPTS: usize = 5;
/// Offset of a cluster node's bus port from its client port.
const BUS_PORT_OFFSET: u16 = 10_000;
/// Highest client port of a cluster node, so that its bus port is below 65535.
const MAX_CLUSTER_PORT: u16 = 55_534;
/// Number of masters in a [`RedisCluster`].
const CLUSTER_NODES: usize = 3;

/// Whether `redis-server --version` and `redis-cli --version` both run.
pub fn redis_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| runs("redis-server") && runs("redis-cli"))
}

fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether a test that needs Redis can run.
///
/// Returns `true` when the binaries are available. Otherwise returns `false`
/// with a notice if `TOLLGATE_SKIP_REDIS=1`, and panics with how to install
/// Redis if not; see the module documentation.
pub fn require_redis() -> bool {
    if redis_available() {
        return true;
    }
    if std::env::var("TOLLGATE_SKIP_REDIS").is_ok_and(|value| value == "1") {
        eprintln!(
            "notice: TOLLGATE_SKIP_REDIS=1: skipping a test that needs Redis \
             (`redis-server` or `redis-cli` is not on PATH)"
        );
        return false;
    }
    panic!(
        "this test needs `redis-server` and `redis-cli` on PATH, and they do not run.\n\
         Install Redis (Debian, Ubuntu: `apt-get install redis-server`; macOS: \
         `brew install redis`), or set TOLLGATE_SKIP_REDIS=1 to skip the tests that need it."
    );
}

/// Sends one command to the server at `addr` and reads its reply, with a
/// timeout of two seconds.
///
/// See [`command_with_timeout`] for the form of the reply.
pub fn command(addr: SocketAddr, args: &[&str]) -> Result<String, String> {
    command_with_timeout(addr, args, COMMAND_TIMEOUT)
}

/// Sends one command, as an array of bulk strings, on a new connection to
/// `addr` and reads its reply; `timeout` bounds the connect, each write and
/// each read.
///
/// A simple string, an integer or a bulk string is returned as its text, a
/// null bulk string or null array as `(nil)`, and an array as its elements
/// joined with newlines. An error reply, a timeout (the message contains
/// `timed out`) or any other I/O failure is an `Err`.
pub fn command_with_timeout(
    addr: SocketAddr,
    args: &[&str],
    timeout: Duration,
) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|error| format!("connect to {addr}: {}", describe(&error)))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|error| format!("configure connection to {addr}: {error}"))?;

    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    (&stream)
        .write_all(&request)
        .map_err(|error| format!("send to {addr}: {}", describe(&error)))?;

    read_reply(&mut BufReader::new(&stream)).map_err(|error| format!("{error} (from {addr})"))
}

/// Whether the server at `addr` answers `PING` with `+PONG`.
pub fn ping(addr: SocketAddr) -> bool {
    command_with_timeout(addr, &["PING"], PROBE_TIMEOUT).is_ok_and(|reply| reply == "PONG")
}

fn describe(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("timed out ({error})"),
        _ => error.to_string(),
    }
}

fn read_reply(reader: &mut impl BufRead) -> Result<String, String> {
    let line = read_line(reader)?;
    match line.as_bytes().first() {
        Some(b'+' | b':') => Ok(line[1..].to_owned()),
        Some(b'-') => Err(format!("error reply: {}", &line[1..])),
        Some(b'$') => {
            let Some(len) = parse_len(&line[1..])? else {
                return Ok("(nil)".to_owned());
            };
            let mut data = vec![0; len + 2];
            reader
                .read_exact(&mut data)
                .map_err(|error| format!("read bulk string: {}", describe(&error)))?;
            data.truncate(len);
            String::from_utf8(data).map_err(|error| format!("bulk string is not UTF-8: {error}"))
        }
        Some(b'*') => {
            let Some(len) = parse_len(&line[1..])? else {
                return Ok("(nil)".to_owned());
            };
            let elements = (0..len)
                .map(|_| read_reply(reader))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(elements.join("\n"))
        }
        _ => Err(format!("unexpected reply line {line:?}")),
    }
}

fn read_line(reader: &mut impl BufRead) -> Result<String, String> {
    let mut line = Vec::new();
    let read = reader
        .read_until(b'\n', &mut line)
        .map_err(|error| format!("read reply: {}", describe(&error)))?;
    if read == 0 || !line.ends_with(b"\r\n") {
        return Err("connection closed before a complete reply".to_owned());
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|error| format!("reply line is not UTF-8: {error}"))
}

/// The length of a bulk string or array, or `None` for a null (`-1`).
fn parse_len(text: &str) -> Result<Option<usize>, String> {
    let len: i64 = text
        .parse()
        .map_err(|_| format!("bad length {text:?} in reply"))?;
    if len < 0 {
        Ok(None)
    } else {
        usize::try_from(len)
            .map(Some)
            .map_err(|_| format!("length {len} too large"))
    }
}

/// A loopback port that is free now; for a cluster node, its bus port
/// (port + 10000) is free too and below 65535.
fn free_port(cluster: bool) -> u16 {
    for _ in 0..200 {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free loopback port");
        let port = listener.local_addr().expect("local address").port();
        if !cluster {
            return port;
        }
        if port <= MAX_CLUSTER_PORT
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port + BUS_PORT_OFFSET)).is_ok()
        {
            return port;
        }
    }
    panic!("found no free loopback port whose cluster bus port (+{BUS_PORT_OFFSET}) is free too");
}

/// Why a server did not become ready.
enum Startup {
    /// The process exited, typically because its port was taken: another
    /// port may work.
    Exited(String),
    /// Anything else.
    Failed(String),
}

/// A `redis-server` child process on a loopback port.
///
/// Dropping it kills the process and removes its temporary directory.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server on a free port and waits until it answers
    /// `PING`.
    ///
    /// # Panics
    ///
    /// If the server cannot be started or does not answer within five
    /// seconds; the message includes its output.
    pub fn start() -> Self {
        Self::launch(false, &[])
    }

    /// Starts a standalone server with `args` added to its command line after
    /// the defaults, which they override: `["--appendonly", "yes"]` keeps the
    /// data across [`restart`](Self::restart). [`restart`](Self::restart)
    /// passes them again.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_with(args: &[&str]) -> Self {
        Self::launch(false, args)
    }

    /// Starts a server with cluster mode enabled, on a port whose bus port is
    /// free too.
    fn start_cluster_node() -> Self {
        Self::launch(true, &[])
    }

    fn launch(cluster: bool, args: &[&str]) -> Self {
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port(cluster);
            let mut extra_args = if cluster {
                vec![
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-config-file".to_owned(),
                    format!("nodes-{port}.conf"),
                    "--cluster-node-timeout".to_owned(),
                    "5000".to_owned(),
                ]
            } else {
                Vec::new()
            };
            extra_args.extend(args.iter().map(|arg| (*arg).to_owned()));
            let mut server = Self {
                port,
                dir: std::env::temp_dir()
                    .join(format!("tollgate-redis-{}-{port}", std::process::id())),
                extra_args,
                child: None,
            };
            // A directory left behind by an earlier process with the same id.
            let _ = fs::remove_dir_all(&server.dir);
            match server.spawn() {
                Ok(()) => return server,
                Err(Startup::Exited(message)) => failures.push(message),
                Err(Startup::Failed(message)) => panic!("{message}"),
            }
        }
        panic!(
            "redis-server did not start on any of {PORT_ATTEMPTS} free ports:\n\n{}",
            failures.join("\n\n")
        );
    }

    fn spawn(&mut self) -> Result<(), Startup> {
        fs::create_dir_all(&self.dir)
            .map_err(|error| Startup::Failed(format!("create {}: {error}", self.dir.display())))?;
        let log = |name: &str| {
            let path = self.dir.join(name);
            File::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|error| Startup::Failed(format!("open {}: {error}", path.display())))
        };
        let (stdout, stderr) = (log("stdout.log")?, log("stderr.log")?);
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|error| Startup::Failed(format!("run redis-server: {error}")))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls until this process (not some other server on the port) answers
    /// `PING`, it exits, or the startup timeout passes.
    fn wait_ready(&mut self) -> Result<(), Startup> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("a started process");
            let pid = child.id();
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    self.child = None;
                    return Err(Startup::Exited(format!(
                        "redis-server on port {} exited during startup ({status})\n{}",
                        self.port,
                        self.logs()
                    )));
                }
                Err(error) => {
                    return Err(Startup::Failed(format!(
                        "redis-server on port {}: {error}",
                        self.port
                    )));
                }
            }
            if ping(self.addr()) && self.runs_as(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // Not ready in time (a loaded machine, or another server on
                // the port): this one is stopped and another port is tried.
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(Startup::Exited(format!(
                    "redis-server on port {} did not answer PING within {STARTUP_TIMEOUT:?}\n{}",
                    self.port,
                    self.logs()
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether the server answering on the port is the process `pid`.
    fn runs_as(&self, pid: u32) -> bool {
        let expected = format!("process_id:{pid}");
        command_with_timeout(self.addr(), &["INFO", "server"], PROBE_TIMEOUT)
            .is_ok_and(|info| info.lines().any(|line| line.trim() == expected))
    }

    /// The server's captured stdout and stderr.
    fn logs(&self) -> String {
        let read = |name: &str| {
            fs::read(self.dir.join(name))
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|error| format!("(cannot read {name}: {error})"))
        };
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            read("stdout.log"),
            read("stderr.log")
        )
    }

    /// The connection URL, `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The process id, or `None` after [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the process (SIGSTOP): connections are still accepted, but
    /// commands get no reply until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("STOP");
        self.wait_for_state(|state| state == 'T');
    }

    /// Continues a paused process (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
        self.wait_for_state(|state| state != 'T');
    }

    /// Kills the process (SIGKILL) and waits for it to exit. Does nothing if
    /// it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if the process has already exited.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, killing it first if it is
    /// still running, and waits until it answers `PING`. Data is not kept,
    /// unless the server was started with persistence
    /// ([`start_with`](Self::start_with)) in its directory, which is kept.
    ///
    /// # Panics
    ///
    /// If the server does not come back, for example because the port has
    /// been taken meanwhile.
    pub fn restart(&mut self) {
        self.kill();
        match self.spawn() {
            Ok(()) => {}
            Err(Startup::Exited(message) | Startup::Failed(message)) => {
                panic!("restart on port {}: {message}", self.port)
            }
        }
    }

    fn signal(&self, name: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("redis-server on port {} is not running", self.port));
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|error| panic!("run `kill -{name} {pid}`: {error}"));
        assert!(status.success(), "`kill -{name} {pid}` failed: {status}");
    }

    /// Waits (up to a second) until the process state in `/proc` satisfies
    /// `done`, so that a signal has taken effect. Does nothing without
    /// `/proc`.
    fn wait_for_state(&self, done: impl Fn(char) -> bool) {
        let Some(pid) = self.pid() else { return };
        let path = PathBuf::from(format!("/proc/{pid}/stat"));
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let Ok(stat) = fs::read_to_string(&path) else {
                return;
            };
            // "pid (comm) S ...": the state follows the last parenthesis.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if state.is_none_or(&done) {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A Redis cluster of three masters, each a [`RedisServer`] with cluster
/// mode enabled, holding all 16384 slots between them.
///
/// Dropping it stops every node.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok` and knows the other
    /// two.
    ///
    /// # Panics
    ///
    /// If a node does not start, the cluster cannot be created, or it is not
    /// ready within fifteen seconds.
    pub fn start() -> Self {
        let nodes = (0..CLUSTER_NODES)
            .map(|_| RedisServer::start_cluster_node())
            .collect();
        let cluster = Self { nodes };
        cluster.create();
        cluster.wait_ok();
        cluster
    }

    fn create(&self) {
        self.create_in(&[0, 1, 2]);
    }

    /// `redis-cli --cluster create` of the nodes in `order`, which gives
    /// each its range of slots in that order.
    fn create_in(&self, order: &[usize]) {
        let ports = self.ports();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(order.iter().map(|&i| format!("127.0.0.1:{}", ports[i])))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("run `redis-cli --cluster create`: {error}"));
        assert!(
            output.status.success(),
            "`redis-cli --cluster create` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let known = format!("cluster_known_nodes:{CLUSTER_NODES}");
        loop {
            let infos: Vec<_> = self
                .nodes
                .iter()
                .map(|node| (node.port(), command(node.addr(), &["CLUSTER", "INFO"])))
                .collect();
            let ready = infos.iter().all(|(_, info)| {
                info.as_ref().is_ok_and(|info| {
                    let lines: Vec<_> = info.lines().map(str::trim).collect();
                    lines.contains(&"cluster_state:ok") && lines.contains(&known.as_str())
                })
            });
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                let report: Vec<_> = infos
                    .iter()
                    .map(|(port, info)| format!("node {port}: {info:?}"))
                    .collect();
                panic!(
                    "the cluster was not ready within {CLUSTER_TIMEOUT:?}:\n{}",
                    report.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The connection URLs of the nodes, `redis://127.0.0.1:PORT/`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The client ports of the nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// The client addresses of the nodes.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(RedisServer::addr).collect()
    }

    /// The nodes, for inspection.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The cluster node id of node `index` (`CLUSTER MYID`).
    pub fn node_id(&self, index: usize) -> String {
        command(self.nodes[index].addr(), &["CLUSTER", "MYID"]).expect("CLUSTER MYID")
    }

    /// The index of the node that serves `slot` now, as node 0 sees it.
    pub fn owner_of(&self, slot: u16) -> usize {
        let ids: Vec<_> = (0..self.nodes.len()).map(|i| self.node_id(i)).collect();
        let shards = command(self.nodes[0].addr(), &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        let owner = shards
            .lines()
            .find(|line| {
                let fields: Vec<_> = line.split(' ').collect();
                fields.get(2).is_some_and(|f| f.contains("master"))
                    && fields[8..].iter().any(|range| {
                        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                        match (lo.parse::<u16>(), hi.parse::<u16>()) {
                            (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                            _ => false,
                        }
                    })
            })
            .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{shards}"));
        let id = owner.split(' ').next().unwrap();
        ids.iter()
            .position(|i| i == id)
            .unwrap_or_else(|| panic!("slot {slot} is served by an unknown node {id}"))
    }

    /// Starts one more node and makes it a replica of node `master`; waits
    /// until it has synchronised. Returns its index.
    pub fn add_replica(&mut self, master: usize) -> usize {
        let replica = RedisServer::start_cluster_node();
        let master_id = self.node_id(master);
        let master_port = self.nodes[master].port().to_string();
        command(
            replica.addr(),
            &["CLUSTER", "MEET", "127.0.0.1", &master_port],
        )
        .expect("CLUSTER MEET");
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        // The replica must know the master before it can follow it.
        while command(replica.addr(), &["CLUSTER", "REPLICATE", &master_id]).is_err() {
            assert!(
                Instant::now() < deadline,
                "the replica never met its master"
            );
            thread::sleep(Duration::from_millis(50));
        }
        loop {
            let info = command(replica.addr(), &["INFO", "replication"]).unwrap_or_default();
            let known = self.nodes.iter().all(|node| {
                command(node.addr(), &["CLUSTER", "NODES"])
                    .is_ok_and(|nodes| nodes.lines().count() == self.nodes.len() + 1)
            });
            if info.contains("master_link_status:up") && known {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not sync: {info}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        self.nodes.push(replica);
        self.nodes.len() - 1
    }

    /// Moves `slot` from node `from` to node `to` as `redis-cli --cluster
    /// reshard` does: `SETSLOT … IMPORTING` and `MIGRATING`, each key
    /// `MIGRATE`d, `between(n, total)` called before the first and after
    /// each of the `total` keys moved (a client then gets `ASK`, or
    /// `TRYAGAIN` for a call whose keys are split), and `SETSLOT … NODE` on
    /// every master.
    pub fn move_slot(
        &self,
        slot: u16,
        from: usize,
        to: usize,
        mut between: impl FnMut(usize, usize),
    ) {
        let (src, dst) = (self.nodes[from].addr(), self.nodes[to].addr());
        let slot_s = slot.to_string();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        command(dst, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]).unwrap();
        command(src, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]).unwrap();
        let keys = command(src, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "1000"]).unwrap();
        let keys: Vec<_> = keys.lines().filter(|k| !k.is_empty()).collect();
        between(0, keys.len());
        let port = self.nodes[to].port().to_string();
        for (n, key) in keys.iter().enumerate() {
            command(src, &["MIGRATE", "127.0.0.1", &port, key, "0", "5000"]).unwrap();
            between(n + 1, keys.len());
        }
        for node in &self.nodes {
            // Replicas refuse SETSLOT; they follow their masters.
            let _ = command(
                node.addr(),
                &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id],
            );
        }
    }

    /// Kills every node and starts it again on its port, empty and without
    /// its cluster configuration (its `nodes-PORT.conf` removed): three
    /// lone nodes with new ids and no slots, which answer `CLUSTERDOWN`
    /// until [`reform`](Self::reform). Only for the three masters (no
    /// replica added).
    pub fn forget(&mut self) {
        assert_eq!(self.nodes.len(), CLUSTER_NODES, "only three masters");
        for node in &mut self.nodes {
            node.kill();
            let _ = fs::remove_file(node.dir.join(format!("nodes-{}.conf", node.port)));
            node.restart();
        }
    }

    /// Creates the cluster anew of the nodes [`forget`](Self::forget) left,
    /// giving them their ranges of slots in `order` (another order than
    /// the first, `[0, 1, 2]`, moves every key to another node), and waits
    /// until it is ready.
    pub fn reform(&self, order: &[usize]) {
        self.create_in(order);
        self.wait_ok();
    }

    /// Node `index`, for fault injection (pause, kill, restart).
    ///
    /// # Panics
    ///
    /// If `index` is not below three.
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }
}

/// The keys of the server at `addr` that match `pattern` (`SCAN … MATCH`),
/// in no particular order. On a Cluster node, only the node's own keys.
pub fn scan(addr: SocketAddr, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let reply = command(addr, &["SCAN", &cursor, "MATCH", pattern, "COUNT", "1000"])
            .unwrap_or_else(|error| panic!("SCAN {cursor} MATCH {pattern}: {error}"));
        // [cursor, [key, …]], flattened by `command` into lines.
        let mut lines = reply.lines();
        cursor = lines.next().unwrap_or("0").to_owned();
        keys.extend(lines.filter(|key| !key.is_empty()).map(str::to_owned));
        if cursor == "0" {
            return keys;
        }
    }
}
