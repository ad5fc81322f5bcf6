//! The wall clock of each boot, as the agent learned it: for a boot whose wall clock became
//! trusted (NTP synchronised it), the offset from its monotonic clock to the wall clock, so that
//! records taken earlier in that boot under an untrusted clock ([`crate::Monotonic`]) get their
//! time corrected, even when they are uploaded after a reboot. Additive to the layout in
//! `lib.rs`, in the same sled tree:
//!
//! | key | value |
//! |---|---|
//! | `K` boot id (16 bytes) | order:u64, then the offset in milliseconds, i64 (both big-endian) |
//! | `M` `clock_next` | the next order, u64 |
//!
//! At most [`MAX_ANCHORS`] boots are remembered, the oldest evicted first: a record from a boot
//! older than that is sent flagged as unsynced.

use super::{Journal, Result, storage};

const P_ANCHOR: u8 = b'K';
const M_CLOCK_NEXT: &[u8] = b"Mclock_next";

/// Boots whose wall clock is remembered.
pub const MAX_ANCHORS: usize = 32;

fn anchor_key(boot: &[u8; 16]) -> [u8; 17] {
    let mut k = [P_ANCHOR; 17];
    k[1..].copy_from_slice(boot);
    k
}

/// `(order, offset)` of an anchor's value; `None` for a value of the wrong length.
fn decode(v: &[u8]) -> Option<(u64, i64)> {
    let order = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let offset = i64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((order, offset))
}

impl Journal {
    /// The wall clock of boot `boot` as an offset from its monotonic clock (wall ms = monotonic
    /// ms + offset), if it was remembered.
    pub fn clock_anchor(&self, boot: &[u8; 16]) -> Result<Option<i64>> {
        let v = self
            .store()?
            .log
            .get(anchor_key(boot))
            .map_err(storage("reading a clock anchor"))?;
        Ok(v.as_deref().and_then(decode).map(|(_, offset)| offset))
    }

    /// Remembers the wall clock of boot `boot` (replacing what was remembered of it), evicting the
    /// oldest boots beyond [`MAX_ANCHORS`]. Synced before returning: an anchor is written once or
    /// twice per boot, and the records it corrects may outlive the boot.
    pub fn set_clock_anchor(&self, boot: &[u8; 16], offset_ms: i64) -> Result<()> {
        let st = self.lock();
        let store = self.store()?;
        let read = || storage("remembering a clock anchor");
        let next = self.meta(M_CLOCK_NEXT)?.unwrap_or(0);
        let mut batch = sled::Batch::default();
        let key = anchor_key(boot);
        let mut value = next.to_be_bytes().to_vec();
        value.extend_from_slice(&offset_ms.to_be_bytes());
        batch.insert(&key[..], value);
        let mut others = Vec::new();
        for kv in store.log.scan_prefix([P_ANCHOR]) {
            let (k, v) = kv.map_err(read())?;
            if k.as_ref() != key {
                others.push((decode(&v).map_or(0, |(order, _)| order), k));
            }
        }
        others.sort();
        let evict = others.len().saturating_sub(MAX_ANCHORS - 1);
        for (_, k) in others.into_iter().take(evict) {
            batch.remove(k);
        }
        batch.insert(M_CLOCK_NEXT, &(next + 1).to_be_bytes()[..]);
        self.apply(batch, "remembering a clock anchor")?;
        drop(st);
        self.sled_changed();
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use crate::replay::tests::open;

    /// Anchors survive a reopen, a boot's anchor is replaced, and the oldest boots are evicted
    /// beyond the bound.
    #[test]
    fn anchors_are_remembered_replaced_and_evicted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = open(dir.path());
            assert_eq!(j.clock_anchor(&[1; 16]).unwrap(), None);
            j.set_clock_anchor(&[1; 16], -5).unwrap();
            j.set_clock_anchor(&[1; 16], 1_700_000_000_000).unwrap();
        }
        let j = open(dir.path());
        assert_eq!(j.clock_anchor(&[1; 16]).unwrap(), Some(1_700_000_000_000));
        for b in 2..=(super::MAX_ANCHORS as u8 + 1) {
            j.set_clock_anchor(&[b; 16], i64::from(b)).unwrap();
        }
        // 33 boots set: the first is gone, the last 32 remain.
        assert_eq!(j.clock_anchor(&[1; 16]).unwrap(), None);
        assert_eq!(j.clock_anchor(&[2; 16]).unwrap(), Some(2));
        assert_eq!(j.clock_anchor(&[33; 16]).unwrap(), Some(33));
    }
}
