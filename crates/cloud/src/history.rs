//! What changes over time, for the console's charts. Pure: the stores and the HTTP layer keep and
//! read the figures, this module says what they are.
//!
//! - **A device's account per minute** ([`Point`]): the records stored in that minute, the most
//!   seqs waiting on the gateway after any of its batches or reports (a backlog that came and
//!   drained within the minute shows), and its ledger (delivered, gaps, waiting, missing) and
//!   reported backlog bytes as that minute's last batch or report left them. A minute with neither has no point (nothing stored, the account
//!   unchanged). PostgreSQL keeps [`KEPT_MINUTES`] (a day) per device in `ferry_history`, written
//!   in the batch's own transaction, so a point never counts a batch that was not committed. The
//!   files store keeps the last [`FILES_KEPT_MINUTES`] per device in memory, from after the
//!   batch's sync; a restart forgets them.
//! - **The fleet's records per second** ([`RateHistory`]): records accepted per [`RATE_SLOT_MS`]
//!   over the last ten minutes. Each process counts what it accepted; on PostgreSQL each replica
//!   publishes its counts to `ferry_rates` every [`PUBLISH_EVERY`] (thread `cloud-rates`), and
//!   the overview adds every other replica's published counts to its own, so the chart shows the
//!   fleet whichever replica answers. Another replica's figures are at most [`PUBLISH_EVERY`]
//!   (plus its database's delay) late; a replica that died keeps the counts it published.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Value, json};

use crate::ledger::Ledger;

/// Length of one point of a device's history.
pub const MINUTE_MS: u64 = 60_000;
/// Minutes of history PostgreSQL keeps per device: a day.
pub const KEPT_MINUTES: u64 = 24 * 60;
/// Minutes of history the files store keeps per device, in memory: an hour.
pub const FILES_KEPT_MINUTES: usize = 60;

/// A device's account at the end of one minute, and what it stored in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    /// Records stored in this minute (resends not counted).
    pub accepted: u64,
    pub delivered: u64,
    pub gaps: u64,
    pub waiting: u64,
    /// The most seqs waiting after any batch or report of the minute.
    pub waiting_max: u64,
    pub missing: u64,
    /// As the gateway last reported it (newer agents).
    pub backlog_bytes: Option<u64>,
}

impl Point {
    /// The point of a batch or report at `now_ms` that stored `accepted` records and left the
    /// device's account at `ledger`.
    pub fn of(now_ms: u64, accepted: u64, ledger: &Ledger) -> Point {
        Point {
            minute: now_ms / MINUTE_MS,
            accepted,
            delivered: ledger.delivered,
            gaps: ledger.gap_total(),
            waiting: ledger.waiting,
            waiting_max: ledger.waiting,
            missing: ledger.missing,
            backlog_bytes: ledger.backlog_bytes,
        }
    }

    /// `later`, a point of the same minute taken after this one, folded in: the records of both,
    /// the most waiting of both, the account as `later` left it.
    fn absorb(&mut self, later: Point) {
        *self = Point {
            accepted: self.accepted + later.accepted,
            waiting_max: self.waiting_max.max(later.waiting_max),
            ..later
        };
    }
}

/// The last [`FILES_KEPT_MINUTES`] points of one device (the files store), oldest first.
#[derive(Debug, Default, Clone)]
pub struct Recent(VecDeque<Point>);

impl Recent {
    pub fn note(&mut self, point: Point) {
        match self.0.back_mut() {
            // A clock stepped back counts into the newest minute: points stay in order.
            Some(last) if last.minute >= point.minute => last.absorb(Point {
                minute: last.minute,
                ..point
            }),
            _ => self.0.push_back(point),
        }
        let oldest = point.minute.saturating_sub(FILES_KEPT_MINUTES as u64 - 1);
        while self.0.len() > FILES_KEPT_MINUTES || self.0.front().is_some_and(|p| p.minute < oldest)
        {
            self.0.pop_front();
        }
    }

    pub fn points(&self) -> Vec<Point> {
        self.0.iter().copied().collect()
    }
}

/// `GET /v1/devices/<id>/history`: the points, oldest first, with the minute's start as `t_ms`.
pub fn device_json(points: &[Point], kept_minutes: u64) -> Value {
    let points: Vec<Value> = points
        .iter()
        .map(|p| {
            json!({
                "t_ms": p.minute * MINUTE_MS,
                "accepted": p.accepted,
                "delivered": p.delivered,
                "gaps": p.gaps,
                "waiting": p.waiting,
                "waiting_max": p.waiting_max,
                "missing": p.missing,
                "backlog_bytes": p.backlog_bytes,
            })
        })
        .collect();
    json!({
        "slot_s": MINUTE_MS / 1000,
        "kept_s": kept_minutes * MINUTE_MS / 1000,
        "points": points,
    })
}

/// Length of one slot of [`RateHistory`].
pub const RATE_SLOT_MS: u64 = 10_000;
/// Slots kept: ten minutes.
pub const RATE_SLOTS: u64 = 60;
/// How often a replica on PostgreSQL publishes its counts (see the module header).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// Records accepted by this process, per [`RATE_SLOT_MS`] slot, over the last [`RATE_SLOTS`]
/// slots.
#[derive(Debug, Default)]
pub struct RateHistory {
    /// `(slot number, records)`, oldest first, only slots that accepted something.
    slots: VecDeque<(u64, u64)>,
}

impl RateHistory {
    pub fn add(&mut self, now_ms: u64, records: u64) {
        let slot = now_ms / RATE_SLOT_MS;
        match self.slots.back_mut() {
            // A clock that stepped back counts into the newest slot: slots stay in order.
            Some((s, n)) if *s >= slot => *n += records,
            _ => self.slots.push_back((slot, records)),
        }
        while self
            .slots
            .front()
            .is_some_and(|(s, _)| *s + RATE_SLOTS <= slot)
        {
            self.slots.pop_front();
        }
    }

    /// The counts of the slots from `first` on, oldest first (what a replica publishes).
    pub fn since(&self, first: u64) -> Vec<(u64, u64)> {
        self.slots
            .iter()
            .copied()
            .filter(|(s, _)| *s >= first)
            .collect()
    }

    /// The first of the last [`RATE_SLOTS`] slots at `now_ms` (the one [`RateHistory::per_second`]
    /// starts with).
    pub fn first_slot(now_ms: u64) -> u64 {
        (now_ms / RATE_SLOT_MS + 1).saturating_sub(RATE_SLOTS)
    }

    /// Records per second in each of the last [`RATE_SLOTS`] slots, oldest first, the current
    /// (partial) one last and counted over the part gone by; `others` (`(slot, records)`, other
    /// replicas' published counts) added to this process's own.
    pub fn per_second(&self, now_ms: u64, others: &[(u64, u64)]) -> Vec<f64> {
        let current = now_ms / RATE_SLOT_MS;
        let first = Self::first_slot(now_ms);
        let in_slot = |list: &mut dyn Iterator<Item = (u64, u64)>, slot: u64| {
            list.filter(|(s, _)| *s == slot)
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        (first..=current)
            .map(|slot| {
                let n = in_slot(&mut self.slots.iter().copied(), slot)
                    + in_slot(&mut others.iter().copied(), slot);
                let span_ms = if slot == current {
                    (now_ms % RATE_SLOT_MS).max(1000)
                } else {
                    RATE_SLOT_MS
                };
                n as f64 * 1000.0 / span_ms as f64
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_history_keeps_ten_minutes_of_ten_second_slots() {
        let mut h = RateHistory::default();
        let t0 = 1_000_000_000;
        h.add(t0, 500);
        h.add(t0 + 5_000, 500);
        h.add(t0 + 20_000, 100);
        let rates = h.per_second(t0 + 25_000, &[]);
        assert_eq!(rates.len(), 60);
        // The slot of t0 + 20 s is current: 100 records over the 5 s gone by.
        assert_eq!(&rates[57..], &[100.0, 0.0, 20.0]);
        // A clock stepped back a minute: counted in the newest slot, the order kept.
        h.add(t0 - 60_000, 50);
        assert_eq!(h.per_second(t0 + 25_000, &[])[59], 30.0);
        assert_eq!(h.slots.len(), 2);
        assert_eq!(
            h.since(t0 / RATE_SLOT_MS + 1),
            vec![(t0 / RATE_SLOT_MS + 2, 150)]
        );
        h.add(t0 + 700_000, 1);
        assert_eq!(h.slots.len(), 1, "slots older than ten minutes are dropped");
    }

    #[test]
    fn other_replicas_counts_add_to_this_ones() {
        let mut h = RateHistory::default();
        let t0 = 1_000_000_000;
        h.add(t0, 100);
        let slot = t0 / RATE_SLOT_MS;
        let rates = h.per_second(t0 + 10_000, &[(slot, 400), (slot, 500), (slot - 100, 7)]);
        assert_eq!(rates[58], 100.0, "(100 + 400 + 500) records over 10 s");
        assert_eq!(
            rates.iter().sum::<f64>(),
            100.0,
            "a slot out of the window is not shown"
        );
    }

    fn point(minute: u64, accepted: u64, waiting: u64) -> Point {
        Point {
            minute,
            accepted,
            delivered: 0,
            gaps: 0,
            waiting,
            waiting_max: waiting,
            missing: 0,
            backlog_bytes: None,
        }
    }

    #[test]
    fn a_device_keeps_one_point_per_minute_for_the_last_hour() {
        let mut r = Recent::default();
        r.note(point(1000, 10, 50));
        r.note(point(1000, 5, 40));
        r.note(point(1002, 0, 30));
        let folded = Point {
            waiting_max: 50,
            ..point(1000, 15, 40)
        };
        assert_eq!(r.points(), vec![folded, point(1002, 0, 30)]);
        // A clock stepped back: into the newest minute.
        r.note(point(990, 1, 20));
        let stepped = Point {
            waiting_max: 30,
            ..point(1002, 1, 20)
        };
        assert_eq!(r.points()[1], stepped);
        r.note(point(1061, 2, 0));
        assert_eq!(
            r.points(),
            vec![stepped, point(1061, 2, 0)],
            "minutes an hour old are dropped"
        );
        for m in 2000..2100 {
            r.note(point(m, 1, 0));
        }
        assert_eq!(r.points().len(), FILES_KEPT_MINUTES);
        assert_eq!(r.points()[0].minute, 2040);
    }
}
