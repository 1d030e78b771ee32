//! Time: the only module that reads a clock.
//!
//! Throttles run on monotonic time ([quanta], nanoseconds since the clock was
//! made); calendar windows run on UTC wall time. [`Clock::system`] reads the
//! machine's clocks; [`ManualClock`] is moved by hand, so tests about time are
//! exact and fast. Clones of a clock share one time.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::gcra::Nanos;

/// A source of time for a store.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Clock, ManualClock};
///
/// let manual = ManualClock::new();
/// let clock = Clock::from(manual.clone());
/// let before = clock.now();
/// manual.advance(Duration::from_secs(2));
/// assert_eq!(clock.now() - before, Duration::from_secs(2));
/// ```
#[derive(Clone)]
pub struct Clock {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    System(Arc<SystemClock>),
    Coarse(Arc<CoarseClock>),
    Manual(ManualClock),
}

/// A clock read from the time a background thread stores every so often.
struct CoarseClock {
    ticker: &'static Ticker,
    start: u64,
    resolution: Duration,
    wall: WallSync,
}

/// How long the wall time is carried forward on the monotonic clock before
/// the system's is read again.
const WALL_RESYNC: Nanos = 100_000_000;

/// The wall time, read from the system at most every [`WALL_RESYNC`] and
/// carried forward on the monotonic clock in between. Reading the system
/// time costs 20 to 50 ns (in a virtual machine, 50 measured), as much as a
/// whole throttle decision, and a request with a calendar quota needs it.
/// In between, the wall time drifts from the system's only as much as the
/// two clocks' rates differ (parts per million), and a step of the system
/// clock (NTP, an operator) is seen within `WALL_RESYNC`.
struct WallSync {
    /// The wall time less the monotonic time, both read at the last read
    /// of the system's: the wall time at `mono` is `mono + offset`. One
    /// word, so that a reader never pairs one read's instant with another
    /// read's time; and a 64-bit load, where the two as one 128-bit word
    /// took an out-of-line 128-bit load on every quota decision.
    offset: AtomicI64,
    /// The monotonic time of that read, only to tell when to read again.
    /// Stored after `offset` (release) and loaded before it (acquire), so
    /// a reader that sees a read's `at` uses that read's offset or a later
    /// one: a step of the system clock is seen within one period.
    at: AtomicU64,
}

impl WallSync {
    fn new(mono: Nanos) -> Self {
        WallSync {
            offset: AtomicI64::new(offset(system_wall_nanos(), mono)),
            at: AtomicU64::new(mono),
        }
    }

    /// Wall nanoseconds at monotonic time `mono`; `exact` reads the
    /// monotonic time now, to pair with the system's when they are read
    /// again (`mono` may be a time read a tick ago).
    #[inline]
    fn wall_nanos(&self, mono: Nanos, exact: impl FnOnce() -> Nanos) -> i64 {
        let at = self.at.load(Ordering::Acquire);
        // Another thread may have read later than `mono` was: either way
        // the read is close enough to carry forward (or back).
        if mono.abs_diff(at) < WALL_RESYNC {
            return carried(mono, self.offset.load(Ordering::Relaxed));
        }
        self.resync(mono, exact())
    }

    /// Pairs the system's wall time with `now`, the monotonic time read
    /// with it, and gives the wall time at `mono`: paired with an older
    /// time, the system's would run ahead by as much until the next read.
    #[cold]
    fn resync(&self, mono: Nanos, now: Nanos) -> i64 {
        let wall = system_wall_nanos();
        let now = now.max(mono);
        let offset = offset(wall, now);
        self.offset.store(offset, Ordering::Relaxed);
        self.at.store(now, Ordering::Release);
        carried(mono, offset)
    }
}

/// The wall time less the monotonic time it was read with.
fn offset(wall: i64, mono: Nanos) -> i64 {
    wall.saturating_sub(i64::try_from(mono).unwrap_or(i64::MAX))
}

/// The wall time at `mono`, by an [`offset`].
#[inline]
fn carried(mono: Nanos, offset: i64) -> i64 {
    offset.saturating_add(i64::try_from(mono).unwrap_or(i64::MAX))
}

/// The system's wall time in nanoseconds since the epoch (negative before).
fn system_wall_nanos() -> i64 {
    nanos_since_epoch(SystemTime::now())
}

/// `t` in nanoseconds since the epoch (negative before it).
fn nanos_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// The process's one time-keeping thread for coarse clocks: it stores the
/// monotonic time (nanoseconds since it started) every `resolution`, for
/// as long as the process runs. It is tollgate's own, so that nothing else
/// in the process can stop it and freeze the time its stores decide by.
struct Ticker {
    now: AtomicU64,
    resolution: Duration,
}

static TICKER: OnceLock<Option<&'static Ticker>> = OnceLock::new();

/// The ticker, started on first use at `resolution`; `None` if its thread
/// cannot be spawned.
fn ticker(resolution: Duration) -> Option<&'static Ticker> {
    *TICKER.get_or_init(|| {
        let clock = quanta::Clock::new();
        let start = clock.raw();
        let ticker: &'static Ticker = Box::leak(Box::new(Ticker {
            now: AtomicU64::new(0),
            resolution,
        }));
        std::thread::Builder::new()
            .name("tollgate-clock".into())
            .spawn(move || {
                loop {
                    let now = clock.delta_as_nanos(start, clock.raw());
                    // Never backwards, whatever the counter does across cores.
                    ticker.now.fetch_max(now, Ordering::Release);
                    std::thread::sleep(ticker.resolution);
                }
            })
            .ok()
            .map(|_| ticker)
    })
}

struct SystemClock {
    clock: quanta::Clock,
    start: u64,
    /// `start` in nanoseconds since [`epoch`].
    since_epoch: Nanos,
    wall: WallSync,
    /// Whether decisions that admit read the counter as the process's
    /// ticker last read it ([`Clock::recent_nanos`]): not for
    /// [`Clock::precise`]. The ticker starts on the first such read, so a
    /// clock made only to read the wall time starts no thread.
    recent: bool,
}

/// How often the ticker reads the counter for [`Clock::system`]'s
/// admissions: how far behind the time they are decided on may be.
const RECENT_TICK: Duration = Duration::from_millis(1);

/// Ticks without a reader after which the ticker sleeps until one comes.
const RECENT_IDLE_TICKS: u32 = 1_000;

/// The counter as one process thread reads it every [`RECENT_TICK`]: what
/// a decision that admits reads instead of the counter itself (a load
/// where the counter costs 8 to 20 ns in the virtual machines measured,
/// as much as the rest of a throttle's decision). Every field is on one
/// cache line, which the thread writes once a tick.
///
/// The thread sleeps when nobody has read for [`RECENT_IDLE_TICKS`]
/// ticks (an idle process is not woken a thousand times a second), and
/// says so in `parked`: a reader that finds it asleep reads the counter
/// itself and wakes it.
#[repr(align(64))]
struct Recent {
    /// The counter's last reading, in nanoseconds since [`epoch`]: a
    /// clock's time is this less its own start's, one subtraction.
    now: AtomicU64,
    /// Set by a reader, cleared by the thread at each tick: whether the
    /// time was read since.
    read: AtomicBool,
    /// The thread is asleep: `now` may be old.
    parked: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl Recent {
    const fn new() -> Self {
        Recent {
            now: AtomicU64::new(0),
            read: AtomicBool::new(false),
            parked: AtomicBool::new(true),
            thread: OnceLock::new(),
        }
    }

    /// The counter's reading of at most a tick ago (plus the thread's
    /// scheduling delay), or `None` when the thread sleeps (and is woken).
    #[inline]
    fn now(&self) -> Option<Nanos> {
        if !self.read.load(Ordering::Relaxed) {
            self.mark_read();
        }
        if self.parked.load(Ordering::SeqCst) {
            self.wake();
            return None;
        }
        Some(self.now.load(Ordering::Acquire))
    }

    /// Tells the thread the time was read this tick: once per tick, so
    /// the line is written by readers that often at most.
    #[cold]
    fn mark_read(&self) {
        self.read.store(true, Ordering::SeqCst);
    }

    #[cold]
    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// The thread's loop: stores the counter every `tick`, sleeps after
    /// `idle` ticks without a reader until one wakes it.
    fn run(&self, clock: &quanta::Clock, tick: Duration, idle: u32) {
        let epoch = epoch(clock);
        let mut unread = 0;
        loop {
            let now = clock.delta_as_nanos(epoch, clock.raw());
            self.now.fetch_max(now, Ordering::Release);
            self.parked.store(false, Ordering::SeqCst);
            std::thread::sleep(tick);
            if self.read.swap(false, Ordering::SeqCst) {
                unread = 0;
                continue;
            }
            unread += 1;
            if unread < idle {
                continue;
            }
            self.parked.store(true, Ordering::SeqCst);
            // A reader that marked the time read before it could see
            // `parked` is seen here (both sides are `SeqCst`): then the
            // thread goes on ticking. One that marks it after sees
            // `parked`, reads the counter itself, and unparks the thread.
            while !self.read.swap(false, Ordering::SeqCst) {
                std::thread::park();
            }
            unread = 0;
        }
    }
}

/// The counter's reading the process's system clocks and ticker count
/// from (the first that any of them took): quanta's raw units are the same
/// for every `quanta::Clock` of the process.
fn epoch(clock: &quanta::Clock) -> u64 {
    static EPOCH: OnceLock<u64> = OnceLock::new();
    *EPOCH.get_or_init(|| clock.raw())
}

/// The process's ticker for [`Clock::system`], started on first use;
/// `None` if its thread cannot be spawned.
#[inline]
fn recent() -> Option<&'static Recent> {
    static RECENT: OnceLock<Option<&'static Recent>> = OnceLock::new();
    match RECENT.get() {
        Some(r) => *r,
        None => start_process_recent(&RECENT),
    }
}

/// [`recent`]'s first call: starts the process's ticker.
#[cold]
#[inline(never)]
fn start_process_recent(
    once: &'static OnceLock<Option<&'static Recent>>,
) -> Option<&'static Recent> {
    *once.get_or_init(|| start_recent(RECENT_TICK, RECENT_IDLE_TICKS))
}

/// A ticker of its own (the process's, or a test's).
fn start_recent(tick: Duration, idle: u32) -> Option<&'static Recent> {
    let recent: &'static Recent = Box::leak(Box::new(Recent::new()));
    let clock = quanta::Clock::new();
    let thread = std::thread::Builder::new()
        .name("tollgate-recent".into())
        .spawn(move || recent.run(&clock, tick, idle))
        .ok()?;
    let _ = recent.thread.set(thread.thread().clone());
    Some(recent)
}

impl Clock {
    /// The machine's clocks: quanta's calibrated monotonic counter for
    /// throttles, the system time for calendar windows. The system time is
    /// read at most every 100 ms and carried forward on the counter in
    /// between, so a step of the system clock is followed within 100 ms.
    ///
    /// A decision that admits may be made on the counter as one process
    /// thread read it a tick (one millisecond) ago, plus that thread's
    /// wake-up and scheduling delay, which saves it reading the counter
    /// itself (8 to 20 ns in the virtual machines measured, as much as the
    /// rest of a throttle's decision). A request that time would deny is
    /// decided again on the counter read then: every denial, and the
    /// `Retry-After` it gives, is exact, and a client that retries when
    /// told is never refused for the lag. Admissions on a time up to `L`
    /// old grant, over any span, at most `rate x L` requests more than the
    /// exact counter would (about one more at 1,000 requests a second),
    /// and the long-run rate is the same. The thread sleeps while nothing
    /// reads the time for a second; the first read after that reads the
    /// counter and wakes it. [`Clock::precise`] reads the counter for every
    /// decision and starts no thread.
    pub fn system() -> Self {
        Self::counter(true)
    }

    /// The machine's clocks, the counter read for every decision: what
    /// [`Clock::system`] is without its ticker (no thread is started;
    /// each decision pays for one counter read).
    ///
    /// ```
    /// use tollgate::{Clock, MemoryStore};
    ///
    /// let store = MemoryStore::builder().clock(Clock::precise()).build()?;
    /// # let _ = store;
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn precise() -> Self {
        Self::counter(false)
    }

    fn counter(recent: bool) -> Self {
        let clock = quanta::Clock::new();
        let epoch = epoch(&clock);
        let start = clock.raw();
        Clock {
            inner: Inner::System(Arc::new(SystemClock {
                since_epoch: clock.delta_as_nanos(epoch, start),
                clock,
                start,
                wall: WallSync::new(0),
                recent,
            })),
        }
    }

    /// A monotonic clock that reads, instead of the CPU's counter, the time a
    /// background thread stores every `resolution` (one thread for the
    /// process, started on first use; the resolution of the first call
    /// holds). A read is one load from memory, which saves a throttle
    /// decision the cost of a counter read.
    ///
    /// The time it gives is up to `resolution` (plus the thread's scheduling
    /// delay) behind, for admissions and denials alike: over any span a
    /// throttle then admits at most `rate x resolution` requests more than
    /// on the exact counter (at the same long-run rate), and `Retry-After`
    /// may be that much longer. [`Clock::system`] admits on such a time
    /// but decides its denials on the counter. Calendar quotas read the
    /// system's wall time as [`Clock::system`] does, carried forward on
    /// this clock.
    /// If the thread cannot be started, this is [`Clock::system`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::{Clock, MemoryStore};
    ///
    /// let store = MemoryStore::builder()
    ///     .clock(Clock::coarse(Duration::from_millis(1)))
    ///     .build()?;
    /// # let _ = store;
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn coarse(resolution: Duration) -> Self {
        let resolution = resolution.max(Duration::from_micros(10));
        match ticker(resolution) {
            Some(ticker) => Clock {
                inner: Inner::Coarse(Arc::new(CoarseClock {
                    ticker,
                    start: ticker.now.load(Ordering::Acquire),
                    resolution: ticker.resolution,
                    wall: WallSync::new(0),
                })),
            },
            None => Clock::system(),
        }
    }

    /// Whether this is a [`ManualClock`].
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_manual(&self) -> bool {
        matches!(self.inner, Inner::Manual(_))
    }

    /// Monotonic time since the clock was made.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos())
    }

    /// Monotonic nanoseconds since the clock was made.
    ///
    /// Counters from different cores can disagree by a little; the result is
    /// then simply a little earlier, which every user of it tolerates (an
    /// earlier `now` never grants capacity).
    #[inline]
    pub(crate) fn nanos(&self) -> Nanos {
        match &self.inner {
            Inner::System(s) => {
                let raw = s.clock.raw();
                // `delta_as_nanos` saturates at zero if the counter reads below the start.
                s.clock.delta_as_nanos(s.start, raw)
            }
            Inner::Coarse(c) => c.ticker.now.load(Ordering::Relaxed).saturating_sub(c.start),
            Inner::Manual(m) => m.shared.mono.load(Ordering::Acquire),
        }
    }

    /// Monotonic nanoseconds for a decision that admits: [`nanos`](Self::nanos),
    /// or, for [`Clock::system`], the counter as its ticker read it up to a
    /// tick ago. A request this time would deny is decided again on
    /// `nanos` when [`lags`](Self::lags).
    #[inline]
    pub(crate) fn recent_nanos(&self) -> Nanos {
        match &self.inner {
            Inner::System(s) => {
                match s.recent.then(recent).flatten().and_then(Recent::now) {
                    // A difference of two scaled readings (quanta scales
                    // by a multiply and a shift) is within 1 ns of the
                    // scaled difference: nothing to a time a tick old.
                    Some(now) => now.saturating_sub(s.since_epoch),
                    None => s.clock.delta_as_nanos(s.start, s.clock.raw()),
                }
            }
            #[cfg(test)]
            Inner::Manual(m) => m
                .shared
                .mono
                .load(Ordering::Acquire)
                .saturating_sub(m.shared.lag.load(Ordering::Acquire)),
            _ => self.nanos(),
        }
    }

    /// Whether [`recent_nanos`](Self::recent_nanos) may be behind
    /// [`nanos`](Self::nanos), so that a denial on it is to be decided again.
    #[inline]
    pub(crate) fn lags(&self) -> bool {
        match &self.inner {
            Inner::System(s) => s.recent,
            #[cfg(test)]
            Inner::Manual(m) => m.shared.lag.load(Ordering::Acquire) > 0,
            _ => false,
        }
    }

    /// UTC wall time.
    pub fn wall(&self) -> SystemTime {
        let n = self.wall_nanos();
        if n >= 0 {
            UNIX_EPOCH + Duration::from_nanos(n as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(n.unsigned_abs())
        }
    }

    /// UTC wall time in nanoseconds since the epoch (negative before it).
    #[inline]
    pub(crate) fn wall_nanos(&self) -> i64 {
        self.wall_nanos_at(self.nanos())
    }

    /// UTC wall time at `mono`, a time this clock's [`nanos`](Self::nanos)
    /// just gave: a decision that read the monotonic time for its throttles
    /// dates its quotas without reading the counter again (a read costs as
    /// much as a quota's whole decision).
    #[inline]
    pub(crate) fn wall_nanos_at(&self, mono: Nanos) -> i64 {
        match &self.inner {
            Inner::System(s) => s
                .wall
                .wall_nanos(mono, || s.clock.delta_as_nanos(s.start, s.clock.raw())),
            Inner::Coarse(c) => c.wall.wall_nanos(mono, || mono),
            Inner::Manual(m) => m.shared.wall.load(Ordering::Acquire),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::System(s) if s.recent => f.write_str("Clock::System"),
            Inner::System(_) => f.write_str("Clock::Precise"),
            Inner::Coarse(c) => f
                .debug_struct("Clock::Coarse")
                .field("resolution", &c.resolution)
                .finish(),
            Inner::Manual(m) => f.debug_tuple("Clock::Manual").field(m).finish(),
        }
    }
}

impl From<ManualClock> for Clock {
    fn from(manual: ManualClock) -> Self {
        Clock {
            inner: Inner::Manual(manual),
        }
    }
}

/// A clock moved by hand, for tests. Clones share one time.
///
/// Monotonic time starts at one hour (so that "an hour ago" exists); wall time
/// starts at 2024-01-01T00:00:00Z unless set. [`advance`](Self::advance) moves
/// both; [`rewind`](Self::rewind) moves both back, to test clocks that step
/// backwards.
#[derive(Clone)]
pub struct ManualClock {
    shared: Arc<Shared>,
}

struct Shared {
    mono: AtomicU64,
    /// Wall time as nanoseconds since the Unix epoch (may be negative).
    wall: AtomicI64,
    /// How far [`Clock::recent_nanos`] lags `mono`, to test decisions made
    /// on a ticker's time.
    #[cfg(test)]
    lag: AtomicU64,
}

/// 2024-01-01T00:00:00Z in seconds since the Unix epoch.
const DEFAULT_WALL_SECS: i64 = 1_704_067_200;

impl ManualClock {
    /// A new manual clock.
    pub fn new() -> Self {
        ManualClock {
            shared: Arc::new(Shared {
                mono: AtomicU64::new(3_600 * crate::gcra::NANOS_PER_SEC),
                wall: AtomicI64::new(DEFAULT_WALL_SECS * 1_000_000_000),
                #[cfg(test)]
                lag: AtomicU64::new(0),
            }),
        }
    }

    /// Moves monotonic and wall time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let n = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.shared.mono.fetch_add(n, Ordering::AcqRel);
        self.shared
            .wall
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }

    /// Moves monotonic and wall time back by `by` (monotonic time stops at zero).
    pub fn rewind(&self, by: Duration) {
        let n = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .shared
            .mono
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                Some(m.saturating_sub(n))
            });
        self.shared
            .wall
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }

    /// Sets the wall time (monotonic time is left alone).
    pub fn set_wall(&self, at: SystemTime) {
        let nanos = match at.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        };
        self.shared.wall.store(nanos, Ordering::Release);
    }

    /// Makes the time decisions that admit read lag `by` behind the
    /// clock's, as [`Clock::system`]'s ticker may.
    #[cfg(test)]
    pub(crate) fn lag_recent(&self, by: Duration) {
        let n = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.shared.lag.store(n, Ordering::Release);
    }

    /// The current wall time.
    pub fn wall(&self) -> SystemTime {
        let n = self.shared.wall.load(Ordering::Acquire);
        if n >= 0 {
            UNIX_EPOCH + Duration::from_nanos(n as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(n.unsigned_abs())
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("mono_nanos", &self.shared.mono.load(Ordering::Relaxed))
            .field("wall", &self.wall())
            .finish()
    }
}

/// This machine's wall time in microseconds since the Unix epoch, read
/// now (not through a [`Clock`]): for measuring how another machine's clock
/// (Redis `TIME`) stands to this one's.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn system_wall_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_is_carried_forward_then_read_again() {
        let sync = WallSync::new(1_000);
        let base = sync.offset.load(Ordering::Relaxed) + 1_000;
        let exact = || panic!("read only to pair with the system's time");
        // Within the resync period: the read carried forward, exactly.
        assert_eq!(
            sync.wall_nanos(1_000 + 40_000_000, exact),
            base + 40_000_000
        );
        // And back, for a reader whose instant precedes the last read.
        assert_eq!(sync.wall_nanos(500, exact), base - 500);
        // Past it: the system's time again, and the read moves on.
        let later = 1_000 + WALL_RESYNC + 1;
        let before = system_wall_nanos();
        let read = sync.wall_nanos(later, || later);
        assert!(read >= before && read <= system_wall_nanos());
        assert_eq!(sync.at.load(Ordering::Relaxed), later);
        assert_eq!(sync.wall_nanos(later + 5, exact), read + 5);
        // A time read a tick ago (3 ms) is paired with the system's time
        // through the time read now: the wall time it gives is 3 ms
        // earlier than the system's, and later reads are not shifted.
        let now = later + 2 * WALL_RESYNC;
        let lagging = now - 3_000_000;
        let before = system_wall_nanos();
        let read = sync.wall_nanos(lagging, || now);
        let after = system_wall_nanos();
        assert!(read >= before - 3_000_000 && read <= after - 3_000_000);
        assert_eq!(sync.at.load(Ordering::Relaxed), now);
        assert_eq!(sync.wall_nanos(now, exact), read + 3_000_000);
    }

    #[test]
    fn system_and_coarse_wall_time_follow_the_system() {
        for clock in [Clock::system(), Clock::coarse(Duration::from_millis(1))] {
            for _ in 0..3 {
                // Carried forward on the monotonic clock: off by the two
                // clocks' drift, and a coarse clock's lag (generous bounds).
                // Never ahead of the system's; behind by more only while
                // this thread, or the coarse clock's ticker, was not run
                // (a loaded machine): then it must follow within a few
                // tries, each a fresh reading.
                let mut tries = 0;
                loop {
                    let before = system_wall_nanos();
                    let wall = clock.wall_nanos();
                    let again = nanos_since_epoch(clock.wall());
                    let after = system_wall_nanos();
                    assert!(wall < after + 50_000_000 && again < after + 50_000_000);
                    let close = wall > before - 50_000_000 && (again - wall).abs() < 50_000_000;
                    tries += 1;
                    if close {
                        break;
                    }
                    assert!(
                        tries < 20,
                        "{tries} readings lagged the system's by 50 ms or more"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::thread::sleep(Duration::from_millis(60));
            }
        }
    }

    #[test]
    fn clones_share_one_time() {
        let a = ManualClock::new();
        let b = a.clone();
        let clock = Clock::from(a.clone());
        let t0 = clock.nanos();
        b.advance(Duration::from_millis(1500));
        assert_eq!(clock.nanos() - t0, 1_500_000_000);
        assert_eq!(
            a.wall().duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_secs(DEFAULT_WALL_SECS as u64) + Duration::from_millis(1500)
        );
    }

    #[test]
    fn rewind_saturates_and_never_panics() {
        let m = ManualClock::new();
        let clock = Clock::from(m.clone());
        m.rewind(Duration::from_secs(10));
        assert_eq!(clock.nanos(), 3_590 * 1_000_000_000);
        m.rewind(Duration::MAX);
        assert_eq!(clock.nanos(), 0);
        m.set_wall(UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(m.wall(), UNIX_EPOCH - Duration::from_secs(5));
    }

    #[test]
    fn a_coarse_clock_moves_forward_and_lags_by_its_resolution_at_most() {
        let coarse = Clock::coarse(Duration::from_millis(1));
        let system = Clock::system();
        let (c0, s0) = (coarse.nanos(), system.nanos());
        std::thread::sleep(Duration::from_millis(50));
        let (c1, s1) = (coarse.nanos(), system.nanos());
        assert!(c1 >= c0, "never backwards: {c0} -> {c1}");
        // It moved, by no more than the time that passed; behind by about
        // its resolution (generously bounded: the machine may be busy).
        assert!(c1 - c0 >= 10_000_000, "{c0} -> {c1}");
        assert!(
            c1 - c0 <= s1 - s0 + 20_000_000,
            "{} vs {}",
            c1 - c0,
            s1 - s0
        );
        assert!(format!("{coarse:?}").contains("Coarse"));
    }

    #[test]
    fn the_system_clock_admits_on_a_time_a_little_behind_the_counter() {
        let c = Clock::system();
        assert!(c.lags());
        // The process's ticker runs: once awake, a read gets its time.
        let ticker = recent().expect("the ticker's thread starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while ticker.now().is_none() {
            assert!(std::time::Instant::now() < deadline, "the ticker wakes");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(format!("{c:?}"), "Clock::System");
        let mut last = 0;
        for _ in 0..200 {
            let before = c.nanos();
            let recent = c.recent_nanos();
            let after = c.nanos();
            // Never ahead of the counter, never backwards; behind by about a
            // tick (generously bounded: the machine may be busy).
            assert!(recent <= after, "{recent} > {after}");
            assert!(recent >= last, "{last} -> {recent}");
            assert!(
                recent + 50_000_000 >= before,
                "{recent} lags {before} by more than 50 ms"
            );
            last = recent;
            std::thread::sleep(Duration::from_micros(250));
        }
        // It moves with the counter.
        let first = c.recent_nanos();
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.recent_nanos() >= first + 10_000_000);
    }

    #[test]
    fn a_precise_clock_reads_the_counter_for_every_decision() {
        let c = Clock::precise();
        assert!(!c.lags());
        assert_eq!(format!("{c:?}"), "Clock::Precise");
        let a = c.recent_nanos();
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.recent_nanos() >= a + 2_000_000);
    }

    #[test]
    fn a_ticker_sleeps_when_unread_and_the_next_read_wakes_it() {
        // 200 ticks unread before it sleeps: a test thread descheduled for
        // a while on a busy machine does not see it fall asleep early.
        let ticker = start_recent(Duration::from_millis(1), 200).unwrap();
        let within = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !done() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // Started, it reads the counter, and sleeps once 200 ticks pass unread.
        within("ticks", &|| ticker.now.load(Ordering::SeqCst) > 0);
        within("sleeps", &|| ticker.parked.load(Ordering::SeqCst));
        let asleep = ticker.now.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ticker.now.load(Ordering::SeqCst), asleep, "it sleeps");
        // A read while it sleeps gives no time (the reader reads the
        // counter) and wakes it: it reads the counter again.
        assert_eq!(ticker.now(), None);
        within("wakes", &|| ticker.now.load(Ordering::SeqCst) > asleep);
        // Read every tick or so, it stays awake and its time moves.
        within("awake", &|| ticker.now().is_some());
        let mut seen = Vec::new();
        for _ in 0..40 {
            seen.extend(ticker.now());
            std::thread::sleep(Duration::from_micros(500));
        }
        assert!(seen.len() >= 20, "{} reads of 40 had a time", seen.len());
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert!(seen.last() > seen.first());
    }

    #[test]
    fn system_clock_moves_forward() {
        let c = Clock::system();
        let a = c.nanos();
        std::thread::sleep(Duration::from_millis(5));
        let b = c.nanos();
        assert!(b >= a + 4_000_000, "{a} -> {b}");
    }
}
