//! The wall clock, and whether to believe it.
//!
//! A gateway without a real-time clock boots at 1970, or at the time fake-hwclock last saved, and
//! its clock jumps when NTP arrives, minutes later on a cellular link. Records taken before that
//! carry a wrong `ts_ms`. So every record is stamped with the wall clock, and, while the wall
//! clock is not trusted, also with the monotonic clock of this boot ([`Monotonic`]: milliseconds
//! of `CLOCK_BOOTTIME`, which counts suspend and never jumps, and the kernel's boot id).
//!
//! **Trusted** means: the wall clock is not earlier than this binary's build, and (with
//! `clock.require_sync`, the default) the kernel says it is synchronised (`adjtimex`: not
//! `TIME_ERROR`, no `STA_UNSYNC`; NTP daemons, chrony and systemd-timesyncd all set it). The `clock`
//! thread checks once a second. Once trusted, the clock stays trusted for the life of the
//! process (a daemon that loses its server for a while lets the kernel report unsynchronised
//! again, while the clock runs on correct), unless it is set back before the build. Its offset
//! from the monotonic clock is then the boot's **anchor**, kept in the journal
//! ([`Journal::set_clock_anchor`]) so that it outlives the process.
//!
//! **What the uplink sends** ([`Clock::wire_time`]): a record stamped under an untrusted clock
//! gets `ts_ms` = its monotonic stamp + its boot's anchor, flagged `"clock": "corrected"` with the
//! original value in `ts_ms_original`. A record of this boot waits in the journal until the
//! clock is trusted, for at most `clock.hold` after start ([`Clock::holds`]); one whose boot
//! never got an anchor (rebooted before sync) is sent flagged `"unsynced"` with its original
//! `ts_ms`, as is one of this boot still untrusted after the hold.
//!
//! **Expiry.** With `journal.max_age`, the same thread replaces unsent records older than that by
//! `expired` gaps every [`EXPIRE_EVERY`] ([`Journal::expire`]), dating each record as
//! [`Clock::age_ms`] does: a record it cannot date (taken in a boot with no anchor, or while the
//! clock is not trusted now) does not expire.
//!
//! **Jumps.** The thread also watches the wall clock against the monotonic one: a step of more
//! than [`JUMP`] is logged (WARN) and counted (`/metrics`). A jump while untrusted is what NTP's
//! first sync looks like. A jump after the clock was trusted is not corrected for: the records
//! between the trust and the jump keep the wall clock they were stamped with.
//!
//! **Not covered.** With `require_sync = false`, a clock later than the build but wrong (a stale
//! fake-hwclock save) is trusted. A record whose boot anchor was evicted (after
//! [`crate::journal::MAX_ANCHORS`] boots) is sent `unsynced`. Timestamps are milliseconds; the
//! correction is as good as the offset read once a second (a few milliseconds of scheduling).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::config::ClockConfig;
use crate::journal::{self, Journal, Monotonic, Record};
use crate::protocol::ClockNote;
use crate::shutdown::Shutdown;

/// A step of the wall clock against the monotonic clock larger than this is a jump.
pub const JUMP: Duration = Duration::from_secs(1);
/// How often the `clock` thread checks the kernel's synchronisation and the offset.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often it looks for records older than `journal.max_age`: they expire within this (and a
/// sync) of their deadline.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(10);
/// Records looked at per expiry round, under the journal's lock.
const EXPIRE_ROUND: u64 = 20_000;

/// The time of a record as it goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireTime {
    pub ts_ms: u64,
    pub note: Option<ClockNote>,
    /// `ts_ms` as stamped, when `note` is set.
    pub original: Option<u64>,
}

impl WireTime {
    /// The time as stamped, without a note: for a record taken under a trusted clock.
    pub fn stamped(r: &Record) -> WireTime {
        WireTime {
            ts_ms: r.ts_ms,
            note: None,
            original: None,
        }
    }
}

/// What the `clock` thread found last, for `/status` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClockStatus {
    pub trusted: bool,
    /// The kernel's synchronisation status (`None`: `adjtimex` failed).
    pub kernel_synced: Option<bool>,
    /// Jumps of the wall clock against the monotonic clock since start.
    pub jumps: u64,
}

/// The clock's shared state: cheap to clone.
#[derive(Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

struct Inner {
    boot: [u8; 16],
    /// The build time of this binary, milliseconds since the epoch: an earlier wall clock is wrong.
    floor_ms: u64,
    cfg: ClockConfig,
    journal: Journal,
    started: Instant,
    trusted: AtomicBool,
    /// The anchor of this boot (wall ms - monotonic ms), valid once `trusted`.
    offset: AtomicI64,
    jumps: AtomicU64,
    kernel_synced: Mutex<Option<bool>>,
    /// Anchors of other boots read from the journal (`None`: it has none), a few at most.
    others: Mutex<Vec<([u8; 16], Option<i64>)>>,
}

impl Clock {
    /// The clock of this boot, trusted at once if it is. `boot` is the kernel's boot id.
    pub fn new(cfg: ClockConfig, journal: Journal) -> Clock {
        let clock = Clock {
            inner: Arc::new(Inner {
                boot: boot_id(),
                floor_ms: build_floor_ms(),
                cfg,
                journal,
                started: Instant::now(),
                trusted: AtomicBool::new(false),
                offset: AtomicI64::new(0),
                jumps: AtomicU64::new(0),
                kernel_synced: Mutex::new(None),
                others: Mutex::new(Vec::new()),
            }),
        };
        let (wall, mono) = now();
        clock.check(wall, mono, None);
        if !clock.is_trusted() {
            warn!(
                "wall clock not trusted yet ({}): records are stamped with the monotonic clock too \
                 and their time corrected once it is",
                clock.why_untrusted(wall)
            );
        }
        clock
    }

    /// Starts the `clock` thread: a check every second until shutdown, and with `max_age`
    /// (`journal.max_age`) the expiry of unsent records older than that every
    /// [`EXPIRE_EVERY`].
    pub fn spawn(
        &self,
        max_age: Option<Duration>,
        shutdown: Shutdown,
    ) -> std::io::Result<JoinHandle<()>> {
        let clock = self.clone();
        std::thread::Builder::new()
            .name("clock".into())
            .spawn(move || {
                let (wall, mono) = now();
                let mut last = wall as i64 - mono as i64;
                let mut expired_at = Instant::now();
                while shutdown.sleep(CHECK_EVERY) {
                    let (wall, mono) = now();
                    last = clock.check(wall, mono, Some(last));
                    if let Some(max_age) = max_age {
                        if expired_at.elapsed() >= EXPIRE_EVERY {
                            expired_at = Instant::now();
                            clock.expire(max_age, &shutdown);
                        }
                    }
                }
            })
    }

    /// Replaces the unsent records older than `max_age` by `expired` gaps (the journal says
    /// which at WARN). A record whose age is unknown is kept. Each round looks at no more than
    /// [`EXPIRE_ROUND`] records under the journal's lock; rounds follow each other while they
    /// find expired records up to their limit.
    fn expire(&self, max_age: Duration, shutdown: &Shutdown) {
        let max_ms = max_age.as_millis() as u64;
        loop {
            let mut looked = 0;
            let round = self.inner.journal.expire(|r| {
                looked += 1;
                if looked > EXPIRE_ROUND {
                    return Some(false);
                }
                self.age_ms(r).map(|age| age > max_ms)
            });
            match round {
                Ok(n) if n > 0 && looked > EXPIRE_ROUND && !shutdown.is_set() => continue,
                Ok(_) => return,
                Err(e) => {
                    // The writer reopens a failed journal; the next round tries again.
                    warn!("cannot expire old records: {}", crate::error_chain(&e));
                    return;
                }
            }
        }
    }

    /// How old `r` is, by the clock it can be dated with: the monotonic clock for a record of
    /// this boot, else the wall clock if it is trusted now (through the record's boot anchor
    /// if it was taken under an untrusted clock). `None` when it cannot be told.
    pub fn age_ms(&self, r: &Record) -> Option<u64> {
        let (wall, mono) = now();
        match r.mono {
            Some(m) if m.boot == self.inner.boot => Some(mono.saturating_sub(m.ms)),
            _ if !self.is_trusted() => None,
            None => Some(wall.saturating_sub(r.ts_ms)),
            Some(_) => match self.wire_time(r) {
                WireTime {
                    ts_ms,
                    note: Some(ClockNote::Corrected),
                    ..
                } => Some(wall.saturating_sub(ts_ms)),
                _ => None,
            },
        }
    }

    pub fn is_trusted(&self) -> bool {
        self.inner.trusted.load(Ordering::Acquire)
    }

    pub fn status(&self) -> ClockStatus {
        ClockStatus {
            trusted: self.is_trusted(),
            kernel_synced: *self
                .inner
                .kernel_synced
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            jumps: self.inner.jumps.load(Ordering::Relaxed),
        }
    }

    /// The stamp of a record taken now: the wall clock, and the monotonic clock while the wall
    /// clock is not trusted.
    pub fn stamp(&self) -> (u64, Option<Monotonic>) {
        let (wall, mono) = now();
        if self.is_trusted() {
            (wall, None)
        } else {
            (
                wall,
                Some(Monotonic {
                    boot: self.inner.boot,
                    ms: mono,
                }),
            )
        }
    }

    /// Whether `r` must wait before it is sent: stamped under an untrusted clock of this boot,
    /// still untrusted, within `clock.hold` of start.
    pub fn holds(&self, r: &Record) -> bool {
        match r.mono {
            Some(m) if m.boot == self.inner.boot => {
                !self.is_trusted() && self.inner.started.elapsed() < self.inner.cfg.hold
            }
            _ => false,
        }
    }

    /// The time `r` is sent with (see the module's header).
    pub fn wire_time(&self, r: &Record) -> WireTime {
        let Some(mono) = r.mono else {
            return WireTime::stamped(r);
        };
        let offset = if mono.boot == self.inner.boot {
            self.is_trusted()
                .then(|| self.inner.offset.load(Ordering::Acquire))
        } else {
            self.anchor_of(&mono.boot)
        };
        match offset.and_then(|o| u64::try_from(mono.ms as i64 + o).ok()) {
            Some(ts_ms) => WireTime {
                ts_ms,
                note: Some(ClockNote::Corrected),
                original: Some(r.ts_ms),
            },
            None => WireTime {
                ts_ms: r.ts_ms,
                note: Some(ClockNote::Unsynced),
                original: Some(r.ts_ms),
            },
        }
    }

    /// When `r` was taken, by the wall clock as it reads now (for ages: a record of this boot is
    /// dated by the monotonic clock, whether or not the wall clock is trusted yet).
    pub fn taken_at_ms(&self, r: &Record) -> u64 {
        match r.mono {
            Some(m) if m.boot == self.inner.boot => {
                let (wall, mono) = now();
                wall.saturating_sub(mono.saturating_sub(m.ms))
            }
            _ => self.wire_time(r).ts_ms,
        }
    }

    /// The anchor of another boot, read from the journal once.
    fn anchor_of(&self, boot: &[u8; 16]) -> Option<i64> {
        let mut others = self.inner.others.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, a)) = others.iter().find(|(b, _)| b == boot) {
            return *a;
        }
        let anchor = match self.inner.journal.clock_anchor(boot) {
            Ok(a) => a,
            // Not remembered as "none": the journal may be reopening.
            Err(e) => {
                warn!("cannot read a clock anchor: {}", crate::error_chain(&e));
                return None;
            }
        };
        if others.len() >= journal::MAX_ANCHORS {
            others.remove(0);
        }
        others.push((*boot, anchor));
        anchor
    }

    /// One check at `wall`/`mono` (ms): trust, anchor, jumps against the offset `last` seen a
    /// second ago. Returns the offset now.
    fn check(&self, wall: u64, mono: u64, last: Option<i64>) -> i64 {
        let offset = wall as i64 - mono as i64;
        let synced = kernel_synced();
        *self
            .inner
            .kernel_synced
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = synced;
        if let Some(last) = last {
            let step = offset - last;
            if step.unsigned_abs() > JUMP.as_millis() as u64 {
                self.inner.jumps.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "wall clock jumped by {:+.3} s against the monotonic clock",
                    step as f64 / 1000.0
                );
            }
        }
        let trusted = self.is_trusted();
        if trusted && wall < self.inner.floor_ms {
            warn!(
                "wall clock set back before this binary's build: no longer trusted, records are \
                 stamped with the monotonic clock again"
            );
            self.inner.trusted.store(false, Ordering::Release);
        } else if !trusted && self.why_untrusted_with(wall, synced).is_none() {
            self.inner.offset.store(offset, Ordering::Release);
            self.inner.trusted.store(true, Ordering::Release);
            info!(
                "wall clock trusted: anchored this boot's monotonic clock at {offset} ms{}",
                if synced == Some(true) {
                    " (the kernel says it is synchronised)"
                } else {
                    ""
                }
            );
            if let Err(e) = self
                .inner
                .journal
                .set_clock_anchor(&self.inner.boot, offset)
            {
                // Records of this boot are still corrected while this process runs.
                warn!(
                    "cannot keep this boot's clock anchor in the journal: {}",
                    crate::error_chain(&e)
                );
            }
        }
        offset
    }

    fn why_untrusted(&self, wall: u64) -> String {
        self.why_untrusted_with(wall, kernel_synced())
            .unwrap_or_else(|| "trusted".into())
    }

    /// Why the wall clock at `wall` is not to be trusted; `None` if it is.
    fn why_untrusted_with(&self, wall: u64, synced: Option<bool>) -> Option<String> {
        if wall < self.inner.floor_ms {
            return Some(format!(
                "it reads {} s since the epoch, before this binary was built",
                wall / 1000
            ));
        }
        if self.inner.cfg.require_sync && synced != Some(true) {
            return Some(match synced {
                Some(_) => "the kernel says it is not synchronised (clock.require_sync)".into(),
                None => "the kernel's synchronisation status is unreadable".into(),
            });
        }
        None
    }
}

/// The wall clock and the monotonic clock (`CLOCK_BOOTTIME`), in milliseconds.
fn now() -> (u64, u64) {
    let wall = journal::now_ms();
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let mono = (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000;
    (wall, mono)
}

/// Whether the kernel says the wall clock is synchronised; `None` if it cannot be read.
#[allow(unsafe_code)]
fn kernel_synced() -> Option<bool> {
    const TIME_ERROR: i32 = 5;
    const STA_UNSYNC: i32 = 0x0040;
    // SAFETY: `timex` is plain old data for which all-zeroes is valid; with `modes` 0, adjtimex
    // only reads the kernel's state into it (no privilege needed, nothing changed).
    let (state, status) = unsafe {
        let mut t: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut t);
        (state, t.status)
    };
    if state < 0 {
        return None;
    }
    Some(state != TIME_ERROR && status & STA_UNSYNC == 0)
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`); if unreadable, one made up for this
/// process (records of an earlier process are then corrected only through their own anchor).
fn boot_id() -> [u8; 16] {
    let read = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|text| parse_boot_id(&text));
    read.unwrap_or_else(|| {
        warn!("cannot read the kernel's boot id: using one of this process's own");
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&crate::rng::Rng::from_time().next_u64().to_be_bytes());
        id[8..].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
        id
    })
}

/// A boot id's 32 hex digits (dashes ignored).
fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

/// This binary's build time (`FERRY_BUILD_UNIX`, set by `build.rs` from `SOURCE_DATE_EPOCH` or
/// the time of the build), in milliseconds.
fn build_floor_ms() -> u64 {
    env!("FERRY_BUILD_UNIX").parse::<u64>().unwrap_or(0) * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_parse() {
        let id = parse_boot_id("0f3a5c1e-7d2b-4c9a-8e6f-112233445566\n").unwrap();
        assert_eq!(id[0], 0x0f);
        assert_eq!(id[15], 0x66);
        assert_eq!(parse_boot_id("0f3a"), None);
        assert_eq!(parse_boot_id("zz3a5c1e-7d2b-4c9a-8e6f-112233445566"), None);
    }

    #[test]
    fn the_build_floor_is_recent() {
        // Built after this code was written (2026-12).
        assert!(build_floor_ms() > 1_796_000_000_000, "{}", build_floor_ms());
    }
}
