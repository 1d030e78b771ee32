//! The Redis test harness itself: servers start on free loopback ports,
//! answer commands, and can be paused, killed and restarted; a cluster of
//! three masters forms.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::redis::{
    RedisCluster, RedisServer, command, command_with_timeout, ping, require_redis,
};

#[test]
fn server_answers_ping_and_round_trips_set_get() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let port = server.port();
    assert_ne!(port, 6379, "must not use the machine's own Redis");
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(server.addr().to_string(), format!("127.0.0.1:{port}"));

    let addr = server.addr();
    assert!(ping(addr));
    assert_eq!(command(addr, &["PING"]).as_deref(), Ok("PONG"));
    assert_eq!(
        command(addr, &["SET", "tollgate:key", "a value"]).as_deref(),
        Ok("OK")
    );
    assert_eq!(
        command(addr, &["GET", "tollgate:key"]).as_deref(),
        Ok("a value")
    );
    assert_eq!(command(addr, &["INCR", "tollgate:n"]).as_deref(), Ok("1"));
    assert_eq!(
        command(addr, &["INCRBY", "tollgate:n", "41"]).as_deref(),
        Ok("42")
    );
    assert_eq!(
        command(addr, &["GET", "tollgate:missing"]).as_deref(),
        Ok("(nil)")
    );
    assert!(
        command(addr, &["INCR", "tollgate:key"])
            .is_err_and(|error| error.contains("not an integer")),
        "error replies are errors"
    );
    assert_eq!(
        command(addr, &["CONFIG", "GET", "save"]).as_deref(),
        Ok("save\n"),
        "snapshots are disabled"
    );

    let pid = server.pid().expect("running");
    let dir = server.dir().to_path_buf();
    assert!(dir.is_dir());
    drop(server);
    assert!(!dir.exists(), "the temporary directory is removed");
    if Path::new("/proc").is_dir() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the process is gone"
        );
    }
    assert!(!ping(addr));
}

#[test]
fn paused_server_times_out_and_answers_after_resume() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let addr = server.addr();
    assert!(ping(addr));

    server.pause();
    let started = Instant::now();
    let reply = command_with_timeout(addr, &["PING"], Duration::from_millis(200));
    let waited = started.elapsed();
    assert!(
        reply
            .as_ref()
            .is_err_and(|error| error.contains("timed out")),
        "a paused server does not answer: {reply:?}"
    );
    assert!(waited >= Duration::from_millis(150), "waited {waited:?}");
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");

    server.resume();
    assert_eq!(command(addr, &["PING"]).as_deref(), Ok("PONG"));
}

#[test]
fn killed_server_restarts_on_the_same_port() {
    if !require_redis() {
        return;
    }
    let mut server = RedisServer::start();
    let port = server.port();
    let addr = server.addr();
    assert_eq!(command(addr, &["SET", "k", "v"]).as_deref(), Ok("OK"));

    server.kill();
    assert_eq!(server.pid(), None);
    assert!(command(addr, &["PING"]).is_err(), "a killed server is gone");

    server.restart();
    assert_eq!(server.port(), port);
    assert!(server.pid().is_some());
    assert_eq!(command(addr, &["PING"]).as_deref(), Ok("PONG"));
    assert_eq!(
        command(addr, &["GET", "k"]).as_deref(),
        Ok("(nil)"),
        "nothing is persisted"
    );

    // A paused server can be killed and restarted as well.
    server.pause();
    server.restart();
    assert_eq!(command(addr, &["PING"]).as_deref(), Ok("PONG"));
}

#[test]
fn cluster_of_three_masters_forms() {
    if !require_redis() {
        return;
    }
    let cluster = RedisCluster::start();
    let ports = cluster.ports();
    assert_eq!(ports.len(), 3);
    for (i, port) in ports.iter().enumerate() {
        assert!(*port <= 55_534, "bus port {} must be valid", port + 10_000);
        assert!(!ports[..i].contains(port), "distinct ports {ports:?}");
    }
    let urls: Vec<_> = ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}/"))
        .collect();
    assert_eq!(cluster.urls(), urls);

    for addr in cluster.addrs() {
        let info = command(addr, &["CLUSTER", "INFO"]).expect("CLUSTER INFO");
        let lines: Vec<_> = info.lines().map(str::trim).collect();
        assert!(lines.contains(&"cluster_state:ok"), "{addr}: {info}");
        assert!(lines.contains(&"cluster_known_nodes:3"), "{addr}: {info}");
        assert!(
            lines.contains(&"cluster_slots_assigned:16384"),
            "{addr}: {info}"
        );
        assert!(lines.contains(&"cluster_size:3"), "{addr}: {info}");
    }

    // A key is served by the node that owns its slot and redirected by the
    // others.
    let replies: Vec<_> = cluster
        .addrs()
        .into_iter()
        .map(|addr| command(addr, &["SET", "tollgate:key", "v"]))
        .collect();
    let served = replies.iter().filter(|reply| reply.as_deref() == Ok("OK"));
    assert_eq!(served.count(), 1, "{replies:?}");
    let moved = replies
        .iter()
        .filter(|reply| reply.as_ref().is_err_and(|error| error.contains("MOVED")));
    assert_eq!(moved.count(), 2, "{replies:?}");
}
