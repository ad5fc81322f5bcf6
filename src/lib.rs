//! ferry: durable store-and-forward of MQTT telemetry from an edge gateway to the cloud.
//!
//! # Data flow
//! ```text
//!  mosquitto ──► [mqtt] ──channel──► [journal-writer] ──► Journal (log, fsync) ──► [uplink] ──► HTTP cloud
//!                  ▲                        │                                          │
//!                  └──── PUBACK after ──────┘ durable watermark          cursor moves on 2xx
//!                                                        [control] ◄── GET /status, /metrics
//!  mosquitto ◄── publish ── [downlink] ◄══ WebSocket ══ cloud: commands (publish, status,
//!                                                       set_config, replay_from) and results
//! ```
//! - `ingest` owns the MQTT connection (`rumqttc`): the `mqtt` thread polls it and never blocks on
//!   the disk; the `journal-writer` thread group-commits messages to the journal.
//! - `journal` owns the record log (append-only segment files: records and gaps by seq) and the
//!   sled database of its small state (the cursor, dead letters, redelivery marks, command
//!   results). Every other module holds a clonable `Journal` handle.
//! - `uplink` owns the HTTP agent (`ureq`): batches in seq order from the cursor, two in flight on
//!   their own connections while the cloud acknowledges (its post threads encode and send them),
//!   answers handled in seq order.
//! - `downlink` owns the WebSocket (`tungstenite`) the agent keeps open to the cloud and runs its
//!   commands; command results and the audited rewind of the cursor live in the journal.
//! - `sparkplug` decodes Sparkplug B payloads for the upload and follows each edge node's `seq`
//!   and `bdSeq` in the `mqtt` thread, journaling an upstream gap where one shows.
//! - `clock` decides whether the wall clock is trusted (the kernel's NTP status, the build time),
//!   stamps records with the monotonic clock while it is not, and corrects their time at upload;
//!   its thread also expires records older than `journal.max_age`.
//! - `tls` holds the one rustls crypto provider and the `[tls]` material of both links.
//! - `operator` carries out the operator's commands (status, apply or set config, restart,
//!   publish, replay_from, a new identity) for the three ways they arrive: `control` (the HTTP
//!   endpoint, which also serves `status`), `console` and `downlink`. `status` is the one snapshot
//!   they all show. `agent` wires the threads and runs shutdown, and tells systemd (`notify`) when
//!   it is ready, healthy and stopping.
//! - `console` serves a configuration shell on a serial line (`[console] device`, or `ferry
//!   console`): edits the config file atomically and asks the agent to apply it.
//! - The receiver (`ferry-cloud`) is a crate of its own (`crates/cloud`), sharing only the
//!   `protocol`, `tls` and util crates with the agent; the journal is one too (`crates/journal`).
//!
//! # Durability contract
//! A QoS1 message is PUBACKed to the broker only after the journal batch holding it is fsynced, so
//! nothing the broker considers delivered can be lost by a crash or a power cut. Every record gets
//! a seq once, strictly increasing and never reused; only durable records are uploaded, and the
//! cursor moves only after the cloud answered 2xx for every batch up to it. Every seq ends up either delivered or reported
//! as a gap (`journal_full`, `rejected`, `journal_lost`, `expired`), so nothing is skipped silently; a record
//! may be sent twice after a crash, and the cloud deduplicates by `(device_id, seq)`.

// The walls the compiler keeps: the journal (the only crate that depends on sled), the protocol
// types the center shares, and the small shared helpers are crates of their own (`crates/`),
// re-exported here under their old paths.
pub use ferry_journal as journal;
pub use ferry_protocol as protocol;
pub use ferry_tls as tls;
pub use ferry_util::rng;

pub mod agent;
pub(crate) mod atomic_file;
pub(crate) mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod control;
pub(crate) mod dns;
pub(crate) mod downlink;
pub(crate) mod failpoint;
pub(crate) mod identity;
pub(crate) mod ingest;
pub mod logging;
pub(crate) mod notify;
pub(crate) mod operator;
pub(crate) mod payload;
pub(crate) mod reload;
pub(crate) mod shutdown;
pub mod sparkplug;
pub(crate) mod stats;
pub mod status;
pub(crate) mod uplink;

pub use ferry_util::error_chain;

/// The parsers of outside bytes that `tests/fuzz.rs` feeds garbage, from modules that are
/// otherwise private: the deliberate test surface, not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Payload classification (`payload`).
    pub mod payload {
        pub use crate::payload::{classify, is_json, is_sparkplug, topic_matches};
    }
    /// The uplink's encoding and its reading of the cloud's answers (`uplink`).
    pub mod uplink {
        pub use crate::uplink::{
            Annotator, Answer, MAX_RESPONSE_BODY, MAX_RETRY_AFTER, Upload, Verdict, describe,
            encode_body, http_agent, parse_retry_after, post, verdict,
        };
    }
    /// The downlink's command frames (`downlink::command`).
    pub mod downlink_command {
        pub use crate::downlink::command::{Parsed, parse, result};
    }
}
