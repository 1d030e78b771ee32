//! Where a behaviour's state lives: the memory store, or a real
//! `redis-server` (or Redis Cluster) of the test alone, so that one test
//! body runs against every store on a manual clock.
//!
//! The servers come from the sibling module [`super::redis`].
//!
//! [`on_each_backend!`] turns generic test bodies into a `memory` and a
//! `redis` test each.

#![allow(async_fn_in_trait)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tollgate::store::Store;
use tollgate::{ManualClock, MemoryStore, RedisStore};

use super::redis::{RedisCluster, RedisServer};

/// Where a behaviour's state lives.
pub trait Backend {
    type S: Store;
    /// A new store, empty, on `clock`.
    async fn store(&self, clock: &ManualClock) -> Self::S;
    /// Waits until `store` has sent everything it sends in the background
    /// (a Redis store's borrowed shares given back first).
    #[allow(dead_code)]
    async fn drain(&self, store: &Self::S) {
        let _ = store;
    }
}

pub struct Memory;

impl Backend for Memory {
    type S = MemoryStore;
    async fn store(&self, clock: &ManualClock) -> MemoryStore {
        MemoryStore::builder().clock(clock.clone()).build().unwrap()
    }
}

/// A Redis server (or cluster) of this test alone; each store gets its own
/// key prefix (`prefix` and a number), so stores count apart as separate
/// memory stores do. The stores decide on the manual clock, not Redis `TIME`.
pub struct Redis {
    prefix: &'static str,
    urls: Vec<String>,
    cluster: bool,
    stores: AtomicUsize,
    /// Whether stores share the key registry in Redis (the default).
    shared_registry: bool,
    _server: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
}

impl Redis {
    pub fn single(prefix: &'static str) -> Self {
        let server = RedisServer::start();
        Redis {
            prefix,
            urls: vec![server.url()],
            cluster: false,
            stores: AtomicUsize::new(0),
            shared_registry: true,
            _server: Some(server),
            _cluster: None,
        }
    }

    pub fn cluster(prefix: &'static str) -> Self {
        let cluster = RedisCluster::start();
        Redis {
            prefix,
            urls: cluster.urls(),
            cluster: true,
            stores: AtomicUsize::new(0),
            shared_registry: true,
            _server: None,
            _cluster: Some(cluster),
        }
    }

    /// Stores that keep keys per process: only decisions reach Redis, for a
    /// test that counts the commands they send.
    #[allow(dead_code)]
    pub fn without_shared_registry(mut self) -> Self {
        self.shared_registry = false;
        self
    }

    /// The server of [`Redis::single`]; panics on a cluster.
    pub fn server(&self) -> &RedisServer {
        self._server.as_ref().expect("a single redis-server")
    }
}

impl Backend for Redis {
    type S = RedisStore;
    async fn store(&self, clock: &ManualClock) -> RedisStore {
        let n = self.stores.fetch_add(1, Ordering::Relaxed);
        let builder = if self.cluster {
            RedisStore::cluster_builder(self.urls.clone())
        } else {
            RedisStore::builder(self.urls[0].clone())
        };
        builder
            .prefix(format!("{}{n}", self.prefix))
            .timeout(Duration::from_secs(2))
            .clock(clock.clone())
            .shared_registry(self.shared_registry)
            .build()
            .await
            .unwrap()
    }

    async fn drain(&self, store: &RedisStore) {
        store.drained().await;
    }
}

/// `on_each_backend!("prefix": name, ...)`: for each `async fn name<B:
/// Backend>(b: &B)` of the calling module, a test `memory::name` on
/// [`Memory`] and a test `redis::name` on its own [`Redis::single`] (which
/// fails without redis-server, unless `TOLLGATE_SKIP_REDIS=1`). The caller
/// imports `Memory`, `Redis` and `require_redis`.
// Unused by the test crates that run no body on each backend.
#[allow(unused_macros)]
macro_rules! on_each_backend {
    ($prefix:literal: $($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::Memory).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    if !super::require_redis() {
                        return;
                    }
                    let redis = super::Redis::single($prefix);
                    super::$name(&redis).await;
                }
            )*
        }
    };
}

#[allow(unused_imports)]
pub(crate) use on_each_backend;
