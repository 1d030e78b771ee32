//! A real PostgreSQL database for the tests whose keys live in one: a table
//! of its own per test in the database `TOLLGATE_TEST_POSTGRES` names
//! (default `postgres://postgres@127.0.0.1:5432/test`), dropped when the
//! test ends.
//!
//! Unlike `redis-server`, which a test starts on its own, PostgreSQL is a
//! server a test finds running: without one at the default URL, a test that
//! needs it is skipped with a notice. With `TOLLGATE_TEST_POSTGRES` set, a
//! server is expected there, and a test that cannot connect fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The database the tests use.
pub fn url() -> String {
    std::env::var("TOLLGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A pool on the test database, or `None` (the test is skipped) when there
/// is none at the default URL.
pub async fn require_postgres() -> Option<PgPool> {
    let connected = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url())
        .await;
    match connected {
        Ok(pool) => Some(pool),
        Err(e) if std::env::var_os("TOLLGATE_TEST_POSTGRES").is_none() => {
            eprintln!(
                "notice: skipping a test that needs PostgreSQL: none at {} ({e}); \
                 set TOLLGATE_TEST_POSTGRES to a database URL to run it",
                url()
            );
            None
        }
        Err(e) => panic!("this test needs PostgreSQL at {} ({e})", url()),
    }
}

/// A table name no other test of this process, nor of another process,
/// uses at the same time.
pub fn table_name(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{what}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
