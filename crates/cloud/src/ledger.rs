//! The completeness ledger of one device: what the center holds of every seq the gateway
//! assigned, by the gateway's own account (`held` in its uploads, `docs/PROTOCOL.md`). Pure: the
//! store hands it the device's stored seqs, gaps and last report.
//!
//! Every seq from 1 to `head_seq` is in exactly one of four classes, so the account balances at
//! every moment: `delivered + gaps + waiting + missing = head_seq`.
//! - **delivered**: stored (durable at the center).
//! - **gaps**: declared by the gateway (dropped when its journal was full, refused, lost with its
//!   journal) and not stored, counted under the reason of the first gap that declared them.
//! - **waiting**: above the gateway's cursor (`acked_seq`), neither stored nor declared: the
//!   gateway holds them and has not delivered them yet. Normal while it is behind.
//! - **missing**: at or below the gateway's cursor, neither stored nor declared: the gateway was
//!   told they were stored and dropped them from its backlog, and they are not here. A true hole;
//!   an alarm, never expected.
//!
//! `head_seq` is the gateway's reported head, or the highest seq stored or declared when that is
//! higher (a report older than the data, or no report: an older agent, or, with the files store,
//! none since its start).
//! Without a report every uncovered seq counts as waiting: nothing says it was delivered.

use std::collections::BTreeMap;

use ferry_protocol::{Gap, Held};

use crate::ranges::RangeSet;

/// Missing and waiting ranges listed per device, at most; the counts cover them all.
pub const MAX_RANGES: usize = 100;

/// One device's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pub head_seq: u64,
    /// The gateway's cursor as last reported (at most `head_seq`), 0 without a report.
    pub acked_seq: u64,
    pub delivered: u64,
    /// Declared and not stored, by reason (`journal_full`, `rejected`, `journal_lost`, ...).
    pub gaps: BTreeMap<&'static str, u64>,
    pub waiting: u64,
    pub missing: u64,
    /// The lowest [`MAX_RANGES`] ranges of each.
    pub waiting_ranges: Vec<(u64, u64)>,
    pub missing_ranges: Vec<(u64, u64)>,
    /// When the gateway received its oldest record not yet delivered, as it last reported.
    pub oldest_unsent_ts_ms: Option<u64>,
    /// Bytes of the gateway's journal not yet delivered, as it last reported (newer agents).
    pub backlog_bytes: Option<u64>,
    /// Whether the gateway reported what it holds (with the files store: since its start).
    pub reported: bool,
}

impl Ledger {
    /// The account of a device with `records` stored, `gaps` declared (in the order stored) and
    /// `held` its last report.
    pub fn account(records: &RangeSet, gaps: &[Gap], held: Option<Held>) -> Ledger {
        Self::account_and_covered(records, gaps, held).0
    }

    /// The account, and the seqs stored or declared (which the account is built from).
    pub fn account_and_covered(
        records: &RangeSet,
        gaps: &[Gap],
        held: Option<Held>,
    ) -> (Ledger, RangeSet) {
        let mut covered = records.clone();
        let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
        for gap in gaps {
            let fresh = covered.insert_range(gap.from_seq, gap.to_seq);
            if fresh > 0 {
                *by_reason.entry(gap.reason.as_str()).or_default() += fresh;
            }
        }
        let highest = covered.max().unwrap_or(0);
        let head_seq = held.map_or(highest, |h| h.head_seq.max(highest));
        let acked_seq = held.map_or(0, |h| h.acked_seq.min(head_seq));
        let missing_ranges = covered.complement(1, acked_seq);
        let waiting_ranges = covered.complement(acked_seq.saturating_add(1), head_seq);
        let count = |ranges: &[(u64, u64)]| ranges.iter().map(|(a, b)| b - a + 1).sum::<u64>();
        let capped = |mut ranges: Vec<(u64, u64)>| {
            ranges.truncate(MAX_RANGES);
            ranges
        };
        let ledger = Ledger {
            head_seq,
            acked_seq,
            delivered: records.len(),
            gaps: by_reason,
            waiting: count(&waiting_ranges),
            missing: count(&missing_ranges),
            waiting_ranges: capped(waiting_ranges),
            missing_ranges: capped(missing_ranges),
            oldest_unsent_ts_ms: held.and_then(|h| h.oldest_unsent_ts_ms),
            backlog_bytes: held.and_then(|h| h.backlog_bytes),
            reported: held.is_some(),
        };
        (ledger, covered)
    }

    /// Seqs in declared gaps, all reasons.
    pub fn gap_total(&self) -> u64 {
        self.gaps.values().sum()
    }

    /// `delivered + gaps + waiting + missing = head_seq`.
    pub fn balances(&self) -> bool {
        self.delivered + self.gap_total() + self.waiting + self.missing == self.head_seq
    }
}

/// The report to keep of two: the one further along (a resend of an old batch carries an old
/// report).
pub fn later(kept: Option<Held>, new: Held) -> Held {
    match kept {
        Some(k) if (k.acked_seq, k.head_seq) > (new.acked_seq, new.head_seq) => k,
        _ => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::GapReason;

    fn set(ranges: &[(u64, u64)]) -> RangeSet {
        let mut s = RangeSet::new();
        for &(a, b) in ranges {
            s.insert_range(a, b);
        }
        s
    }

    fn held(head_seq: u64, acked_seq: u64) -> Option<Held> {
        Some(Held {
            head_seq,
            acked_seq,
            oldest_unsent_ts_ms: Some(7),
            backlog_bytes: None,
        })
    }

    fn gap(from_seq: u64, to_seq: u64, reason: GapReason) -> Gap {
        Gap {
            from_seq,
            to_seq,
            reason,
        }
    }

    #[test]
    fn a_device_behind_is_waiting_not_missing() {
        let l = Ledger::account(&set(&[(1, 500)]), &[], held(1000, 500));
        assert_eq!((l.delivered, l.waiting, l.missing), (500, 500, 0));
        assert_eq!(l.waiting_ranges, vec![(501, 1000)]);
        assert_eq!(l.oldest_unsent_ts_ms, Some(7));
        assert!(l.balances());
    }

    #[test]
    fn seqs_the_gateway_was_told_were_stored_and_are_not_are_missing() {
        let l = Ledger::account(&set(&[(1, 10), (21, 30)]), &[], held(40, 30));
        assert_eq!((l.delivered, l.waiting, l.missing), (20, 10, 10));
        assert_eq!(l.missing_ranges, vec![(11, 20)]);
        assert!(l.balances());
    }

    #[test]
    fn gaps_count_once_under_the_first_reason_and_never_over_a_stored_seq() {
        let gaps = [
            gap(5, 10, GapReason::JournalFull),
            gap(8, 12, GapReason::Rejected),
            gap(1, 2, GapReason::Rejected),
        ];
        let l = Ledger::account(&set(&[(1, 4), (13, 20)]), &gaps, held(20, 20));
        assert_eq!(l.gaps.get("journal_full"), Some(&6));
        assert_eq!(l.gaps.get("rejected"), Some(&2));
        assert_eq!((l.delivered, l.waiting, l.missing), (12, 0, 0));
        assert!(l.balances());
    }

    #[test]
    fn without_a_report_the_head_is_the_highest_seq_here_and_holes_are_waiting() {
        let l = Ledger::account(&set(&[(1, 3), (7, 9)]), &[], None);
        assert_eq!((l.head_seq, l.acked_seq), (9, 0));
        assert_eq!((l.waiting, l.missing), (3, 0));
        assert!(!l.reported && l.balances());
    }

    #[test]
    fn a_report_older_than_the_data_does_not_shrink_the_head() {
        let l = Ledger::account(&set(&[(1, 50)]), &[], held(20, 10));
        assert_eq!(
            (l.head_seq, l.acked_seq, l.waiting, l.missing),
            (50, 10, 0, 0)
        );
        assert!(l.balances());
    }

    #[test]
    fn the_account_balances_for_any_mix() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..500 {
            let mut records = RangeSet::new();
            for _ in 0..next(6) {
                let a = 1 + next(200);
                records.insert_range(a, a + next(30));
            }
            let gaps: Vec<Gap> = (0..next(4))
                .map(|i| {
                    let a = 1 + next(200);
                    let reason = if i % 2 == 0 {
                        GapReason::JournalFull
                    } else {
                        GapReason::Rejected
                    };
                    gap(a, a + next(20), reason)
                })
                .collect();
            let head = next(260);
            let report = if next(3) > 0 {
                held(head, next(head + 1))
            } else {
                None
            };
            let l = Ledger::account(&records, &gaps, report);
            assert!(l.balances(), "{l:?}");
        }
    }

    #[test]
    fn the_later_report_is_kept() {
        let old = Held {
            head_seq: 10,
            acked_seq: 5,
            oldest_unsent_ts_ms: Some(1),
            backlog_bytes: None,
        };
        let new = Held {
            head_seq: 20,
            acked_seq: 10,
            oldest_unsent_ts_ms: Some(2),
            backlog_bytes: Some(9),
        };
        assert_eq!(later(Some(new), old), new);
        assert_eq!(later(Some(old), new), new);
        assert_eq!(later(None, old), old);
    }
}
