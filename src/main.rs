//! `ferry`: parse the command line, set up logging, load the config, dispatch. The architecture map
//! is at the top of `lib.rs`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

use std::process::ExitCode;
use std::time::Duration;

use ferry::cli::{self, Command};
use ferry::config::Config;
use ferry::{agent, control, error_chain};

fn main() -> ExitCode {
    // FERRY_LOG, else RUST_LOG, else `info` until `ferry run` reads `log.level`.
    ferry::logging::init("info");
    // Before any config is built: rustls needs exactly one provider (see `tls`).
    ferry::tls::install_provider();
    let cmd = match cli::parse(std::env::args().skip(1)) {
        Ok(cmd) => cmd,
        Err(msg) => {
            eprintln!("ferry: {msg}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match cmd {
        Command::Help => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("ferry {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                print!("{}", cfg.to_masked_toml());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            match agent::run(cfg) {
                Ok(agent::Exit::Stopped) => ExitCode::SUCCESS,
                Ok(agent::Exit::Restart) => restart(),
                Err(e) => {
                    log::error!("{}", error_chain(&e));
                    ExitCode::from(1)
                }
            }
        }
        Command::Status { config, json } => with_agent(&config, |addr, token| {
            let token = token.ok();
            let body = control::get(addr, "/status", token.as_deref(), Duration::from_secs(3))?;
            if json {
                println!("{body}");
            } else {
                print!("{}", ferry::status::status_text(&body));
            }
            Ok(())
        }),
        Command::Reload { config } => with_agent(&config, |addr, token| {
            println!(
                "{}",
                control::post(addr, "/reload", &token?, Duration::from_secs(10))?
            );
            Ok(())
        }),
        Command::Console { config, device } => {
            match ferry::console::standalone(&config, device.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("ferry: {msg}");
                    ExitCode::from(1)
                }
            }
        }
        Command::DeadLetters { config, requeue } => with_agent(&config, |addr, token| {
            let body = match requeue {
                None => {
                    let token = token.ok();
                    control::get(
                        addr,
                        "/dead-letters",
                        token.as_deref(),
                        Duration::from_secs(3),
                    )?
                }
                Some(seq) => control::post(
                    addr,
                    &format!("/dead-letters/{seq}/requeue"),
                    &token?,
                    Duration::from_secs(10),
                )?,
            };
            println!("{body}");
            Ok(())
        }),
    }
}

/// Replaces this process with a fresh copy of itself (same pid, same arguments), so that a supervisor
/// sees one process and the new configuration applies from the start.
fn restart() -> ExitCode {
    use std::os::unix::process::CommandExt as _;
    let err = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(e) => e,
    };
    log::error!(
        "cannot restart: {}; exiting for the supervisor to restart",
        err
    );
    ExitCode::from(1)
}

fn config_error(e: &ferry::config::Error) -> ExitCode {
    eprintln!("ferry: {}", error_chain(e));
    ExitCode::from(2)
}

/// Runs `f` against the control address from the config file.
fn with_agent(
    config: &std::path::Path,
    f: impl FnOnce(std::net::SocketAddr, Result<String, control::Error>) -> Result<(), control::Error>,
) -> ExitCode {
    let cfg = match Config::load(config) {
        Ok(cfg) => cfg,
        Err(e) => return config_error(&e),
    };
    // Reads go without the token on loopback; changes need it (`control`).
    match f(cfg.control.listen, control::token(&cfg, false)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}
