//! Asking the running agent to re-read its config file, or to restart. The agent's main loop owns
//! the running configuration and answers each request with the [`Plan`] it applied. The
//! [`crate::operator::Operator`] holds the [`Reloader`] for the control endpoint (`POST /reload`,
//! `POST /restart`: `ferry reload`, `ferry console`), the console and the downlink; SIGHUP asks the
//! main loop directly.

use std::sync::mpsc;
use std::time::Duration;

use crate::config::edit::Plan;

/// The agent's answer: what changed and whether it restarts to apply it, or why the file was not
/// applied (the running configuration stays).
pub type Outcome = Result<Plan, String>;

const STOPPING: &str = "the agent is stopping";

/// What is asked of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Re-read the config file: runtime keys apply now, the others by a restart.
    Reload,
    /// Restart in place (same process, a fresh run), e.g. to take up a new device id.
    Restart,
}

/// Cheap clonable handle to the agent's reload queue.
#[derive(Clone, Debug)]
pub struct Reloader {
    tx: mpsc::SyncSender<(Request, mpsc::Sender<Outcome>)>,
}

/// The agent's end: requests waiting to be answered. Dropped when the agent stops answering, so that
/// a console or downlink waiting for an answer sees shutdown at once.
pub struct Requests {
    rx: mpsc::Receiver<(Request, mpsc::Sender<Outcome>)>,
}

pub fn channel() -> (Reloader, Requests) {
    let (tx, rx) = mpsc::sync_channel(8);
    (Reloader { tx }, Requests { rx })
}

impl Reloader {
    /// Asks for a reload and waits up to `timeout` for the outcome.
    pub fn reload(&self, timeout: Duration) -> Outcome {
        self.ask(Request::Reload, timeout)
    }

    /// Asks the agent to restart itself and waits up to `timeout` for it to agree.
    pub fn restart(&self, timeout: Duration) -> Outcome {
        self.ask(Request::Restart, timeout)
    }

    fn ask(&self, request: Request, timeout: Duration) -> Outcome {
        let (reply, answer) = mpsc::channel();
        self.tx.try_send((request, reply)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => "the agent is busy; try again".to_owned(),
            mpsc::TrySendError::Disconnected(_) => STOPPING.to_owned(),
        })?;
        // A request still queued when the agent drops [`Requests`] fails at once, not at `timeout`.
        answer.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                format!("the agent did not answer within {timeout:?}")
            }
            mpsc::RecvTimeoutError::Disconnected => STOPPING.to_owned(),
        })?
    }
}

impl Requests {
    /// Waits up to `timeout` for the next request; the caller sends the outcome on the returned sender.
    pub fn next(&self, timeout: Duration) -> Option<(Request, mpsc::Sender<Outcome>)> {
        self.rx.recv_timeout(timeout).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_to_an_agent_that_stopped_answering_fails_at_once() {
        // Whether the request was queued before `Requests` went or not, the asker hears "stopping"
        // at once instead of waiting out its timeout (the agent drops `Requests` at shutdown).
        let (reloader, requests) = channel();
        let asker = std::thread::spawn(move || reloader.reload(Duration::from_secs(600)));
        drop(requests);
        assert_eq!(asker.join().unwrap(), Err(STOPPING.to_owned()));
    }
}
