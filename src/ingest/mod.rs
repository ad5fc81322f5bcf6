//! Ingest: the local MQTT broker into the journal. The only module that names `rumqttc`.
//!
//! Two threads, so that a slow disk never stalls the MQTT connection (a stalled poll loop misses
//! keep-alives and the broker evicts the client):
//! - `mqtt` (`mqtt.rs`) owns the connection: polls it with a short timeout while messages wait for a commit
//!   (the writer cannot wake a thread blocked in rumqttc: from 1 ms, growing with the wait, see
//!   `MqttLoop::ack_poll`), re-subscribes on every CONNACK,
//!   backs off on errors, hands each PUBLISH to the writer in arrival order, and sends the PUBACKs
//!   for everything the writer reports durable, in the same order.
//! - `journal-writer` (`writer.rs`) appends whatever has queued up as one batch, syncs once (group
//!   commit) and then publishes the durable watermark.
//!
//! A QoS1 message is acknowledged to the broker only after it is durable in the journal, so a crash
//! at any point loses nothing the broker considers delivered: the session is persistent
//! (`clean_session = false`, stable client id) and the broker redelivers what was not acked. PUBACKs
//! are only ever sent on the connection the message arrived on (on a connection error rumqttc drops
//! the PUBACKs still in its request queue, and this thread stops acking that connection's
//! messages); after a reconnect the broker
//! redelivers with DUP and the journal recognises copies it already holds (see `journal`). It can
//! only among its newest QoS1 records, so the `mqtt` thread journals at most `PUBACK_WINDOW`
//! messages ahead of the PUBACKs written, whatever in-flight limit the broker keeps (or does not).
//!
//! Memory is bounded while the journal is behind (a slow or full disk): past `QUEUE_BYTES` of
//! payload or `OVERFLOW_MESSAGES` messages waiting for the writer, a QoS0 message is dropped and
//! counted, and a QoS1 message is left with the broker: not taken, not acknowledged, so the broker
//! keeps it. Once one is left, every later one on that connection is too (the journal keeps the
//! broker's order), and when everything taken is journaled and acknowledged the `mqtt` thread
//! disconnects cleanly and reconnects: MQTT 3.1.1 redelivers unacknowledged messages only on a new
//! connection. The broker's own queue limits then bound the backlog, as with any slow subscriber.
//!
//! The downlink's `publish` commands go out through a [`CommandPublisher`] (`publisher.rs`), a
//! connection of its own (see there for why).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info, trace, warn};
use rumqttc::{
    Client, Connection, ConnectionError, Event, Incoming, MqttOptions, Outgoing, Publish, QoS,
    SubscribeFilter,
};

use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::config::MqttConfig;
use crate::failpoint;
use crate::journal::{self, Journal, MqttDelivery, NewRecord, StoredFormat};
use crate::logging::Repeats;
use crate::payload;
use crate::shutdown::Shutdown;
use crate::sparkplug::Tracker;
use crate::stats::Stats;

mod mqtt;
mod publisher;
mod writer;

use mqtt::MqttLoop;

pub use publisher::{CommandPublisher, Publication};
use writer::run_writer;

/// Poll timeout of a connected session with nothing waiting for a commit: how quickly the loop
/// sees shutdown.
const POLL: Duration = Duration::from_millis(50);
/// Shortest poll timeout while taken messages wait for the writer's commit (the writer cannot
/// wake a thread blocked in rumqttc); see `MqttLoop::ack_poll`.
const ACK_POLL: Duration = Duration::from_millis(1);
/// rumqttc's deadline for TCP connect plus CONNACK, in seconds.
const CONNECT_TIMEOUT_SECS: u64 = 5;
/// Poll timeout while connecting. rumqttc's `recv_timeout` drops the whole poll, including a
/// connect in progress, so it must outlast the connect deadline; shutdown waits at most this long.
const CONNECT_POLL: Duration = Duration::from_secs(CONNECT_TIMEOUT_SECS + 1);
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// A repeated connection error is logged at most once per this period.
const REPEAT_LOG: Duration = Duration::from_secs(60);
/// How long the broker may take to close the connection after the DISCONNECT that retakes the
/// messages left with it.
const RETAKE_CLOSE: Duration = Duration::from_secs(5);
/// Largest group commit.
const MAX_GROUP: usize = 1000;
/// Payload bytes waiting for the journal beyond which new messages are not taken (see the module
/// header). The broker's in-flight window does not bound them: mosquitto 2.0.11 stops enforcing it
/// on a resumed session and sends everything it has queued for us.
const QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Messages in `overflow` beyond which new messages are not taken: bounds the per-message memory
/// when payloads are small (about 200 bytes each besides the payload). Failpoint
/// `ingest_overflow=N` lowers it for tests.
const OVERFLOW_MESSAGES: usize = 10_000;
/// Channel depth between the threads (QoS1 messages in it are at most `PUBACK_WINDOW`).
const CHANNEL: usize = 4096;
/// How long shutdown waits for the writer so that journaled messages can still be acked.
const ACK_DRAIN: Duration = Duration::from_millis(1500);
/// QoS1 messages handed to the journal writer and not yet PUBACKed on the wire (rumqttc reports each
/// PUBACK it writes), at most; past it, messages wait in `overflow`. After a crash the broker
/// redelivers everything it has in flight, and the journal recognises copies only among its newest
/// `journal::MAX_MARKS` QoS1 records, so that must cover whatever was journaled and not
/// acknowledged. The broker's `max_inflight_messages` does not bound it: mosquitto 2.0.11 stops
/// enforcing it on a resumed session once the session acks, and sends everything queued (measured);
/// rumqttc then writes one PUBACK per poll, behind the publishes it has already read, so PUBACKs fell
/// thousands of messages behind and a crash brought them all back, beyond the marks. The rest of
/// `MAX_MARKS` is for PUBACKs written but not yet read by the broker when the connection breaks
/// (mosquitto drops those on a reset; it reads 1,000 within a millisecond).
const PUBACK_WINDOW: usize = 256;
const _: () = assert!(PUBACK_WINDOW * 4 <= journal::MAX_MARKS);
/// Packets up to this size are read even when over `mqtt.max_packet_size`, so that an oversized
/// message is reported and acknowledged instead of breaking the connection on every redelivery.
const HARD_PACKET_CAP: u64 = 32 * 1024 * 1024;

struct Delivery {
    index: u64,
    record: NewRecord,
}

/// The two ingest threads.
pub struct Ingest {
    pub mqtt: JoinHandle<()>,
    pub writer: JoinHandle<()>,
}

/// Starts the `mqtt` and `journal-writer` threads; `commit_wait` is `journal.commit_wait`.
pub fn spawn(
    cfg: &MqttConfig,
    commit_wait: Duration,
    client_id: String,
    tracker: Tracker,
    shared: Parts,
) -> std::io::Result<Ingest> {
    let Parts {
        journal,
        clock,
        stats,
        shutdown,
    } = shared;
    let (tx, rx) = mpsc::sync_channel(CHANNEL);
    let shared = Shared {
        journal,
        clock,
        stats,
        shutdown,
        durable: Arc::new(AtomicU64::new(0)),
        queued: Arc::new(AtomicUsize::new(0)),
        window_full: Arc::new(AtomicBool::new(false)),
    };
    let writer = {
        let shared = shared.clone();
        thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || run_writer(rx, shared, commit_wait))?
    };
    let mqtt = {
        let cfg = cfg.clone();
        thread::Builder::new()
            .name("mqtt".into())
            .spawn(move || MqttLoop::new(cfg, commit_wait, client_id, tx, shared, tracker).run())?
    };
    Ok(Ingest { mqtt, writer })
}

/// What the ingest threads take from the agent.
pub struct Parts {
    pub journal: Journal,
    /// Stamps each message with the time it arrived (`clock`).
    pub clock: Clock,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
}

/// What the two ingest threads share.
#[derive(Clone)]
struct Shared {
    journal: Journal,
    /// Stamps each message with the time it arrived (`clock`).
    clock: Clock,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    /// Arrival index of the last message the writer made durable.
    durable: Arc<AtomicU64>,
    /// Payload bytes taken from the broker and not journaled yet (in the MQTT thread's queue, the
    /// channel, the writer's group). QoS0 messages are dropped past `QOS0_QUEUE_BYTES`.
    queued: Arc<AtomicUsize>,
    /// The `mqtt` thread holds messages back because `PUBACK_WINDOW` is full: nothing more comes
    /// until the writer commits, so a writer waiting to fill its group (`journal.commit_wait`)
    /// commits at once.
    window_full: Arc<AtomicBool>,
}

/// Broker address and credentials from `cfg`, for a connection with `client_id` (the agent's own,
/// or a distinct one for the console's probe and the downlink's commands).
fn options(cfg: &MqttConfig, client_id: String) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    if let Some(user) = &cfg.username {
        let pass = cfg
            .password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default();
        opts.set_credentials(user.clone(), pass);
    }
    opts
}

/// A client and its connection, with ferry's connect deadline.
fn client(opts: MqttOptions, capacity: usize) -> (Client, rumqttc::Connection) {
    let (client, mut connection) = Client::new(opts, capacity);
    connection
        .eventloop
        .network_options
        .set_connection_timeout(CONNECT_TIMEOUT_SECS);
    (client, connection)
}

/// Connects to the broker once with a clean session and the client id `probe_client_id`, which must
/// differ from the agent's own (the broker would otherwise drop the agent's session), and disconnects
/// (the console's `test mqtt`). Returns the time to CONNACK, or what went wrong in plain words.
pub fn probe(cfg: &MqttConfig, probe_client_id: &str) -> Result<Duration, String> {
    let mut opts = options(cfg, probe_client_id.to_owned());
    opts.set_keep_alive(cfg.keep_alive).set_clean_session(true);
    let (client, mut connection) = client(opts, 8);
    let started = Instant::now();
    let outcome = match connection.recv_timeout(CONNECT_POLL) {
        Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => Ok(started.elapsed()),
        Ok(Ok(other)) => Err(format!(
            "unexpected first answer from the broker: {other:?}"
        )),
        Ok(Err(e)) => Err(probe_words(&e)),
        Err(_) => Err(format!(
            "timed out after {CONNECT_POLL:?} without a CONNACK"
        )),
    };
    if outcome.is_ok() && client.try_disconnect().is_ok() {
        // Let the DISCONNECT go out; the broker forgets the clean session either way.
        let _ = connection.recv_timeout(POLL);
    }
    outcome
}

/// An MQTT connect failure in plain words.
fn probe_words(e: &ConnectionError) -> String {
    use rumqttc::ConnectReturnCode as Code;
    match e {
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is mosquitto running on that host and port?)".to_owned()
        }
        ConnectionError::Io(io) => format!("cannot connect: {io}"),
        ConnectionError::NetworkTimeout => "timed out connecting".to_owned(),
        ConnectionError::ConnectionRefused(Code::BadUserNamePassword) => {
            "the broker refused: bad username or password (mqtt.username, mqtt.password)".to_owned()
        }
        ConnectionError::ConnectionRefused(Code::NotAuthorized) => {
            "the broker refused: not authorized".to_owned()
        }
        ConnectionError::ConnectionRefused(code) => format!("the broker refused: {code:?}"),
        other => other.to_string(),
    }
}

fn read_limit(max_packet_size: u64) -> usize {
    max_packet_size.max(HARD_PACKET_CAP) as usize
}
