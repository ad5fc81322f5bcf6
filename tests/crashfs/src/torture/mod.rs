//! The power-cut torture run (`ferry-torture`).
//!
//! mosquitto and `ferry-cloud` run on the normal disk; ferry's journal lives on the crash-test
//! filesystem. A publisher sends numbered QoS1 messages throughout. A power cut is: `cut` (the
//! filesystem drops everything not synced, optionally keeping a random prefix or tearing a
//! write, and fails every request from then on), SIGKILL ferry, `remount`, start ferry again.
//! The moment of each cut is drawn from a few strategies aimed at the journal's crash windows:
//! a random delay, right after an fsync, right after the cursor moved (ack + trim), while a
//! compaction creates its new database or swaps the `db` link, and during startup and recovery.
//!
//! Each cut is also of one of four kinds, drawn per cut (the first four cuts of a campaign take
//! each kind once, in a random order), so that the failures real disks have besides a clean cut
//! are in every campaign:
//! - `cut`: power off and SIGKILL at the same instant.
//! - `crash-then-cut`: first a crash with the power on (SIGKILL: the page cache keeps what ferry
//!   wrote and did not sync), ferry restarted on that still volatile data and left to run (it
//!   uploads, PUBACKs the broker's redeliveries), and only then the cut.
//! - `eio`: an `fsync`/`fdatasync` of a journal file (a log segment or sled's) fails with EIO as
//!   on Linux: its unsynced data dropped though reads still show it, the error reported once to
//!   every descriptor open at the time; ferry runs on, then the cut.
//! - `overlap`: every sync takes its own random time up to 300 ms, so that syncs from several
//!   threads overlap and end out of order; then the cut.
//!
//! Checked, and counted in the tally (the last line printed):
//! - every message the broker PUBACKed to the publisher is at the cloud (`lost`), under one seq
//!   only (`duplicates`, after the cloud's dedupe by seq);
//! - the journal always opened: ferry came up after every cut (`journal_reopen_failures`), never
//!   quarantined a database (`db.corrupt-*`) nor reported a `journal_lost` gap (`journal_lost`).
//!   One exception, counted apart (`databases_adopted`): after an injected EIO and a cut before
//!   the repair, sled's file misses what the failed sync dropped and sled may refuse it; the
//!   journal moves it aside and adopts the log, and the other counts must still be zero;
//! - `seq` never went backwards: after a restart `head_seq` is at least the `durable_seq` seen
//!   before the cut (`seq_regressions`), and the cloud never saw one seq with two contents
//!   (`clashes`).
//!
//! Scenario `slow-fsync`: every fsync takes 2 s; the broker must keep ferry's session (one
//! `mqtt connected`, no disconnect in ferry's or mosquitto's log) and nothing is lost.
//!
//! Scenarios `crash-then-cut`, `eio` and `overlap` are the regression tests, through the real
//! binaries, of three holes the journal had; each runs five rounds aimed at its window and must
//! lose nothing:
//! - `crash-then-cut`: ferry's writer waits 400 ms between writing a group and syncing it
//!   (failpoint `slow_sync_ms`); SIGKILL in that wait, so that the page cache holds frames no
//!   sync covered; restart with a 5 s wait there, so that the restarted writer syncs nothing
//!   soon; wait until the restarted ferry has uploaded everything it read; cut. A ferry that
//!   counted what it read as durable uploads frames the cut then takes (seqs reused: clashes,
//!   and the messages sent again under them refused).
//! - `eio`: the next fdatasync of a log segment fails (its unsynced data dropped); wait until
//!   ferry's durable head passes the failed group; cut. A ferry that retried the sync (Linux
//!   answers 0 the second time) PUBACKs a group the cut then takes.
//!
//! - `overlap`: every fdatasync of a log segment takes 1.5 s (sled's none); cut 300 ms after the
//!   uplink's ack freed a segment. A sync that returned while another's fdatasync covering its
//!   data still ran (the uplink's, beside the writer's) let the uplink send records the cut then
//!   takes (seqs reused: clashes).
//!
//! Usage: `ferry-torture [--cuts N] [--seed S]
//! [--scenario cuts|slow-fsync|crash-then-cut|eio|overlap] [--rate MSG_PER_S] [--keep]`. The seed is printed first; `--seed` repeats a run's choices (the timing of the
//! processes themselves still varies). The work directory is kept on failure (or with `--keep`).
//!
//! Why one file of this length: the campaign and the scenarios share the stack (crashfs, broker,
//! cloud, agent) and the checks of what came back; the processes are in `procs.rs`, the publisher
//! in `publisher.rs`.

mod peer;
mod procs;
mod publisher;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::Rng;
use procs::{Cloud, CrashFsProc, Ferry, Mosquitto, free_port, mosquitto, wait_until};
use publisher::Publisher;

const DEVICE: &str = "torture";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Cuts,
    SlowFsync,
    CrashThenCut,
    Eio,
    Overlap,
    /// `--peer mosquitto-bridge`: the peer's run (`peer.rs`), reported, not judged.
    PeerBridge,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub cuts: u64,
    pub seed: u64,
    pub scenario: Scenario,
    pub rate: u64,
    pub keep: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            cuts: 50,
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
            scenario: Scenario::Cuts,
            rate: 200,
            keep: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut num = |what: &str| -> Result<u64, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{what} needs a number"))
            };
            match a.as_str() {
                "--cuts" => o.cuts = num("--cuts")?,
                "--seed" => o.seed = num("--seed")?,
                "--rate" => o.rate = num("--rate")?.max(1),
                "--keep" => o.keep = true,
                "--peer" => match it.next().map(String::as_str) {
                    Some("mosquitto-bridge") => o.scenario = Scenario::PeerBridge,
                    other => return Err(format!("--peer {other:?}: mosquitto-bridge")),
                },
                "--scenario" => {
                    o.scenario = match it.next().map(String::as_str) {
                        Some("cuts") => Scenario::Cuts,
                        Some("slow-fsync") => Scenario::SlowFsync,
                        Some("crash-then-cut") => Scenario::CrashThenCut,
                        Some("eio") => Scenario::Eio,
                        Some("overlap") => Scenario::Overlap,
                        other => {
                            return Err(format!(
                                "--scenario {other:?}: cuts, slow-fsync, crash-then-cut, eio or overlap"
                            ));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unexpected argument {other:?}; usage: ferry-torture [--cuts N] [--seed S] \
                         [--scenario cuts|slow-fsync|crash-then-cut|eio|overlap] [--peer mosquitto-bridge] \
                         [--rate MSG_PER_S] [--keep]"
                    ));
                }
            }
        }
        Ok(o)
    }
}

/// The peer's run: its tally line; `false` only when the run itself failed (not for the peer's
/// losses, which are what it measures).
fn run_peer(opts: &Options) -> bool {
    println!(
        "torture: peer mosquitto-bridge seed={} cycles={} (a cut during an uplink outage each)",
        opts.seed, opts.cuts
    );
    let work = std::env::temp_dir().join(format!("ferry-torture-peer-{}", std::process::id()));
    let result = std::fs::create_dir_all(&work)
        .map_err(|e| format!("{}: {e}", work.display()))
        .and_then(|()| peer::run(opts.cuts, opts.seed, opts.rate, &work));
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    match result {
        Ok(t) => {
            println!(
                "torture: peer=mosquitto-bridge cuts={} acked={} delivered={} lost={} cycles_losing={} \
                 (mosquitto writes its persistence at autosave and exit only; reported, not judged)",
                t.cuts, t.acked, t.delivered, t.lost, t.cycles_losing
            );
            true
        }
        Err(e) => {
            println!("torture: peer run failed: {e}");
            false
        }
    }
}

/// What a run counted. `passed` is the verdict.
#[derive(Debug, Default)]
pub struct Tally {
    pub cuts: u64,
    pub published: u64,
    pub acked: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub journal_reopen_failures: u64,
    /// Databases sled refused after an injected EIO on a journal file and a cut before the
    /// repair, moved aside, their log adopted (not a failure: what matters is counted in
    /// `lost`, `journal_lost` and `clashes`). The same after any other cut is a failure.
    pub databases_adopted: u64,
    pub journal_lost: u64,
    pub seq_regressions: u64,
    pub clashes: u64,
    pub other_gaps: u64,
    pub session_drops: u64,
    /// Crashes with the power on (`crash-then-cut`), fsync failures injected (`eio`), and the
    /// most syncs seen in flight at once.
    pub crashes: u64,
    /// ferry stopped by itself (a panic, an exit) before the torture killed it.
    pub agent_exits: u64,
    pub eio_injected: u64,
    pub max_fsyncs_in_flight: u64,
    /// The most fsyncs of one file in flight at once (ferry syncs each file from one thread at a
    /// time), and which file.
    pub max_fsyncs_in_flight_one_file: u64,
    pub one_file_path: Option<String>,
    /// Failures that are no count (a process that would not start, a deadline).
    pub errors: Vec<String>,
    pub by_strategy: BTreeMap<&'static str, u64>,
    pub by_kind: BTreeMap<&'static str, u64>,
}

impl Tally {
    pub fn passed(&self) -> bool {
        self.errors.is_empty()
            && self.lost == 0
            && self.duplicates == 0
            && self.journal_reopen_failures == 0
            && self.journal_lost == 0
            && self.seq_regressions == 0
            && self.clashes == 0
            && self.other_gaps == 0
            && self.session_drops == 0
            && self.agent_exits == 0
    }

    pub fn line(&self, seed: u64) -> String {
        format!(
            "torture: cuts={} published={} acked={} delivered={} lost={} duplicates={} \
             journal_reopen_failures={} databases_adopted={} journal_lost={} seq_regressions={} clashes={} other_gaps={} \
             session_drops={} crashes={} agent_exits={} eio_injected={} max_fsyncs_in_flight={} \
             max_fsyncs_in_flight_one_file={}{} seed={} result={}",
            self.cuts,
            self.published,
            self.acked,
            self.delivered,
            self.lost,
            self.duplicates,
            self.journal_reopen_failures,
            self.databases_adopted,
            self.journal_lost,
            self.seq_regressions,
            self.clashes,
            self.other_gaps,
            self.session_drops,
            self.crashes,
            self.agent_exits,
            self.eio_injected,
            self.max_fsyncs_in_flight,
            self.max_fsyncs_in_flight_one_file,
            match (&self.one_file_path, self.max_fsyncs_in_flight_one_file > 1) {
                (Some(p), true) => format!(" ({p})"),
                _ => String::new(),
            },
            seed,
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// Runs the scenario; prints progress, and the tally as the last line. Returns whether it passed.
pub fn run(opts: &Options) -> bool {
    match opts.scenario {
        Scenario::Cuts => println!(
            "torture: seed={} cuts={} (--seed {} repeats the choices)",
            opts.seed, opts.cuts, opts.seed
        ),
        Scenario::SlowFsync => println!("torture: scenario slow-fsync"),
        Scenario::CrashThenCut => println!("torture: scenario crash-then-cut"),
        Scenario::Eio => println!("torture: scenario eio"),
        Scenario::Overlap => println!("torture: scenario overlap"),
        Scenario::PeerBridge => return run_peer(opts),
    }
    let work = std::env::temp_dir().join(format!(
        "ferry-torture-{}-{}",
        opts.seed,
        std::process::id()
    ));
    let mut tally = Tally::default();
    let result = std::fs::create_dir_all(&work)
        .map_err(|e| format!("{}: {e}", work.display()))
        .and_then(|()| match opts.scenario {
            Scenario::Cuts => run_cuts(opts, &work, &mut tally),
            Scenario::SlowFsync => run_slow_fsync(&work, &mut tally),
            Scenario::CrashThenCut => run_rounds(&work, &mut tally, Round::CrashThenCut),
            Scenario::Eio => run_rounds(&work, &mut tally, Round::Eio),
            Scenario::Overlap => run_rounds(&work, &mut tally, Round::Overlap),
            Scenario::PeerBridge => Ok(()),
        });
    if let Err(e) = result {
        tally.errors.push(e);
    }
    for e in &tally.errors {
        println!("torture: ERROR {e}");
    }
    if !tally.by_strategy.is_empty() {
        println!("torture: cut moments {:?}", tally.by_strategy);
    }
    if !tally.by_kind.is_empty() {
        println!("torture: cut kinds {:?}", tally.by_kind);
    }
    let passed = tally.passed();
    if passed && !opts.keep {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("torture: work directory kept: {}", work.display());
    }
    println!("{}", tally.line(opts.seed));
    passed
}

fn ferry_config(
    fs: &CrashFsProc,
    broker: &Mosquitto,
    cloud: &Cloud,
    control: u16,
    extra_mqtt: &str,
) -> String {
    // A small journal so that trims and compactions happen every few seconds.
    format!(
        r#"[device]
id = "{DEVICE}"

[mqtt]
host = "127.0.0.1"
port = {mqtt}
topics = ["sensors/#"]
max_backoff = "200ms"
{extra_mqtt}

[journal]
dir = "{journal}"
max_bytes = "4MiB"
cache_bytes = "4MiB"

[uplink]
url = "{url}"
batch_max_records = 100
max_backoff = "200ms"
connect_timeout = "2s"
request_timeout = "5s"

[control]
listen = "127.0.0.1:{control}"

[clock]
require_sync = false
"#,
        mqtt = broker.port,
        journal = fs.mountpoint.join("journal").display(),
        url = cloud.url(),
    )
}

/// How the moment of a cut is chosen.
const STRATEGIES: [&str; 5] = [
    "random",
    "after-fsync",
    "after-ack",
    "compaction",
    "startup",
];

fn run_cuts(opts: &Options, work: &Path, tally: &mut Tally) -> Result<(), String> {
    let mut rng = Rng::new(opts.seed);
    let mut fs = CrashFsProc::start(work)?;
    let broker = mosquitto(&work.join("mqtt"), 20)?;
    let cloud = Cloud::start(&work.join("cloud"))?;
    let control = free_port()?;
    let mut ferry = Ferry::new(
        &work.join("agent"),
        &ferry_config(&fs, &broker, &cloud, control, ""),
        control,
    )?;
    ferry.start()?;
    wait_until(
        "ferry's first MQTT connection",
        Duration::from_secs(20),
        || ferry.status().is_ok_and(|s| s["mqtt_connected"] == true),
    )?;
    let publisher = Publisher::start(broker.port, opts.rate, None, rng.next_u64())?;
    let started = Instant::now();
    let mut max_durable = 0u64;
    let mut log_seen = 0usize;

    // Each kind once among the first cuts, in a random order; then drawn per cut.
    let mut first_kinds = KINDS.to_vec();
    for i in (1..first_kinds.len()).rev() {
        first_kinds.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for i in 0..opts.cuts {
        if let Some(e) = publisher.error() {
            return Err(e);
        }
        let kind = match first_kinds.get(i as usize) {
            Some(k) => *k,
            None => KINDS[rng.below(KINDS.len() as u64) as usize],
        };
        *tally.by_kind.entry(kind).or_default() += 1;
        let strategy = STRATEGIES[rng.below(STRATEGIES.len() as u64) as usize];
        *tally.by_strategy.entry(strategy).or_default() += 1;
        let what = format!("cut {} ({kind}, {strategy})", i + 1);
        let eio_before = counter(&fs, "/eio_injected");
        prepare(kind, &mut ferry, &fs, &mut rng, &mut max_durable, tally)
            .map_err(|e| format!("{what}: {e}"))?;
        aim(strategy, &ferry, &fs, &mut rng, &mut max_durable)?;
        let cut = match rng.below(4) {
            0 | 1 => "cut".to_string(),
            2 => format!("cut --keep-prefix-seed {}", rng.next_u64()),
            _ => format!("cut --tear-seed {}", rng.next_u64()),
        };
        ferry.failpoint = None;
        let eio = counter(&fs, "/eio_injected") > eio_before;
        let status = power_cut(&mut ferry, &fs, work, &cut, &what, max_durable, tally)?;
        let log = ferry.log_text();
        check_log(log.get(log_seen..).unwrap_or(""), &what, eio, tally);
        log_seen = log.len();
        if (i + 1) % 10 == 0 || i + 1 == opts.cuts {
            println!(
                "torture: {} cuts in {:.0?} published={} acked={} head_seq={} acked_seq={}",
                i + 1,
                started.elapsed(),
                publisher.sent(),
                publisher.acked(),
                status["head_seq"],
                status["acked_seq"]
            );
        }
        if !tally.passed() && !tally.errors.is_empty() {
            break;
        }
    }
    let quarantined = std::fs::read_dir(fs.mountpoint.join("journal"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("db.corrupt-"))
                .count()
        })
        .unwrap_or(0);
    // Cross-check of the log: every database that would not open was moved aside.
    tally.journal_reopen_failures = tally
        .journal_reopen_failures
        .max((quarantined as u64).saturating_sub(tally.databases_adopted));
    let lost_in_log = tally.journal_lost;

    let published = publisher.finish()?;
    tally.published = published.sent;
    tally.acked = published.acked.len() as u64;
    check_delivery(&cloud, &published.acked, tally)?;
    tally.journal_lost = tally.journal_lost.max(lost_in_log);
    note_fs(&fs, tally);
    if !tally.passed() {
        dump(&fs, work);
    }
    ferry.stop()?;
    fs.quit()
}

/// The kinds of cut (see the module header).
const KINDS: [&str; 4] = ["cut", "crash-then-cut", "eio", "overlap"];

/// What happens before the moment of the cut, by kind: a crash and a restart on volatile data,
/// an fsync that fails, or slow overlapping syncs.
fn prepare(
    kind: &str,
    ferry: &mut Ferry,
    fs: &CrashFsProc,
    rng: &mut Rng,
    max_durable: &mut u64,
    tally: &mut Tally,
) -> Result<(), String> {
    let run_for = |ferry: &Ferry, ms: u64, max_durable: &mut u64| {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            note_durable(ferry, max_durable);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    match kind {
        "crash-then-cut" => {
            // The crash: at a random moment, or while a sync is in flight.
            if rng.below(2) == 0 {
                fs.send("slow-fsync 300")?;
                let _ = wait_until("a sync in flight", Duration::from_secs(3), || {
                    counter(fs, "/fsyncs_in_flight") > 0
                });
            } else {
                run_for(ferry, rng.below(1000), max_durable);
            }
            note_durable(ferry, max_durable);
            note_exit(ferry.kill(), "before a crash", tally);
            tally.crashes += 1;
            fs.send("slow-fsync 0")?;
            // Half the time the restarted writer's first sync comes a second late, so that the
            // cut may fall before it: the window where frames read back are not synced yet.
            if rng.below(2) == 0 {
                ferry.failpoint = Some("slow_sync_ms=1000".into());
            }
            ferry.start().map_err(|e| {
                tally.journal_reopen_failures += 1;
                format!("restart after the crash: {e}")
            })?;
            // Let it run on what it read: uploads, PUBACKs of the broker's redeliveries.
            run_for(ferry, 200 + rng.below(1500), max_durable);
        }
        "eio" => {
            // A log segment's or one of sled's (its `db`, `conf`, blobs): every fsync of those
            // is ferry's own now that sled runs without its flusher thread.
            let pattern = ["journal/log/", "journal/db-", "journal/"][rng.below(3) as usize];
            let before = counter(fs, "/eio_injected");
            fs.send(&format!("fail-fsync {pattern} --nth {}", 1 + rng.below(3)))?;
            let _ = wait_until("the injected EIO", Duration::from_secs(3), || {
                counter(fs, "/eio_injected") > before
            });
            run_for(ferry, rng.below(2500), max_durable);
        }
        "overlap" => {
            fs.send(&format!("slow-fsync 300 --jitter {}", rng.next_u64()))?;
            run_for(ferry, rng.below(1500), max_durable);
        }
        _ => {}
    }
    Ok(())
}

/// A counter of the filesystem's `stats` (0 when it cannot be read).
fn counter(fs: &CrashFsProc, name: &str) -> u64 {
    fs.stats()
        .map(|s| s.pointer(name).and_then(|v| v.as_u64()).unwrap_or(0))
        .unwrap_or(0)
}

fn note_durable(ferry: &Ferry, max_durable: &mut u64) {
    if let Ok(s) = ferry.status() {
        *max_durable = (*max_durable).max(s["durable_seq"].as_u64().unwrap_or(0));
    }
}

/// The filesystem's counters of a run, into the tally.
fn note_fs(fs: &CrashFsProc, tally: &mut Tally) {
    tally.eio_injected = counter(fs, "/eio_injected");
    tally.max_fsyncs_in_flight = counter(fs, "/max_fsyncs_in_flight");
    tally.max_fsyncs_in_flight_one_file = counter(fs, "/max_fsyncs_in_flight_one_file");
    tally.one_file_path = fs.stats().ok().and_then(|s| {
        s.pointer("/max_fsyncs_in_flight_one_file_path")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    });
}

/// The power cut: `cut` (a `cut ...` command), SIGKILL ferry, remount with every fault cleared,
/// start ferry again and check that its head did not go below `max_durable`. Returns its status.
fn power_cut(
    ferry: &mut Ferry,
    fs: &CrashFsProc,
    work: &Path,
    cut: &str,
    what: &str,
    max_durable: u64,
    tally: &mut Tally,
) -> Result<serde_json::Value, String> {
    fs.send(cut)?;
    note_exit(ferry.kill(), what, tally);
    fs.send("remount")?;
    fs.send("fail-fsync --clear")?;
    fs.send("slow-fsync 0")?;
    tally.cuts += 1;
    if let Err(e) = ferry.start() {
        tally.journal_reopen_failures += 1;
        dump(fs, work);
        return Err(format!("after {what}, {cut}: {e}"));
    }
    // The journal opened; check what it holds.
    let status = wait_status(ferry)?;
    let head = status["head_seq"].as_u64().unwrap_or(0);
    if head < max_durable {
        tally.seq_regressions += 1;
        println!(
            "torture: {what}, {cut}: head_seq={head} after restart, but durable_seq={max_durable} was seen before"
        );
    }
    Ok(status)
}

/// Counts a ferry that had ended by itself before the torture killed it.
fn note_exit(gone: Option<std::process::ExitStatus>, what: &str, tally: &mut Tally) {
    if let Some(status) = gone {
        tally.agent_exits += 1;
        println!("torture: {what}: ferry had stopped by itself ({status}); see its log");
    }
}

/// What ferry said while opening its journal again: lost records, a journal that would not open.
/// After a cut that followed an injected EIO (`eio`), sled's file may miss what the failed sync
/// dropped: a database refused then, moved aside and its log adopted, is counted apart.
fn check_log(new: &str, what: &str, eio: bool, tally: &mut Tally) {
    if new.contains("journal lost records") || new.contains("journal_lost") {
        tally.journal_lost += 1;
        println!("torture: {what}: ferry reported lost records");
    }
    if new.contains("would not open") {
        if eio && new.contains("adopted it") {
            tally.databases_adopted += 1;
            println!(
                "torture: {what}: the database would not open after the EIO; its log was adopted"
            );
        } else {
            tally.journal_reopen_failures += 1;
            println!("torture: {what}: the journal would not open");
        }
    }
}

/// The crash-then-cut scenario's ferry waits this long between writing a group and syncing it.
const CRASH_WINDOW: &str = "slow_sync_ms=400";

/// The rounds of the `crash-then-cut` and `eio` scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    CrashThenCut,
    Eio,
    Overlap,
}

/// Five rounds of `round` (see the module header) under a steady publisher, then the delivery
/// check.
fn run_rounds(work: &Path, tally: &mut Tally, round: Round) -> Result<(), String> {
    const ROUNDS: u64 = 5;
    let mut fs = CrashFsProc::start(work)?;
    // Overlap: a wide in-flight window, so that segments fill (and are freed) in seconds even
    // though every log sync takes 1.5 s.
    let (inflight, rate) = match round {
        Round::Overlap => (400, 400),
        _ => (20, 200),
    };
    let broker = mosquitto(&work.join("mqtt"), inflight)?;
    let cloud = Cloud::start(&work.join("cloud"))?;
    let control = free_port()?;
    let mut ferry = Ferry::new(
        &work.join("agent"),
        &ferry_config(&fs, &broker, &cloud, control, ""),
        control,
    )?;
    if round == Round::CrashThenCut {
        ferry.failpoint = Some(CRASH_WINDOW.into());
    }
    ferry.start()?;
    wait_until("ferry's MQTT connection", Duration::from_secs(20), || {
        ferry.status().is_ok_and(|s| s["mqtt_connected"] == true)
    })?;
    let publisher = Publisher::start(broker.port, rate, None, 11)?;
    let mut max_durable = 0;
    let mut log_seen = 0;
    let status_of = |ferry: &Ferry, field: &str| {
        ferry
            .status()
            .map(|s| s[field].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    for r in 1..=ROUNDS {
        if let Some(e) = publisher.error() {
            return Err(e);
        }
        let what = format!("{round:?} round {r}");
        match round {
            Round::CrashThenCut => {
                // Crash between a group's write and its sync: frames no sync covered.
                wait_until(
                    "frames written and not synced",
                    Duration::from_secs(10),
                    || {
                        ferry.status().is_ok_and(|s| {
                            s["head_seq"].as_u64().unwrap_or(0)
                                > s["durable_seq"].as_u64().unwrap_or(0)
                        })
                    },
                )?;
                note_durable(&ferry, &mut max_durable);
                note_exit(ferry.kill(), "before a crash", tally);
                tally.crashes += 1;
                // The restarted writer's first sync comes late: the cut comes before it.
                ferry.failpoint = Some("slow_sync_ms=5000".into());
                ferry.start()?;
                ferry.failpoint = Some(CRASH_WINDOW.into());
                // The restarted ferry holds the crashed one's frames: wait until it uploaded them.
                let head = wait_status(&ferry)?["head_seq"].as_u64().unwrap_or(0);
                wait_until(
                    "the restarted ferry to upload what it read",
                    Duration::from_secs(30),
                    || status_of(&ferry, "acked_seq") >= head,
                )?;
            }
            Round::Overlap => {
                // Every log sync takes 1.5 s, sled's none: the writer's sync is nearly always
                // running when the uplink's ack frees a segment and syncs (sled, mostly).
                fs.send("slow-fsync 1500 --only journal/log/")?;
                let before = counter(&fs, "/ops/unlink");
                let freed = wait_until("a segment freed", Duration::from_secs(90), || {
                    counter(&fs, "/ops/unlink") > before
                });
                if let Err(e) = freed {
                    // An uplink stopped by a clash frees nothing: the check below counts it.
                    println!("torture: {what}: {e}; checking what was delivered");
                    break;
                }
                // The uplink uploads what the journal now calls durable; the writer's sync
                // is still running.
                std::thread::sleep(Duration::from_millis(300));
            }
            Round::Eio => {
                let before = counter(&fs, "/eio_injected");
                fs.send("fail-fsync journal/log/")?;
                wait_until("the injected EIO", Duration::from_secs(10), || {
                    counter(&fs, "/eio_injected") > before
                })?;
                // Past the group whose sync failed: ferry says it is durable.
                let head = status_of(&ferry, "head_seq");
                wait_until(
                    "ferry's durable head past the failed group",
                    Duration::from_secs(30),
                    || status_of(&ferry, "durable_seq") > head,
                )?;
            }
        }
        note_durable(&ferry, &mut max_durable);
        power_cut(&mut ferry, &fs, work, "cut", &what, max_durable, tally)?;
        let log = ferry.log_text();
        check_log(log.get(log_seen..).unwrap_or(""), &what, false, tally);
        log_seen = log.len();
        println!(
            "torture: {what} done: published={} acked={} head_seq={}",
            publisher.sent(),
            publisher.acked(),
            status_of(&ferry, "head_seq")
        );
    }
    let published = publisher.finish()?;
    tally.published = published.sent;
    tally.acked = published.acked.len() as u64;
    check_delivery(&cloud, &published.acked, tally)?;
    note_fs(&fs, tally);
    if !tally.passed() {
        dump(&fs, work);
    }
    ferry.stop()?;
    fs.quit()
}

/// Waits for the moment of the cut according to `strategy`, noting the durable seq meanwhile.
fn aim(
    strategy: &str,
    ferry: &Ferry,
    fs: &CrashFsProc,
    rng: &mut Rng,
    max_durable: &mut u64,
) -> Result<(), String> {
    let mut note = |ferry: &Ferry| {
        if let Ok(s) = ferry.status() {
            *max_durable = (*max_durable).max(s["durable_seq"].as_u64().unwrap_or(0));
            Some(s)
        } else {
            None
        }
    };
    let counter = |name: &str| -> u64 {
        fs.stats()
            .map(|s| s.pointer(name).and_then(|v| v.as_u64()).unwrap_or(0))
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    match strategy {
        "random" => {
            let end = Instant::now() + Duration::from_millis(rng.below(1500));
            while Instant::now() < end {
                note(ferry);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        "after-fsync" => {
            note(ferry);
            let target = counter("/fsyncs") + 1 + rng.below(4);
            while counter("/fsyncs") < target && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        "after-ack" => {
            let first = note(ferry)
                .and_then(|s| s["acked_seq"].as_u64())
                .unwrap_or(0);
            while Instant::now() < deadline {
                let acked = note(ferry)
                    .and_then(|s| s["acked_seq"].as_u64())
                    .unwrap_or(0);
                if acked > first {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(rng.below(30)));
        }
        "compaction" => {
            // A compaction creates the next database directory, then swaps the `db` link.
            note(ferry);
            let which = if rng.below(2) == 0 {
                "/ops/mkdir"
            } else {
                "/ops/symlink"
            };
            let base = counter(which);
            while counter(which) == base && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(rng.below(20)));
        }
        _ => {
            // startup: ferry was just (re)started and is opening or recovering its journal.
            std::thread::sleep(Duration::from_millis(rng.below(200)));
        }
    }
    Ok(())
}

fn wait_status(ferry: &Ferry) -> Result<serde_json::Value, String> {
    let mut status = None;
    wait_until(
        "ferry's /status after restart",
        Duration::from_secs(20),
        || {
            status = ferry.status().ok();
            status.is_some()
        },
    )?;
    status.ok_or_else(|| "no status".into())
}

/// Waits (up to 3 min) until every acked message is at the cloud, then counts what is not,
/// what is there twice, and any gaps or clashes the cloud recorded.
fn check_delivery(cloud: &Cloud, acked: &BTreeSet<u64>, tally: &mut Tally) -> Result<(), String> {
    let want = acked.len() as u64;
    let _ = wait_until(
        "the cloud to hold every acked message",
        Duration::from_secs(180),
        || {
            cloud
                .device(DEVICE)
                .ok()
                .flatten()
                .and_then(|d| d["records"].as_u64())
                .is_some_and(|n| n >= want)
        },
    );
    let records = cloud.records(DEVICE)?;
    let mut seqs_of: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (seq, n) in records {
        if let Some(n) = n {
            seqs_of.entry(n).or_default().insert(seq);
        }
    }
    tally.delivered = seqs_of.keys().filter(|n| acked.contains(n)).count() as u64;
    let lost: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|n| !seqs_of.contains_key(n))
        .collect();
    tally.lost = lost.len() as u64;
    if !lost.is_empty() {
        println!(
            "torture: lost messages (first 20): {:?}",
            &lost[..lost.len().min(20)]
        );
    }
    let dups: Vec<(&u64, &BTreeSet<u64>)> = seqs_of.iter().filter(|(_, s)| s.len() > 1).collect();
    tally.duplicates = dups.len() as u64;
    if !dups.is_empty() {
        println!(
            "torture: duplicated messages (n -> seqs, first 10): {:?}",
            &dups[..dups.len().min(10)]
        );
    }
    let mut journal_lost = 0;
    if let Some(d) = cloud.device(DEVICE)? {
        for g in d["gaps"].as_array().into_iter().flatten() {
            println!("torture: the cloud holds a gap {g}");
            if g["reason"] == "journal_lost" {
                journal_lost += 1;
            } else {
                tally.other_gaps += 1;
            }
        }
        tally.journal_lost = journal_lost;
        tally.clashes = d["clashes_total"].as_u64().unwrap_or(0);
        if tally.clashes > 0 {
            println!(
                "torture: the cloud saw seqs with two contents: {}",
                d["clashes"]
            );
        }
    }
    Ok(())
}

/// Copies the filesystem's current tree next to the logs, for forensics.
fn dump(fs: &CrashFsProc, work: &Path) {
    let to: PathBuf = work.join("journal-dump");
    match fs.send(&format!("dump {}", to.display())) {
        Ok(_) => println!("torture: journal files copied to {}", to.display()),
        Err(e) => println!("torture: could not copy the journal files: {e}"),
    }
}

/// A 2 s fsync must not cost ferry its MQTT session, nor any message.
fn run_slow_fsync(work: &Path, tally: &mut Tally) -> Result<(), String> {
    const SLOW_MS: u64 = 2000;
    const MESSAGES: u64 = 300;
    let mut fs = CrashFsProc::start(work)?;
    // The recommended in-flight window: ferry PUBACKs a whole group after each (slow) sync.
    let broker = mosquitto(&work.join("mqtt"), 100)?;
    let cloud = Cloud::start(&work.join("cloud"))?;
    let control = free_port()?;
    // The shortest keep-alive ferry allows, so that a stalled MQTT thread would be noticed.
    let config = ferry_config(&fs, &broker, &cloud, control, "keep_alive = \"5s\"");
    let mut ferry = Ferry::new(&work.join("agent"), &config, control)?;
    ferry.start()?;
    wait_until("ferry's MQTT connection", Duration::from_secs(20), || {
        ferry.status().is_ok_and(|s| s["mqtt_connected"] == true)
    })?;
    fs.send(&format!("slow-fsync {SLOW_MS}"))?;
    let publisher = Publisher::start(broker.port, 20, Some(MESSAGES), 7)?;
    let started = Instant::now();
    let pubs = wait_until("the publisher to finish", Duration::from_secs(120), || {
        publisher.is_done()
    });
    let published = publisher.finish()?;
    pubs?;
    tally.published = published.sent;
    tally.acked = published.acked.len() as u64;
    check_delivery(&cloud, &published.acked, tally)?;
    let stats = fs.stats()?;
    println!(
        "torture: slow-fsync {SLOW_MS} ms: {} messages delivered in {:.0?}, {} fsyncs",
        tally.delivered,
        started.elapsed(),
        stats["fsyncs"]
    );
    let log = ferry.log_text();
    let connects = log.matches("mqtt connected").count();
    let disconnects = log.matches("mqtt disconnected").count();
    let broker_log = std::fs::read_to_string(&broker.log).unwrap_or_default();
    let timeouts = broker_log
        .lines()
        .filter(|l| {
            l.contains("ferry-") && (l.contains("exceeded timeout") || l.contains("disconnected"))
        })
        .count();
    if connects != 1 || disconnects > 0 || timeouts > 0 {
        tally.session_drops += 1;
        println!(
            "torture: ferry's MQTT session was interrupted: connects={connects} disconnects={disconnects} broker_timeouts={timeouts}"
        );
    }
    fs.send("slow-fsync 0")?;
    ferry.stop()?;
    fs.quit()
}
