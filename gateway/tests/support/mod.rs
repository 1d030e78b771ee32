//! What the gateway's tests share: the gateway binary as a child process
//! ([`process`]), real `redis-server` processes ([`redis`], the root
//! crate's `tests/support/redis.rs`) and dates for a manual clock.

#![allow(dead_code, unreachable_pub)]

pub(crate) mod process;
#[path = "../../../tests/support/redis.rs"]
pub(crate) mod redis;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate::Date;

/// `secs` seconds into the UTC day `y`-`m`-`d`, for a manual clock's wall
/// time.
pub(crate) fn at(y: i32, m: u8, d: u8, secs: u64) -> SystemTime {
    let days = Date::new(y, m, d).unwrap().days();
    UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400 + secs)
}
