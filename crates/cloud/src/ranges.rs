//! A compact set of `u64`s stored as disjoint inclusive ranges.
//!
//! The receiver keeps one per device for the stored record seqs and one for the seqs covered by gaps.
//! A device that delivers its seqs in order needs a single range however many records it sends, so
//! millions of records cost a few bytes; the worst case (every other seq missing) is one entry per seq.

use std::collections::BTreeMap;
use std::ops::Bound;

/// Disjoint, non-adjacent inclusive ranges keyed by their start: `start -> end`.
///
/// Invariant: for consecutive entries `(a, b)` and `(c, d)`, `a <= b` and `b + 1 < c` (ranges never
/// touch; inserting a neighbour merges them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    len: u64,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Number of values in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, value: u64) -> bool {
        self.ranges
            .range(..=value)
            .next_back()
            .is_some_and(|(_, &end)| value <= end)
    }

    pub fn max(&self) -> Option<u64> {
        self.ranges.last_key_value().map(|(_, &end)| end)
    }

    /// Adds one value; returns whether it was new.
    pub fn insert(&mut self, value: u64) -> bool {
        self.insert_range(value, value) == 1
    }

    /// Adds every value in `from..=to` (nothing if `from > to`); returns how many were new.
    pub fn insert_range(&mut self, from: u64, to: u64) -> u64 {
        if from > to {
            return 0;
        }
        let mut start = from;
        let mut end = to;
        let mut covered = 0;
        // The range that starts at or before `from` may overlap or touch it.
        if let Some((&s, &e)) = self.ranges.range(..=from).next_back() {
            if e.saturating_add(1) >= from {
                start = s;
                end = end.max(e);
                covered += span(s, e);
                self.ranges.remove(&s);
            }
        }
        // Every range starting inside `start..=end + 1` overlaps or touches the merged range.
        let upper = end.saturating_add(1);
        let absorbed: Vec<(u64, u64)> = self
            .ranges
            .range((Bound::Excluded(start), Bound::Included(upper)))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in absorbed {
            covered += span(s, e);
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
        let total = span(start, end);
        self.len = self.len - covered + total;
        // Values of the absorbed ranges that lay outside `from..=to` were already present, so the new
        // values are the growth of the set.
        total - covered
    }

    /// Adds every value of `other`.
    pub fn extend(&mut self, other: &RangeSet) {
        for (from, to) in other.iter() {
            self.insert_range(from, to);
        }
    }

    /// The ranges in ascending order, each as `(from, to)` inclusive.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// The ranges of `from..=to` that are not in the set, ascending.
    pub fn complement(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut missing = Vec::new();
        if from > to {
            return missing;
        }
        let mut next = from;
        // Start with the range that may cover `from`, then walk the ones starting inside.
        let first = self.ranges.range(..=from).next_back();
        let rest = self
            .ranges
            .range((Bound::Excluded(from), Bound::Included(to)));
        for (&s, &e) in first.into_iter().chain(rest) {
            if e < next {
                continue;
            }
            if s > next {
                missing.push((next, s - 1));
            }
            if e >= to {
                return missing;
            }
            next = e + 1;
        }
        missing.push((next, to));
        missing
    }
}

/// Number of values in `from..=to`; `from <= to`. Saturates for the whole `u64` range, which a device
/// cannot reach (it would need 2^64 records).
fn span(from: u64, to: u64) -> u64 {
    (to - from).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(set: &RangeSet) -> Vec<(u64, u64)> {
        set.iter().collect()
    }

    #[test]
    fn consecutive_inserts_collapse_into_one_range() {
        let mut set = RangeSet::new();
        for seq in 1..=1000 {
            assert!(set.insert(seq));
        }
        assert_eq!(ranges(&set), vec![(1, 1000)]);
        assert_eq!(set.len(), 1000);
        assert_eq!(set.max(), Some(1000));
    }

    #[test]
    fn inserting_a_present_value_reports_it_as_not_new() {
        let mut set = RangeSet::new();
        assert!(set.insert(5));
        assert!(!set.insert(5));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn a_value_between_two_ranges_joins_them() {
        let mut set = RangeSet::new();
        set.insert_range(1, 4);
        set.insert_range(6, 9);
        assert_eq!(ranges(&set), vec![(1, 4), (6, 9)]);
        assert!(set.insert(5));
        assert_eq!(ranges(&set), vec![(1, 9)]);
        assert_eq!(set.len(), 9);
    }

    #[test]
    fn an_overlapping_range_counts_only_new_values() {
        let mut set = RangeSet::new();
        set.insert_range(10, 20);
        set.insert_range(30, 40);
        // 5..=9, 21..=29 and 41..=45 are new.
        assert_eq!(set.insert_range(5, 45), 5 + 9 + 5);
        assert_eq!(ranges(&set), vec![(5, 45)]);
        assert_eq!(set.len(), 41);
    }

    #[test]
    fn a_range_inside_an_existing_one_adds_nothing() {
        let mut set = RangeSet::new();
        set.insert_range(1, 100);
        assert_eq!(set.insert_range(40, 60), 0);
        assert_eq!(ranges(&set), vec![(1, 100)]);
    }

    #[test]
    fn an_empty_range_is_ignored() {
        let mut set = RangeSet::new();
        assert_eq!(set.insert_range(5, 4), 0);
        assert!(set.is_empty());
    }

    #[test]
    fn contains_sees_only_stored_values() {
        let mut set = RangeSet::new();
        set.insert_range(3, 5);
        set.insert(9);
        let found: Vec<u64> = (0..12).filter(|&v| set.contains(v)).collect();
        assert_eq!(found, vec![3, 4, 5, 9]);
    }

    #[test]
    fn values_at_the_top_of_u64_do_not_overflow() {
        let mut set = RangeSet::new();
        set.insert(u64::MAX);
        set.insert(u64::MAX - 1);
        assert_eq!(ranges(&set), vec![(u64::MAX - 1, u64::MAX)]);
        assert_eq!(
            set.complement(u64::MAX - 3, u64::MAX),
            vec![(u64::MAX - 3, u64::MAX - 2)]
        );
    }

    #[test]
    fn complement_lists_the_holes_within_bounds() {
        let mut set = RangeSet::new();
        set.insert_range(3, 5);
        set.insert_range(8, 8);
        set.insert_range(12, 20);
        assert_eq!(set.complement(1, 15), vec![(1, 2), (6, 7), (9, 11)]);
        assert_eq!(set.complement(4, 10), vec![(6, 7), (9, 10)]);
        assert_eq!(set.complement(21, 22), vec![(21, 22)]);
        assert_eq!(set.complement(12, 20), vec![]);
    }

    #[test]
    fn complement_of_an_empty_set_is_the_whole_interval() {
        assert_eq!(RangeSet::new().complement(1, 7), vec![(1, 7)]);
        assert_eq!(RangeSet::new().complement(2, 1), vec![]);
    }

    #[test]
    fn extend_merges_another_set() {
        let mut a = RangeSet::new();
        a.insert_range(1, 3);
        let mut b = RangeSet::new();
        b.insert_range(4, 6);
        b.insert_range(10, 10);
        a.extend(&b);
        assert_eq!(ranges(&a), vec![(1, 6), (10, 10)]);
        assert_eq!(a.len(), 7);
    }

    #[test]
    fn random_inserts_match_a_plain_set() {
        // A small model test: a deterministic pseudo-random walk checked against a BTreeSet.
        let mut set = RangeSet::new();
        let mut model = std::collections::BTreeSet::new();
        let mut rng = ferry_util::rng::Rng::new(1);
        for _ in 0..2000 {
            let state = rng.next_u64();
            let from = state % 300;
            let to = from + (state >> 32) % 6;
            let before = model.len() as u64;
            model.extend(from..=to);
            assert_eq!(set.insert_range(from, to), model.len() as u64 - before);
            assert_eq!(set.len(), model.len() as u64);
        }
        for v in 0..310 {
            assert_eq!(set.contains(v), model.contains(&v), "value {v}");
        }
        let holes: Vec<u64> = set
            .complement(0, 309)
            .into_iter()
            .flat_map(|(a, b)| a..=b)
            .collect();
        let model_holes: Vec<u64> = (0..310).filter(|v| !model.contains(v)).collect();
        assert_eq!(holes, model_holes);
        let pairs = ranges(&set);
        for w in pairs.windows(2) {
            assert!(w[0].1 + 1 < w[1].0, "ranges {:?} touch", w);
        }
    }
}
