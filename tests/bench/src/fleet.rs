//! The center under a fleet (`ferry-bench --only fleet`, `make bench-fleet`): simulated gateways
//! speaking protocol v1 as the agent does against the release `ferry-cloud` on its embedded
//! `files` store, run under the usual limit of 1,024 open files.
//!
//! Each simulated gateway sends its records in gzipped batches with idempotency keys and its
//! `held` account; a device's two batches go out at once from two client threads (the agent
//! keeps two in flight); a transient answer (transport error, 5xx, 429) is retried with
//! backoff. Some devices add adversity: every 100th declares a gap and resends its first batch
//! after the second (a lost answer), every 1,000th is cloned (a second gateway sends its seqs
//! with other content, which must be answered 409). Each fleet runs two rounds on one receiver:
//! first contact (every device new, its files created) and steady state (every device's next
//! records, its files there). After the run the fleet's account must
//! balance: every record delivered, no seq missing (`/metrics`).
//!
//! Side by side for each fleet, in one run: the harness's own ceiling (the same requests to a
//! receiver that reads each one and answers 200 at once: what this machine's HTTP and client
//! threads allow, with no receiver work), the `files` store, and `ferry-cloud --store
//! postgres://` on a PostgreSQL the bench starts (fsync and `synchronous_commit` on) behind one
//! replica and behind two replicas with a real nginx balancing round robin; on PostgreSQL the
//! baseline of the same run is the same rows loaded with one `COPY` into a table of the same key
//! (the fastest way into PostgreSQL, with no per-batch work). `--only fleet-pg`
//! (`make bench-fleet-pg`) runs the PostgreSQL centers alone.

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::procs::{self, Cloud};
use crate::report::Row;
use crate::store::{Result, dir_bytes};

pub const SECTION: &str = "fleet: ferry-cloud under many gateways";
pub const SECTION_PG: &str = "fleet-pg: ferry-cloud replicas on PostgreSQL under many gateways";

/// What receives the fleet's batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Center {
    /// A receiver that reads each request and answers 200 at once (the harness's ceiling).
    Ceiling,
    Files,
    /// `--store postgres://` with this many replicas (more than one: behind nginx).
    Postgres {
        replicas: usize,
    },
}

impl Center {
    /// The centers of `make bench-fleet`, side by side.
    pub const ALL: [Center; 4] = [
        Center::Ceiling,
        Center::Files,
        Center::Postgres { replicas: 1 },
        Center::Postgres { replicas: 2 },
    ];
    /// The centers of `make bench-fleet-pg`.
    pub const POSTGRES: [Center; 2] = [
        Center::Postgres { replicas: 1 },
        Center::Postgres { replicas: 2 },
    ];

    fn label(self) -> String {
        match self {
            Center::Ceiling => "null receiver (the harness's ceiling)".into(),
            Center::Files => "files store".into(),
            Center::Postgres { replicas: 1 } => "PostgreSQL, 1 replica".into(),
            Center::Postgres { replicas } => {
                format!("PostgreSQL, {replicas} replicas behind nginx")
            }
        }
    }
}

/// How long a system tool the bench runs (`prlimit`, `df`) may take.
const TOOL_DEADLINE: Duration = Duration::from_secs(10);

/// Client threads posting batches.
const CLIENTS: usize = 8;
/// The descriptor limit ferry-cloud runs under (the usual soft default).
const NOFILE: u64 = 1024;

/// One simulated run: `devices` gateways of `per_device` records each, in batches of `batch`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub devices: usize,
    pub per_device: u64,
    pub batch: u64,
}

/// One request to make: a device's batch, gzipped, and what it must be answered.
struct Post {
    body: Vec<u8>,
    key: String,
    /// A clone's batch, which must be refused with 409.
    clash: bool,
}

/// Runs every shape against every center (for each shape the centers side by side) and
/// pushes the rows to section `s`.
pub fn run(
    bin_dir: &Path,
    work: &Path,
    shapes: &[Shape],
    centers: &[Center],
    s: &'static str,
    rows: &mut Vec<Row>,
) -> Result<()> {
    for shape in shapes {
        for &center in centers {
            one_center(bin_dir, work, *shape, center, s, rows)?;
        }
    }
    Ok(())
}

fn one_center(
    bin_dir: &Path,
    work: &Path,
    shape: Shape,
    center: Center,
    s: &'static str,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let dir = work.join(format!("fleet-{}", shape.devices));
    let r = one_run(bin_dir, &dir, shape, center)?;
    let _ = std::fs::remove_dir_all(&dir);
    let records = shape.devices as u64 * shape.per_device;
    let what = format!(
        "{} devices x {} records, batches of {}, {}",
        shape.devices,
        shape.per_device,
        shape.batch,
        center.label()
    );
    for (phase, p) in [("first contact", &r.first), ("steady state", &r.steady)] {
        println!(
            "   {what}, {phase}: {:.0} records/s, {} requests, p99 {:.1} ms, ferry-cloud cpu {:.1} s, {} retries, {} clashes refused",
            records as f64 / p.secs,
            p.requests,
            p.p99_ms,
            p.cloud_cpu,
            p.retries,
            p.clashes
        );
        rows.push(
            Row::new(
                s,
                format!("{what}, {phase}: records/s"),
                records as f64 / p.secs,
                "rec/s",
            )
            .note(format!(
                "{}; ferry-cloud cpu {:.1} s; p99 latency {:.1} ms; {} retries, {} clashing \
                 batches refused",
                match (center, phase) {
                    (Center::Ceiling, _) => "no parse, no store: HTTP and the clients alone",
                    (Center::Files, "first contact") => "every device new: its files are created",
                    (Center::Files, _) => "the devices' files exist",
                    (_, "first contact") => "every device new: its row is created",
                    _ => "every device known",
                },
                p.cloud_cpu,
                p.p99_ms,
                p.retries,
                p.clashes
            )),
        );
    }
    if let Some(CopyRates {
        key_order: copy,
        fleet_order,
    }) = r.copy_rate
    {
        let best = (2 * records) as f64 / (r.first.secs + r.steady.secs);
        println!(
            "   {what}: COPY of the same rows {copy:.0} records/s; ferry-cloud {:.2}x of it; \
             in the fleet's order {fleet_order:.0} records/s ({:.2}x), ferry-cloud {:.2}x of it",
            best / copy,
            fleet_order / copy,
            best / fleet_order
        );
        rows.push(
            Row::new(s, format!("{what}: both rounds vs COPY"), best / copy, "x").note(format!(
                "baseline: the same {} rows loaded by one COPY into a table keyed \
                     (device_id, seq), {copy:.0} records/s, same server, same run",
                2 * records
            )),
        );
        rows.push(
            Row::new(
                s,
                format!("{what}: both rounds vs COPY in the fleet's order"),
                best / fleet_order,
                "x",
            )
            .note(format!(
                "the same rows by one COPY round after round, as the fleet sends them: \
                 {fleet_order:.0} records/s, {:.2}x the COPY in key order (each device's \
                 second round goes into the middle of the key)",
                fleet_order / copy
            )),
        );
    }
    if center == Center::Ceiling {
        return Ok(());
    }
    let (slowest, slowest_ms) = r
        .views
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("-", 0.0));
    let each: Vec<String> = r
        .views
        .iter()
        .map(|(path, ms)| format!("{path} {ms:.1} ms"))
        .collect();
    println!("   {what}: fleet views {}", each.join(", "));
    rows.push(
        Row::new(s, format!("{what}: slowest fleet view"), slowest_ms, "ms").note(format!(
            "median of 5 GETs of each, after the run: {}; slowest {slowest}; the console's \
             bar is a page under 1,000 ms at 100,000 devices",
            each.join(", ")
        )),
    );
    println!(
        "   {what}: {:.0} B on disk per record; account balanced, nothing missing",
        r.disk_bytes as f64 / (2 * records) as f64
    );
    rows.push(
        Row::new(
            s,
            format!("{what}: bytes on disk per record"),
            r.disk_bytes as f64 / (2 * records) as f64,
            "B",
        )
        .note(format!(
            "{CLIENTS} client threads, two batches of a device at once, gzip; ferry-cloud \
             under a limit of {NOFILE} open files; afterwards the account balanced, nothing \
             missing or waiting{}",
            if center == Center::Files {
                ""
            } else {
                "; bytes: the database's directory"
            }
        )),
    );
    Ok(())
}

/// One phase of a run: a round of every device's batches.
struct Phase {
    secs: f64,
    requests: usize,
    retries: usize,
    clashes: usize,
    p99_ms: f64,
    cloud_cpu: f64,
}

struct RunResult {
    /// Every device sends for the first time: its files are created.
    first: Phase,
    /// Every device sends its next records: its files exist.
    steady: Phase,
    disk_bytes: u64,
    /// PostgreSQL: the same rows by one COPY.
    copy_rate: Option<CopyRates>,
    /// [`VIEWS`] and the median ms each took.
    views: Vec<(&'static str, f64)>,
}

/// The harness's ceiling: both rounds to a receiver that answers 200 at once.
fn ceiling_run(shape: Shape) -> Result<RunResult> {
    let sink = procs::NullSink::start()?;
    let urls = [sink.url()];
    Ok(RunResult {
        first: drive(&urls, &[], &encode(shape, 0), true)?,
        steady: drive(&urls, &[], &encode(shape, 1), true)?,
        disk_bytes: 0,
        copy_rate: None,
        views: Vec::new(),
    })
}

fn one_run(bin_dir: &Path, dir: &Path, shape: Shape, center: Center) -> Result<RunResult> {
    let data = dir.join("data");
    let bin = bin_dir.join("ferry-cloud");
    let (pg, clouds) = match center {
        Center::Ceiling => return ceiling_run(shape),
        Center::Files => (None, vec![Cloud::start(&bin, &data)?]),
        Center::Postgres { replicas } => {
            check_disk(dir, shape)?;
            let pg = ferry_testkit::Postgres::start(&dir.join("pg"), procs::free_port()?)?;
            let clouds = (0..replicas.max(1))
                .map(|i| Cloud::start_on(&bin, &dir.join(format!("replica-{i}")), Some(&pg.url())))
                .collect::<Result<Vec<_>>>()?;
            (Some(pg), clouds)
        }
    };
    for cloud in &clouds {
        let limited = ferry_testkit::output_within(
            std::process::Command::new("prlimit")
                .arg(format!("--pid={}", cloud.proc.pid()))
                .arg(format!("--nofile={NOFILE}:{NOFILE}")),
            "prlimit",
            TOOL_DEADLINE,
        )?;
        if !limited.status.success() {
            return Err(format!(
                "prlimit: {}: {}",
                limited.status,
                String::from_utf8_lossy(&limited.stderr)
            )
            .into());
        }
    }
    let nginx = match clouds.len() {
        1 => None,
        _ => {
            let ports: Vec<u16> = clouds.iter().map(|c| c.port).collect();
            Some(ferry_testkit::Nginx::start(
                &dir.join("nginx"),
                procs::free_port()?,
                &ports,
            )?)
        }
    };
    let urls = match &nginx {
        Some(nginx) => vec![nginx.url()],
        None => clouds.iter().map(Cloud::url).collect(),
    };
    let pids: Vec<String> = clouds.iter().map(|c| c.proc.pid().to_string()).collect();
    let first = drive(&urls, &pids, &encode(shape, 0), false)?;
    let steady = drive(&urls, &pids, &encode(shape, 1), false)?;
    check_account(&clouds[0], shape)?;
    let views = time_views(&clouds[0])?;
    let copy_rate = match &pg {
        Some(pg) => Some(copy_baselines(pg, dir, shape)?),
        None => None,
    };
    Ok(RunResult {
        first,
        steady,
        disk_bytes: dir_bytes(&if pg.is_some() { dir.join("pg") } else { data }),
        copy_rate,
        views,
    })
}

/// The fleet views an operator's console asks for, and what each takes (median of 5, ms).
const VIEWS: [&str; 4] = [
    "/v1/devices?limit=100",
    "/v1/devices?state=behind&sort=waiting&limit=100",
    "/v1/devices?prefix=gw-00001&limit=100",
    "/metrics",
];

fn time_views(cloud: &Cloud) -> Result<Vec<(&'static str, f64)>> {
    let http = http_agent();
    let mut out = Vec::new();
    for path in VIEWS {
        let mut ms = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let mut response = http
                .get(format!("http://127.0.0.1:{}{path}", cloud.port))
                .call()?;
            let status = response.status().as_u16();
            response.body_mut().read_to_string()?;
            if status != 200 {
                return Err(format!("GET {path}: {status}").into());
            }
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        out.push((path, ms[ms.len() / 2]));
    }
    Ok(out)
}

/// PostgreSQL's own bulk load of the same rows as both rounds (every device's `2 * per_device`
/// records as the store keeps them: device, seq, the record's JSON line), by one `COPY` into a
/// table keyed like `ferry_records` (device ids compared byte by byte), records/s.
#[derive(Debug, Clone, Copy)]
struct CopyRates {
    /// In key order, device after device: every row goes at the end of the key. The engine's
    /// fastest case, and the target's baseline.
    key_order: f64,
    /// In the order the fleet sends them, round after round: each device's second round goes
    /// into the middle of the key, where ferry-cloud has to put it too.
    fleet_order: f64,
}

fn copy_baselines(pg: &ferry_testkit::Postgres, dir: &Path, shape: Shape) -> Result<CopyRates> {
    let records = 2 * shape.per_device;
    let key_order = copy_baseline(pg, dir, shape, |out| {
        for d in 0..shape.devices {
            for seq in 1..=records {
                copy_row(out, d, seq)?;
            }
        }
        Ok(())
    })?;
    let fleet_order = copy_baseline(pg, dir, shape, |out| {
        for round in 0..2 {
            for d in 0..shape.devices {
                for seq in round * shape.per_device + 1..=(round + 1) * shape.per_device {
                    copy_row(out, d, seq)?;
                }
            }
        }
        Ok(())
    })?;
    Ok(CopyRates {
        key_order,
        fleet_order,
    })
}

/// One row of the baseline's file: the record line as the simulator sends it; COPY's text
/// format doubles backslashes (the lines have none) and needs no quoting of JSON's quotes.
fn copy_row(out: &mut impl std::io::Write, device: usize, seq: u64) -> std::io::Result<()> {
    writeln!(out, "gw-{device:06}\t{seq}\t{}", record_line(seq, ""))
}

/// The rows `write` writes, loaded by one `COPY` into an empty table keyed like `ferry_records`
/// (dropped afterwards, with its file); records/s.
fn copy_baseline(
    pg: &ferry_testkit::Postgres,
    dir: &Path,
    shape: Shape,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<f64> {
    let file = dir.join("copy.tsv");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
    write(&mut out)?;
    out.flush()?;
    drop(out);
    pg.psql(
        "CREATE TABLE copy_baseline (device_id text COLLATE \"C\" NOT NULL, seq int8 NOT NULL, \
         line text NOT NULL, PRIMARY KEY (device_id, seq))",
    )?;
    let records = 2 * shape.per_device * shape.devices as u64;
    let started = Instant::now();
    // psql takes one meta-command alone; the server runs with synchronous_commit on.
    // A large fleet's rows take longer than psql's usual deadline: 50,000 a second at least.
    let deadline = ferry_testkit::PSQL_DEADLINE.max(Duration::from_secs(records / 50_000));
    pg.psql_within(
        &format!("\\copy copy_baseline FROM '{}'", file.display()),
        deadline,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    pg.psql("DROP TABLE copy_baseline")?;
    Ok(records as f64 / secs)
}

/// Bytes on disk per record a PostgreSQL run is allowed for: the database's directory, WAL
/// included (510 B measured at 10 million records, 240 B at 50 million; up to 1,200 B at a
/// million, where the WAL kept weighs more), and one COPY baseline's file and table at a time
/// (about 250 B).
const PG_BYTES_PER_RECORD: u64 = 1_000;

/// Refuses a PostgreSQL run whose records would not fit on the disk under `dir`, before it fills
/// the disk half way.
fn check_disk(dir: &Path, shape: Shape) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let out = ferry_testkit::output_within(
        std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(dir),
        "df",
        TOOL_DEADLINE,
    )?;
    let free: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("df {}: no free space in its answer", dir.display()))?;
    let needed = 2 * shape.devices as u64 * shape.per_device * PG_BYTES_PER_RECORD;
    if free < needed {
        return Err(format!(
            "{} devices x {} records on PostgreSQL need up to {:.1} GB under {}, which has {:.1} GB free",
            shape.devices,
            shape.per_device,
            needed as f64 / 1e9,
            dir.display(),
            free as f64 / 1e9
        )
        .into());
    }
    Ok(())
}

/// Sends `posts` from [`CLIENTS`] threads, each taking the next one when done with its last;
/// client `n` posts to `urls[n % urls.len()]`. The CPU reported is that of the processes
/// `pids`. `any_200`: a 200 is the final answer of every post (the ceiling's receiver cannot
/// refuse a clone).
fn drive(urls: &[String], pids: &[String], posts: &[Post], any_200: bool) -> Result<Phase> {
    let cpu = || pids.iter().map(|p| procs::cpu_secs(p)).sum::<f64>();
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(posts.len()));
    let retries = AtomicUsize::new(0);
    let clashes = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let cpu0 = cpu();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for n in 0..CLIENTS {
            let url = &urls[n % urls.len()];
            let (next, latencies, retries, clashes, failure) =
                (&next, &latencies, &retries, &clashes, &failure);
            let spawned = std::thread::Builder::new()
                .name(format!("fleet-client-{n}"))
                .spawn_scoped(scope, move || {
                    let agent = http_agent();
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(post) = posts.get(i) else { break };
                        match send(&agent, url, post, any_200) {
                            Ok((took, tries)) => {
                                mine.push(took);
                                retries.fetch_add(tries, Ordering::Relaxed);
                                if post.clash && !any_200 {
                                    clashes.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                next.store(posts.len(), Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    latencies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(mine);
                });
            if let Err(e) = spawned {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("cannot start a client thread: {e}"));
            }
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let cloud_cpu = cpu() - cpu0;
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.into());
    }
    let mut lat = latencies.into_inner().unwrap_or_else(|p| p.into_inner());
    lat.sort_unstable();
    let p99 = lat
        .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    Ok(Phase {
        secs,
        requests: posts.len(),
        retries: retries.into_inner(),
        clashes: clashes.into_inner(),
        p99_ms: p99.as_secs_f64() * 1000.0,
        cloud_cpu,
    })
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// POSTs `post` until it gets its final answer: 200, or 409 for a clone. Transient answers are
/// retried with backoff (at most 20 tries). Returns the last attempt's latency and the retries.
fn send(
    agent: &ureq::Agent,
    url: &str,
    post: &Post,
    any_200: bool,
) -> std::result::Result<(Duration, usize), String> {
    let mut backoff = Duration::from_millis(10);
    for tries in 0..20 {
        let t = Instant::now();
        let answer = agent
            .post(url)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip")
            .header("Idempotency-Key", &post.key)
            .send(&post.body[..]);
        let took = t.elapsed();
        let status = match answer {
            Ok(mut r) => {
                let _ = r.body_mut().read_to_vec();
                r.status().as_u16()
            }
            Err(_) => 0,
        };
        match status {
            200 if !post.clash || any_200 => return Ok((took, tries)),
            409 if post.clash => return Ok((took, tries)),
            0 | 429 | 500..=599 => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return Err(format!("{}: status {other}", post.key)),
        }
    }
    Err(format!("{}: no final answer after 20 tries", post.key))
}

/// The requests of round `round` (0: each device's first `per_device` records, 1: its next
/// ones), in the order they go out: both batches of a device next to each other, so that two
/// client threads send them at once. In round 0 the adversity, the clones last.
fn encode(shape: Shape, round: u64) -> Vec<Post> {
    let mut posts = Vec::new();
    let mut clones = Vec::new();
    let batches = shape.per_device.div_ceil(shape.batch);
    let base = round * shape.per_device;
    let head = base + shape.per_device;
    const GAP: &str = r#","gaps":[{"from_seq":1,"to_seq":2,"reason":"journal_full"}]"#;
    for d in 0..shape.devices {
        let id = format!("gw-{d:06}");
        // Every 100th device declares seqs 1..=2 a gap (its first two records were dropped
        // when its journal was full) instead of sending them, and resends its first batch.
        let gappy = round == 0 && d % 100 == 7;
        for b in 0..batches {
            let first = base + b * shape.batch + 1;
            let last = (base + (b + 1) * shape.batch).min(head);
            // The gateway's cursor is below both batches in flight.
            let acked = (base + b * shape.batch).saturating_sub(shape.batch);
            let (from, gaps) = if gappy && b == 0 {
                (3, GAP)
            } else {
                (first, "")
            };
            posts.push(post(&id, from..=last, gaps, "", head, acked, false));
        }
        if gappy && batches > 1 {
            // A lost answer: the first batch comes again after the last.
            posts.push(post(
                &id,
                3..=shape.batch.min(head),
                GAP,
                "",
                head,
                0,
                false,
            ));
        }
        if round == 0 && d % 1000 == 500 {
            // A cloned image: another gateway with this id sends seq 1 with its own content, at
            // the end of the round (the device's own batches are long stored by then).
            clones.push(post(&id, 1..=1, "", "clone", head, 0, true));
        }
    }
    posts.extend(clones);
    posts
}

/// One gzipped batch of `seqs` of device `id` with `gaps` (JSON to append after the records)
/// and the account `held` = (`head`, `acked`); `salt` makes a clone's content differ.
fn post(
    id: &str,
    seqs: std::ops::RangeInclusive<u64>,
    gaps: &str,
    salt: &str,
    head: u64,
    acked: u64,
    clash: bool,
) -> Post {
    let (first, last) = (*seqs.start(), *seqs.end());
    let mut json = format!(r#"{{"device_id":"{id}","records":["#);
    for seq in seqs {
        if seq > first {
            json.push(',');
        }
        json.push_str(&record_line(seq, salt));
    }
    json.push(']');
    json.push_str(gaps);
    json.push_str(&format!(
        r#","held":{{"head_seq":{head},"acked_seq":{acked},"oldest_unsent_ts_ms":1763700000000}}}}"#
    ));
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(json.as_bytes());
    Post {
        body: enc.finish().unwrap_or_default(),
        key: format!("{id}:{first}-{last}"),
        clash,
    }
}

/// Record `seq` of a simulated gateway, as one line of JSON; `salt` makes a clone's differ.
fn record_line(seq: u64, salt: &str) -> String {
    format!(
        r#"{{"seq":{seq},"ts_ms":{},"topic":"site/line-{}/temp","payload":{{"t":{}.{},"src":"{salt}"}}}}"#,
        1_763_700_000_000u64 + seq * 1000,
        seq % 8,
        20 + seq % 10,
        seq % 100
    )
}

/// After the run: every device listed, every record delivered, nothing missing, the account
/// balanced (`/metrics`).
fn check_account(cloud: &Cloud, shape: Shape) -> Result<()> {
    let metrics = http_agent()
        .get(format!("http://127.0.0.1:{}/metrics", cloud.port))
        .call()?
        .body_mut()
        .read_to_string()?;
    let value = |name: &str| -> Option<u64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let gappy = (0..shape.devices).filter(|d| d % 100 == 7).count() as u64;
    let want_delivered = 2 * shape.devices as u64 * shape.per_device - 2 * gappy;
    let checks = [
        ("ferry_cloud_devices{state=\"all\"} ", shape.devices as u64),
        ("ferry_cloud_ledger_delivered_records ", want_delivered),
        ("ferry_cloud_ledger_gap_records ", 2 * gappy),
        ("ferry_cloud_ledger_missing_records ", 0),
        ("ferry_cloud_ledger_waiting_records ", 0),
        ("ferry_cloud_ledger_unbalanced_devices ", 0),
    ];
    for (name, want) in checks {
        if value(name) != Some(want) {
            return Err(format!(
                "after the fleet run {}is {:?}, not {want}",
                name,
                value(name)
            )
            .into());
        }
    }
    Ok(())
}
