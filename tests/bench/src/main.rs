//! `ferry-bench`: ferry's benchmarks side by side in one run, each against a baseline measured in
//! the same run, reported as ratios (`make bench`, `make bench QUICK=1`).
//!
//! - `store`: durable append, bytes on disk after churn, open time; ferry's journal called
//!   directly, a raw file and SQLite as baselines, and journal-layout experiments.
//! - `procs`: the release `ferry` and `ferry-cloud` binaries and a real mosquitto: peak RSS, backlog
//!   drain (against ferry-cloud and a null HTTP sink), MQTT ingest (against a plain subscriber).
//! - `wear`: bytes written per payload byte against a raw append+fdatasync of the same frames,
//!   ferry's PUBACK delay and RSS at 1,000 msg/s per `journal.commit_wait`, and a mosquitto bridge.
//! - `report`: the table, and the numbers part of `docs/BENCHMARKS.md`.
//!
//! Timing never decides a test: nothing here fails a build, a missed target is reported.

mod fleet;
mod lock;
mod machine;
mod procs;
mod report;
mod store;
mod wear;

use std::path::{Path, PathBuf};
use std::time::Instant;

use report::{Row, Target};
use store::{Layout, PAYLOAD, Result};

const USAGE: &str =
    "usage: ferry-bench [--quick] [--only SECTION] [--fleet SHAPE] [--doc FILE] [--work DIR]
                   [--target-dir DIR]
  --quick           a smaller run (about a tenth of the records)
  --only SECTION    run one section: size, append, churn, backlog, ingest, wear, e2e
                    or fleet, fleet-pg (only run by name: make bench-fleet); no --doc then
  --fleet SHAPE     the fleet sections run this one fleet: DEVICESxRECORDS/BATCH, as
                    100000x250/250 (DEVICES gateways of RECORDS records, in batches of BATCH)
  --doc FILE        write the numbers into FILE between the bench markers
  --work DIR        where the bench's files go (default target/bench-work; removed after)
  --target-dir DIR  where the release binaries are (default target)";

struct Sizes {
    /// Records per durable-append measurement.
    append: usize,
    /// Records appended in the churn measurement, and the backlog held meanwhile.
    churn_total: usize,
    churn_backlog: usize,
    /// The backlog for open time, RSS and drain.
    backlog: usize,
    /// Messages published in the ingest measurement.
    ingest: usize,
    /// Seconds of 1,000 msg/s per setting in the wear measurement.
    wear_secs: u64,
    /// The fleet sections' runs: the two shapes of a fleet, then 100,000 gateways with
    /// small batches and with large ones.
    fleet: [fleet::Shape; 4],
}

/// `devices` gateways of `per_device` records each, in batches of `batch`.
const fn shape(devices: usize, per_device: u64, batch: u64) -> fleet::Shape {
    fleet::Shape {
        devices,
        per_device,
        batch,
    }
}

const FULL: Sizes = Sizes {
    append: 50_000,
    churn_total: 400_000,
    churn_backlog: 50_000,
    backlog: 1_000_000,
    ingest: 200_000,
    wear_secs: 20,
    fleet: [
        shape(2_000, 500, 250),
        shape(20_000, 50, 25),
        shape(100_000, 50, 25),
        shape(100_000, 250, 250),
    ],
};

const QUICK: Sizes = Sizes {
    append: 5_000,
    churn_total: 40_000,
    churn_backlog: 5_000,
    backlog: 100_000,
    ingest: 20_000,
    wear_secs: 5,
    fleet: [
        shape(200, 500, 250),
        shape(2_000, 50, 25),
        shape(10_000, 50, 25),
        shape(10_000, 250, 250),
    ],
};

/// The group commit of the headline append row: the broker's in-flight window in the recommended
/// mosquitto config (README), which bounds how many QoS1 messages can wait for one sync.
const BATCH: usize = 100;
/// The uplink's default `batch_max_records`, the step in which the churn acknowledges.
const ACK_STEP: usize = 500;
/// mosquitto's `max_inflight_messages` for the ingest row (README's recommended config).
const INFLIGHT: u32 = 100;

/// The sections' names for `--only`, in the order they run.
const SECTIONS: [&str; 9] = [
    "size", "append", "churn", "backlog", "ingest", "wear", "e2e", "fleet", "fleet-pg",
];
/// Sections that run only when asked for by name (`--only`): `make bench-fleet`,
/// `make bench-fleet-pg`.
const ON_REQUEST: [&str; 2] = ["fleet", "fleet-pg"];
/// One section of the run: pushes its rows.
type Section<'a> = dyn Fn(&mut Vec<Row>) -> Result<()> + 'a;
/// Creates a layout in a directory.
type MakeLayout = dyn Fn(&Path) -> Result<Box<dyn Layout>>;

struct Args {
    quick: bool,
    only: Option<String>,
    fleet: Option<fleet::Shape>,
    doc: Option<PathBuf>,
    work: PathBuf,
    target: PathBuf,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        quick: false,
        only: None,
        fleet: None,
        doc: None,
        work: PathBuf::from("target/bench-work"),
        target: PathBuf::from("target"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--only" => a.only = Some(value("--only")?),
            "--fleet" => a.fleet = Some(fleet_shape(&value("--fleet")?)?),
            "--doc" => a.doc = Some(PathBuf::from(value("--doc")?)),
            "--work" => a.work = PathBuf::from(value("--work")?),
            "--target-dir" => a.target = PathBuf::from(value("--target-dir")?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.fleet.is_some()
        && !a
            .only
            .as_ref()
            .is_some_and(|o| ON_REQUEST.contains(&o.as_str()))
    {
        return Err(format!(
            "--fleet goes with --only fleet or --only fleet-pg\n{USAGE}"
        ));
    }
    if let Some(only) = &a.only {
        if !SECTIONS.contains(&only.as_str()) {
            return Err(format!("unknown section {only:?}\n{USAGE}"));
        }
        // The document holds every section's rows: one section alone would drop the others.
        if a.doc.is_some() {
            return Err(format!("--only and --doc do not go together\n{USAGE}"));
        }
    }
    Ok(a)
}

/// `DEVICESxRECORDS/BATCH` (`--fleet`).
fn fleet_shape(text: &str) -> std::result::Result<fleet::Shape, String> {
    let bad = || format!("--fleet {text:?}: not DEVICESxRECORDS/BATCH, as 100000x250/250");
    let (devices, rest) = text.split_once('x').ok_or_else(bad)?;
    let (per_device, batch) = rest.split_once('/').ok_or_else(bad)?;
    let shape = shape(
        devices.parse().map_err(|_| bad())?,
        per_device.parse().map_err(|_| bad())?,
        batch.parse().map_err(|_| bad())?,
    );
    if shape.devices == 0 || shape.batch == 0 || shape.per_device < shape.batch {
        return Err(format!(
            "--fleet {text:?}: devices and batch must be at least 1, records at least a batch"
        ));
    }
    Ok(shape)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let sizes = if args.quick { QUICK } else { FULL };
    let mut args = args;
    let _lock = match lock::WorkLock::take(&args.work) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let _ = std::fs::remove_dir_all(&args.work);
    // Absolute: the agent resolves a relative journal.dir against its config file's directory.
    match std::fs::create_dir_all(&args.work).and_then(|()| args.work.canonicalize()) {
        Ok(w) => args.work = w,
        Err(e) => {
            eprintln!("cannot create {}: {e}", args.work.display());
            std::process::exit(1);
        }
    }
    let args = args;
    let machine = machine::describe(&args.work);
    println!(
        "ferry-bench ({} run)\n{machine}",
        if args.quick { "quick" } else { "full" }
    );
    let started = Instant::now();

    let mut rows = Vec::new();
    // The fleet sections' shapes: the one `--fleet` names, or the size's four.
    let fleets = args
        .fleet
        .as_ref()
        .map_or(&sizes.fleet[..], std::slice::from_ref);
    let sections: [(&'static str, &Section<'_>); 9] = [
        ("binary size", &|r| binary_sizes(&args, r)),
        ("durable append", &|r| append(&args, &sizes, r)),
        ("disk use after churn", &|r| churn(&args, &sizes, r)),
        ("backlog: open, RSS, drain", &|r| backlog(&args, &sizes, r)),
        ("MQTT ingest", &|r| ingest(&args, &sizes, r)),
        (wear::SECTION, &|r| {
            wear::run(
                &args.target.join("release"),
                &args.work.join("wear"),
                sizes.wear_secs,
                r,
            )
        }),
        (wear::E2E_SECTION, &|r| {
            wear::end_to_end(
                &args.target.join("release"),
                &args.work.join("e2e"),
                sizes.ingest,
                r,
            )
        }),
        (fleet::SECTION, &|r| {
            fleet::run(
                &args.target.join("release"),
                &args.work.join("fleet"),
                fleets,
                &fleet::Center::ALL,
                fleet::SECTION,
                r,
            )
        }),
        (fleet::SECTION_PG, &|r| {
            fleet::run(
                &args.target.join("release"),
                &args.work.join("fleet-pg"),
                fleets,
                &fleet::Center::POSTGRES,
                fleet::SECTION_PG,
                r,
            )
        }),
    ];
    for ((name, run), key) in sections.into_iter().zip(SECTIONS) {
        if args.only.as_ref().is_some_and(|only| only != key)
            || (args.only.is_none() && ON_REQUEST.contains(&key))
        {
            continue;
        }
        println!("== {name}");
        let t = Instant::now();
        let before = rows.len();
        if let Err(e) = run(&mut rows) {
            eprintln!("   {name} failed: {e}");
            rows.push(Row::missing(name, format!("{name}: failed"), e.to_string()));
        }
        for r in &rows[before..] {
            println!(
                "   {}: {}",
                r.what,
                r.value
                    .map_or("-".into(), |v| format!("{} {}", report::num(v), r.unit))
            );
        }
        println!("   ({:.1} s)", t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&args.work);

    report::print_table(&rows);
    let total = started.elapsed().as_secs_f64();
    println!(
        "\n{} run in {:.0} s",
        if args.quick { "quick" } else { "full" },
        total
    );
    if let Some(doc) = &args.doc {
        let run = format!(
            "Measured by `make bench{}` on {} at commit {}, in {:.0} s. {}",
            if args.quick { " QUICK=1" } else { "" },
            command_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            command_out("git", &["rev-parse", "--short", "HEAD"]),
            total,
            sizes_text(&sizes)
        );
        match report::write_doc(doc, &report::markdown(&rows, &machine, &run)) {
            Ok(()) => println!("numbers written to {}", doc.display()),
            Err(e) => {
                eprintln!("cannot write {}: {e}", doc.display());
                std::process::exit(1);
            }
        }
    }
}

/// The most a drain of `backlog` records limited to `limit` per second may measure against the
/// limit: a token bucket of one second lets `limit` through at once, the rest at the limit.
fn burst_bound(backlog: f64, limit: f64) -> f64 {
    backlog / (backlog - limit).max(limit) * 1.03
}

fn sizes_text(s: &Sizes) -> String {
    format!(
        "Records carry {PAYLOAD}-byte payloads. Append: {} records per row; churn: {} records through \
         a backlog of {}; backlog rows: {} records; ingest: {} QoS1 messages; wear: {} s at 1,000 msg/s \
         per setting, {} messages end to end.",
        s.append, s.churn_total, s.churn_backlog, s.backlog, s.ingest, s.wear_secs, s.ingest
    )
}

fn command_out(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

const MIB: f64 = (1u64 << 20) as f64;

fn binary_sizes(args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    const S: &str = "binary size";
    let host = machine::arch();
    // `make cross` builds into target/<triple> with cross, target/arm/<triple> on the Debian route.
    let cross = |triple: &str| {
        let via_cross = args.target.join(triple).join("release/ferry");
        let debian = args.target.join("arm").join(triple).join("release/ferry");
        if via_cross.exists() {
            via_cross
        } else {
            debian
        }
    };
    for (arch, triple) in [
        ("x86_64", None),
        ("aarch64", Some("aarch64-unknown-linux-gnu")),
        ("armv7", Some("armv7-unknown-linux-gnueabihf")),
    ] {
        let path = triple.map_or_else(|| args.target.join("release/ferry"), cross);
        let what = format!("ferry, stripped release, {arch}");
        let native = host == arch;
        let path = if native && !path.exists() {
            args.target.join("release/ferry")
        } else {
            path
        };
        match std::fs::metadata(&path) {
            Ok(m) => rows.push(
                Row::new(S, what, m.len() as f64 / MIB, "MiB")
                    .target(Target::AtMost(6.0))
                    .note(path.display().to_string()),
            ),
            Err(_) if triple.is_some() => rows.push(Row::missing(
                S,
                what,
                format!(
                    "not built (run make cross TARGET={})",
                    triple.unwrap_or_default()
                ),
            )),
            Err(e) => return Err(format!("{}: {e} (run make build)", path.display()).into()),
        }
    }
    Ok(())
}

fn append(args: &Args, sizes: &Sizes, rows: &mut Vec<Row>) -> Result<()> {
    const S: &str = "durable append";
    let work = args.work.join("append");
    let recs = store::records(1, sizes.append);
    let qos1 = store::records_qos1(1, sizes.append);
    let sqlite_label = format!("SQLite {} WAL FULL", store::Sqlite::version());
    for batch in [BATCH, 1000] {
        let headline = batch == BATCH;
        let d = |name: &str| work.join(format!("{name}-{batch}"));
        let mut layouts: Vec<Box<dyn Layout>> = vec![
            Box::new(store::RawFile::create(&d("raw"))?),
            Box::new(store::Sqlite::create(&d("sqlite"))?),
            Box::new(store::Ferry::create(&d("ferry"))?),
        ];
        let mut names = vec!["raw", "sqlite", "ferry"];
        if headline {
            // The ingest writer's QoS1 path (redelivery marks kept), then the journal-layout
            // experiments, against the same raw baseline.
            layouts.push(Box::new(store::Ferry::create_qos1(&d("ferry-qos1"))?));
            layouts.push(Box::new(store::SledPerRecord::create(&d("sled"))?));
            layouts.push(Box::new(store::SledGrouped::create(&d("grouped"))?));
            layouts.push(Box::new(store::Segments::create(&d("segments"), false)?));
            layouts.push(Box::new(store::Segments::create(&d("segments-pre"), true)?));
            names.extend([
                "ferry journal, QoS1 records (packet ids, redelivery marks)",
                "experiment: sled, a key per record",
                "experiment: sled, records grouped 50 per value",
                "experiment: append-only segment files",
                "experiment: segment files, preallocated",
            ]);
        }
        let rates = store::append_rates(&mut layouts, &recs, &qos1, batch, 10)?;
        drop(layouts);
        for (name, rate) in names.iter().zip(&rates) {
            println!("   {name} batch={batch}: {} records/s", report::num(*rate));
        }
        let (raw, sqlite, ferry) = (rates[0], rates[1], rates[2]);
        let t = |t| if headline { t } else { Target::None };
        rows.push(
            Row::new(
                S,
                format!("ferry journal vs raw, batch {batch}"),
                ferry,
                "rec/s",
            )
            .baseline("raw append+fdatasync", raw)
            .target(t(Target::RatioAtLeast(0.5))),
        );
        rows.push(
            Row::new(
                S,
                format!("ferry journal vs SQLite, batch {batch}"),
                ferry,
                "rec/s",
            )
            .baseline(sqlite_label.clone(), sqlite)
            .target(t(Target::RatioAtLeast(1.0))),
        );
        for (name, rate) in names.iter().zip(&rates).skip(3) {
            rows.push(
                Row::new(S, format!("{name}, batch {batch}"), *rate, "rec/s").baseline("raw", raw),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn churn(args: &Args, sizes: &Sizes, rows: &mut Vec<Row>) -> Result<()> {
    const S: &str = "disk use after churn";
    let work = args.work.join("churn");
    let layouts: [(&str, Box<MakeLayout>); 7] = [
        (
            "ferry journal",
            Box::new(|d| Ok(Box::new(store::Ferry::create(d)?))),
        ),
        (
            "ferry journal, journal.replay_window = 0",
            Box::new(|d| Ok(Box::new(store::Ferry::with_replay_window(d, 0)?))),
        ),
        (
            "SQLite WAL (for comparison)",
            Box::new(|d| Ok(Box::new(store::Sqlite::create(d)?))),
        ),
        (
            "experiment: sled, a key per record",
            Box::new(|d| Ok(Box::new(store::SledPerRecord::create(d)?))),
        ),
        (
            "experiment: sled, records grouped 50 per value",
            Box::new(|d| Ok(Box::new(store::SledGrouped::create(d)?))),
        ),
        (
            "experiment: append-only segment files",
            Box::new(|d| Ok(Box::new(store::Segments::create(d, false)?))),
        ),
        (
            "experiment: segment files, preallocated",
            Box::new(|d| Ok(Box::new(store::Segments::create(d, true)?))),
        ),
    ];
    for (i, (name, make)) in layouts.iter().enumerate() {
        let dir = work.join(format!("l{i}"));
        let mut layout = make(&dir)?;
        let t = Instant::now();
        let c = store::churn(
            layout.as_mut(),
            sizes.churn_total,
            1000,
            sizes.churn_backlog,
            ACK_STEP,
        )?;
        let secs = t.elapsed().as_secs_f64();
        drop(layout);
        let blobs = store::blob_count(&dir) + store::blob_count(&dir.join("db"));
        let _ = std::fs::remove_dir_all(&dir);
        let note = format!(
            "{} rec/s with acks, {blobs} sled blob files",
            report::num(sizes.churn_total as f64 / secs)
        );
        let disk = c.disk as f64 / MIB;
        if c.replay_payload > 0 {
            // The journal holds the replay window's records on purpose (they are what the
            // downlink's replay_from sends again): the overhead is against everything it holds.
            rows.push(
                Row::new(
                    S,
                    format!("{name}: bytes on disk / payload held"),
                    disk,
                    "MiB",
                )
                .baseline(
                    "payload held: backlog + replay window",
                    (c.backlog_payload + c.replay_payload) as f64 / MIB,
                )
                .target(Target::RatioAtMost(1.5))
                .note(format!(
                    "{note}; replay window {} MiB of payload",
                    report::num(c.replay_payload as f64 / MIB)
                )),
            );
        }
        rows.push(
            Row::new(
                S,
                format!("{name}: bytes on disk / unsent backlog"),
                disk,
                "MiB",
            )
            .baseline("unsent backlog payload", c.backlog_payload as f64 / MIB)
            .note(note),
        );
    }
    Ok(())
}

fn backlog(args: &Args, sizes: &Sizes, rows: &mut Vec<Row>) -> Result<()> {
    const S: &str = "backlog: open, RSS, drain";
    let work = args.work.join("backlog");
    let master = work.join("journal");
    let n = sizes.backlog;
    let fill = store::fill_journal(&master, n)?;
    let disk = store::dir_bytes(&master);
    println!(
        "   filled {n} records at {} rec/s, {:.0} MiB on disk",
        report::num(fill),
        disk as f64 / MIB
    );

    // Warm (the files just written are in the page cache), then cold where the cache can be dropped.
    let (warm, found) = store::open_time(&master)?;
    if found != n as u64 {
        return Err(format!("reopened journal holds {found} records, {n} were appended").into());
    }
    rows.push(
        Row::new(
            S,
            format!("journal open + first batch, {n} records, warm cache"),
            warm,
            "s",
        )
        .target(Target::AtMost(0.5)),
    );
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| e.to_string())
        .and_then(|()| store::open_time(&master).map_err(|e| e.to_string()));
    match cold {
        Ok((secs, _)) => rows.push(Row::new(
            S,
            "same, cold cache (after drop_caches)",
            secs,
            "s",
        )),
        Err(e) => rows.push(Row::missing(
            S,
            "same, cold cache",
            format!("cannot drop caches: {e}"),
        )),
    }

    let bins = args.target.join("release");
    let ferry = bins.join("ferry");
    let broker = procs::mosquitto(&work.join("mosquitto"), INFLIGHT)?;
    let drain = |name: &str, url: &str, extra: &str, tag: &str| -> Result<procs::Drain> {
        let journal = work.join(format!("journal-{tag}"));
        store::copy_tree(&master, &journal)?;
        let d = procs::drain(
            &ferry,
            &work.join(format!("agent-{tag}")),
            &journal,
            broker.port,
            url,
            extra,
        )?;
        let _ = std::fs::remove_dir_all(&journal);
        println!(
            "   drain to {name} {extra:?}: {} rec/s, agent cpu {:.1} s of {:.1} s, peak rss {:.1} MiB",
            report::num(d.records as f64 / d.secs),
            d.agent_cpu,
            d.secs,
            d.rss_peak_kib as f64 / 1024.0
        );
        Ok(d)
    };

    let sink = procs::NullSink::start()?;
    let null = drain("null sink", &sink.url(), "", "null")?;
    let requests = sink.requests.load(std::sync::atomic::Ordering::Relaxed);
    let mut cloud = procs::Cloud::start(&bins.join("ferry-cloud"), &work.join("cloud"))?;
    let cloud_pid = cloud.proc.pid().to_string();
    let cpu0 = procs::cpu_secs(&cloud_pid);
    let real = drain("ferry-cloud", &cloud.url(), "", "cloud")?;
    let cloud_cpu = procs::cpu_secs(&cloud_pid) - cpu0;
    cloud.proc.stop()?;

    let rate = |d: &procs::Drain| d.records as f64 / d.secs;
    rows.push(
        Row::new(
            S,
            format!("peak RSS of ferry run, {n}-record backlog drained"),
            real.rss_peak_kib as f64 / 1024.0,
            "MiB",
        )
        .target(Target::AtMost(16.0))
        .note(format!(
            "{:.1} MiB right after open",
            real.rss_open_kib as f64 / 1024.0
        )),
    );
    rows.push(
        Row::new(S, "backlog drain to ferry-cloud (defaults: 500 records, gzip)", rate(&real), "rec/s")
            .baseline("null sink", rate(&null))
            .target(Target::AtLeast(200_000.0))
            .note(format!(
                "cpu s: agent {:.1}, ferry-cloud {:.1}, in {:.1} s wall; null sink run: agent {:.1} s in {:.1} s, {} requests",
                real.agent_cpu, cloud_cpu, real.secs, null.agent_cpu, null.secs, requests
            )),
    );

    // What limits the drain: the same backlog with one uplink parameter changed at a time.
    for (what, extra) in [
        ("no compression", "compression = \"none\""),
        (
            "batches of 5,000 records / 4 MiB",
            "batch_max_records = 5000\nbatch_max_bytes = \"4MiB\"",
        ),
    ] {
        let d = drain("null sink", &sink.url(), extra, "exp")?;
        rows.push(
            Row::new(
                S,
                format!("experiment: drain to null sink, {what}"),
                rate(&d),
                "rec/s",
            )
            .baseline("null sink, defaults", rate(&null))
            .note(format!("agent cpu {:.1} s in {:.1} s", d.agent_cpu, d.secs)),
        );
    }
    // The drain limit (`uplink.max_records_per_sec`, the replay-storm guard): the rate it lets
    // through against the limit itself, set well under what this machine drains unlimited.
    // `tests/replay.rs` checks the bound; the figure lives here.
    let limit = (rate(&null) / 4.0).clamp(1_000.0, 100_000.0).round();
    let d = drain(
        "null sink",
        &sink.url(),
        &format!("max_records_per_sec = {limit}"),
        "limit",
    )?;
    rows.push(
        Row::new(
            S,
            "drain limited by uplink.max_records_per_sec, to null sink",
            rate(&d),
            "rec/s",
        )
        .baseline("the limit", limit)
        // The token bucket holds one second's worth, which goes through at once when the drain
        // starts: the backlog then takes (backlog - limit) / limit seconds, not backlog / limit.
        // Its bound is that ratio, and 3 % for the timing of the run's ends.
        .target(Target::RatioAtMost(burst_bound(sizes.backlog as f64, limit)))
        .note(format!(
            "agent cpu {:.1} s in {:.1} s; a token bucket of one second lets at most {:.3}x through",
            d.agent_cpu,
            d.secs,
            burst_bound(sizes.backlog as f64, limit) / 1.03
        )),
    );
    let mut cloud = procs::Cloud::start(&bins.join("ferry-cloud"), &work.join("cloud-big"))?;
    let cloud_pid = cloud.proc.pid().to_string();
    let cpu0 = procs::cpu_secs(&cloud_pid);
    let extra = "batch_max_records = 5000\nbatch_max_bytes = \"4MiB\"";
    let d = drain("ferry-cloud", &cloud.url(), extra, "exp")?;
    let big_cloud_cpu = procs::cpu_secs(&cloud_pid) - cpu0;
    cloud.proc.stop()?;
    rows.push(
        Row::new(
            S,
            "experiment: drain to ferry-cloud, batches of 5,000 records / 4 MiB",
            rate(&d),
            "rec/s",
        )
        .baseline("ferry-cloud, defaults", rate(&real))
        .note(format!(
            "cpu s: agent {:.1}, ferry-cloud {:.1}, in {:.1} s wall",
            d.agent_cpu, big_cloud_cpu, d.secs
        )),
    );
    drop(sink);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn ingest(args: &Args, sizes: &Sizes, rows: &mut Vec<Row>) -> Result<()> {
    const S: &str = "MQTT ingest";
    let work = args.work.join("ingest");
    let n = sizes.ingest;

    // Baseline: a plain QoS1 subscriber on its own broker.
    let broker = procs::mosquitto(&work.join("mosquitto-plain"), INFLIGHT)?;
    let sub = procs::Subscriber::start(broker.port)?;
    let received = std::sync::Arc::clone(&sub.received);
    let (plain, pub_plain) = procs::ingest_rate(broker.port, n, || {
        Ok(received.load(std::sync::atomic::Ordering::Relaxed))
    })?;
    drop(sub);
    drop(broker);
    println!(
        "   plain subscriber: {} msg/s (publisher {} msg/s)",
        report::num(plain),
        report::num(pub_plain)
    );

    // ferry: the uplink points at a closed port, so only ingest runs.
    let broker = procs::mosquitto(&work.join("mosquitto-ferry"), INFLIGHT)?;
    let control = procs::free_port()?;
    let dead = format!("http://127.0.0.1:{}/v1/ingest", procs::free_port()?);
    let config = procs::agent_config(&work.join("journal"), broker.port, &dead, control, "");
    let mut agent = procs::Agent::start(
        &args.target.join("release/ferry"),
        &work.join("agent"),
        &config,
        control,
    )?;
    let ingested = |a: &procs::Agent| -> Result<u64> {
        Ok(a.status()?["totals"]["ingested"].as_u64().unwrap_or(0))
    };
    procs::wait_for(
        "ferry's MQTT session",
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        || Ok(agent.status()?["mqtt_connected"] == true),
    )?;
    // A first message proves the subscription is in place before the clock starts.
    procs::publish(broker.port, 1)?;
    procs::wait_for(
        "the first message",
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        || Ok(ingested(&agent)? >= 1),
    )?;
    let (ferry, pub_ferry) = procs::ingest_rate(broker.port, n, || ingested(&agent))?;
    let cpu = procs::cpu_secs(&agent.proc.pid().to_string());
    agent.proc.stop()?;
    println!(
        "   ferry: {} msg/s (publisher {} msg/s)",
        report::num(ferry),
        report::num(pub_ferry)
    );
    rows.push(
        Row::new(
            S,
            format!("ferry run, QoS1 into the journal (in-flight window {INFLIGHT})"),
            ferry,
            "msg/s",
        )
        .baseline("plain QoS1 subscriber", plain)
        .target(Target::RatioAtLeast(0.8))
        .note(format!(
            "publisher alone: {} msg/s with ferry, {} with the subscriber; ferry cpu {:.1} s",
            report::num(pub_ferry),
            report::num(pub_plain),
            cpu
        )),
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
