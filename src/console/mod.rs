//! The serial console: a small configuration shell for the technician who installs a gateway with
//! a laptop on its console port, before any network is up.
//!
//! Served by the agent's `console` thread on `console.device` (raw 8N1 at `console.baud`), or
//! stand-alone by `ferry console` on a device or on stdin/stdout (over SSH). Pieces:
//! - [`tty`] owns the terminal (the only module naming termios): raw mode, polled reads.
//! - [`line`] turns bytes into lines: echo, erase, Ctrl-C, bounded lines, noise rejected.
//! - [`parse`] turns a line into a [`parse::Command`].
//! - `session` runs a session on a port (PIN, banner, lines to the shell) and serves sessions: the
//!   agent's `console` thread ([`spawn`]) and `ferry console` ([`standalone`]).
//! - [`Shell`] keeps the session's state: edits go to a [`Draft`] of the config file; `save`
//!   writes it atomically and has the agent apply it, and announces what applied now and what
//!   restarts the agent. What reaches the agent (status, apply, restart, a new identity) is done by
//!   the [`Operator`], the executor the downlink and the control endpoint use too: directly in the
//!   agent, through the control endpoint stand-alone.
//!
//! An optional PIN (`console.pin_sha256`) guards each session; after three wrong PINs each further
//! try waits, 10 s doubling up to 5 min.

pub mod line;
pub mod parse;
mod session;
pub mod tty;

use std::path::Path;

use log::info;

use crate::config::Config;
use crate::config::edit::Draft;
use crate::config::units::format_size;
use crate::operator::{self, Applied, Operator};
use parse::{Command, TOPICS, Target};
pub use session::{End, PinGate, session, spawn, standalone};

/// The command interpreter of one session. Output is text with `\n` line ends.
pub struct Shell {
    draft: Draft,
    /// The configuration the session started from (the running one when the agent runs), if the
    /// file was valid then.
    running: Option<Config>,
    /// Carries out what reaches the agent (status, apply, restart, identity).
    operator: Operator,
    /// `identity regenerate` waits for `yes`.
    confirming: bool,
}

/// What a command asks of the session.
pub struct Reply {
    pub text: String,
    pub exit: bool,
}

fn reply(text: impl Into<String>) -> Reply {
    Reply {
        text: text.into(),
        exit: false,
    }
}

impl Shell {
    pub fn new(path: &Path, operator: Operator) -> Result<Shell, String> {
        let draft = Draft::load(path).map_err(|e| crate::error_chain(&e))?;
        let running = draft.validate().ok();
        Ok(Shell {
            draft,
            running,
            operator,
            confirming: false,
        })
    }

    /// The device id for the prompt: the agent's, else the file's, else the stored one.
    pub fn device_id(&self) -> String {
        if let Some(id) = self.operator.own_device_id() {
            return id.to_owned();
        }
        if let Ok(v) = self.operator.status() {
            if let Some(id) = v["device_id"].as_str() {
                return id.to_owned();
            }
        }
        self.offline_device_id()
            .unwrap_or_else(|| "ferry".to_owned())
    }

    fn offline_device_id(&self) -> Option<String> {
        let cfg = self.running.as_ref()?;
        cfg.device
            .id
            .clone()
            .or_else(|| crate::identity::stored(&cfg.journal.dir))
    }

    pub fn prompt(&self, device_id: &str) -> String {
        if self.confirming {
            "type yes to confirm: ".to_owned()
        } else {
            format!("{device_id}> ")
        }
    }

    /// Carries out one line.
    pub fn execute(&mut self, line: &str) -> Reply {
        if std::mem::take(&mut self.confirming) {
            return if line.trim() == "yes" {
                reply(self.regenerate_identity())
            } else {
                reply("cancelled: the device id is unchanged\n")
            };
        }
        let cmd = match parse::parse(line) {
            Ok(c) => c,
            Err(msg) => return reply(format!("{msg}\n")),
        };
        match cmd {
            Command::Nothing => reply(""),
            Command::Help(None) => {
                let mut s = String::from("commands:\n");
                for t in TOPICS {
                    s.push_str(&format!("  {}\n", t.usage()));
                }
                reply(s)
            }
            Command::Help(Some(t)) => reply(format!("{}\n{}\n", t.usage(), t.details())),
            Command::Status => reply(match self.operator.status() {
                Ok(v) => crate::status::status_text(&v.to_string()),
                Err(e) => format!("{e}\n"),
            }),
            Command::Show(filter) => reply(self.show(filter.as_deref())),
            Command::Set { key, value } => reply(match self.draft.set(&key, &value) {
                Ok(()) => format!(
                    "{key} = {} (pending; save applies it)\n",
                    self.draft.get(&key).unwrap_or_default()
                ),
                Err(e) => format!("not set: {}\n", crate::error_chain(&e)),
            }),
            Command::Unset(key) => reply(match self.draft.unset(&key) {
                Ok(()) => format!("{key} unset: its default applies (pending; save applies it)\n"),
                Err(e) => format!("not unset: {}\n", crate::error_chain(&e)),
            }),
            Command::Diff => reply(self.diff()),
            Command::Save => reply(self.save()),
            Command::Discard => {
                let n = self.draft.diff().len();
                self.draft.discard();
                reply(format!("discarded {n} pending change(s)\n"))
            }
            Command::Test(Target::Uplink) => reply(self.test_uplink()),
            Command::Test(Target::Mqtt) => reply(self.test_mqtt()),
            Command::Journal => reply(self.journal()),
            Command::Log(None) => reply(format!(
                "log.level = {}\n",
                self.draft
                    .get("log.level")
                    .unwrap_or_else(|| "\"info\" (default)".to_owned())
            )),
            Command::Log(Some(level)) => reply(match self.draft.set("log.level", &level) {
                Ok(()) => format!(
                    "log.level = {} (pending; save applies it without a restart)\n",
                    self.draft.get("log.level").unwrap_or_default()
                ),
                Err(e) => format!("not set: {}\n", crate::error_chain(&e)),
            }),
            Command::Identity { regenerate } => reply(self.identity(regenerate)),
            Command::Exit => Reply {
                text: match self.draft.diff().len() {
                    0 => "bye\n".to_owned(),
                    n => format!("bye ({n} unsaved change(s) dropped)\n"),
                },
                exit: true,
            },
        }
    }

    fn show(&self, filter: Option<&str>) -> String {
        let rows: Vec<_> = self
            .draft
            .show()
            .into_iter()
            .filter(|(k, ..)| match filter {
                None => true,
                Some(f) => k == f || k.strip_prefix(f).is_some_and(|r| r.starts_with('.')),
            })
            .collect();
        if rows.is_empty() {
            return match filter {
                Some(f) => format!("no setting {f:?}; `show` lists them all\n"),
                None => "the configuration is empty\n".to_owned(),
            };
        }
        let mut s = String::new();
        for (k, v, set) in rows {
            let mark = if set { "" } else { "   (default)" };
            s.push_str(&format!("{k} = {v}{mark}\n"));
        }
        if self.draft.validate().is_err() {
            s.push_str("(the configuration does not validate: defaults are not shown)\n");
        }
        s
    }

    fn diff(&self) -> String {
        let changes = self.draft.diff();
        if changes.is_empty() {
            return "no pending changes\n".to_owned();
        }
        changes.iter().map(|c| format!("{c}\n")).collect()
    }

    fn save(&mut self) -> String {
        let changes = self.draft.diff();
        if changes.is_empty() {
            return "nothing to save\n".to_owned();
        }
        let path = self.draft.path().to_owned();
        let saved = match self.draft.save() {
            Ok(saved) => saved,
            Err(e) => return format!("not saved: {}\n", crate::error_chain(&e)),
        };
        for c in &changes {
            info!("console changed {} in {}", c, path.display());
        }
        let mut out = String::new();
        if saved.rebased {
            out.push_str(
                "the file had changed since this session read it (the cloud or another console): \
                 your changes were saved on top of it\n",
            );
            for key in &saved.overridden {
                out.push_str(&format!(
                    "  {key}: changed there too; your value was saved\n"
                ));
            }
        }
        out.push_str(&format!(
            "saved {} (previous file kept as {})\n",
            path.display(),
            crate::atomic_file::with_suffix(&path, ".bak").display()
        ));
        match self.operator.apply() {
            Ok(applied) => out.push_str(&announce(&applied)),
            Err(operator::Error::NotRunning) => {
                out.push_str("agent not running: the new configuration applies when it starts\n")
            }
            Err(e) => out.push_str(&format!("the agent did not apply it: {e}\n")),
        }
        self.running = Some(saved.config);
        out
    }

    /// The configuration to test with: the pending one if it validates.
    fn pending_config(&self) -> Result<Config, String> {
        self.draft.validate().map_err(|e| {
            format!(
                "the configuration does not validate: {}\n",
                crate::error_chain(&e)
            )
        })
    }

    fn test_uplink(&self) -> String {
        let cfg = match self.pending_config() {
            Ok(c) => c,
            Err(e) => return e,
        };
        let id = self.device_id();
        match crate::uplink::probe(&cfg.uplink, &cfg.tls.material, &id) {
            Ok(t) => format!(
                "uplink ok: {} answered in {} ms\n",
                cfg.uplink.url,
                t.as_millis()
            ),
            Err(why) => format!("uplink FAILED: {}: {why}\n", cfg.uplink.url),
        }
    }

    fn test_mqtt(&self) -> String {
        let cfg = match self.pending_config() {
            Ok(c) => c,
            Err(e) => return e,
        };
        let client_id = cfg
            .mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("ferry-{}", self.device_id()));
        let probe_id = format!("{client_id}-probe");
        let target = format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port);
        match crate::ingest::probe(&cfg.mqtt, &probe_id) {
            Ok(t) => format!(
                "mqtt ok: {target} accepted client {probe_id} in {} ms\n",
                t.as_millis()
            ),
            Err(why) => format!("mqtt FAILED: {target}: {why}\n"),
        }
    }

    fn journal(&self) -> String {
        let v = match self.operator.status() {
            Ok(v) => v,
            Err(e) => return format!("{e}: the journal is read through the running agent\n"),
        };
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let oldest = match v["oldest_unsent_age_s"].as_u64() {
            Some(age) => format!("received {} ago", age_words(age)),
            None => "nothing waiting".to_owned(),
        };
        format!(
            "backlog        {} records, {} waiting for the cloud\n\
             oldest unsent  {oldest}\n\
             disk use       {} (budget {})\n\
             dead letters   {}\n\
             accepting      {}\n",
            n("backlog_records"),
            format_size(n("backlog_bytes")),
            format_size(n("journal_disk_bytes")),
            format_size(n("budget_bytes")),
            n("dead_letters"),
            if v["journal_accepting"] == false {
                "NO: the journal is full or failing"
            } else {
                "yes"
            },
        )
    }

    fn identity(&mut self, regenerate: bool) -> String {
        let Some(cfg) = self.draft.validate().ok().or_else(|| self.running.clone()) else {
            return "the configuration does not validate; fix it first (show, set, unset)\n"
                .to_owned();
        };
        let id = self.device_id();
        if let Some(configured) = &cfg.device.id {
            let mut s = format!(
                "device id      {id}\nsource         device.id = {configured:?} in {}\n",
                cfg.source.display()
            );
            s.push_str(if regenerate {
                "not regenerated: device.id in the config file wins over a generated id.\n\
                 To change it: set device.id NEW-ID, then save.\n"
            } else {
                "the config file's value wins over a generated id; to change it: set device.id NEW-ID\n"
            });
            return s;
        }
        if regenerate {
            self.confirming = true;
            return format!(
                "This replaces device id {id} with a new random one and restarts the agent.\n\
                 Do it only on a gateway installed from a cloned image: the cloud sees a new device.\n"
            );
        }
        format!(
            "device id      {id}\nsource         generated, stored in {}\n\
             on a gateway installed from a cloned image every copy has this id:\n\
             `identity regenerate` makes a new one\n",
            crate::identity::path(&cfg.journal.dir).display()
        )
    }

    fn regenerate_identity(&mut self) -> String {
        let Some(cfg) = self.running.clone() else {
            return "the configuration does not validate; fix it first\n".to_owned();
        };
        let (id, restarted) = match self.operator.regenerate_identity(&cfg.journal.dir) {
            Ok(x) => x,
            Err(e) => return format!("not regenerated: {e}\n"),
        };
        let mut s = format!("new device id {id}\n");
        match restarted {
            Ok(()) => s.push_str("agent restarting to apply: the new device id\n"),
            Err(operator::Error::NotRunning) => {
                s.push_str("agent not running: it uses the new id when it starts\n")
            }
            Err(e) => s.push_str(&format!(
                "the agent did not restart ({e}): restart it to use the new id\n"
            )),
        }
        s
    }
}

/// `applied now: ...` and `agent restarting to apply: ...` from what the agent answered.
fn announce(a: &Applied) -> String {
    let key_of = |c: &String| c.split(' ').next().unwrap_or_default().to_owned();
    let (restart, now): (Vec<&String>, Vec<&String>) = a
        .changes
        .iter()
        .partition(|c| a.restart_keys.contains(&key_of(c)));
    let mut s = String::new();
    if a.changes.is_empty() && a.restart_keys.is_empty() {
        s.push_str("the agent runs this configuration already: nothing changed\n");
    }
    if !now.is_empty() {
        let list: Vec<&str> = now.iter().map(|c| c.as_str()).collect();
        s.push_str(&format!("applied now: {}\n", list.join(", ")));
    }
    if !a.restart_keys.is_empty() {
        let list: Vec<&str> = if restart.is_empty() {
            a.restart_keys.iter().map(String::as_str).collect()
        } else {
            restart.iter().map(|c| c.as_str()).collect()
        };
        s.push_str(&format!(
            "agent restarting to apply: {}\n(the console comes back when the agent is up again)\n",
            list.join(", ")
        ));
    }
    s
}

fn age_words(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_splits_runtime_from_restart_changes() {
        let a = Applied {
            changes: vec![
                "uplink.max_records_per_sec 0 -> 250".into(),
                "uplink.url \"http://a\" -> \"http://b\"".into(),
            ],
            restart_keys: vec!["uplink.url".into()],
        };
        let s = announce(&a);
        assert!(
            s.contains("applied now: uplink.max_records_per_sec 0 -> 250\n"),
            "{s}"
        );
        assert!(
            s.contains("agent restarting to apply: uplink.url \"http://a\" -> \"http://b\""),
            "{s}"
        );
    }

    fn shell(text: &str) -> (tempfile::TempDir, Shell) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, text).unwrap();
        let sh = Shell::new(&path, Operator::remote(&path, None, None)).unwrap();
        (dir, sh)
    }

    const BASE: &str = "[journal]\ndir = \"j\"\n[mqtt]\ntopics = [\"a/#\"]\n[uplink]\nurl = \"http://127.0.0.1:9/x\"\ntoken = \"s3cret\"\n";

    #[test]
    fn a_typo_names_the_key_and_saves_nothing() {
        let (dir, mut sh) = shell(BASE);
        let r = sh.execute("set uplink.batch_max_records 10x0");
        assert!(r.text.contains("uplink.batch_max_records"), "{}", r.text);
        assert_eq!(sh.execute("save").text, "nothing to save\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ferry.toml")).unwrap(),
            BASE
        );
    }

    #[test]
    fn save_without_an_agent_writes_and_says_so() {
        let (dir, mut sh) = shell(BASE);
        sh.execute("set uplink.max_records_per_sec 250");
        assert!(
            sh.execute("diff")
                .text
                .contains("uplink.max_records_per_sec (unset) -> 250")
        );
        let r = sh.execute("save").text;
        assert!(r.contains("agent not running"), "{r}");
        let text = std::fs::read_to_string(dir.path().join("ferry.toml")).unwrap();
        assert!(text.contains("max_records_per_sec = 250"));
        assert_eq!(sh.execute("diff").text, "no pending changes\n");
    }

    #[test]
    fn show_masks_secrets_and_marks_defaults() {
        let (_dir, sh) = shell(BASE);
        let s = sh.show(Some("uplink"));
        assert!(s.contains("uplink.token = ****\n"), "{s}");
        assert!(!s.contains("s3cret"));
        assert!(
            s.contains("uplink.batch_max_records = 500   (default)"),
            "{s}"
        );
        assert!(!s.contains("mqtt."));
        assert!(
            sh.show(Some("uplink.url"))
                .starts_with("uplink.url = \"http://127.0.0.1:9/x\"")
        );
        assert!(sh.show(Some("nope")).starts_with("no setting"));
    }

    #[test]
    fn identity_regenerate_asks_and_a_configured_id_wins() {
        let (_dir, mut sh) = shell(&format!("[device]\nid = \"gw-9\"\n{BASE}"));
        let r = sh.execute("identity regenerate").text;
        assert!(r.contains("set device.id"), "{r}");
        let (dir, mut sh) = shell(BASE);
        sh.execute("identity regenerate");
        assert_eq!(sh.prompt("x"), "type yes to confirm: ");
        assert!(sh.execute("no").text.starts_with("cancelled"));
        sh.execute("identity regenerate");
        let r = sh.execute("yes").text;
        assert!(r.starts_with("new device id gw-"), "{r}");
        assert!(dir.path().join("j/device-id").exists());
    }
}
