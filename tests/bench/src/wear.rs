//! The `wear` section: what a gateway's card and memory pay while 1,000 QoS1 messages/s flow
//! through ferry to a live ferry-cloud, per `journal.commit_wait`, and the same publisher through
//! the peer many operators use instead, a mosquitto bridge.
//!
//! - Bytes written per payload byte: the kernel's count for the process (`/proc/<pid>/io`
//!   `write_bytes`, ferry's `/status` `disk.written_bytes`), over the payload bytes it took in.
//!   The physical limit is measured in the same run: the same number of frames (payload, topic,
//!   seq, timestamp, length, CRC) appended to one file and `fdatasync`ed in as many groups as
//!   ferry committed, counted the same way for the thread that writes them.
//! - PUBACK delay: ferry's own, to the broker, from a message's arrival to its PUBACK, which
//!   waits for the group commit that makes it durable (`/status` `puback_delay`, a histogram: the
//!   figures are bucket bounds). The publisher's PUBACK comes from mosquitto at once, with ferry
//!   or the bridge behind it; it is measured too (from PUBLISH leaving to PUBACK arriving).
//! - RSS while the messages flow (VmRSS at the end of the flow, VmHWM over the run).
//!
//! The bridge: an edge mosquitto (persistence on, as the README's recommended config, autosave at
//! its default) bridged with `cleansession false` and QoS1 to a cloud mosquitto, and a subscriber
//! there. mosquitto writes its persistence file only at autosave and exit: what it acknowledged
//! in between is in memory only, which is why its write figure is near zero.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::procs::{self, Agent, Cloud};
use crate::report::{self, Row, Target};
use crate::store::{PAYLOAD, Result, payload};

pub const SECTION: &str = "card wear, PUBACK delay, RSS at 1,000 msg/s";
const S: &str = SECTION;
/// The publisher's steady rate.
pub const RATE: usize = 1000;
/// The topic the paced publisher uses; `TOPIC_LEN` is in every frame of the raw baseline.
const TOPIC: &str = "bench/t";
/// The commit waits compared (the settings).
const WAITS_MS: [u64; 4] = [0, 10, 50, 100];

/// The publisher's PUBACK latencies of a paced run.
pub struct Paced {
    pub latencies: Vec<Duration>,
}

impl Paced {
    /// The `q` quantile (0..=1) in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        let mut v = self.latencies.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

/// Publishes `rate` QoS1 messages/s of [`PAYLOAD`] bytes on `bench/t` for `secs` seconds and
/// records each PUBACK's latency.
pub fn paced_publish(port: u16, rate: usize, secs: u64) -> Result<Paced> {
    use rumqttc::{Event, Incoming, Outgoing, QoS};
    let n = rate * secs as usize;
    let (client, mut conn) =
        procs::mqtt_client(port, &format!("bench-paced-{}", procs::free_port()?));
    let sender = std::thread::Builder::new()
        .name("paced-publisher".into())
        .spawn(move || {
            let start = Instant::now();
            for i in 0..n {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if client
                    .publish(TOPIC, QoS::AtLeastOnce, false, payload(i as u64))
                    .is_err()
                {
                    break;
                }
            }
            client
        })?;
    let mut sent_at: HashMap<u16, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(n);
    let end = Instant::now() + Duration::from_secs(secs + 120);
    while latencies.len() < n {
        if Instant::now() >= end {
            return Err(format!("paced publisher: {} of {n} acked", latencies.len()).into());
        }
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                sent_at.insert(pkid, Instant::now());
            }
            Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                if let Some(t) = sent_at.remove(&ack.pkid) {
                    latencies.push(t.elapsed());
                }
            }
            Ok(Err(e)) => return Err(format!("paced publisher: {e}").into()),
            _ => {}
        }
    }
    let client = sender.join().map_err(|_| "paced publisher panicked")?;
    let _ = client.disconnect();
    Ok(Paced { latencies })
}

/// `write_bytes` of a process (`/proc/<pid>/io`), or of the calling thread (`thread-self`).
pub fn write_bytes(who: &str) -> Result<u64> {
    ferry::status::written_bytes_of(who)
        .ok_or_else(|| format!("/proc/{who}/io has no write_bytes").into())
}

/// The physical limit: `records` frames of [`PAYLOAD`]-byte payloads on [`TOPIC`] (with seq,
/// timestamp, length and CRC, as a journal frame carries) appended to one file in `groups` groups
/// of equal size, each `fdatasync`ed. Returns the bytes the writing thread caused to be written.
pub fn raw_frames_written(dir: &Path, records: u64, groups: u64) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("raw-frames.log");
    let groups = groups.clamp(1, records.max(1));
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("raw-frames".into())
        .spawn(move || -> std::result::Result<u64, String> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| e.to_string())?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| e.to_string())?;
            let before = write_bytes("thread-self").map_err(|e| e.to_string())?;
            let mut seq = 0u64;
            let mut buf = Vec::new();
            for g in 0..groups {
                // Records spread evenly over the groups.
                let upto = records * (g + 1) / groups;
                buf.clear();
                while seq < upto {
                    seq += 1;
                    let body = payload(seq);
                    let len = (8 + 8 + 1 + TOPIC.len() + body.len()) as u32;
                    buf.extend_from_slice(&len.to_le_bytes());
                    buf.extend_from_slice(&0u32.to_le_bytes()); // the CRC's place
                    buf.extend_from_slice(&seq.to_le_bytes());
                    buf.extend_from_slice(&1_763_700_000_000u64.to_le_bytes());
                    buf.push(TOPIC.len() as u8);
                    buf.extend_from_slice(TOPIC.as_bytes());
                    buf.extend_from_slice(&body);
                }
                file.write_all(&buf).map_err(|e| e.to_string())?;
                file.sync_data().map_err(|e| e.to_string())?;
            }
            let after = write_bytes("thread-self").map_err(|e| e.to_string())?;
            Ok(after - before)
        })?
        .join()
        .map_err(|_| "raw-frames thread panicked")?
        .map_err(Into::into)
}

/// `write_bytes` of each of a process's threads, summed per thread name with its number dropped
/// (`sled-io-3` counts as `sled-io`).
fn thread_writes(pid: u32) -> std::collections::BTreeMap<String, u64> {
    per_thread(pid, |task| write_bytes(task).ok())
}

/// CPU time (user + system, in 10 ms clock ticks) of each of a process's threads, summed per
/// thread name as in [`thread_writes`].
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, u64> {
    per_thread(pid, |task| {
        Some((procs::cpu_secs(task) * 100.0).round() as u64)
    })
}

/// `figure("<pid>/task/<tid>")` for each of a process's threads, summed per thread name with
/// its number dropped.
fn per_thread(
    pid: u32,
    figure: impl Fn(&str) -> Option<u64>,
) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = comm
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .trim_end_matches('-');
        if let Some(v) = figure(&format!("{pid}/task/{tid}")) {
            *out.entry(name.to_owned()).or_default() += v;
        }
    }
    out
}

/// What each thread group wrote between two [`thread_writes`], as `name N KiB` parts.
fn thread_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    per_thread_delta(before, after, |w| format!("{} KiB", w / 1024))
}

/// The CPU each thread group took between two [`thread_cpu`], as `name 0.00 s` parts.
fn thread_cpu_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    per_thread_delta(before, after, |t| format!("{:.2} s", t as f64 / 100.0))
}

fn per_thread_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    show: impl Fn(u64) -> String,
) -> String {
    after
        .iter()
        .map(|(name, v)| {
            (
                name,
                v.saturating_sub(before.get(name).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .map(|(name, v)| format!("{name} {}", show(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bucket bound (ms) of the `q` quantile of ferry's PUBACK delays between two `/status`
/// readings (`puback_delay`: bounds and counts per bucket); `None` above the last bound.
fn delay_at_most_ms(s0: &serde_json::Value, s1: &serde_json::Value, q: f64) -> Option<u64> {
    let counts = |s: &serde_json::Value| -> Vec<u64> {
        s["puback_delay"]["counts"]
            .as_array()
            .map(|a| a.iter().map(u).collect())
            .unwrap_or_default()
    };
    let (c0, c1) = (counts(s0), counts(s1));
    let diff: Vec<u64> = c1
        .iter()
        .enumerate()
        .map(|(i, c)| c.saturating_sub(c0.get(i).copied().unwrap_or(0)))
        .collect();
    let bounds: Vec<u64> = s1["puback_delay"]["le_ms"]
        .as_array()
        .map(|a| a.iter().map(u).collect())
        .unwrap_or_default();
    ferry::status::quantile_at_most(&bounds, &diff, q)
}

/// A PUBACK delay bound from [`delay_at_most_ms`], as the notes print it.
fn bound(b: Option<u64>) -> String {
    b.map_or("over 5,000 ms".to_string(), |b| format!("at most {b} ms"))
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Starts `ferry run` in `work` on the broker at `mqtt_port`, uploading to `url`, with extra
/// `[journal]` keys; returns once a first message went through to the uplink (the session and
/// the subscription are up before anything is counted).
fn start_uploading(
    bin_dir: &Path,
    work: &Path,
    mqtt_port: u16,
    url: &str,
    journal_extra: &str,
) -> Result<Agent> {
    let control = procs::free_port()?;
    let config = procs::agent_config_with(
        &work.join("journal"),
        mqtt_port,
        url,
        control,
        journal_extra,
        "",
    );
    let agent = Agent::start(
        &bin_dir.join("ferry"),
        &work.join("agent"),
        &config,
        control,
    )?;
    procs::wait_for(
        "ferry's MQTT session",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(agent.status()?["mqtt_connected"] == true),
    )?;
    procs::publish(mqtt_port, 1)?;
    procs::wait_for(
        "the first message uploaded",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(u(&agent.status()?["acked_seq"]) >= 1),
    )?;
    Ok(agent)
}

/// One paced run of ferry with `journal.commit_wait = wait_ms`.
struct FerryRun {
    written: u64,
    payload: u64,
    records: u64,
    commits: u64,
    paced: Paced,
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
    /// Bytes written per thread group over the run.
    by_thread: String,
    /// ferry's own PUBACK delay (to the broker), p50 and p99, as bucket bounds in ms.
    puback_p50: Option<u64>,
    puback_p99: Option<u64>,
}

fn ferry_run(bin_dir: &Path, work: &Path, wait_ms: u64, secs: u64) -> Result<FerryRun> {
    let broker = procs::mosquitto(&work.join("mosquitto"), crate::INFLIGHT)?;
    let mut cloud = Cloud::start(&bin_dir.join("ferry-cloud"), &work.join("cloud"))?;
    let mut agent = start_uploading(
        bin_dir,
        work,
        broker.port,
        &cloud.url(),
        &format!("commit_wait = \"{wait_ms}ms\""),
    )?;
    let status = |a: &Agent| a.status();
    let pid = agent.proc.pid();
    let t0 = thread_writes(pid);
    let s0 = status(&agent)?;
    let paced = paced_publish(broker.port, RATE, secs)?;
    let (_, rss_kib) = procs::rss_kib(pid);
    let want = u(&s0["head_seq"]) + (RATE as u64) * secs;
    procs::wait_for(
        "every message at the cloud",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || Ok(u(&status(&agent)?["acked_seq"]) >= want),
    )?;
    let s1 = status(&agent)?;
    let by_thread = thread_delta(&t0, &thread_writes(pid));
    let (hwm_kib, _) = procs::rss_kib(pid);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    agent.proc.stop()?;
    cloud.proc.stop()?;
    let delta = |path: &str| {
        u(&s1.pointer(path).cloned().unwrap_or_default())
            - u(&s0.pointer(path).cloned().unwrap_or_default())
    };
    Ok(FerryRun {
        written: delta("/disk/written_bytes"),
        payload: delta("/totals/ingested_bytes"),
        records: delta("/totals/ingested"),
        commits: delta("/totals/journal_commits"),
        paced,
        rss_kib,
        hwm_kib,
        threads,
        by_thread,
        puback_p50: delay_at_most_ms(&s0, &s1, 0.5),
        puback_p99: delay_at_most_ms(&s0, &s1, 0.99),
    })
}

/// End to end as fast as it goes: `n` messages from the publisher until ferry-cloud acknowledged
/// them all (ferry's `acked_seq`). Messages/s.
fn ferry_end_to_end(
    bin_dir: &Path,
    work: &Path,
    n: usize,
    null_sink: bool,
    inflight: u32,
) -> Result<EndToEnd> {
    let broker = procs::mosquitto(&work.join("mosquitto"), inflight)?;
    let sink = if null_sink {
        Some(procs::NullSink::start()?)
    } else {
        None
    };
    let mut cloud = match sink {
        Some(_) => None,
        None => Some(Cloud::start(
            &bin_dir.join("ferry-cloud"),
            &work.join("cloud"),
        )?),
    };
    let url = match (&sink, &cloud) {
        (Some(s), _) => s.url(),
        (None, Some(c)) => c.url(),
        (None, None) => return Err("no uplink".into()),
    };
    let mut agent = start_uploading(bin_dir, work, broker.port, &url, "")?;
    let agent_pid = agent.proc.pid().to_string();
    let cloud_pid = cloud.as_ref().map(|c| c.proc.pid().to_string());
    let cpu = |pid: &Option<String>| pid.as_deref().map_or(0.0, procs::cpu_secs);
    let broker_pid = broker.pid().map(|p| p.to_string());
    let (a0, c0, b0) = (
        procs::cpu_secs(&agent_pid),
        cpu(&cloud_pid),
        cpu(&broker_pid),
    );
    let t0 = thread_cpu(agent.proc.pid());
    let s0 = agent.status()?;
    let (rate, _) = procs::ingest_rate(broker.port, n, || Ok(u(&agent.status()?["acked_seq"])))?;
    let s1 = agent.status()?;
    let puback = (
        delay_at_most_ms(&s0, &s1, 0.5),
        delay_at_most_ms(&s0, &s1, 0.99),
    );
    let (agent_cpu, cloud_cpu) = (procs::cpu_secs(&agent_pid) - a0, cpu(&cloud_pid) - c0);
    let broker_cpu = cpu(&broker_pid) - b0;
    let by_thread = thread_cpu_delta(&t0, &thread_cpu(agent.proc.pid()));
    agent.proc.stop()?;
    if let Some(c) = cloud.as_mut() {
        c.proc.stop()?;
    }
    Ok(EndToEnd {
        rate,
        agent_cpu,
        cloud_cpu,
        broker_cpu,
        by_thread,
        puback,
    })
}

/// An end-to-end run: messages/s, and the CPU seconds ferry and ferry-cloud took meanwhile.
struct EndToEnd {
    rate: f64,
    agent_cpu: f64,
    cloud_cpu: f64,
    /// The broker's CPU seconds meanwhile.
    broker_cpu: f64,
    /// ferry's CPU per thread group.
    by_thread: String,
    /// ferry's PUBACK delay, p50 and p99 (bucket bounds, ms; `None` above the last).
    puback: (Option<u64>, Option<u64>),
}

/// The same through the bridge: until the subscriber at the cloud broker counted them all.
/// Messages/s, and the CPU seconds the edge and the cloud broker took meanwhile.
fn bridge_end_to_end(work: &Path, n: usize) -> Result<(f64, f64, f64)> {
    let (cloud, edge, sub) = bridge(work)?;
    let pid = |m: &ferry_testkit::Mosquitto| m.pid().map_or(String::new(), |p| p.to_string());
    let (edge_pid, cloud_pid) = (pid(&edge), pid(&cloud));
    let (e0, c0) = (procs::cpu_secs(&edge_pid), procs::cpu_secs(&cloud_pid));
    let (rate, _) = procs::ingest_rate(edge.port, n, || {
        Ok(sub.received.load(std::sync::atomic::Ordering::Relaxed))
    })?;
    Ok((
        rate,
        procs::cpu_secs(&edge_pid) - e0,
        procs::cpu_secs(&cloud_pid) - c0,
    ))
}

/// A cloud mosquitto, an edge mosquitto bridged to it, and a subscriber at the cloud; returns
/// once a message went through.
fn bridge(
    work: &Path,
) -> Result<(
    ferry_testkit::Mosquitto,
    ferry_testkit::Mosquitto,
    procs::Subscriber,
)> {
    let cloud = procs::mosquitto(&work.join("cloud-mosquitto"), crate::INFLIGHT)?;
    let conf = format!(
        "max_inflight_messages {}\nconnection cloud\naddress 127.0.0.1:{}\ntopic bench/# out 1\n\
         cleansession false\nbridge_protocol_version mqttv311\nremote_clientid bench-bridge\n",
        crate::INFLIGHT,
        cloud.port
    );
    let edge =
        ferry_testkit::Mosquitto::start(&work.join("edge-mosquitto"), procs::free_port()?, &conf)?;
    let sub = procs::Subscriber::start(cloud.port)?;
    procs::wait_for(
        "the bridge to carry a message",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            if sub.received.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                procs::publish(edge.port, 1)?;
            }
            Ok(sub.received.load(std::sync::atomic::Ordering::Relaxed) > 0)
        },
    )?;
    Ok((cloud, edge, sub))
}

/// One paced run through an edge mosquitto bridged to a cloud mosquitto.
struct BridgeRun {
    written: u64,
    payload: u64,
    paced: Paced,
    rss_kib: u64,
    hwm_kib: u64,
}

fn bridge_run(work: &Path, secs: u64) -> Result<BridgeRun> {
    let (_cloud, edge, sub) = bridge(work)?;
    let pid = edge.pid().ok_or("the edge mosquitto is not running")?;
    let got0 = sub.received.load(std::sync::atomic::Ordering::Relaxed);
    let w0 = write_bytes(&pid.to_string())?;
    let paced = paced_publish(edge.port, RATE, secs)?;
    let (_, rss_kib) = procs::rss_kib(pid);
    let n = (RATE as u64) * secs;
    procs::wait_for(
        "every message at the cloud broker",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || Ok(sub.received.load(std::sync::atomic::Ordering::Relaxed) >= got0 + n),
    )?;
    let written = write_bytes(&pid.to_string())? - w0;
    let (hwm_kib, _) = procs::rss_kib(pid);
    Ok(BridgeRun {
        written,
        payload: n * PAYLOAD as u64,
        paced,
        rss_kib,
        hwm_kib,
    })
}

const MIB: f64 = 1024.0;

/// The section: `secs` seconds of paced flow per setting, `n` messages for the end-to-end rates.
pub fn run(bin_dir: &Path, work: &Path, secs: u64, rows: &mut Vec<Row>) -> Result<()> {
    for wait in WAITS_MS {
        let dir = work.join(format!("ferry-{wait}ms"));
        let r = ferry_run(bin_dir, &dir, wait, secs)?;
        let raw = raw_frames_written(&dir.join("raw"), r.records, r.commits)?;
        let _ = std::fs::remove_dir_all(&dir);
        let payload = r.payload.max(1) as f64;
        println!(
            "   commit_wait {wait} ms: {} B written for {} B of payload, {} commits of {:.1} records; raw frames {} B; ferry's PUBACK p50 {} p99 {}; rss {:.1} MiB",
            r.written,
            r.payload,
            r.commits,
            r.records as f64 / r.commits.max(1) as f64,
            raw,
            bound(r.puback_p50),
            bound(r.puback_p99),
            r.rss_kib as f64 / MIB
        );
        let headline = wait == 0;
        rows.push(
            Row::new(
                S,
                format!("ferry, commit_wait {wait} ms: bytes written / payload byte"),
                r.written as f64 / payload,
                "B/B",
            )
            .baseline(
                "raw append+fdatasync of the same frames, same groups",
                raw as f64 / payload,
            )
            .target(Target::RatioAtMost(1.1))
            .note(format!(
                "{} commits of {:.1} records on average; by thread: {}",
                r.commits,
                r.records as f64 / r.commits.max(1) as f64,
                r.by_thread
            )),
        );
        match r.puback_p99 {
            Some(p99) => rows.push(
                Row::new(S, format!("ferry, commit_wait {wait} ms: its PUBACK delay p99 (bucket bound)"), p99 as f64, "ms")
                    .note(format!(
                        "p50 {}; the publisher's own PUBACK (from mosquitto) p50 {:.1} ms, p99 {:.1} ms",
                        bound(r.puback_p50),
                        r.paced.ms(0.5),
                        r.paced.ms(0.99)
                    )),
            ),
            None => rows.push(Row::missing(
                S,
                format!("ferry, commit_wait {wait} ms: its PUBACK delay p99"),
                "over 5,000 ms or none counted",
            )),
        }
        rows.push(
            Row::new(
                S,
                format!("ferry, commit_wait {wait} ms: RSS while messages flow"),
                r.rss_kib as f64 / MIB,
                "MiB",
            )
            .target(if headline {
                Target::AtMost(14.0)
            } else {
                Target::None
            })
            .note(format!(
                "peak {:.1} MiB; {} threads",
                r.hwm_kib as f64 / MIB,
                r.threads
            )),
        );
    }
    let b = bridge_run(&work.join("bridge"), secs)?;
    let _ = std::fs::remove_dir_all(work);
    println!(
        "   mosquitto bridge: {} B written for {} B of payload; PUBACK p50 {:.1} ms p99 {:.1} ms; edge rss {:.1} MiB",
        b.written,
        b.payload,
        b.paced.ms(0.5),
        b.paced.ms(0.99),
        b.rss_kib as f64 / MIB
    );
    rows.push(
        Row::new(
            S,
            "peer: mosquitto bridge (persistence, autosave default): bytes written / payload byte",
            b.written as f64 / b.payload.max(1) as f64,
            "B/B",
        )
        .note("written at autosave and exit only: not durable at a power cut"),
    );
    rows.push(
        Row::new(
            S,
            "peer: mosquitto bridge: the publisher's PUBACK p99",
            b.paced.ms(0.99),
            "ms",
        )
        .note(format!(
            "p50 {:.1} ms; acknowledged before any write",
            b.paced.ms(0.5)
        )),
    );
    rows.push(
        Row::new(
            S,
            "peer: mosquitto bridge: edge broker RSS while messages flow",
            b.rss_kib as f64 / MIB,
            "MiB",
        )
        .note(format!("peak {:.1} MiB", b.hwm_kib as f64 / MIB)),
    );
    Ok(())
}

/// How many times the end-to-end pair (ferry, the bridge) runs.
const E2E_ROUNDS: usize = 3;

/// The end-to-end section's name.
pub const E2E_SECTION: &str = "end to end against a mosquitto bridge";

/// End to end as fast as each goes: `n` messages through ferry to ferry-cloud and through a
/// mosquitto bridge to a cloud mosquitto, then the experiments.
pub fn end_to_end(bin_dir: &Path, work: &Path, n: usize, rows: &mut Vec<Row>) -> Result<()> {
    const S: &str = E2E_SECTION;
    // The headline pair runs ROUNDS times, alternating, so that whatever else loads this shared
    // machine meanwhile weighs on both; each side's median is reported.
    let mut ferries = Vec::new();
    let mut bridges = Vec::new();
    for round in 0..E2E_ROUNDS {
        let dir = work.join(format!("e2e-ferry-{round}"));
        ferries.push(ferry_end_to_end(bin_dir, &dir, n, false, crate::INFLIGHT)?);
        let dir = work.join(format!("e2e-bridge-{round}"));
        bridges.push(bridge_end_to_end(&dir, n)?);
        let _ = std::fs::remove_dir_all(work);
    }
    let null = ferry_end_to_end(bin_dir, &work.join("e2e-null"), n, true, crate::INFLIGHT)?;
    let wide = ferry_end_to_end(bin_dir, &work.join("e2e-wide"), n, false, 1000)?;
    let _ = std::fs::remove_dir_all(work);
    ferries.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    bridges.sort_by(|a, b| a.0.total_cmp(&b.0));
    let ferry = &ferries[E2E_ROUNDS / 2];
    let (bridge_rate, edge_cpu, cloud_broker_cpu) = bridges[E2E_ROUNDS / 2];
    let all = |rates: &mut dyn Iterator<Item = f64>| {
        rates.map(report::num).collect::<Vec<_>>().join(", ")
    };
    let rounds = format!(
        "{E2E_ROUNDS} alternating rounds, medians; ferry {}; bridge {}",
        all(&mut ferries.iter().map(|f| f.rate)),
        all(&mut bridges.iter().map(|b| b.0))
    );
    println!(
        "   end to end, {n} messages: ferry {} msg/s (to the null sink {}), mosquitto bridge {} msg/s ({rounds})",
        report::num(ferry.rate),
        report::num(null.rate),
        report::num(bridge_rate)
    );
    rows.push(
        Row::new(S, "end to end to the cloud, as fast as it goes: ferry to ferry-cloud", ferry.rate, "msg/s")
            .baseline("mosquitto bridge to a cloud mosquitto", bridge_rate)
            .target(Target::RatioAtLeast(0.8))
            .note(format!(
                "QoS1, in-flight window 100; ferry PUBACKs after fdatasync, the bridge before any write; \
                 {rounds}; ferry's PUBACK delay p50 {}, p99 {}; cpu s: ferry {:.1} ({}), ferry-cloud {:.1}, mosquitto {:.1}; \
                 the bridge's edge mosquitto {:.1}, cloud mosquitto {:.1} (same 2 cores, same disk)",
                bound(ferry.puback.0), bound(ferry.puback.1), ferry.agent_cpu, ferry.by_thread, ferry.cloud_cpu,
                ferry.broker_cpu, edge_cpu, cloud_broker_cpu
            )),
    );
    rows.push(
        Row::new(
            S,
            "experiment: the same, ferry to ferry-cloud with mosquitto's in-flight window at 1,000",
            wide.rate,
            "msg/s",
        )
        .baseline("mosquitto bridge to a cloud mosquitto", bridge_rate)
        .note(format!(
            "more messages per fdatasync; cpu s: ferry {:.1}, ferry-cloud {:.1}",
            wide.agent_cpu, wide.cloud_cpu
        )),
    );
    rows.push(
        Row::new(
            S,
            "experiment: the same, ferry to the null sink",
            null.rate,
            "msg/s",
        )
        .baseline("mosquitto bridge to a cloud mosquitto", bridge_rate)
        .note(format!(
            "the uplink's ceiling: no receiver's CPU or fsync on this machine; ferry cpu {:.1} s",
            null.agent_cpu
        )),
    );
    Ok(())
}
