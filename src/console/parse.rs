//! Console command parsing: a typed line into a [`Command`], or a short message saying what was
//! expected. Pure, unit-tested case by case; the shell in `mod.rs` carries the commands out.

/// One console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An empty line.
    Nothing,
    /// `help [command]`.
    Help(Option<Topic>),
    Status,
    /// `show [section|key]`.
    Show(Option<String>),
    Set {
        key: String,
        value: String,
    },
    Unset(String),
    Diff,
    Save,
    Discard,
    /// `test uplink` / `test mqtt`.
    Test(Target),
    Journal,
    /// `log [level]`.
    Log(Option<String>),
    /// `identity`, or `identity regenerate` (asks for confirmation).
    Identity {
        regenerate: bool,
    },
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Uplink,
    Mqtt,
}

/// A command `help` can explain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Help,
    Status,
    Show,
    Set,
    Unset,
    Diff,
    Save,
    Discard,
    Test,
    Journal,
    Log,
    Identity,
    Exit,
}

/// Every topic, in the order `help` lists them.
pub const TOPICS: [Topic; 13] = [
    Topic::Status,
    Topic::Show,
    Topic::Set,
    Topic::Unset,
    Topic::Diff,
    Topic::Save,
    Topic::Discard,
    Topic::Test,
    Topic::Journal,
    Topic::Log,
    Topic::Identity,
    Topic::Help,
    Topic::Exit,
];

impl Topic {
    pub fn name(self) -> &'static str {
        match self {
            Topic::Help => "help",
            Topic::Status => "status",
            Topic::Show => "show",
            Topic::Set => "set",
            Topic::Unset => "unset",
            Topic::Diff => "diff",
            Topic::Save => "save",
            Topic::Discard => "discard",
            Topic::Test => "test",
            Topic::Journal => "journal",
            Topic::Log => "log",
            Topic::Identity => "identity",
            Topic::Exit => "exit",
        }
    }

    /// One line for the command list.
    pub fn usage(self) -> &'static str {
        match self {
            Topic::Help => "help [COMMAND]        this list, or more about one command",
            Topic::Status => "status                what the agent is doing",
            Topic::Show => "show [SECTION|KEY]    the configuration (secrets masked)",
            Topic::Set => "set KEY VALUE         change a setting (pending until save)",
            Topic::Unset => "unset KEY             back to the default (pending until save)",
            Topic::Diff => "diff                  pending changes against the running config",
            Topic::Save => "save                  check, write and apply the pending changes",
            Topic::Discard => "discard               forget the pending changes",
            Topic::Test => "test uplink|mqtt      try a connection, say how long or what failed",
            Topic::Journal => {
                "journal               backlog, disk use, age of the oldest unsent record"
            }
            Topic::Log => "log [LEVEL]           show or set log.level",
            Topic::Identity => "identity [regenerate] the device id; a new one for a cloned image",
            Topic::Exit => "exit                  end the session",
        }
    }

    /// The longer explanation of `help COMMAND`.
    pub fn details(self) -> &'static str {
        match self {
            Topic::Help => "Lists the commands; `help set` explains one.",
            Topic::Status => "The agent's status: MQTT connection, journal, uplink, totals.",
            Topic::Show => {
                "`show` prints every setting, `show uplink` one section, `show uplink.url` one key.\n\
                 Values set in the file show as written; the others are defaults (marked).\n\
                 Pending changes show as they will be saved. Secrets show as ****."
            }
            Topic::Set => {
                "`set uplink.url https://cloud.example/v1/ingest`: the value as you would write it\n\
                 in the file, quotes optional for text (sizes `64MiB`, durations `30s`, lists\n\
                 `a/#, b/#`). A value that breaks the configuration is refused and names the key.\n\
                 Changes are pending until `save`."
            }
            Topic::Unset => {
                "`unset uplink.max_records_per_sec` removes the key, so its default applies."
            }
            Topic::Diff => "Lists each pending change as `key old -> new`.",
            Topic::Save => {
                "Checks the whole configuration, writes it safely (the previous file is kept as\n\
                 .bak) and applies it: rate limits, batch sizes and log.level change at once,\n\
                 anything else restarts the agent, which the console announces."
            }
            Topic::Discard => "Forgets every pending change.",
            Topic::Test => {
                "`test uplink` sends an empty batch to uplink.url; `test mqtt` connects to the\n\
                 broker with its own client id. Each says how long it took, or what failed:\n\
                 DNS failure, connection refused, timed out, TLS certificate problem, HTTP status."
            }
            Topic::Journal => {
                "Records and bytes waiting for the cloud, the journal's disk use, and how old the\n\
                 oldest unsent record is."
            }
            Topic::Log => {
                "`log` shows log.level; `log debug` or `log warn,ferry::uplink=debug` sets it\n\
                 (pending until `save`, which applies it without a restart)."
            }
            Topic::Identity => {
                "`identity` shows the device id and where it comes from. On a gateway installed\n\
                 from a cloned image every copy has the same id: `identity regenerate` makes a new\n\
                 one (after you type yes) and restarts the agent."
            }
            Topic::Exit => "Ends the session.",
        }
    }
}

/// Longest key accepted (the config's own keys are much shorter).
const MAX_KEY: usize = 64;

/// Parses one line.
pub fn parse(line: &str) -> Result<Command, String> {
    let line = line.trim();
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (line, ""),
    };
    let no_args = |cmd: Command| {
        if rest.is_empty() {
            Ok(cmd)
        } else {
            Err(format!("{word} takes no arguments"))
        }
    };
    match word {
        "" => Ok(Command::Nothing),
        "help" | "?" => match rest {
            "" => Ok(Command::Help(None)),
            t => TOPICS
                .iter()
                .find(|topic| topic.name() == t)
                .map(|topic| Command::Help(Some(*topic)))
                .ok_or_else(|| format!("no command {t:?}; type help for the list")),
        },
        "status" => no_args(Command::Status),
        "show" => match rest {
            "" => Ok(Command::Show(None)),
            k => Ok(Command::Show(Some(key(k)?))),
        },
        "set" => {
            let (k, value) = match rest.split_once(char::is_whitespace) {
                Some((k, v)) if !v.trim().is_empty() => (k, v.trim()),
                _ => {
                    return Err(
                        "usage: set KEY VALUE, e.g. set uplink.url http://host/ingest".into(),
                    );
                }
            };
            Ok(Command::Set {
                key: key(k)?,
                value: value.to_owned(),
            })
        }
        "unset" => match rest {
            "" => Err("usage: unset KEY".into()),
            k if k.contains(char::is_whitespace) => Err("usage: unset KEY".into()),
            k => Ok(Command::Unset(key(k)?)),
        },
        "diff" => no_args(Command::Diff),
        "save" => no_args(Command::Save),
        "discard" => no_args(Command::Discard),
        "test" => match rest {
            "uplink" => Ok(Command::Test(Target::Uplink)),
            "mqtt" => Ok(Command::Test(Target::Mqtt)),
            _ => Err("usage: test uplink | test mqtt".into()),
        },
        "journal" => no_args(Command::Journal),
        "log" => match rest {
            "" => Ok(Command::Log(None)),
            level => Ok(Command::Log(Some(level.to_owned()))),
        },
        "identity" => match rest {
            "" => Ok(Command::Identity { regenerate: false }),
            "regenerate" => Ok(Command::Identity { regenerate: true }),
            _ => Err("usage: identity [regenerate]".into()),
        },
        "exit" | "quit" | "logout" => no_args(Command::Exit),
        other => Err(format!(
            "unknown command {:?}; type help for the list",
            shorten(other)
        )),
    }
}

/// A key or section name as typed: printable, no spaces, bounded. Whether it exists is for the
/// config to say.
fn key(k: &str) -> Result<String, String> {
    if k.len() > MAX_KEY || !k.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "{:?} is not a key: expected section.name, e.g. uplink.url",
            shorten(k)
        ));
    }
    Ok(k.to_owned())
}

/// At most 40 characters of what was typed, for a message.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, value: &str) -> Command {
        Command::Set {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn an_empty_line_is_nothing() {
        assert_eq!(parse(""), Ok(Command::Nothing));
        assert_eq!(parse("   "), Ok(Command::Nothing));
    }

    #[test]
    fn help_lists_or_explains_one_command() {
        assert_eq!(parse("help"), Ok(Command::Help(None)));
        assert_eq!(parse("?"), Ok(Command::Help(None)));
        assert_eq!(parse("help save"), Ok(Command::Help(Some(Topic::Save))));
        assert!(parse("help fly").unwrap_err().contains("fly"));
        for t in TOPICS {
            assert_eq!(
                parse(&format!("help {}", t.name())),
                Ok(Command::Help(Some(t)))
            );
        }
    }

    #[test]
    fn status_takes_no_arguments() {
        assert_eq!(parse("status"), Ok(Command::Status));
        assert_eq!(parse("status now"), Err("status takes no arguments".into()));
    }

    #[test]
    fn show_takes_an_optional_section_or_key() {
        assert_eq!(parse("show"), Ok(Command::Show(None)));
        assert_eq!(
            parse("show uplink"),
            Ok(Command::Show(Some("uplink".into())))
        );
        assert_eq!(
            parse(" show  uplink.url "),
            Ok(Command::Show(Some("uplink.url".into())))
        );
        assert!(parse("show a b").is_err());
    }

    #[test]
    fn set_keeps_the_rest_of_the_line_as_the_value() {
        assert_eq!(
            parse("set uplink.url http://h/ingest"),
            Ok(set("uplink.url", "http://h/ingest"))
        );
        assert_eq!(
            parse("set mqtt.topics [\"a/#\", \"b/#\"]"),
            Ok(set("mqtt.topics", "[\"a/#\", \"b/#\"]"))
        );
        assert_eq!(
            parse("set\tlog.level   debug  "),
            Ok(set("log.level", "debug"))
        );
    }

    #[test]
    fn set_without_a_value_says_how() {
        assert!(
            parse("set")
                .unwrap_err()
                .starts_with("usage: set KEY VALUE")
        );
        assert!(parse("set uplink.url").unwrap_err().starts_with("usage"));
        assert!(parse("set uplink.url   ").unwrap_err().starts_with("usage"));
    }

    #[test]
    fn a_key_is_bounded_and_printable() {
        let long = "k".repeat(100);
        let err = parse(&format!("set {long} 1")).unwrap_err();
        assert!(err.contains("is not a key") && err.len() < 120, "{err}");
        assert!(parse("unset é.x").is_err());
    }

    #[test]
    fn unset_takes_one_key() {
        assert_eq!(
            parse("unset uplink.token"),
            Ok(Command::Unset("uplink.token".into()))
        );
        assert!(parse("unset").is_err());
        assert!(parse("unset a.b c").is_err());
    }

    #[test]
    fn diff_save_discard_journal_exit_take_no_arguments() {
        assert_eq!(parse("diff"), Ok(Command::Diff));
        assert_eq!(parse("save"), Ok(Command::Save));
        assert_eq!(parse("discard"), Ok(Command::Discard));
        assert_eq!(parse("journal"), Ok(Command::Journal));
        assert_eq!(parse("exit"), Ok(Command::Exit));
        assert_eq!(parse("quit"), Ok(Command::Exit));
        assert!(parse("save now").is_err());
        assert!(parse("exit 1").is_err());
    }

    #[test]
    fn test_names_its_target() {
        assert_eq!(parse("test uplink"), Ok(Command::Test(Target::Uplink)));
        assert_eq!(parse("test mqtt"), Ok(Command::Test(Target::Mqtt)));
        assert!(parse("test").is_err());
        assert!(parse("test cloud").is_err());
    }

    #[test]
    fn log_shows_or_sets_the_level() {
        assert_eq!(parse("log"), Ok(Command::Log(None)));
        assert_eq!(parse("log debug"), Ok(Command::Log(Some("debug".into()))));
        assert_eq!(
            parse("log warn,ferry::uplink=debug"),
            Ok(Command::Log(Some("warn,ferry::uplink=debug".into())))
        );
    }

    #[test]
    fn identity_shows_or_regenerates() {
        assert_eq!(
            parse("identity"),
            Ok(Command::Identity { regenerate: false })
        );
        assert_eq!(
            parse("identity regenerate"),
            Ok(Command::Identity { regenerate: true })
        );
        assert!(parse("identity reset").is_err());
    }

    #[test]
    fn an_unknown_command_is_named_shortly() {
        let err = parse(&"z".repeat(500)).unwrap_err();
        assert!(
            err.starts_with("unknown command") && err.len() < 100,
            "{err}"
        );
    }
}
