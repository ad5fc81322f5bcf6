//! Command-line parsing: a handful of subcommands and flags, parsed by hand into [`Command`].
//! Pure, so that every case is unit-tested.

use std::path::PathBuf;

pub const DEFAULT_CONFIG: &str = "/etc/ferry/ferry.toml";

pub const USAGE: &str = "\
ferry: durable store-and-forward of MQTT telemetry to the cloud

usage:
  ferry run -c FILE             run the agent
  ferry check-config -c FILE    validate FILE and print the effective config (secrets masked)
  ferry status [-c FILE] [--json]
                                show the running agent's status
  ferry reload [-c FILE]        make the running agent re-read its config file
                                (runtime keys apply at once, others restart it)
  ferry console [-c FILE] [--device DEV]
                                the technician's configuration shell, on the serial device
                                DEV or on this terminal
  ferry dead-letters [-c FILE] [--requeue SEQ]
                                list records the cloud refused, or queue one again
  ferry --version | --help

FILE defaults to /etc/ferry/ferry.toml. Logging: log.level in FILE, or FERRY_LOG=debug (or
RUST_LOG), which wins over the file. SIGHUP makes `ferry run` re-read FILE.
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run {
        config: PathBuf,
    },
    CheckConfig {
        config: PathBuf,
    },
    Status {
        config: PathBuf,
        json: bool,
    },
    DeadLetters {
        config: PathBuf,
        requeue: Option<u64>,
    },
    Reload {
        config: PathBuf,
    },
    Console {
        config: PathBuf,
        device: Option<PathBuf>,
    },
    Help,
    Version,
}

pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut args = args.into_iter();
    let Some(sub) = args.next() else {
        return Err("missing subcommand".into());
    };
    let mut config = None;
    let mut json = false;
    let mut requeue = None;
    let mut device = None;
    let rest: Vec<String> = args.collect();
    let mut i = 0;
    while i < rest.len() {
        let flag = rest[i].as_str();
        let mut value = || {
            i += 1;
            rest.get(i).cloned().ok_or(format!("{flag} needs a value"))
        };
        match flag {
            "-c" | "--config" => config = Some(PathBuf::from(value()?)),
            "--json" if sub == "status" => json = true,
            "--device" if sub == "console" => device = Some(PathBuf::from(value()?)),
            "--requeue" if sub == "dead-letters" => {
                let v = value()?;
                requeue = Some(
                    v.parse()
                        .map_err(|_| format!("--requeue needs a seq, got {v:?}"))?,
                );
            }
            other => return Err(format!("unexpected argument {other:?} for {sub}")),
        }
        i += 1;
    }
    let config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match sub.as_str() {
        "run" => Ok(Command::Run { config }),
        "check-config" => Ok(Command::CheckConfig { config }),
        "status" => Ok(Command::Status { config, json }),
        "dead-letters" => Ok(Command::DeadLetters { config, requeue }),
        "reload" => Ok(Command::Reload { config }),
        "console" => Ok(Command::Console { config, device }),
        "-h" | "--help" | "help" => Ok(Command::Help),
        "-V" | "--version" | "version" => Ok(Command::Version),
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn run_takes_a_config_file() {
        assert_eq!(
            p(&["run", "-c", "f.toml"]),
            Ok(Command::Run {
                config: "f.toml".into()
            })
        );
        assert_eq!(
            p(&["run", "--config", "f.toml"]),
            Ok(Command::Run {
                config: "f.toml".into()
            })
        );
    }

    #[test]
    fn config_defaults_to_etc() {
        assert_eq!(
            p(&["check-config"]),
            Ok(Command::CheckConfig {
                config: DEFAULT_CONFIG.into()
            })
        );
    }

    #[test]
    fn status_and_dead_letters_take_their_flags_only() {
        assert_eq!(
            p(&["status", "--json"]),
            Ok(Command::Status {
                config: DEFAULT_CONFIG.into(),
                json: true
            })
        );
        assert_eq!(
            p(&["dead-letters", "--requeue", "7"]),
            Ok(Command::DeadLetters {
                config: DEFAULT_CONFIG.into(),
                requeue: Some(7)
            })
        );
        assert!(p(&["run", "--json"]).is_err());
        assert!(p(&["dead-letters", "--requeue", "x"]).is_err());
    }

    #[test]
    fn console_takes_an_optional_device() {
        assert_eq!(
            p(&["console", "-c", "f.toml", "--device", "/dev/ttyUSB0"]),
            Ok(Command::Console {
                config: "f.toml".into(),
                device: Some("/dev/ttyUSB0".into())
            })
        );
        assert_eq!(
            p(&["console"]),
            Ok(Command::Console {
                config: DEFAULT_CONFIG.into(),
                device: None
            })
        );
        assert!(p(&["run", "--device", "/dev/x"]).is_err());
        assert!(
            p(&["console", "--device"])
                .unwrap_err()
                .contains("needs a value")
        );
    }

    #[test]
    fn mistakes_are_errors_that_say_what() {
        assert_eq!(p(&[]), Err("missing subcommand".into()));
        assert!(p(&["fly"]).unwrap_err().contains("fly"));
        assert!(p(&["run", "-c"]).unwrap_err().contains("-c needs a value"));
    }
}
