//! The registry against real `redis-server` processes (single and Cluster),
//! started by the integration tests' harness.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::watch::{Held, Position};
use super::*;

#[path = "../../../../tests/support/redis.rs"]
mod support;

use self::support::{RedisCluster, RedisServer, command, require_redis};

async fn store(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .key_secret("registry tests")
        .timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("a store")
}

fn key(store: &RedisStore, id: &str, value: &str) -> KeyRecord {
    KeyRecord {
        id: id.to_owned(),
        value_hash: store.value_hash(value.as_bytes()),
        plan: "gold".to_owned(),
        account: None,
        enabled: true,
    }
}

/// Updates delivered to a watcher.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<RegistryUpdate>>>);

impl Seen {
    fn callback(&self) -> Arc<dyn Fn(RegistryUpdate) + Send + Sync> {
        let seen = self.0.clone();
        Arc::new(move |u| seen.lock().unwrap().push(u))
    }

    fn take(&self) -> Vec<RegistryUpdate> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// Waits until `n` updates have arrived (at most `within`).
    async fn wait(&self, n: usize, within: Duration) -> Vec<RegistryUpdate> {
        let deadline = Instant::now() + within;
        while self.0.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.take()
    }
}

fn change(version: u64, change: Change) -> RegistryUpdate {
    RegistryUpdate::Change { version, change }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_store_reaches_another_within_a_second() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let (a, b) = (store(&server.url()).await, store(&server.url()).await);
    let (version, all) = b.registry_load().await.unwrap();
    assert_eq!((version, all), (0, vec![]));
    let seen = Seen::default();
    b.registry_watch(seen.callback(), version, &[]);

    let k = key(&a, "k1", "secret-1");
    let plan = Change::PutPlan {
        name: "gold".into(),
        encoded: "rate=10".into(),
    };
    assert_eq!(a.registry_write(&plan).await.unwrap(), 1);
    let written = Instant::now();
    assert_eq!(
        a.registry_write(&Change::AddKey(k.clone())).await.unwrap(),
        2
    );
    let got = seen.wait(2, Duration::from_secs(1)).await;
    assert!(
        written.elapsed() < Duration::from_secs(1),
        "{:?}",
        written.elapsed()
    );
    assert_eq!(
        got,
        vec![change(1, plan), change(2, Change::AddKey(k.clone()))]
    );

    // The same secret gives the same hash on every instance; the value is
    // stored nowhere.
    assert_eq!(a.value_hash(b"secret-1"), b.value_hash(b"secret-1"));
    let dump = command(server.addr(), &["HGETALL", "{tollgate:registry}:keys"]).unwrap();
    assert!(!dump.contains("secret-1") && dump.contains(&format!("{:032x}", k.value_hash)));

    // Updates keep the stored value hash.
    let mut moved = k.clone();
    (moved.plan, moved.account, moved.enabled) = ("free".into(), Some("acme".into()), false);
    moved.value_hash = 7;
    assert_eq!(
        a.registry_write(&Change::UpdateKey(moved.clone()))
            .await
            .unwrap(),
        3
    );
    moved.value_hash = k.value_hash;
    let got = seen.wait(1, Duration::from_secs(1)).await;
    assert_eq!(got, vec![change(3, Change::UpdateKey(moved))]);

    // A store dropped stops its watcher.
    let weak = Arc::downgrade(&b.inner);
    drop(b);
    tokio::time::sleep(super::watch::POLL * 2).await;
    assert!(weak.upgrade().is_none());
}

/// How many times Redis has run `command` (from `INFO commandstats`).
fn calls(server: &RedisServer, command_name: &str) -> u64 {
    let info = command(server.addr(), &["INFO", "commandstats"]).unwrap();
    let prefix = format!("cmdstat_{command_name}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A read of the log that fails (Redis did not answer, for longer than a
/// read waits) leaves the watcher where it was in the log: the next poll
/// goes on from there, and the next change arrives within the second. Not a
/// read of the whole registry again, which on a large registry takes longer
/// than that second, with no change arriving meanwhile: the log tells
/// by itself whether it still goes on from there (see `registry_read`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_the_log_that_failed_goes_on_from_where_it_was() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let (a, b) = (store(&server.url()).await, store(&server.url()).await);
    let plan = Change::PutPlan {
        name: "gold".into(),
        encoded: "rate=10".into(),
    };
    a.registry_write(&plan).await.unwrap();
    let (version, all) = b.registry_load().await.unwrap();
    let seen = Seen::default();
    b.registry_watch(seen.callback(), version, &all);
    let k1 = key(&a, "k1", "v1");
    a.registry_write(&Change::AddKey(k1.clone())).await.unwrap();
    assert_eq!(
        seen.wait(1, Duration::from_secs(1)).await,
        vec![change(2, Change::AddKey(k1))]
    );

    // No answer for 1.5 s: the watcher's reads in that time fail.
    server.pause();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.resume();
    let full_reads = calls(&server, "hscan");
    let k2 = key(&a, "k2", "v2");
    a.registry_write(&Change::AddKey(k2.clone())).await.unwrap();
    let written = Instant::now();
    let got = seen.wait(1, Duration::from_secs(1)).await;
    assert!(
        written.elapsed() < Duration::from_secs(1),
        "{:?}",
        written.elapsed()
    );
    assert_eq!(got, vec![change(3, Change::AddKey(k2))]);
    assert_eq!(
        calls(&server, "hscan"),
        full_reads,
        "the registry was read in full again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_started_later_loads_the_registry_with_tombstones() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let a = store(&server.url()).await;
    let (k1, k2, k3) = (
        key(&a, "k1", "v1"),
        key(&a, "k2", "v2"),
        key(&a, "k3", "v3"),
    );
    let writes = [
        Change::PutAccount {
            name: "acme".into(),
            encoded: "budget=5".into(),
        },
        Change::AddKey(k1.clone()),
        Change::Import(vec![k2.clone(), k3.clone()]),
        Change::RemoveKey { id: "k2".into() },
        // A key only in a static configuration.
        Change::RemoveKey {
            id: "static".into(),
        },
        Change::PutPlan {
            name: "gold".into(),
            encoded: "rate=10".into(),
        },
    ];
    for w in &writes {
        a.registry_write(w).await.unwrap();
    }
    let later = store(&server.url()).await;
    let (version, all) = later.registry_load().await.unwrap();
    assert_eq!(version, 6);
    assert_eq!(
        all,
        vec![
            writes[5].clone(),
            writes[0].clone(),
            Change::RemoveKey { id: "k2".into() },
            Change::RemoveKey {
                id: "static".into()
            },
            Change::AddKey(k1),
            Change::AddKey(k3),
        ]
    );
    // A removed key's value is free again, and its id can come back.
    let again = key(&a, "k2b", "v2");
    a.registry_write(&Change::AddKey(again)).await.unwrap();
    a.registry_write(&Change::AddKey(k2.clone()))
        .await
        .unwrap_err();
    let k2 = key(&a, "k2", "v2-new");
    a.registry_write(&Change::AddKey(k2.clone())).await.unwrap();
    let (_, all) = later.registry_load().await.unwrap();
    assert!(all.contains(&Change::AddKey(k2)));
    assert!(!all.contains(&Change::RemoveKey { id: "k2".into() }));
    // A removed key cannot be updated.
    let err = a
        .registry_write(&Change::UpdateKey(key(&a, "static", "s")))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownKey { id } if id == "static"));
}

/// An update of some fields of a key, from `held` (the writer's copy).
fn update(held: Option<&KeyRecord>, id: &str) -> KeyUpdate {
    KeyUpdate {
        id: id.to_owned(),
        held: held.cloned(),
        enabled: None,
        plan: None,
        account: None,
    }
}

/// Two stores change different fields of one key, each from its own copy
/// as it was before either change: both changes hold, in Redis, in the
/// log and in what each write answers. A key of a static configuration is
/// written from the writer's copy; a key in neither is unknown; a stored
/// record that cannot be read is not written over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_sets_its_fields_on_the_record_redis_holds() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let (a, b) = (store(&server.url()).await, store(&server.url()).await);
    let k = key(&a, "k", "value-k");
    a.registry_write(&Change::AddKey(k.clone())).await.unwrap();
    let seen = Seen::default();
    b.registry_watch(seen.callback(), 1, &[]);

    // a disables k; b, from its copy of k still enabled, moves it.
    let off = KeyUpdate {
        enabled: Some(false),
        ..update(Some(&k), "k")
    };
    let (v, written) = a.registry_update(&off).await.unwrap();
    let disabled = KeyRecord {
        enabled: false,
        ..k.clone()
    };
    assert_eq!((v, &written), (2, &disabled));
    let moved = KeyUpdate {
        plan: Some("free".into()),
        ..update(Some(&k), "k")
    };
    let (v, written) = b.registry_update(&moved).await.unwrap();
    let both = KeyRecord {
        plan: "free".into(),
        ..disabled.clone()
    };
    assert_eq!((v, &written), (3, &both), "b's move kept a's disable");
    assert_eq!(
        seen.wait(2, Duration::from_secs(1)).await,
        vec![
            change(2, Change::UpdateKey(disabled)),
            change(3, Change::UpdateKey(both.clone())),
        ]
    );

    // An account set, kept by a later change of another field, then taken
    // away; the writer's value hash is never written over Redis's.
    let mut stale = k.clone();
    stale.value_hash = 7;
    let join = KeyUpdate {
        account: Some(Some("acme".into())),
        ..update(Some(&stale), "k")
    };
    a.registry_update(&join).await.unwrap();
    let on = KeyUpdate {
        enabled: Some(true),
        ..update(None, "k")
    };
    let (_, written) = b.registry_update(&on).await.unwrap();
    let joined = KeyRecord {
        account: Some("acme".into()),
        enabled: true,
        ..both.clone()
    };
    assert_eq!(written, joined);
    let leave = KeyUpdate {
        account: Some(None),
        ..update(None, "k")
    };
    let (v, written) = a.registry_update(&leave).await.unwrap();
    assert_eq!(written.account, None);
    let (version, all) = b.registry_load().await.unwrap();
    assert_eq!((version, all), (v, vec![Change::AddKey(written)]));

    // A key only in a static configuration: the writer's copy, changed.
    let s = key(&a, "static", "value-static");
    let off = KeyUpdate {
        enabled: Some(false),
        ..update(Some(&s), "static")
    };
    let (_, written) = a.registry_update(&off).await.unwrap();
    assert_eq!(
        written,
        KeyRecord {
            enabled: false,
            ..s
        }
    );

    // Neither in Redis nor held by the writer: unknown, nothing written.
    let (before, _) = a.registry_load().await.unwrap();
    let err = b
        .registry_update(&update(None, "nobody"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::UnknownKey { id } if id == "nobody"),
        "{err:?}"
    );

    // A record edited by hand into something else is not written over.
    command(
        server.addr(),
        &["HSET", "{tollgate:registry}:keys", "junk", "not a record"],
    )
    .unwrap();
    let err = a
        .registry_update(&KeyUpdate {
            enabled: Some(false),
            ..update(Some(&key(&a, "junk", "value-junk")), "junk")
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be read"), "{err}");
    assert_eq!(
        command(server.addr(), &["HGET", "{tollgate:registry}:keys", "junk"]).unwrap(),
        "not a record"
    );
    assert_eq!(
        command(server.addr(), &["GET", "{tollgate:registry}:version"]).unwrap(),
        before.to_string()
    );
}

/// One key's record is read as Redis holds it, the latest change in it; an
/// id never added or removed has none; a record edited by hand into
/// something else is an error, not a missing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_is_read_as_redis_holds_it() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let (a, b) = (store(&server.url()).await, store(&server.url()).await);
    let k = KeyRecord {
        account: Some("acme".into()),
        ..key(&a, "k", "value-k")
    };
    a.registry_write(&Change::AddKey(k.clone())).await.unwrap();
    assert_eq!(b.registry_key("k").await.unwrap(), Some(k.clone()));
    let off = KeyUpdate {
        enabled: Some(false),
        ..update(None, "k")
    };
    let (_, disabled) = a.registry_update(&off).await.unwrap();
    assert_eq!(b.registry_key("k").await.unwrap(), Some(disabled));

    assert_eq!(b.registry_key("nobody").await.unwrap(), None);
    let remove = Change::RemoveKey { id: "k".into() };
    a.registry_write(&remove).await.unwrap();
    assert_eq!(b.registry_key("k").await.unwrap(), None, "a tombstone");

    command(
        server.addr(),
        &["HSET", "{tollgate:registry}:keys", "junk", "not a record"],
    )
    .unwrap();
    let err = b.registry_key("junk").await.unwrap_err();
    assert!(err.to_string().contains("cannot be read"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_refused_and_an_import_is_all_or_nothing() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let s = store(&server.url()).await;
    s.registry_write(&Change::AddKey(key(&s, "k1", "v1")))
        .await
        .unwrap();
    let err = s
        .registry_write(&Change::AddKey(key(&s, "k1", "other")))
        .await;
    assert!(matches!(err, Err(RegistryError::Duplicate { id }) if id == "k1"));
    let err = s.registry_write(&Change::AddKey(key(&s, "k9", "v1"))).await;
    assert!(matches!(err, Err(RegistryError::DuplicateValue { id }) if id == "k9"));

    let batches = [
        // In Redis already.
        (
            vec![key(&s, "a", "va"), key(&s, "k1", "vb")],
            "duplicate",
            "k1",
        ),
        (vec![key(&s, "a", "va"), key(&s, "b", "v1")], "value", "b"),
        // Within the batch.
        (
            vec![key(&s, "a", "va"), key(&s, "a", "vb")],
            "duplicate",
            "a",
        ),
        (vec![key(&s, "a", "va"), key(&s, "b", "va")], "value", "b"),
    ];
    for (batch, kind, bad) in batches {
        let err = s.registry_write(&Change::Import(batch)).await.unwrap_err();
        match (&err, kind) {
            (RegistryError::Duplicate { id }, "duplicate")
            | (RegistryError::DuplicateValue { id }, "value") => assert_eq!(id, bad),
            _ => panic!("{err:?} for {bad}"),
        }
        assert!(err.to_string().contains(bad), "{err}");
    }
    // Nothing of the refused batches was written, nor logged.
    let (version, all) = s.registry_load().await.unwrap();
    assert_eq!((version, all.len()), (1, 1));
    assert_eq!(
        command(server.addr(), &["XLEN", "{tollgate:registry}:log"]).unwrap(),
        "1"
    );
    let ok = vec![key(&s, "a", "va"), key(&s, "b", "vb")];
    assert_eq!(s.registry_write(&Change::Import(ok)).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_import_is_staged_in_parts_and_made_live_at_once_or_not_at_all() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let s = store(&server.url()).await;
    s.registry_write(&Change::AddKey(key(&s, "live", "live-value")))
        .await
        .unwrap();
    let batch = |n: usize| -> Vec<KeyRecord> {
        (0..n)
            .map(|i| key(&s, &format!("k{i}"), &format!("value-{i}")))
            .collect()
    };
    let staging = || {
        let keys = command(server.addr(), &["KEYS", "*stag*"]).unwrap();
        let importing = command(server.addr(), &["EXISTS", "{tollgate:registry}:importing"]);
        (keys, importing.unwrap())
    };

    // A clash in the third part (with a live key): nothing live, nothing
    // staged left, nothing logged.
    let mut bad = batch(3 * IMPORT_PART + 10);
    bad[2 * IMPORT_PART + 5].value_hash = s.value_hash(b"live-value");
    let err = s.registry_write(&Change::Import(bad)).await.unwrap_err();
    let bad_id = format!("k{}", 2 * IMPORT_PART + 5);
    assert!(
        matches!(&err, RegistryError::DuplicateValue { id } if *id == bad_id),
        "{err:?}"
    );
    let (version, all) = s.registry_load().await.unwrap();
    assert_eq!((version, all.len()), (1, 1));
    assert_eq!(staging(), (String::new(), "0".to_owned()));

    // A duplicate id across parts.
    let mut twice = batch(IMPORT_PART + 10);
    twice[IMPORT_PART + 3].id = "k7".to_owned();
    let err = s.registry_write(&Change::Import(twice)).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Duplicate { id } if id == "k7"),
        "{err:?}"
    );
    assert_eq!(s.registry_load().await.unwrap().1.len(), 1);

    // While an import is staged, other writes wait their turn.
    let token = "someone-elses-import";
    let stage: Vec<String> = [
        "w",
        "256",
        "262144",
        "S",
        token,
        "60000",
        "x",
        &"0".repeat(33),
    ]
    .map(str::to_owned)
    .to_vec();
    let _: Vec<String> = s.inner.registry_eval(&stage, None).await.unwrap();
    let err = s
        .registry_write(&Change::AddKey(key(&s, "late", "late-value")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("import is in progress"), "{err}");
    let abort: Vec<String> = ["w", "256", "262144", "X", token]
        .map(str::to_owned)
        .to_vec();
    let _: Vec<String> = s.inner.registry_eval(&abort, None).await.unwrap();

    // A good one: every key live, one version, one log entry saying "read
    // everything again", no Redis call carrying more than a part. (Every
    // call is logged, and counted by its arguments, not timed: a loaded
    // machine makes any call slow.)
    command(server.addr(), &["SLOWLOG", "RESET"]).unwrap();
    command(
        server.addr(),
        &["CONFIG", "SET", "slowlog-max-len", "10000"],
    )
    .unwrap();
    command(
        server.addr(),
        &["CONFIG", "SET", "slowlog-log-slower-than", "0"],
    )
    .unwrap();
    let n = 5 * IMPORT_PART + 1;
    assert_eq!(
        s.registry_write(&Change::Import(batch(n))).await.unwrap(),
        2
    );
    let (version, all) = s.registry_load().await.unwrap();
    assert_eq!((version, all.len()), (2, n + 1));
    assert_eq!(staging(), (String::new(), "0".to_owned()));
    let log = command(
        server.addr(),
        &["XRANGE", "{tollgate:registry}:log", "-", "+"],
    )
    .unwrap();
    assert!(log.lines().any(|l| l == "R"), "{log}");
    // Redis logs a call's first 31 arguments and "... (N more arguments)".
    let calls = command(server.addr(), &["SLOWLOG", "GET", "10000"]).unwrap();
    let largest = calls
        .lines()
        .filter_map(|l| l.strip_prefix("... (")?.strip_suffix(" more arguments)"))
        .map(|n| n.parse::<usize>().unwrap() + 31)
        .max()
        .expect("the import's calls are logged");
    // A part: an id and a record per key, and the call's own few.
    assert!(largest > IMPORT_PART, "{largest}");
    assert!(largest <= 2 * IMPORT_PART + 32, "{largest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_log_or_an_emptied_redis_makes_a_reload() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let s = store(&server.url()).await;
    let seen = Seen::default();
    let on = seen.callback();
    s.registry_write(&Change::AddKey(key(&s, "k1", "v1")))
        .await
        .unwrap();
    let mut held = Held::at(1);
    let mut at = s
        .inner
        .registry_step(Position::Start(1), &mut held, &*on)
        .await;
    assert!(seen.take().is_empty());

    // Three changes, of which the log keeps only the last.
    for i in 2..5 {
        s.registry_write(&Change::AddKey(key(&s, &format!("k{i}"), &format!("v{i}"))))
            .await
            .unwrap();
    }
    command(
        server.addr(),
        &["XTRIM", "{tollgate:registry}:log", "MAXLEN", "1"],
    )
    .unwrap();
    at = s.inner.registry_step(at, &mut held, &*on).await;
    match &seen.take()[..] {
        [RegistryUpdate::Reload { version: 4, all }] => assert_eq!(all.len(), 4),
        other => panic!("{other:?}"),
    }

    // Redis restarted empty, then written to again past where we were.
    command(server.addr(), &["FLUSHALL"]).unwrap();
    for i in 0..5 {
        s.registry_write(&Change::RemoveKey {
            id: format!("x{i}"),
        })
        .await
        .unwrap();
    }
    at = s.inner.registry_step(at, &mut held, &*on).await;
    match &seen.take()[..] {
        [RegistryUpdate::Reload { version: 5, all }] => assert_eq!(all.len(), 5),
        other => panic!("{other:?}"),
    }

    // A change too large to log is read from the records.
    let big: Vec<_> = (0..3000)
        .map(|i| {
            key(
                &s,
                &format!("bulk-{i:04}-{}", "x".repeat(64)),
                &format!("b{i}"),
            )
        })
        .collect();
    assert_eq!(s.registry_write(&Change::Import(big)).await.unwrap(), 6);
    at = s.inner.registry_step(at, &mut held, &*on).await;
    match &seen.take()[..] {
        [RegistryUpdate::Reload { version: 6, all }] => assert_eq!(all.len(), 3005),
        other => panic!("{other:?}"),
    }

    // Started at a version Redis no longer has.
    let _ = s
        .inner
        .registry_step(Position::Start(99), &mut held, &*on)
        .await;
    assert!(matches!(
        &seen.take()[..],
        [RegistryUpdate::Reload { version: 6, .. }]
    ));
    drop(at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_delivered_twice_are_applied_once() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let s = store(&server.url()).await;
    let seen = Seen::default();
    let on = seen.callback();
    let mut held = Held::at(0);
    let at = s
        .inner
        .registry_step(Position::Start(0), &mut held, &*on)
        .await;
    let (k1, k2) = (key(&s, "k1", "v1"), key(&s, "k2", "v2"));
    s.registry_write(&Change::AddKey(k1.clone())).await.unwrap();
    // The same entry again (a client that retried, a replayed log), and an
    // older one.
    let log = "{tollgate:registry}:log";
    let text = {
        let mut t = "A".to_owned();
        codec::field(&mut t, "k1");
        codec::field(&mut t, &codec::record(&k1));
        t
    };
    command(server.addr(), &["XADD", log, "*", "v", "1", "c", &text]).unwrap();
    command(server.addr(), &["XADD", log, "*", "v", "0", "c", "D1:z"]).unwrap();
    let at = s.inner.registry_step(at, &mut held, &*on).await;
    assert_eq!(seen.take(), vec![change(1, Change::AddKey(k1))]);
    s.registry_write(&Change::AddKey(k2.clone())).await.unwrap();
    command(server.addr(), &["XADD", log, "*", "v", "2", "c", "D1:z"]).unwrap();
    let at = s.inner.registry_step(at, &mut held, &*on).await;
    let at = s.inner.registry_step(at, &mut held, &*on).await;
    assert_eq!(seen.take(), vec![change(2, Change::AddKey(k2))]);
    assert!(matches!(at, Position::At(Cursor { version: 2, .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_a_write_fails_it_and_writes_nothing() {
    if !require_redis() {
        return;
    }
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let s = store(&server.url()).await;
    let seen = Seen::default();
    s.registry_watch(seen.callback(), 0, &[]);
    s.registry_write(&Change::AddKey(key(&s, "k1", "v1")))
        .await
        .unwrap();
    assert_eq!(seen.wait(1, Duration::from_secs(1)).await.len(), 1);

    server.kill();
    let started = Instant::now();
    let err = s
        .registry_write(&Change::Import(vec![
            key(&s, "k2", "v2"),
            key(&s, "k3", "v3"),
        ]))
        .await
        .unwrap_err();
    assert!(started.elapsed() <= s.timeout() + Duration::from_millis(200));
    assert!(matches!(err, RegistryError::Store(_)), "{err}");

    // Down long enough for the watcher to find it down.
    tokio::time::sleep(super::watch::POLL * 3).await;
    server.restart();
    let (version, all) = s.registry_load().await.unwrap();
    assert_eq!(
        (version, all),
        (1, vec![Change::AddKey(key(&s, "k1", "v1"))])
    );
    // The watcher's reads failed for a while: once Redis is back it goes on
    // from where it was (the log, kept on disk, still holds the entry it
    // read last), with nothing to deliver, and delivers the next change.
    assert_eq!(seen.wait(1, Duration::from_millis(1500)).await, vec![]);
    let k4 = key(&s, "k4", "v4");
    s.registry_write(&Change::AddKey(k4.clone())).await.unwrap();
    assert_eq!(
        seen.wait(1, Duration::from_secs(1)).await,
        vec![change(2, Change::AddKey(k4))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_masters_keeps_one_registry() {
    if !require_redis() {
        return;
    }
    let cluster = RedisCluster::start();
    let build = || async {
        RedisStore::cluster_builder(cluster.urls())
            .key_secret("registry tests")
            .timeout(Duration::from_millis(500))
            .build()
            .await
            .expect("a cluster store")
    };
    let (a, b) = (build().await, build().await);
    let seen = Seen::default();
    let (version, _) = b.registry_load().await.unwrap();
    b.registry_watch(seen.callback(), version, &[]);
    let keys: Vec<_> = (0..20)
        .map(|i| key(&a, &format!("k{i}"), &format!("v{i}")))
        .collect();
    a.registry_write(&Change::Import(keys.clone()))
        .await
        .unwrap();
    a.registry_write(&Change::RemoveKey { id: "k3".into() })
        .await
        .unwrap();
    let got = seen.wait(2, Duration::from_secs(1)).await;
    assert_eq!(
        got,
        vec![
            change(1, Change::Import(keys)),
            change(2, Change::RemoveKey { id: "k3".into() })
        ]
    );
    let (version, all) = build().await.registry_load().await.unwrap();
    assert_eq!((version, all.len()), (2, 20));
}

/// An add or an import sent again after its connection was lost ('W'):
/// when Redis holds every entry exactly as sent, its first run made it, and
/// it answers the version as it is, writing nothing; anything else is
/// checked as a first run is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_sent_again_after_its_first_run_is_not_a_clash() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let s = store(&server.url()).await;
    let again = |op: &str, keys: &[KeyRecord]| {
        let mut args = ["W", "256", "262144", op].map(str::to_owned).to_vec();
        for k in keys {
            args.push(k.id.clone());
            args.push(codec::record(k));
        }
        args
    };
    let send = |args: Vec<String>| {
        let s = s.clone();
        async move {
            let reply: Vec<String> = s.inner.registry_eval(&args, None).await.unwrap();
            written(reply)
        }
    };
    let (k1, k2) = (key(&s, "k1", "v1"), key(&s, "k2", "v2"));
    assert_eq!(
        s.registry_write(&Change::AddKey(k1.clone())).await.unwrap(),
        1
    );
    assert_eq!(
        send(again("A", std::slice::from_ref(&k1))).await.unwrap(),
        1
    );
    // Not every entry held: the one held is a clash, as on a first run.
    assert!(matches!(
        send(again("I", &[k1.clone(), k2.clone()])).await,
        Err(RegistryError::Duplicate { id }) if id == "k1"
    ));
    let mut moved = k1.clone();
    moved.plan = "pro".to_owned();
    assert!(matches!(
        send(again("A", &[moved])).await,
        Err(RegistryError::Duplicate { id }) if id == "k1"
    ));
    let mut same_value = key(&s, "k3", "v1");
    same_value.enabled = false;
    assert!(matches!(
        send(again("A", &[same_value])).await,
        Err(RegistryError::DuplicateValue { id }) if id == "k3"
    ));
    // Its first run not made: made now.
    assert_eq!(
        send(again("I", std::slice::from_ref(&k2))).await.unwrap(),
        2
    );
    assert_eq!(
        send(again("I", std::slice::from_ref(&k2))).await.unwrap(),
        2
    );
    let (version, all) = s.registry_load().await.unwrap();
    assert_eq!(
        (version, all),
        (2, vec![Change::AddKey(k1), Change::AddKey(k2)])
    );
}

/// The watcher's read of the log may be answered just before a change this
/// instance writes, and be applied after `Admin` applied that change at
/// once: the older changes it delivers then must not undo the later one of
/// the same plan or key (a plan back at its old numbers, a key back on the
/// plan it was moved from, until the next poll), nor may a reload read
/// before it.
#[test]
fn a_change_delivered_late_does_not_undo_a_later_one_applied_at_once() {
    use crate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};

    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(store(&server.url()));
    let plan = |burst| UsagePlan::new("p").throttle(Throttle::new(1.0, burst).unwrap());
    let policy = Policy::builder()
        .plan(plan(1))
        .plan(UsagePlan::new("q").throttle(Throttle::new(2.0, 1).unwrap()))
        .key(ApiKey::new("k0", "v0", "p"))
        .build()
        .unwrap();
    // Built outside the runtime: no watcher of its own, this test is it.
    let layer = RateLimitLayer::builder(policy.clone())
        .store(s.clone())
        .build();
    let admin = layer.admin();
    let plan_p = || policy.load().plan_named("p").unwrap().source.clone();
    let plan_of = |id| admin.key(id).unwrap().plan;
    let seen = Seen::default();
    let on = seen.callback();
    let follow = |updates: Vec<RegistryUpdate>| {
        for u in updates {
            policy.follow(u, &[], &s, None);
        }
    };

    let mut held = Held::at(0);
    let at = rt.block_on(async {
        let at = s
            .inner
            .registry_step(Position::Start(0), &mut held, &*on)
            .await;
        admin.put_plan(plan(2)).await.unwrap();
        admin.set_plan("k0", "q").await.unwrap();
        // The watcher reads versions 1 and 2 …
        s.inner.registry_step(at, &mut held, &*on).await
    });
    let late = seen.take();
    assert_eq!(late.len(), 2);
    // … and this instance changes the plan and the key again before they
    // are applied.
    rt.block_on(async {
        admin.put_plan(plan(3)).await.unwrap();
        admin.set_plan("k0", "p").await.unwrap();
    });
    assert_eq!((plan_p(), plan_of("k0")), (plan(3), "p".to_owned()));
    follow(late.clone());
    assert_eq!((plan_p(), plan_of("k0")), (plan(3), "p".to_owned()));

    // A reload read at version 2 leaves them too.
    let stale = late
        .iter()
        .filter_map(|u| match u {
            RegistryUpdate::Change { change, .. } => Some(change.clone()),
            RegistryUpdate::Reload { .. } => None,
        })
        .collect();
    follow(vec![RegistryUpdate::Reload {
        version: 2,
        all: stale,
    }]);
    assert_eq!((plan_p(), plan_of("k0")), (plan(3), "p".to_owned()));

    // The watcher reaches them (applied again, nothing changes); later
    // changes, this instance's or another's, are applied as they come.
    rt.block_on(s.inner.registry_step(at, &mut held, &*on));
    follow(seen.take());
    assert_eq!((plan_p(), plan_of("k0")), (plan(3), "p".to_owned()));
    let moved = Change::UpdateKey(KeyRecord {
        plan: "q".to_owned(),
        ..key(&s, "k0", "v0")
    });
    follow(vec![change(5, moved)]);
    assert_eq!(plan_of("k0"), "q");
}
