//! The cloud's commands, remembered: the ids and results of the commands the downlink carried
//! out, so that a command the cloud sends again is answered from here and never run twice.
//! Additive to the layout in `lib.rs`, in the same sled tree, so every change is one atomic
//! `sled::Batch`:
//!
//! | key | value |
//! |---|---|
//! | `C` id bytes | a command's result: order:u64, then the result's JSON |
//! | `O` order:u64 | the id of the command remembered `order`-th (for evicting the oldest) |
//! | `M` `command_next` | the next order, u64 |
//! | `M` `command_bytes` | bytes of the remembered ids and results, u64 (absent: counted once) |
//!
//! Commands: at most [`MAX_COMMANDS`] results and [`MAX_COMMAND_BYTES`] of ids and results are
//! remembered, the oldest evicted first; so at least the last 64 are, however large.

use super::{Error, Journal, Result, storage};

const P_COMMAND: u8 = b'C';
const P_COMMAND_ORDER: u8 = b'O';
const M_COMMAND_NEXT: &[u8] = b"Mcommand_next";
const M_COMMAND_BYTES: &[u8] = b"Mcommand_bytes";

/// Command results remembered.
pub const MAX_COMMANDS: u64 = 10_000;
/// Longest command id and result stored.
pub const MAX_COMMAND_ID: usize = 128;
pub const MAX_COMMAND_RESULT: usize = 64 * 1024;
/// Bytes of remembered command ids and results, at most (sled's share of `journal.max_bytes`
/// stays small): 64 of the largest.
pub const MAX_COMMAND_BYTES: u64 = 64 * (MAX_COMMAND_ID + MAX_COMMAND_RESULT) as u64;

fn command_key(id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(P_COMMAND);
    k.extend_from_slice(id);
    k
}

/// The order an `O` key names (0 for a key too short, which this module never writes).
fn order_of(key: &[u8]) -> u64 {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn order_key(order: u64) -> [u8; 9] {
    let mut k = [P_COMMAND_ORDER; 9];
    k[1..].copy_from_slice(&order.to_be_bytes());
    k
}

impl Journal {
    /// The stored result of command `id`, if it was remembered and not evicted yet.
    pub fn command_result(&self, id: &str) -> Result<Option<String>> {
        let v = self
            .store()?
            .log
            .get(command_key(id.as_bytes()))
            .map_err(storage("reading a command result"))?;
        Ok(v.and_then(|v| {
            v.get(8..)
                .map(|json| String::from_utf8_lossy(json).into_owned())
        }))
    }

    /// Remembers the `result` of command `id`, evicting the oldest beyond [`MAX_COMMANDS`] or
    /// [`MAX_COMMAND_BYTES`]. Synced before returning, so a command answered is never executed
    /// again after a crash.
    pub fn remember_command(&self, id: &str, result: &str) -> Result<()> {
        self.remember_command_within(id, result, MAX_COMMANDS, MAX_COMMAND_BYTES)
    }

    fn remember_command_within(
        &self,
        id: &str,
        result: &str,
        max: u64,
        max_bytes: u64,
    ) -> Result<()> {
        if id.is_empty() || id.len() > MAX_COMMAND_ID || result.len() > MAX_COMMAND_RESULT {
            return Err(Error::CommandTooLarge {
                id_bytes: id.len(),
                result_bytes: result.len(),
            });
        }
        // The state lock serialises writers of the order counter.
        let st = self.lock();
        let store = self.store()?;
        let read = || storage("remembering a command");
        let next = self.meta(M_COMMAND_NEXT)?.unwrap_or(0);
        let mut bytes = match self.meta(M_COMMAND_BYTES)? {
            Some(bytes) => bytes,
            // A journal from before the byte budget: count what it remembers, once.
            None => store
                .log
                .scan_prefix([P_COMMAND])
                .try_fold(0u64, |sum, kv| kv.map(|(k, v)| sum + stored_bytes(&k, &v)))
                .map_err(read())?,
        };
        let mut batch = sled::Batch::default();
        let key = command_key(id.as_bytes());
        // The same id again (not expected: a repeat is answered from here): the new result replaces
        // the old one, whose order entry no longer matches and is dropped when evicted.
        if let Some(old) = store.log.get(&key).map_err(read())? {
            bytes = bytes.saturating_sub(stored_bytes(&key, &old));
        }
        let mut value = next.to_be_bytes().to_vec();
        value.extend_from_slice(result.as_bytes());
        bytes += stored_bytes(&key, &value);
        batch.insert(key, value);
        batch.insert(&order_key(next)[..], id.as_bytes());
        let next = next + 1;
        // The order entries run without a hole from the oldest remembered to the newest, so the
        // first one says how many there are. The oldest are evicted first; the new one (not in the
        // tree yet) never is.
        let mut remembered = 1;
        for (i, kv) in store.log.scan_prefix([P_COMMAND_ORDER]).enumerate() {
            let (k, old_id) = kv.map_err(read())?;
            let order = order_of(&k);
            if i == 0 {
                remembered = next.saturating_sub(order).max(1);
            }
            if remembered <= max && bytes <= max_bytes {
                break;
            }
            remembered -= 1;
            batch.remove(k);
            if old_id.as_ref() == id.as_bytes() {
                continue;
            }
            let k = command_key(&old_id);
            // Only if that id was not remembered again since.
            if let Some(v) = store.log.get(&k).map_err(read())? {
                if v.get(..8) == Some(&order.to_be_bytes()[..]) {
                    bytes = bytes.saturating_sub(stored_bytes(&k, &v));
                    batch.remove(k);
                }
            }
        }
        batch.insert(M_COMMAND_NEXT, &next.to_be_bytes()[..]);
        batch.insert(M_COMMAND_BYTES, &bytes.to_be_bytes()[..]);
        self.apply(batch, "remembering a command")?;
        drop(st);
        self.sled_changed();
        self.sync()
    }
}

/// What a remembered command counts against [`MAX_COMMAND_BYTES`]: its id and its result.
fn stored_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len().saturating_sub(1) + value.len().saturating_sub(8)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::tests::open;

    #[test]
    fn command_results_are_remembered_and_the_oldest_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path());
        j.remember_command("a", "{\"ok\":true}").unwrap();
        assert_eq!(
            j.command_result("a").unwrap().as_deref(),
            Some("{\"ok\":true}")
        );
        assert_eq!(j.command_result("b").unwrap(), None);
        for i in 0..5 {
            j.remember_command_within(&format!("c{i}"), "{}", 5, MAX_COMMAND_BYTES)
                .unwrap();
        }
        assert_eq!(j.command_result("a").unwrap(), None);
        assert!(j.command_result("c1").unwrap().is_some());
        assert!(j.remember_command("", "{}").is_err());
    }

    /// Large results evict by bytes: the budget holds, the newest are kept, and the newest one is
    /// kept even when it alone is over the budget; the count survives a reopen.
    #[test]
    fn command_results_are_evicted_by_bytes_too() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(1000);
        {
            let j = open(dir.path());
            for i in 0..10 {
                // id "kN" (2 bytes) + 1000: three fit in 3,100 bytes.
                j.remember_command_within(&format!("k{i}"), &big, 100, 3100)
                    .unwrap();
            }
            let kept: Vec<bool> = (0..10)
                .map(|i| j.command_result(&format!("k{i}")).unwrap().is_some())
                .collect();
            assert_eq!(kept, [[false; 7].as_slice(), &[true; 3]].concat());
        }
        let j = open(dir.path());
        j.remember_command_within("k10", &big, 100, 3100).unwrap();
        assert_eq!(
            j.command_result("k7").unwrap(),
            None,
            "bytes survived the reopen"
        );
        assert!(j.command_result("k8").unwrap().is_some());
        j.remember_command_within("huge", &"y".repeat(5000), 100, 3100)
            .unwrap();
        assert!(
            j.command_result("huge").unwrap().is_some(),
            "the newest is kept"
        );
        assert_eq!(j.command_result("k10").unwrap(), None);
    }

    /// A journal written before the byte budget has no byte count: it is counted once from what
    /// is stored.
    #[test]
    fn a_journal_without_a_byte_count_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(1000);
        {
            let j = open(dir.path());
            for i in 0..3 {
                j.remember_command_within(&format!("k{i}"), &big, 100, u64::MAX)
                    .unwrap();
            }
            let store = j.store().unwrap();
            store.log.remove(M_COMMAND_BYTES).unwrap();
        }
        let j = open(dir.path());
        j.remember_command_within("k3", &big, 100, 3100).unwrap();
        assert_eq!(j.command_result("k0").unwrap(), None);
        assert!(j.command_result("k1").unwrap().is_some());
        assert!(j.command_result("k3").unwrap().is_some());
    }
}
