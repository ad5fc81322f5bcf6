//! The agent's status: one snapshot ([`Status`]) read from its counters and its journal, served as
//! JSON (`GET /status`, the downlink's `status` command), as Prometheus text ([`metrics`]), and as
//! text for a person ([`status_text`]: `ferry status`, the console).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::clock::{Clock, ClockStatus};
use crate::journal::{Journal, Positions};
use crate::stats::{DownlinkState, Stats, UplinkState};

/// Everything `/status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub device_id: String,
    pub version: &'static str,
    pub uptime_s: u64,
    pub mqtt_connected: bool,
    /// Why the MQTT connection is down (cleared on connect).
    pub mqtt_last_error: Option<String>,
    pub journal_accepting: bool,
    #[serde(flatten)]
    pub positions: Positions,
    pub journal_disk_bytes: u64,
    /// Age in seconds of the oldest record not yet acknowledged by the cloud; `None` when nothing waits.
    pub oldest_unsent_age_s: Option<u64>,
    /// Estimated seconds to drain the backlog at the current drain rate (or the limit when idle);
    /// `None` while nothing drains.
    pub backlog_eta_s: Option<u64>,
    pub uplink: UplinkState,
    /// Absent without a `[downlink]` section.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downlink: Option<DownlinkState>,
    /// What this agent has written to storage since it started, to project an SD card's life.
    pub disk: DiskWrites,
    /// How long QoS1 messages waited for ferry's PUBACK since start: the group commit that makes
    /// them durable, and `journal.commit_wait`.
    pub puback_delay: crate::stats::Delays,
    /// Whether the wall clock is trusted, what the kernel says, jumps seen (`clock`).
    pub clock: ClockStatus,
    pub totals: Totals,
}

/// Bytes written to storage since start: the kernel's count for this process (`/proc/self/io`
/// `write_bytes`: the journal's appends, sled, the seq mark, config edits), and that count per
/// payload byte ingested. `None` where the kernel does not say, or before any payload.
#[derive(Debug, Clone, Serialize)]
pub struct DiskWrites {
    pub written_bytes: Option<u64>,
    pub written_per_payload_byte: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub ingested: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    pub parse_failed: u64,
    pub redeliveries: u64,
    pub qos0_dropped: u64,
    pub left_with_broker: u64,
    pub upload_failures: u64,
    pub journal_reopens: u64,
    /// Payload bytes taken into the journal.
    pub ingested_bytes: u64,
    /// Group commits (an append and a sync each): `ingested / journal_commits` is the average group.
    pub journal_commits: u64,
}

/// What a status is read from: the agent's counters and its journal. Cheap to clone.
#[derive(Clone)]
pub struct Source {
    pub device_id: String,
    pub journal: Journal,
    pub clock: Clock,
    pub stats: Arc<Stats>,
    pub started: Instant,
    /// [`written_bytes`] when this run started (a restart in place keeps the process).
    pub written_at_start: Option<u64>,
}

/// The bytes this process has caused to be written to storage (`/proc/self/io` `write_bytes`),
/// if the kernel says.
pub fn written_bytes() -> Option<u64> {
    written_bytes_of("self")
}

/// [`written_bytes`] of another entry of `/proc`: a process (`"1234"`), one of its threads
/// (`"1234/task/1240"`), or the calling thread (`"thread-self"`).
pub fn written_bytes_of(entry: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{entry}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Source {
    pub fn status(&self) -> Status {
        let s = &self.stats;
        let positions = self.journal.positions();
        let dropped_total = positions.dropped;
        let uplink = s.uplink();
        let rate = if uplink.drain_records_per_sec > 0.0 {
            Some(uplink.drain_records_per_sec)
        } else {
            uplink.limit_records_per_sec
        };
        let backlog_eta_s = match (positions.backlog_records, rate) {
            (0, _) => Some(0),
            (n, Some(r)) if r > 0.0 => Some((n as f64 / r).ceil() as u64),
            _ => None,
        };
        Status {
            device_id: self.device_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            mqtt_connected: s.mqtt_connected.load(std::sync::atomic::Ordering::Relaxed),
            mqtt_last_error: s.mqtt_error(),
            journal_accepting: s
                .journal_accepting
                .load(std::sync::atomic::Ordering::Relaxed),
            positions,
            journal_disk_bytes: self.journal.disk_bytes(),
            oldest_unsent_age_s: match self.journal.oldest_unsent() {
                Ok(Some(r)) => {
                    Some(crate::journal::now_ms().saturating_sub(self.clock.taken_at_ms(&r)) / 1000)
                }
                _ => None,
            },
            backlog_eta_s,
            disk: {
                let written = written_bytes()
                    .zip(self.written_at_start)
                    .map(|(now, start)| now.saturating_sub(start));
                let payload = Stats::get(&s.ingested_bytes);
                DiskWrites {
                    written_bytes: written,
                    written_per_payload_byte: written
                        .filter(|_| payload > 0)
                        .map(|w| w as f64 / payload as f64),
                }
            },
            puback_delay: s.puback_delay.read(),
            clock: self.clock.status(),
            uplink,
            downlink: s.downlink(),
            totals: Totals {
                ingested: Stats::get(&s.ingested),
                delivered: Stats::get(&s.delivered),
                dropped: dropped_total,
                dead_lettered: Stats::get(&s.dead_lettered),
                parse_failed: Stats::get(&s.parse_failed),
                redeliveries: Stats::get(&s.redeliveries),
                qos0_dropped: Stats::get(&s.qos0_dropped),
                left_with_broker: Stats::get(&s.left_with_broker),
                upload_failures: Stats::get(&s.upload_failures),
                journal_reopens: Stats::get(&s.journal_reopens),
                ingested_bytes: Stats::get(&s.ingested_bytes),
                journal_commits: Stats::get(&s.journal_commits),
            },
        }
    }
}

/// The bound of the bucket holding the `q` quantile (0..=1) of a histogram given as bucket
/// bounds and counts per bucket (`counts` may have one more entry, above the last bound, as
/// `/status` `puback_delay` has): the value is at most this. `None` without observations, or
/// when the quantile lies above the last bound. For readers of `/status` too (the bench).
pub fn quantile_at_most(bounds: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return bounds.get(i).copied();
        }
    }
    None
}

/// Prometheus text exposition of the status.
pub fn metrics(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP ferry_{name} {help}\n# TYPE ferry_{name} {kind}\nferry_{name} {value}\n"
        ));
    };
    let p = &s.positions;
    let t = &s.totals;
    metric("head_seq", "gauge", "Highest seq assigned.", p.head_seq);
    metric(
        "acked_seq",
        "gauge",
        "Highest seq acknowledged by the cloud (the cursor).",
        p.acked_seq,
    );
    metric(
        "backlog_records",
        "gauge",
        "Journal entries not yet acknowledged.",
        p.backlog_records,
    );
    metric(
        "backlog_bytes",
        "gauge",
        "Bytes of journal entries not yet acknowledged.",
        p.backlog_bytes,
    );
    metric(
        "dead_letters",
        "gauge",
        "Records in the dead-letter store.",
        p.dead_letters,
    );
    metric(
        "journal_disk_bytes",
        "gauge",
        "Bytes the journal takes on disk.",
        s.journal_disk_bytes,
    );
    metric(
        "mqtt_connected",
        "gauge",
        "1 while connected to the broker.",
        u64::from(s.mqtt_connected),
    );
    metric(
        "journal_accepting",
        "gauge",
        "1 while the journal accepts new records.",
        u64::from(s.journal_accepting),
    );
    metric(
        "clock_trusted",
        "gauge",
        "1 while the wall clock is trusted (synchronised, later than the build).",
        u64::from(s.clock.trusted),
    );
    metric(
        "clock_jumps_total",
        "counter",
        "Jumps of the wall clock against the monotonic clock, over 1 s, since start.",
        s.clock.jumps,
    );
    metric(
        "ingested_total",
        "counter",
        "Records journaled.",
        t.ingested,
    );
    metric(
        "ingested_bytes_total",
        "counter",
        "Payload bytes taken into the journal.",
        t.ingested_bytes,
    );
    metric(
        "journal_commits_total",
        "counter",
        "Group commits of the journal writer (an append and a sync each).",
        t.journal_commits,
    );
    if let Some(w) = s.disk.written_bytes {
        metric(
            "disk_written_bytes_total",
            "counter",
            "Bytes this agent wrote to storage since it started (/proc/self/io write_bytes).",
            w,
        );
    }
    metric(
        "delivered_total",
        "counter",
        "Records acknowledged by the cloud.",
        t.delivered,
    );
    metric(
        "dropped_total",
        "counter",
        "Records dropped by drop_oldest.",
        t.dropped,
    );
    metric(
        "expired_total",
        "counter",
        "Unsent records replaced by expired gaps (journal.max_age) since start.",
        p.expired,
    );
    metric(
        "dead_lettered_total",
        "counter",
        "Records refused by the cloud.",
        t.dead_lettered,
    );
    metric(
        "parse_failed_total",
        "counter",
        "Payloads that failed their parser.",
        t.parse_failed,
    );
    metric(
        "redeliveries_total",
        "counter",
        "Broker redeliveries not journaled twice.",
        t.redeliveries,
    );
    metric(
        "qos0_dropped_total",
        "counter",
        "QoS0 messages dropped under overload.",
        t.qos0_dropped,
    );
    metric(
        "left_with_broker_total",
        "counter",
        "QoS1 messages left with the broker while the journal was behind (taken again later).",
        t.left_with_broker,
    );
    metric(
        "upload_failures_total",
        "counter",
        "Failed upload attempts.",
        t.upload_failures,
    );
    metric(
        "journal_reopens_total",
        "counter",
        "Tries to reopen the journal after a failed write or sync (the disk is failing).",
        t.journal_reopens,
    );
    // The uplink state as an enum-style gauge: one series per state, 1 for the current one.
    out.push_str(
        "# HELP ferry_uplink_state What the uplink is doing.\n# TYPE ferry_uplink_state gauge\n",
    );
    for state in [
        "idle",
        "sending",
        "throttled",
        "backoff",
        "refused",
        "stopped",
    ] {
        let v = u64::from(s.uplink.state == state);
        out.push_str(&format!("ferry_uplink_state{{state=\"{state}\"}} {v}\n"));
    }
    let d = &s.puback_delay;
    out.push_str(
        "# HELP ferry_puback_delay_seconds From a QoS1 message's arrival to its PUBACK (after the commit that made it durable).\n\
         # TYPE ferry_puback_delay_seconds histogram\n",
    );
    let mut cumulative = 0;
    for (le, c) in d.le_ms.iter().zip(&d.counts) {
        cumulative += c;
        out.push_str(&format!(
            "ferry_puback_delay_seconds_bucket{{le=\"{}\"}} {cumulative}\n",
            *le as f64 / 1000.0
        ));
    }
    out.push_str(&format!(
        "ferry_puback_delay_seconds_bucket{{le=\"+Inf\"}} {}\nferry_puback_delay_seconds_sum {}\nferry_puback_delay_seconds_count {}\n",
        d.count,
        d.sum_ms / 1000.0,
        d.count
    ));
    out
}

/// The `/status` JSON rendered for a person (`ferry status`).
pub fn status_text(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return format!("{json}\n");
    };
    let n = |path: &[&str]| {
        let mut cur = &v;
        for p in path {
            cur = &cur[*p];
        }
        match cur {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    };
    let downlink = if v["downlink"].is_object() {
        format!(
            "downlink      {} (commands: {}, last error: {})\n",
            n(&["downlink", "state"]),
            n(&["downlink", "commands"]),
            n(&["downlink", "last_error"])
        )
    } else {
        String::new()
    };
    format!(
        "device        {}\nversion       {} (up {} s)\nmqtt          {}\njournal       head_seq={} acked_seq={} backlog={} records / {} bytes, {} bytes on disk{}\nuplink        {} (last error: {})\n{}dead letters  {}\ndisk writes   {} bytes since start, {} per payload byte ({} payload bytes in {} commits)\ntotals        ingested={} delivered={} dropped={} dead_lettered={} parse_failed={} redeliveries={}\n",
        n(&["device_id"]),
        n(&["version"]),
        n(&["uptime_s"]),
        if v["mqtt_connected"] == true {
            "connected"
        } else {
            "disconnected"
        },
        n(&["head_seq"]),
        n(&["acked_seq"]),
        n(&["backlog_records"]),
        n(&["backlog_bytes"]),
        n(&["journal_disk_bytes"]),
        if v["journal_accepting"] == false {
            ", NOT ACCEPTING (full or failing)"
        } else {
            ""
        },
        n(&["uplink", "state"]),
        n(&["uplink", "last_error"]),
        downlink,
        n(&["dead_letters"]),
        n(&["disk", "written_bytes"]),
        match v["disk"]["written_per_payload_byte"].as_f64() {
            Some(r) => format!("{r:.2}"),
            None => "-".to_owned(),
        },
        n(&["totals", "ingested_bytes"]),
        n(&["totals", "journal_commits"]),
        n(&["totals", "ingested"]),
        n(&["totals", "delivered"]),
        n(&["totals", "dropped"]),
        n(&["totals", "dead_lettered"]),
        n(&["totals", "parse_failed"]),
        n(&["totals", "redeliveries"]),
    )
}
