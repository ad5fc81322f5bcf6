//! The uplink's post threads: each encodes a batch, compresses it and POSTs it on its own
//! connection, so that the `uplink` thread can read and send the next batch while one is in
//! flight (up to [`PIPELINE`] at once). A post thread holds no state between jobs: the `uplink`
//! thread decides what is sent and what an answer means.
//!
//! Threads `uplink-post-<n>`, fed by a channel each (one job at a time), answering on one shared
//! channel. They stop when the `uplink` thread drops their job channel or shutdown is set; a
//! request in hand is bounded by the HTTP agent's deadlines.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::debug;

use super::{Annotator, Answer, Upload, post, span, wire_body};
use crate::config::{Compression, Secret, UplinkConfig};
use crate::journal::Entry;
use crate::protocol::Held;
use crate::shutdown::Shutdown;

/// Most uploads in flight at once, each on its own connection. Two are enough to keep the cloud
/// busy while the next batch is read, encoded and compressed, and while the answer to the
/// previous one travels back; more would only pile up work the cloud must redo when one fails.
pub const PIPELINE: usize = 2;

/// How often an idle post thread looks at the shutdown flag.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// One batch to upload: `id` ties the answer to it.
pub struct Job {
    pub id: u64,
    pub entries: Vec<Entry>,
    /// What the journal held when the batch was handed to the post thread (sent with it for the
    /// center's ledger).
    pub held: Held,
}

/// The answer to a [`Job`], with its entries handed back.
pub struct Posted {
    pub id: u64,
    pub poster: usize,
    pub entries: Vec<Entry>,
    pub answer: Answer,
}

/// What every post thread needs to build a request.
#[derive(Clone)]
struct Target {
    agent: ureq::Agent,
    url: String,
    device_id: String,
    token: Option<Secret>,
    compression: Compression,
    annotator: Annotator,
}

/// The post threads and their channels; owned by the `uplink` thread.
pub struct Posters {
    jobs: Vec<SyncSender<Job>>,
    handles: Vec<JoinHandle<()>>,
    pub answers: Receiver<Posted>,
}

impl Posters {
    /// Starts [`PIPELINE`] post threads.
    pub fn start(
        cfg: &UplinkConfig,
        agent: &ureq::Agent,
        device_id: &str,
        annotator: &Annotator,
        shutdown: &Shutdown,
    ) -> std::io::Result<Posters> {
        let target = Target {
            agent: agent.clone(),
            url: cfg.url.clone(),
            device_id: device_id.to_string(),
            token: cfg.token.clone(),
            compression: cfg.compression,
            annotator: annotator.clone(),
        };
        let (answer_tx, answers) = mpsc::sync_channel(PIPELINE);
        let mut posters = Posters {
            jobs: Vec::new(),
            handles: Vec::new(),
            answers,
        };
        for n in 0..PIPELINE {
            let (job_tx, jobs) = mpsc::sync_channel(1);
            let (target, answer_tx, shutdown) =
                (target.clone(), answer_tx.clone(), shutdown.clone());
            let handle = thread::Builder::new()
                .name(format!("uplink-post-{n}"))
                .spawn(move || run(n, &target, &jobs, &answer_tx, &shutdown))?;
            posters.jobs.push(job_tx);
            posters.handles.push(handle);
        }
        Ok(posters)
    }

    /// Hands `job` to post thread `poster`, which must be idle. Returns the job when that thread
    /// is gone (it only stops after the `uplink` thread does).
    pub fn send(&self, poster: usize, job: Job) -> Result<(), Job> {
        match self.jobs.get(poster) {
            Some(tx) => tx.try_send(job).map_err(|e| match e {
                mpsc::TrySendError::Full(j) | mpsc::TrySendError::Disconnected(j) => j,
            }),
            None => Err(job),
        }
    }

    /// Whether post thread `poster` has ended (after shutdown, or by a panic).
    pub fn stopped(&self, poster: usize) -> bool {
        self.handles.get(poster).is_none_or(JoinHandle::is_finished)
    }

    /// Stops the post threads and waits for them: each ends within the HTTP agent's request
    /// deadline (the agent abandons the `uplink` thread at its own shutdown deadline).
    pub fn stop(self) {
        drop(self.jobs);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

fn run(
    n: usize,
    target: &Target,
    jobs: &Receiver<Job>,
    answers: &SyncSender<Posted>,
    shutdown: &Shutdown,
) {
    while !shutdown.is_set() {
        let job = match jobs.recv_timeout(IDLE_POLL) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let answer = upload(target, &job.entries, job.held);
        let posted = Posted {
            id: job.id,
            poster: n,
            entries: job.entries,
            answer,
        };
        if answers.send(posted).is_err() {
            break;
        }
    }
}

/// Encodes, compresses and POSTs `entries`, and reads the answer.
fn upload(t: &Target, entries: &[Entry], held: Held) -> Answer {
    let (first, last) = span(entries);
    let body = wire_body(
        t.compression,
        &t.device_id,
        entries,
        Some(held),
        &t.annotator,
    );
    debug!(
        "uploading first_seq={} last_seq={} entries={} bytes={}",
        first,
        last,
        entries.len(),
        body.len()
    );
    post(
        &t.agent,
        &Upload {
            url: &t.url,
            device_id: &t.device_id,
            first,
            last,
            token: t.token.as_ref().map(Secret::expose),
            gzip: t.compression == Compression::Gzip,
            body: &body,
        },
    )
}
