//! The command line of the `tollgate-gateway` binary: `--help` on stdout with
//! every flag, environment variable and default, and a clear error with exit
//! status 2 for a bad flag or value.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::process::server_binary;

/// Runs the binary with `args`; panics if it does not exit within 10 s (a
/// gateway that started serving instead).
fn run<A: AsRef<OsStr>>(args: &[A]) -> Output {
    run_with_env::<_, &str>(args, &[])
}

/// [`run`] with the environment variables `env` set.
fn run_with_env<A: AsRef<OsStr>, V: AsRef<OsStr>>(args: &[A], env: &[(&str, V)]) -> Output {
    let mut child = Command::new(server_binary())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the gateway");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("query the gateway").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
            panic!("`tollgate-gateway {args:?}` did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("the gateway's output")
}

#[test]
fn help_lists_every_flag_and_variable_with_its_default_on_stdout() {
    for flag in ["--help", "-h"] {
        let out = run(&[flag]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(out.stderr.is_empty(), "{flag}: {:?}", out.stderr);
        let help = String::from_utf8(out.stdout).unwrap();
        for needle in [
            "--config FILE",
            "--listen ADDR",
            "[default: 127.0.0.1:3000]",
            "--redis URL",
            "--redis-timeout MS",
            "[default: 100]",
            "--drain SECS",
            "[default: 30]",
            "--header-timeout SECS",
            "[default: 10]",
            "--body-timeout SECS",
            "--body-deadline SECS",
            "--max-connections N",
            "[default: 1024]",
            "--log-json",
            "--upstream URL",
            "--upstream-key KEY",
            "--upstream-timeout SECS",
            "[default: 600]",
            "--upstream-connect-timeout SECS",
            "--help",
            "TOLLGATE_KEY_SECRET",
            "TOLLGATE_UPSTREAM_KEY",
            "RUST_LOG",
            tollgate_gateway::DEFAULT_LOG,
        ] {
            assert!(help.contains(needle), "{flag}: no {needle:?} in\n{help}");
        }
        // Every flag and every variable names its default: an entry is a
        // line indented by two spaces and the deeper-indented lines after it.
        let mut entries: Vec<String> = Vec::new();
        for line in help.lines() {
            if line.starts_with("   ") {
                if let Some(e) = entries.last_mut() {
                    e.push_str(line);
                }
            } else if let Some(entry) = line.strip_prefix("  ") {
                entries.push(entry.to_owned());
            }
        }
        assert!(entries.len() >= 8, "{entries:?}");
        for entry in entries.iter().filter(|e| !e.starts_with("-h, --help")) {
            assert!(entry.contains("[default: "), "no default in {entry:?}");
        }
    }
    // Help wins over other flags, even bad ones after it: nothing is served.
    let out = run(&["--listen", "127.0.0.1:0", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tollgate-gateway"));
}

#[test]
fn a_bad_flag_or_value_is_a_clear_error_with_status_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["--colour"], "unknown argument `--colour`"),
        // `--flag=value` is `--flag value`.
        (&["--listen=localhost"], "--listen `localhost`"),
        (&["--drain=soon"], "--drain `soon`: not a number of seconds"),
        (&["--colour=red"], "unknown argument `--colour`"),
        (&["--log-json=yes"], "--log-json takes no value"),
        (&["serve"], "unknown argument `serve`"),
        (&["--listen"], "--listen needs an address"),
        (&["--listen", "localhost"], "--listen `localhost`"),
        (
            &["--listen", "127.0.0.1:99999"],
            "--listen `127.0.0.1:99999`",
        ),
        (&["--config"], "--config needs a file"),
        (&["--redis"], "--redis needs a URL"),
        // A URL that is not Redis's is bad flags, named before anything
        // connects, its password left out: it was "store unavailable".
        (&["--redis", "nope"], "--redis `nope`: not a Redis URL"),
        (
            &["--redis", "http://127.0.0.1:6379/"],
            "--redis `http://127.0.0.1:6379/`: not a Redis URL",
        ),
        (
            &["--redis", "redis://127.0.0.1:6379/x"],
            "Invalid database number",
        ),
        (&["--redis", "redis://me:hunter22@@/"], "`redis://…@/`"),
        (&["--redis", ""], "--redis: the URL is empty"),
        (
            &["--redis", "redis://127.0.0.1:1/,"],
            "--redis: URL 2 of 2 is empty",
        ),
        (
            &["--redis", "redis://127.0.0.1:1/, nope"],
            "--redis `nope` (URL 2 of 2): not a Redis URL",
        ),
        (
            &["--drain", "soon"],
            "--drain `soon`: not a number of seconds",
        ),
        (&["--drain", "-1"], "--drain `-1`: not a number of seconds"),
        (&["--redis-timeout", "0"], "--redis-timeout `0`"),
        (&["--redis-timeout", "1.5"], "--redis-timeout `1.5`"),
        (
            &["--config", "/nonexistent/tollgate.toml"],
            "/nonexistent/tollgate.toml",
        ),
        (&["--config", "/"], "/: cannot read"),
        (&["--upstream"], "--upstream needs a URL"),
        (
            &["--upstream", "localhost:8000"],
            "the scheme must be http or https",
        ),
        (
            &["--upstream", "ftp://h/"],
            "the scheme must be http or https",
        ),
        (&["--upstream", "http://"], "--upstream: `http://`"),
        (&["--upstream", "8000"], "--upstream: `8000` is not a URL"),
        (
            &["--upstream", "http://h:1/?model=m"],
            "a query or fragment",
        ),
        // The secret in the URL is not echoed.
        (&["--upstream", "http://me:hunter22@h/"], "user or password"),
        (&["--upstream-key", "k"], "--upstream-key is for --upstream"),
        (
            &["--upstream", "http://h", "--upstream-timeout", "0"],
            "--upstream-timeout `0`",
        ),
        (
            &["--upstream", "http://h", "--upstream-connect-timeout", "x"],
            "--upstream-connect-timeout `x`",
        ),
        // Below a millisecond, a timeout was zero to the timers: every
        // connection was dropped at once.
        (&["--header-timeout", "1e-10"], "--header-timeout `1e-10`"),
        (&["--body-timeout", "0.0001"], "--body-timeout `0.0001`"),
        (&["--body-deadline", "0"], "--body-deadline `0`"),
        (
            &["--body-deadline"],
            "--body-deadline needs a number of seconds",
        ),
    ];
    for (args, message) in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {:?}", out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!err.contains("hunter22"), "{args:?}: {err}");
        assert!(!err.contains("store unavailable"), "{args:?}: {err}");
        assert!(!err.contains("cannot be reached"), "{args:?}: {err}");
    }
}

/// A flag given twice is an error naming it: one of the two was taken and
/// the other dropped without a word (`--config prod.toml` then a wrapper's
/// `--config demo.toml` served the demo's public keys).
#[test]
fn a_flag_given_twice_is_an_error() {
    let cases: &[&[&str]] = &[
        &["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
        &["--config", "a.toml", "--config=b.toml"],
        &["--drain", "5", "--drain", "10"],
        &[
            "--redis",
            "redis://127.0.0.1:1/",
            "--redis",
            "redis://127.0.0.1:2/",
        ],
        &["--redis-timeout", "100", "--redis-timeout", "200"],
        &["--header-timeout", "1", "--header-timeout", "2"],
        &["--body-timeout", "1", "--body-timeout", "2"],
        &["--body-deadline", "1", "--body-deadline", "2"],
        &["--body-memory", "1", "--body-memory", "2"],
        &["--max-connections", "1", "--max-connections", "2"],
        &["--log-json", "--log-json"],
        &["--upstream", "http://h", "--upstream", "http://g"],
        &[
            "--upstream",
            "http://h",
            "--upstream-key",
            "k1",
            "--upstream-key",
            "k2",
        ],
        &[
            "--upstream",
            "http://h",
            "--upstream-timeout",
            "1",
            "--upstream-timeout",
            "2",
        ],
        &[
            "--upstream",
            "http://h",
            "--upstream-connect-timeout",
            "1",
            "--upstream-connect-timeout",
            "2",
        ],
    ];
    for args in cases {
        let flag = args[args.len() - 1]
            .split('=')
            .next()
            .filter(|a| a.starts_with("--"))
            .unwrap_or(args[args.len() - 2]);
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("{flag} is given twice")),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("k1") && !err.contains("k2"),
            "{args:?}: {err}"
        );
    }
    // As an unknown flag, one given twice before `--help` is an error; help
    // asked twice is help.
    assert_eq!(
        run(&["--drain", "1", "--drain", "2", "--help"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(run(&["--help", "--help"]).status.code(), Some(0));
}

/// An argument that is not UTF-8 (a file name in another encoding, a
/// mistyped flag) is a clear error with status 2, as any bad flag is: the
/// gateway panicked reading it (status 101, a backtrace on stderr).
#[cfg(unix)]
#[test]
fn an_argument_that_is_not_utf8_is_a_clear_error_with_status_2() {
    use std::os::unix::ffi::OsStrExt;
    let config: &[&OsStr] = &[
        OsStr::new("--config"),
        OsStr::from_bytes(b"/tmp/caf\xe9.toml"),
    ];
    let flag: &[&OsStr] = &[OsStr::from_bytes(b"--list\xe9n")];
    for args in [config, flag] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is not UTF-8"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// An environment variable the gateway reads that is not UTF-8 is a clear
/// error with status 2, as `RUST_LOG` is: `TOLLGATE_KEY_SECRET` was taken
/// as unset (the names of the state in Redis then differ from those of the
/// other gateways, which count the same clients apart), and
/// `TOLLGATE_UPSTREAM_KEY` too (the backend was sent no credential).
#[cfg(unix)]
#[test]
fn a_variable_that_is_not_utf8_is_a_clear_error_with_status_2() {
    use std::os::unix::ffi::OsStrExt;
    let garbled = OsStr::from_bytes(b"s\xe9cret-key");
    let cases: [(&[&str], &str); 2] = [
        (
            &["--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:1/"],
            "TOLLGATE_KEY_SECRET",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:1",
            ],
            "TOLLGATE_UPSTREAM_KEY",
        ),
    ];
    for (args, var) in cases {
        let out = run_with_env(args, &[(var, garbled)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {err}");
        assert!(err.contains(&format!("{var} is not UTF-8")), "{var}: {err}");
    }
}

#[test]
fn an_unreachable_redis_cluster_at_startup_is_an_outage_with_status_1() {
    // Nothing listens on ports 1 and 2: the cluster's slots cannot be read.
    let out = run(&[
        "--listen",
        "127.0.0.1:0",
        "--redis",
        "redis://127.0.0.1:1/,redis://127.0.0.1:2/",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the Redis Cluster cannot be reached"), "{err}");
    assert!(!err.contains("serving anyway"), "{err}");
    // A node that is not a URL is bad flags, as ever.
    let out = run(&[
        "--listen",
        "127.0.0.1:0",
        "--redis",
        "redis://127.0.0.1:1/,not a url",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// `RUST_LOG` set but empty (as a deployment template leaves it) keeps the
/// default filter, and one that does not parse is a clear error with status
/// 2, as a bad flag is. Before, an empty one turned every warning off (a
/// store failure's too), and a bad one was replaced by the default without
/// a word.
#[test]
fn an_empty_rust_log_keeps_the_default_filter_and_a_bad_one_is_an_error() {
    // Nothing listens on ports 1 and 2: a warning for each node, then exit.
    let cluster = [
        "--listen",
        "127.0.0.1:0",
        "--redis",
        "redis://127.0.0.1:1/,redis://127.0.0.1:2/",
    ];
    let out = run_with_env(&cluster, &[("RUST_LOG", "")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WARN") && err.contains("a Redis Cluster node cannot be reached"),
        "{err}"
    );
    for bad in ["tollgate=verbose", "tollgate_gateway=info["] {
        let out = run_with_env(&["--listen", "127.0.0.1:0"], &[("RUST_LOG", bad)]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("RUST_LOG `{bad}`")), "{bad}: {err}");
    }
}
