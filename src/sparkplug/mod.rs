//! Sparkplug B, the industrial MQTT payload: protobuf payloads on
//! `spBv1.0/<group>/<type>/<edge node>[/<device>]`, metrics named in the births (NBIRTH, DBIRTH)
//! and referred to by alias after them, a per-edge-node `seq` (0..=255, wrapping) on every
//! message but the death, and a `bdSeq` tying each NBIRTH to its NDEATH.
//!
//! - `decode.rs` turns a payload into JSON (pure). The journal keeps the raw bytes; the uplink
//!   sends them as `payload_b64` with the decoded form beside them (`"sparkplug"`), metric names
//!   resolved from the latest births this process saw ([`Aliases`]).
//! - [`Tracker`] (owned by the `mqtt` thread, which sees messages in arrival order) follows each
//!   edge node: its births, aliases, `seq` and `bdSeq`. A `seq` that skips, a DBIRTH/NDATA/DDATA/
//!   DDEATH before any NBIRTH, or an NDEATH whose `bdSeq` is not the NBIRTH's is an **upstream
//!   gap**: the tracker returns an event that the `mqtt` thread journals, just before the message
//!   that revealed it, as a record on topic [`UPSTREAM_GAP_TOPIC`] (JSON: which node, which seqs,
//!   which message). So the gap travels the same durable path as the data, is never lost, and
//!   the cloud sees exactly where in the stream it was found. With `[sparkplug] rebirth = true`
//!   the `mqtt` thread also asks the edge node to rebirth (NCMD `Node Control/Rebirth`), at most
//!   once per `rebirth_period` per node.
//!
//! What holds and what does not: a `seq` seen again (a QoS1 redelivery, a broker resending after
//! a reconnect) is a repeat, not a gap: a `seq` 1 to 127 ahead of the expected one is a gap of
//! that many, one 128 or more ahead (that is, up to 128 behind) is taken for a repeat. The
//! 0..=255 wrap cannot tell more: a loss of 128 messages or more in a row is not reported (the
//! next birth resynchronises). An NDEATH whose `bdSeq` is not the birth's is reported (Sparkplug
//! hosts ignore such a stale death) but asks for no rebirth.
//!
//! Across ferry's restarts: the tracker's state lives in memory, and at start the agent replays
//! the journal's newest records through it ([`Tracker::replay`]: state only, nothing reported
//! again, no rebirth asked), so each node found there is followed as ferry left it, births and
//! aliases included, and a message lost while ferry was down is a `seq` gap. A node with nothing
//! there is as after a first start: its first message that is not a birth is journaled on
//! [`UPSTREAM_UNKNOWN_TOPIC`] (`"no_birth_seen"`, `"since_start": true`: not a gap, since nothing
//! says one happened, and not counted as one by the center) and, with `rebirth`, makes the node
//! rebirth. A node followed without its birth (it was older than the records replayed) is asked
//! to rebirth too, without a gap. Until a birth, its aliases stay unresolved in the decoded form
//! (the raw bytes are always there). A record replayed that the journal then loses (written, not
//! synced, before a crash, and gone at a later power cut) was never acknowledged to the broker,
//! which sends it again: a repeat, not a gap.

pub mod decode;
pub mod encode;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0/";
/// Topic of the records ferry journals for an upstream gap.
pub const UPSTREAM_GAP_TOPIC: &str = "$ferry/upstream_gap";
/// Topic of the records ferry journals when it cannot tell: the first data of a node after ferry
/// itself started (it has not seen that node's birth, and does not know what it missed).
pub const UPSTREAM_UNKNOWN_TOPIC: &str = "$ferry/upstream_unknown";

/// The topic an event of the tracker is journaled on.
pub fn event_topic(event: &Value) -> &'static str {
    if event["since_start"] == true {
        UPSTREAM_UNKNOWN_TOPIC
    } else {
        UPSTREAM_GAP_TOPIC
    }
}

/// A Sparkplug B topic, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub node: &'a str,
    pub device: Option<&'a str>,
}

/// `spBv1.0/<group>/<type>/<edge node>[/<device>]`; `None` for anything else (the `STATE`
/// topics of host applications included).
pub fn topic(t: &str) -> Option<Topic<'_>> {
    let rest = t.strip_prefix(NAMESPACE)?;
    let mut parts = rest.split('/');
    let (group, kind, node) = (parts.next()?, parts.next()?, parts.next()?);
    let device = parts.next();
    if parts.next().is_some() || [group, kind, node].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(Topic {
        group,
        kind,
        node,
        device,
    })
}

/// Whether `t` is in the Sparkplug B namespace (what `format = "auto"` recognises).
pub fn is_sparkplug_topic(t: &str) -> bool {
    t.starts_with(NAMESPACE)
}

/// `(group, edge node)`.
type NodeKey = (String, String);
/// Metric names by alias, per `(edge node, device)`: the maps of its last births, each with the
/// time the birth was stamped, oldest first.
type AliasMaps = HashMap<(NodeKey, Option<String>), Vec<(u64, Arc<HashMap<u64, String>>)>>;

/// Births remembered per edge node or device: a backlog uploaded after a rebirth that renumbered
/// the aliases still resolves by the birth before it, unless it spans more births than this.
const BIRTHS_KEPT: usize = 4;

/// Metric names by alias, per edge node and device (`None`: the node's own), from their last
/// births. Shared by the `mqtt` thread (which writes it) and the uplink's post threads (which
/// resolve aliases when they decode): a record is resolved by the latest birth stamped no later
/// than the record (so data journaled before a rebirth that renumbered the aliases keeps the old
/// names). Records and births are stamped by the same clock, in milliseconds: data stamped in
/// the same millisecond as a later birth, or across a backward step of the clock, may resolve by
/// the wrong one.
#[derive(Clone, Default)]
pub struct Aliases {
    inner: Arc<RwLock<AliasMaps>>,
}

/// Aliases remembered at most, over all nodes and devices (a birth beyond this is not
/// remembered: its data decodes with aliases unresolved).
const MAX_ALIASES: usize = 1_000_000;

impl Aliases {
    /// A birth of `key` stamped `ts_ms` declared `map`.
    fn born(&self, key: (NodeKey, Option<String>), ts_ms: u64, map: HashMap<u64, String>) {
        let mut all = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let held: usize = all
            .values()
            .flat_map(|births| births.iter().map(|(_, m)| m.len()))
            .sum();
        if held + map.len() > MAX_ALIASES {
            log::warn!(
                "sparkplug: not remembering the aliases of {}/{} ({} of them): over {MAX_ALIASES}",
                key.0.0,
                key.0.1,
                map.len()
            );
            return;
        }
        let births = all.entry(key).or_default();
        births.push((ts_ms, Arc::new(map)));
        if births.len() > BIRTHS_KEPT {
            births.remove(0);
        }
    }

    /// A new NBIRTH of `node` stamped `ts_ms`: its devices' aliases are unknown from then on
    /// until their DBIRTHs.
    fn node_born(&self, node: &NodeKey, ts_ms: u64) {
        let devices: Vec<_> = {
            let all = self.inner.read().unwrap_or_else(|e| e.into_inner());
            all.keys()
                .filter(|(n, d)| n == node && d.is_some())
                .cloned()
                .collect()
        };
        for key in devices {
            self.born(key, ts_ms, HashMap::new());
        }
    }

    /// The decoded form of the payload published on `topic` and stamped `ts_ms`, metric names
    /// resolved from the aliases of the latest birth stamped no later: each metric with an alias
    /// and no name gets `"name"` if the alias is known, else `"alias_unresolved": true`.
    pub fn decode(
        &self,
        topic_name: &str,
        payload: &[u8],
        ts_ms: u64,
    ) -> Result<Value, decode::Invalid> {
        let mut v = decode::payload(payload)?;
        let Some(t) = topic(topic_name) else {
            return Ok(v);
        };
        let key = (
            (t.group.to_owned(), t.node.to_owned()),
            t.device.map(str::to_owned),
        );
        let all = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let names = all.get(&key).and_then(|births| {
            births
                .iter()
                .rev()
                .find(|(born, _)| *born <= ts_ms)
                .map(|(_, map)| map)
        });
        if let Some(metrics) = v.get_mut("metrics").and_then(Value::as_array_mut) {
            for m in metrics {
                let Some(obj) = m.as_object_mut() else {
                    continue;
                };
                if obj.contains_key("name") {
                    continue;
                }
                let Some(alias) = obj.get("alias").and_then(Value::as_u64) else {
                    continue;
                };
                match names.and_then(|n| n.get(&alias)) {
                    Some(name) => {
                        obj.insert("name".into(), json!(name));
                    }
                    None => {
                        obj.insert("alias_unresolved".into(), json!(true));
                    }
                }
            }
        }
        Ok(v)
    }
}

/// What the tracker knows of an edge node.
#[derive(Debug, Default)]
struct Node {
    /// The `bdSeq` of its current NBIRTH.
    bd_seq: Option<u64>,
    /// The last `seq` it sent; `None` before its NBIRTH (or after its NDEATH).
    last_seq: Option<u8>,
    /// When ferry last asked it to rebirth.
    rebirth_asked: Option<Instant>,
    /// One of its NBIRTHs was seen (since this start, or among the journal's newest records at
    /// start): the names of its aliases are known.
    birth_seen: bool,
}

/// Follows every edge node's births, `seq` and `bdSeq` (see the module header). Owned by the
/// `mqtt` thread.
pub struct Tracker {
    nodes: HashMap<NodeKey, Node>,
    aliases: Aliases,
    rebirth: Option<Duration>,
}

/// What the tracker found in one message.
#[derive(Debug, Default, PartialEq)]
pub struct Observed {
    /// An upstream gap to journal before the message (JSON).
    pub gap: Option<Value>,
    /// Ask this node to rebirth: the NCMD's topic and payload.
    pub rebirth: Option<(String, Vec<u8>)>,
}

/// Edge nodes followed at most; more are followed only once an old one dies.
const MAX_NODES: usize = 100_000;

impl Tracker {
    /// `rebirth`: ask a node with a gap to rebirth, at most once per this period.
    pub fn new(aliases: Aliases, rebirth: Option<Duration>) -> Tracker {
        Tracker {
            nodes: HashMap::new(),
            aliases,
            rebirth,
        }
    }

    /// Looks at one message as it arrives (`ts_ms`: the time its record is stamped with, or a
    /// little earlier). Messages outside the namespace, commands, host STATE and payloads that do
    /// not decode are not followed.
    pub fn observe(
        &mut self,
        topic_name: &str,
        payload: &[u8],
        ts_ms: u64,
        now: Instant,
    ) -> Observed {
        self.follow(topic_name, payload, ts_ms, Some(now))
    }

    /// Follows a message journaled before this start (`ts_ms`: its record's stamp), in journal
    /// order, before any live one: its node's `seq`, `bdSeq` and births (aliases) as they were
    /// when ferry stopped, so that a message lost while ferry was down shows as a gap. What it
    /// finds is not reported again, and no rebirth is asked.
    pub fn replay(&mut self, topic_name: &str, payload: &[u8], ts_ms: u64) {
        self.follow(topic_name, payload, ts_ms, None);
    }

    /// Edge nodes followed now.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// [`Tracker::observe`] (`now`: live) or [`Tracker::replay`] (`None`).
    fn follow(
        &mut self,
        topic_name: &str,
        payload: &[u8],
        ts_ms: u64,
        now: Option<Instant>,
    ) -> Observed {
        let Some(t) = topic(topic_name) else {
            return Observed::default();
        };
        if !matches!(
            t.kind,
            "NBIRTH" | "NDEATH" | "DBIRTH" | "DDEATH" | "NDATA" | "DDATA"
        ) {
            return Observed::default();
        }
        let Ok(decoded) = decode::payload(payload) else {
            return Observed::default();
        };
        let key: NodeKey = (t.group.to_owned(), t.node.to_owned());
        if !self.nodes.contains_key(&key) && self.nodes.len() >= MAX_NODES {
            self.nodes.retain(|_, n| n.last_seq.is_some());
            if self.nodes.len() >= MAX_NODES {
                return Observed::default();
            }
        }
        let first_since_start = !self.nodes.contains_key(&key);
        let node = self.nodes.entry(key.clone()).or_default();
        let seq = decoded
            .get("seq")
            .and_then(Value::as_u64)
            .map(|s| (s & 0xff) as u8);
        let bd_seq = metric_value(&decoded, "bdSeq");
        let base = json!({
            "group": t.group,
            "edge_node": t.node,
            "device": t.device,
            "topic": topic_name,
        });
        let gap = |kind: &str, extra: Value| {
            let mut v = base.clone();
            if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
                obj.insert("kind".into(), json!(kind));
                obj.extend(more.clone());
            }
            v
        };
        let mut out = Observed::default();
        match t.kind {
            "NBIRTH" => {
                node.bd_seq = bd_seq;
                node.last_seq = seq;
                node.birth_seen = true;
                self.aliases.node_born(&key, ts_ms);
                self.aliases
                    .born((key.clone(), None), ts_ms, names(&decoded));
            }
            "NDEATH" => {
                if bd_seq.is_some() && node.bd_seq.is_some() && bd_seq != node.bd_seq {
                    out.gap = Some(gap(
                        "bd_seq_mismatch",
                        json!({"birth_bd_seq": node.bd_seq, "death_bd_seq": bd_seq}),
                    ));
                } else {
                    node.last_seq = None;
                }
            }
            _ => match (node.last_seq, seq) {
                (None, _) => {
                    out.gap = Some(gap(
                        "no_birth_seen",
                        json!({"received_seq": seq, "since_start": first_since_start}),
                    ));
                    // From here on, follow it: one report, not one per message.
                    node.last_seq = seq;
                }
                (Some(last), Some(got)) => {
                    let expected = last.wrapping_add(1);
                    let ahead = got.wrapping_sub(expected);
                    if ahead == 0 {
                        node.last_seq = Some(got);
                    } else if ahead < 128 {
                        let last_missing = got.wrapping_sub(1);
                        out.gap = Some(gap(
                            "seq",
                            json!({"expected_seq": expected, "received_seq": got,
                                   "missing": ahead, "missing_seqs": format!("{expected}..={last_missing}")}),
                        ));
                        node.last_seq = Some(got);
                    }
                    // Else a repeat (a redelivery): no gap, and the position stays.
                }
                (Some(_), None) => {
                    out.gap = Some(gap("no_seq", json!({})));
                }
            },
        }
        if t.kind == "DBIRTH" {
            if let Some(device) = t.device {
                self.aliases.born(
                    (key.clone(), Some(device.to_owned())),
                    ts_ms,
                    names(&decoded),
                );
            }
        }
        let Some(now) = now else {
            // Replayed: found before, and reported then.
            return Observed::default();
        };
        // A stale NDEATH (another session's) is reported, but is no reason for a rebirth. Data
        // of a node whose birth ferry has not seen (followed from the journal's newest records,
        // which did not hold its birth) is: its aliases are unknown.
        let resync = out
            .gap
            .as_ref()
            .is_some_and(|g| g["kind"] != "bd_seq_mismatch")
            || (!node.birth_seen && t.kind != "NDEATH");
        if resync {
            if let Some(period) = self.rebirth {
                if node
                    .rebirth_asked
                    .is_none_or(|at| now.duration_since(at) >= period)
                {
                    node.rebirth_asked = Some(now);
                    out.rebirth = Some((
                        format!("{NAMESPACE}{}/NCMD/{}", t.group, t.node),
                        encode::rebirth_request(crate::journal::now_ms()),
                    ));
                }
            }
        }
        out
    }
}

/// The value of the payload's metric named `name`, as an integer.
fn metric_value(decoded: &Value, name: &str) -> Option<u64> {
    decoded["metrics"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| {
            m["value"]
                .as_u64()
                .or_else(|| m["value"].as_i64().map(|v| v as u64))
        })
}

/// The `alias -> name` map a birth declares.
fn names(decoded: &Value) -> HashMap<u64, String> {
    decoded["metrics"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| Some((m["alias"].as_u64()?, m["name"].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
