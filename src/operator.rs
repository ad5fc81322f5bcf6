//! The operator's commands, carried out in one place whichever way they arrive: a line on the
//! serial console (`console`), a frame from the cloud (`downlink`), an HTTP request to the
//! control endpoint (`control`). Those modules own their transport: they read, authenticate,
//! parse and answer in their own words; what a command does to the agent is done here, once.
//!
//! An [`Operator`] reaches the agent directly from inside it ([`Agent`]: its status, its reload
//! queue, the journal, the command publisher), or, for `ferry console` run beside it, through its
//! control endpoint. The commands that only make sense inside the agent (publishing to the local
//! broker, moving the cursor) say so when asked from outside.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::info;
use serde_json::{Value, json};

use crate::config::edit::{Draft, Plan};
use crate::config::live::{RUNTIME_KEYS, is_runtime_key};
use crate::ingest::{CommandPublisher, Publication};
use crate::journal::Rewind;
use crate::reload::Reloader;
use crate::shutdown::Shutdown;
use crate::status;

/// How long the agent's main loop gets to apply its config file or agree to restart (it answers
/// within 100 ms when well).
const AGENT_WAIT: Duration = Duration::from_secs(5);
/// How long `ferry console` waits for the agent's answer through the control endpoint: longer
/// than the agent's own wait, so that its answer, not this deadline, is what the operator sees.
const REMOTE_WAIT: Duration = Duration::from_secs(10);

/// How long a `publish` waits for the broker's PUBACK.
const PUBLISH_WAIT: Duration = Duration::from_secs(10);

/// What the commands act on inside the agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    pub status: status::Source,
    pub reloader: Reloader,
    pub publisher: CommandPublisher,
}

/// Where the commands go.
#[derive(Clone)]
enum Reach {
    /// Shared by every thread that carries out commands.
    InAgent(std::sync::Arc<Agent>),
    /// `ferry console` beside the agent: its control endpoint, if the config file names one, and
    /// its token when this user can read it (changes need it; see `control`).
    Remote(Option<SocketAddr>, Option<String>),
}

/// The one executor of operator commands.
#[derive(Clone)]
pub struct Operator {
    /// The config file the agent runs with: what `set_config` edits.
    config_path: PathBuf,
    reach: Reach,
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No agent answers (`ferry console` with the agent stopped).
    NotRunning,
    /// Said in words for the operator.
    Failed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotRunning => f.write_str("agent not running"),
            Error::Failed(m) => f.write_str(m),
        }
    }
}

/// What the agent applied of its config file: changes as `key old -> new`, and the keys that
/// restart it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<String>,
    pub restart_keys: Vec<String>,
}

impl From<Plan> for Applied {
    fn from(p: Plan) -> Applied {
        Applied {
            changes: p.changes.iter().map(ToString::to_string).collect(),
            restart_keys: p.restart_keys,
        }
    }
}

impl Applied {
    /// The JSON both the control endpoint (`POST /reload`) and the downlink's `set_config` answer
    /// with: `{"changes": ["key old -> new", ...], "restart": bool, "restart_keys": [...]}`.
    pub fn to_json(&self) -> Value {
        json!({
            "changes": self.changes,
            "restart": !self.restart_keys.is_empty(),
            "restart_keys": self.restart_keys,
        })
    }

    fn from_json(v: &Value) -> Applied {
        let strings = |k: &str| -> Vec<String> {
            v[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Applied {
            changes: strings("changes"),
            restart_keys: strings("restart_keys"),
        }
    }
}

impl Operator {
    /// Inside the agent.
    pub fn in_agent(config_path: &Path, agent: Agent) -> Operator {
        Operator {
            config_path: config_path.to_path_buf(),
            reach: Reach::InAgent(std::sync::Arc::new(agent)),
        }
    }

    /// Beside the agent, through its control endpoint (`addr`) with `token`.
    pub fn remote(config_path: &Path, addr: Option<SocketAddr>, token: Option<String>) -> Operator {
        Operator {
            config_path: config_path.to_path_buf(),
            reach: Reach::Remote(addr, token),
        }
    }

    /// The agent's device id, when it is known without asking the running agent.
    pub fn own_device_id(&self) -> Option<&str> {
        match &self.reach {
            Reach::InAgent(a) => Some(&a.status.device_id),
            Reach::Remote(..) => None,
        }
    }

    /// The agent's `/status`.
    pub fn status(&self) -> Result<Value, Error> {
        match &self.reach {
            Reach::InAgent(a) => serde_json::to_value(a.status.status())
                .map_err(|e| Error::Failed(format!("cannot render status: {e}"))),
            Reach::Remote(addr, token) => {
                let body = remote(*addr, token, "GET", "/status")?;
                serde_json::from_str(&body)
                    .map_err(|e| Error::Failed(format!("unreadable status from the agent: {e}")))
            }
        }
    }

    /// Asks the agent to re-read its config file; answers what it applied.
    pub fn apply(&self) -> Result<Applied, Error> {
        match &self.reach {
            Reach::InAgent(a) => a
                .reloader
                .reload(AGENT_WAIT)
                .map(Applied::from)
                .map_err(Error::Failed),
            Reach::Remote(addr, token) => {
                let body = remote(*addr, token, "POST", "/reload")?;
                let v: Value = serde_json::from_str(&body)
                    .map_err(|e| Error::Failed(format!("unreadable answer: {e}")))?;
                Ok(Applied::from_json(&v))
            }
        }
    }

    /// Asks the agent to restart in place (a fresh run of the same process).
    pub fn restart(&self) -> Result<(), Error> {
        match &self.reach {
            Reach::InAgent(a) => a
                .reloader
                .restart(AGENT_WAIT)
                .map(drop)
                .map_err(Error::Failed),
            Reach::Remote(addr, token) => remote(*addr, token, "POST", "/restart").map(drop),
        }
    }

    /// Sets one key that applies without a restart in the config file (validated, atomic, with a
    /// backup), and has the agent apply it. Keys that restart the agent are refused: a command
    /// from afar must not take the gateway down.
    pub fn set_runtime_key(&self, key: &str, value: &str) -> Result<Applied, Error> {
        if !is_runtime_key(key) {
            return Err(Error::Failed(format!(
                "{key:?} cannot be set remotely: only keys that apply without a restart, {}",
                RUNTIME_KEYS.join(", ")
            )));
        }
        let chain = |e: crate::config::edit::Error| Error::Failed(crate::error_chain(&e));
        let mut draft = Draft::load(&self.config_path).map_err(chain)?;
        draft.set(key, value).map_err(chain)?;
        draft.save().map_err(chain)?;
        info!("config file changed key={} (set_config)", key);
        self.apply()
    }

    /// Moves the uplink's cursor back so that everything from `seq` is sent again (audited in the
    /// journal, within `journal.replay_window`).
    pub fn replay_from(&self, seq: u64) -> Result<Rewind, Error> {
        let agent = self.agent("replay_from")?;
        agent
            .status
            .journal
            .rewind_to(seq)
            .map_err(|e| Error::Failed(crate::error_chain(&e)))
    }

    /// Publishes to the local broker and waits for its PUBACK (QoS 1).
    pub fn publish(&self, p: &Publication, shutdown: &Shutdown) -> Result<Value, Error> {
        let agent = self.agent("publish")?;
        agent
            .publisher
            .publish(p, PUBLISH_WAIT, shutdown)
            .map_err(Error::Failed)?;
        Ok(json!({"topic": p.topic, "bytes": p.payload.len()}))
    }

    /// Replaces the generated device id in `journal_dir` with a new one and restarts the agent
    /// to take it up. Returns the new id and how the restart went.
    pub fn regenerate_identity(
        &self,
        journal_dir: &Path,
    ) -> Result<(String, Result<(), Error>), Error> {
        let id = crate::identity::regenerate(journal_dir)
            .map_err(|e| Error::Failed(crate::error_chain(&e)))?;
        info!("device id regenerated by the operator, new id={}", id);
        Ok((id, self.restart()))
    }

    fn agent(&self, what: &str) -> Result<&Agent, Error> {
        match &self.reach {
            Reach::InAgent(a) => Ok(a),
            Reach::Remote(..) => Err(Error::Failed(format!("{what} runs inside the agent only"))),
        }
    }
}

/// One request to the agent's control endpoint for `ferry console`: a read waits 3 s, a change
/// as long as the agent may take to apply it.
fn remote(
    addr: Option<SocketAddr>,
    token: &Option<String>,
    method: &str,
    path: &str,
) -> Result<String, Error> {
    use crate::control;
    let addr = addr.ok_or(Error::NotRunning)?;
    let answer = match (method, token) {
        ("POST", Some(t)) => control::post(addr, path, t, REMOTE_WAIT),
        ("POST", None) => {
            return Err(Error::Failed(
                "the agent's control token is not readable here (run the console as the user the \
                 agent runs as, or set control.token)"
                    .to_owned(),
            ));
        }
        _ => control::get(addr, path, token.as_deref(), Duration::from_secs(3)),
    };
    answer.map_err(|e| match e {
        control::Error::Connect { .. } => Error::NotRunning,
        other => Error::Failed(crate::error_chain(&other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[journal]\ndir = \"j\"\n[mqtt]\ntopics = [\"a/#\"]\n[uplink]\nurl = \"http://127.0.0.1:9/x\"\n";

    #[test]
    fn beside_a_stopped_agent_reads_say_not_running_and_agent_only_commands_say_so() {
        let op = Operator::remote(Path::new("/nonexistent/ferry.toml"), None, None);
        assert_eq!(op.status().unwrap_err(), Error::NotRunning);
        assert_eq!(op.apply().unwrap_err(), Error::NotRunning);
        assert_eq!(op.own_device_id(), None);
        let e = op.replay_from(1).unwrap_err().to_string();
        assert!(e.contains("inside the agent"), "{e}");
    }

    #[test]
    fn a_key_that_restarts_the_agent_is_refused_and_the_file_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, BASE).unwrap();
        let op = Operator::remote(&path, None, None);
        let e = op
            .set_runtime_key("uplink.url", "http://elsewhere/")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be set remotely"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), BASE);
        // A runtime key is written, then the agent is asked to apply it: none runs here.
        assert_eq!(
            op.set_runtime_key("uplink.max_records_per_sec", "250"),
            Err(Error::NotRunning)
        );
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("max_records_per_sec = 250")
        );
    }
}
