//! The center under a fleet (`ferry-bench --only fleet`, `make bench-fleet`): simulated gateways
//! speaking protocol v1 as the agent does against the release `ferry-cloud` on its embedded
//! `files` store, run under the usual limit of 1,024 open files.
//!
//! Each simulated gateway sends its records in gzipped batches with idempotency keys and its
//! `held` account; a device's two batches go out at once from two client threads (the agent
//! keeps two in flight); a transient answer (transport error, 5xx, 429) is retried with
//! backoff. Some devices add adversity: every 100th declares a gap and resends its first batch
//! after the second (a lost answer), every 1,000th is cloned (a second gateway sends its seqs
//! with other content, which must be answered 409). After the run the fleet's account must
//! balance: every record delivered, no seq missing (`/metrics`). The PostgreSQL rows of issue 12
//! are not built yet.

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::procs::{self, Cloud};
use crate::report::Row;
use crate::store::{Result, dir_bytes};

pub const SECTION: &str = "fleet: ferry-cloud under many gateways (files store)";
const S: &str = SECTION;

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

pub fn run(bin_dir: &Path, work: &Path, shapes: &[Shape], rows: &mut Vec<Row>) -> Result<()> {
    for shape in shapes {
        let dir = work.join(format!("fleet-{}", shape.devices));
        let r = one_run(bin_dir, &dir, *shape)?;
        let _ = std::fs::remove_dir_all(&dir);
        let records = shape.devices as u64 * shape.per_device;
        let what = format!(
            "{} devices x {} records, batches of {}",
            shape.devices, shape.per_device, shape.batch
        );
        println!(
            "   {what}: {:.0} records/s, {} requests, p99 {:.1} ms, ferry-cloud cpu {:.1} s, {:.0} B on disk per record, {} clashes refused",
            records as f64 / r.secs,
            r.requests,
            r.p99_ms,
            r.cloud_cpu,
            r.disk_bytes as f64 / records as f64,
            r.clashes
        );
        rows.push(
            Row::new(
                S,
                format!("{what}: records/s"),
                records as f64 / r.secs,
                "rec/s",
            )
            .note(format!(
                "{CLIENTS} client threads, two batches of a device at once, gzip; ferry-cloud \
                     under a limit of {NOFILE} open files, cpu {:.1} s; {} retries; account \
                     balanced, nothing missing, {} clashing batches refused",
                r.cloud_cpu, r.retries, r.clashes
            )),
        );
        rows.push(Row::new(
            S,
            format!("{what}: request latency p99"),
            r.p99_ms,
            "ms",
        ));
        rows.push(Row::new(
            S,
            format!("{what}: bytes on disk per record"),
            r.disk_bytes as f64 / records as f64,
            "B",
        ));
    }
    Ok(())
}

struct RunResult {
    secs: f64,
    requests: usize,
    retries: usize,
    clashes: usize,
    p99_ms: f64,
    cloud_cpu: f64,
    disk_bytes: u64,
}

fn one_run(bin_dir: &Path, dir: &Path, shape: Shape) -> Result<RunResult> {
    let data = dir.join("data");
    let cloud = Cloud::start(&bin_dir.join("ferry-cloud"), &data)?;
    let pid = cloud.proc.pid();
    let limited = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .status()?;
    if !limited.success() {
        return Err(format!("prlimit: {limited}").into());
    }
    let posts = encode(shape);
    let url = cloud.url();
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(posts.len()));
    let retries = AtomicUsize::new(0);
    let clashes = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let cpu0 = procs::cpu_secs(&pid.to_string());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for n in 0..CLIENTS {
            let (posts, url, next, latencies, retries, clashes, failure) = (
                &posts, &url, &next, &latencies, &retries, &clashes, &failure,
            );
            let spawned = std::thread::Builder::new()
                .name(format!("fleet-client-{n}"))
                .spawn_scoped(scope, move || {
                    let agent = http_agent();
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(post) = posts.get(i) else { break };
                        match send(&agent, url, post) {
                            Ok((took, tries)) => {
                                mine.push(took);
                                retries.fetch_add(tries, Ordering::Relaxed);
                                if post.clash {
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
    let cloud_cpu = procs::cpu_secs(&pid.to_string()) - cpu0;
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.into());
    }
    check_account(&cloud, shape)?;
    let mut lat = latencies.into_inner().unwrap_or_else(|p| p.into_inner());
    lat.sort_unstable();
    let p99 = lat
        .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    Ok(RunResult {
        secs,
        requests: posts.len(),
        retries: retries.into_inner(),
        clashes: clashes.into_inner(),
        p99_ms: p99.as_secs_f64() * 1000.0,
        cloud_cpu,
        disk_bytes: dir_bytes(&data),
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
            200 if !post.clash => return Ok((took, tries)),
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

/// The requests of the run, in the order they go out: both batches of a device next to each
/// other, so that two client threads send them at once; the clones last.
fn encode(shape: Shape) -> Vec<Post> {
    let mut posts = Vec::new();
    let mut clones = Vec::new();
    let batches = shape.per_device.div_ceil(shape.batch);
    for d in 0..shape.devices {
        let id = format!("gw-{d:06}");
        let mut device_posts = Vec::new();
        for b in 0..batches {
            let first = b * shape.batch + 1;
            let last = ((b + 1) * shape.batch).min(shape.per_device);
            // Every 100th device declares seqs 1..=2 a gap (its first two records were dropped
            // when its journal was full) instead of sending them.
            let gappy = d % 100 == 7;
            let from = if gappy && first == 1 { 3 } else { first };
            let gaps = if gappy && first == 1 {
                r#","gaps":[{"from_seq":1,"to_seq":2,"reason":"journal_full"}]"#
            } else {
                ""
            };
            device_posts.push(post(&id, from..=last, gaps, "", shape, b, false));
        }
        if d % 100 == 7 && device_posts.len() > 1 {
            // A lost answer: the first batch comes again after the last.
            let again = post(
                &id,
                3..=shape.batch.min(shape.per_device),
                r#","gaps":[{"from_seq":1,"to_seq":2,"reason":"journal_full"}]"#,
                "",
                shape,
                0,
                false,
            );
            device_posts.push(again);
        }
        if d % 1000 == 500 {
            // A cloned image: another gateway with this id sends seq 1 with its own content, at
            // the end of the run (the device's own batches are long stored by then).
            clones.push(post(&id, 1..=1, "", "clone", shape, 0, true));
        }
        posts.extend(device_posts);
    }
    posts.extend(clones);
    posts
}

fn post(
    id: &str,
    seqs: std::ops::RangeInclusive<u64>,
    gaps: &str,
    salt: &str,
    shape: Shape,
    batch_index: u64,
    clash: bool,
) -> Post {
    let (first, last) = (*seqs.start(), *seqs.end());
    let mut json = format!(r#"{{"device_id":"{id}","records":["#);
    for seq in seqs {
        if seq > first {
            json.push(',');
        }
        json.push_str(&format!(
            r#"{{"seq":{seq},"ts_ms":{},"topic":"site/line-{}/temp","payload":{{"t":{}.{},"src":"{salt}"}}}}"#,
            1_763_700_000_000u64 + seq * 1000,
            seq % 8,
            20 + seq % 10,
            seq % 100
        ));
    }
    json.push(']');
    json.push_str(gaps);
    // The account a gateway sends: it holds everything; its cursor is below this batch.
    json.push_str(&format!(
        r#","held":{{"head_seq":{},"acked_seq":{},"oldest_unsent_ts_ms":1763700000000}}}}"#,
        shape.per_device,
        (batch_index * shape.batch).saturating_sub(shape.batch),
    ));
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(json.as_bytes());
    Post {
        body: enc.finish().unwrap_or_default(),
        key: format!("{id}:{first}-{last}"),
        clash,
    }
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
    let want_delivered = shape.devices as u64 * shape.per_device - 2 * gappy;
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
