//! `ferry-cloud`: the reference receiver of ferry's wire protocol (see the `ferry_cloud` library). This file only
//! parses arguments, sets up logging and signals, runs the receiver and maps the outcome to an exit
//! code: 0 after SIGTERM/SIGINT, 1 when the receiver cannot start or fails, 2 for bad arguments.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use ferry_cloud as cloud;
use signal_hook::consts::{SIGINT, SIGTERM};

const USAGE: &str = "\
usage: ferry-cloud --listen HOST:PORT
                   (--data DIR | --store postgres://... [--store-ca PEM] [--store-password-file FILE])
                   [--reject-marker STR] [--token TOKEN | --token-file FILE] [--operators FILE]
                   [--max-records-per-sec N] [--silent-after SECS] [--max-record-age SECS]
                   [--idle-timeout SECS] [--max-connections N]
                   [--ws-listen HOST:PORT [--tls-cert PEM --tls-key PEM [--client-ca PEM]]]

Reference receiver of ferry's wire protocol v1 (docs/PROTOCOL.md).

  --listen HOST:PORT     address to listen on; port 0 picks a free port. Prints
                         'listening on <addr>' on stdout once accepting.
  --data DIR             keep the records, gaps and ledger as files in DIR (created if
                         missing); one ferry-cloud per DIR
  --store postgres://USER@HOST:PORT/DB
                         keep them in PostgreSQL instead (a URL or key=value string as
                         rust-postgres reads it: no .pgpass, PGPASSWORD or sslrootcert;
                         schema created or migrated at start); replicas may share one.
                         A password in it shows in the process list: give it with
                         --store-password-file, or use a Unix socket
                         (host=/run/postgresql) with peer authentication
  --store-password-file FILE
                         the database password: FILE's first line (kept out of the
                         process list and the logs)
  --store-ca PEM         with sslmode=require in the connection string: trust these CA
                         certificates for the database's (default: the Mozilla roots).
                         TLS to the database is always verified, by the host name or
                         address the connection string gives (libpq's verify-full)
  --reject-marker STR    answer 422 to any batch with a record whose payload contains STR
  --max-records-per-sec N
                         answer 429 (Retry-After: 1) to batches over N records per second
  --silent-after SECS    a device that sent no batch for this long is 'silent' in
                         GET /v1/devices and /metrics (default 3600)
  --max-record-age SECS  answer 422 to any batch with a record whose ts_ms is older than
                         this, as clouds that keep a time window do (default: any age)
  --idle-timeout SECS    close an HTTP connection that sends nothing for this long,
                         between requests or within one (default 60): a gateway whose
                         link died without closing its connection does not hold a
                         thread for ever
  --max-connections N    serve at most N HTTP connections at once, one thread and two
                         file descriptors each (default 256); further ones wait in the
                         listen backlog. A fleet larger than that connects through
                         nginx (README)
  --token TOKEN          require 'Authorization: Bearer TOKEN' on uploads and on the
                         downlink
  --token-file FILE      the same, the token read from FILE's first line (kept out of
                         the process list, where --token shows)
  --operators FILE       the operators, one 'NAME TOKEN' per line: the fleet API
                         (/v1/devices..., commands, /v1/stats) then needs
                         'Authorization: Bearer TOKEN' of one of them (16+ characters,
                         not the device token). Without it that API is open, which is
                         allowed on loopback only: listening beyond loopback needs
                         both --token and --operators
  --ws-listen HOST:PORT  serve the downlink WebSocket (/v1/downlink) there; prints
                         'downlink listening on <addr>' as the second line
  --tls-cert PEM, --tls-key PEM
                         serve the downlink as wss:// with this certificate and key
  --client-ca PEM        with TLS, require client certificates signed by this CA (mTLS)
  -h, --help             print this help

Logs go to stderr; set RUST_LOG (default info).";

const WORKERS: usize = 4;

fn main() -> ExitCode {
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("ferry-cloud: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    ferry_tls::install_provider();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-cloud: {}", ferry_util::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run(config: cloud::Config) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        // A second signal while shutting down exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&shutdown))?;
        signal_hook::flag::register(signal, Arc::clone(&shutdown))?;
    }
    let running = cloud::start(config, Arc::clone(&shutdown))?;
    let mut stdout = std::io::stdout().lock();
    // One write: a reader that takes only the first line and closes the pipe must not fail us.
    let mut lines = format!("listening on {}\n", running.local_addr());
    if let Some(ws) = running.ws_addr() {
        lines.push_str(&format!("downlink listening on {ws}\n"));
    }
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    drop(stdout);
    running.join()?;
    log::info!("stopped");
    Ok(())
}

/// The first line of the file `path` given to `flag`, without its line ending (a secret kept out
/// of the process list, where an argument shows).
fn first_line(flag: &str, path: &std::path::Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or_default();
    // `lines` leaves a carriage return that ends the file without a newline.
    Ok(line.strip_suffix('\r').unwrap_or(line).to_owned())
}

/// The device token in `path` (`--token-file`): its first line, trimmed.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    let line = first_line("--token-file", path)?;
    let token = line.trim();
    if token.is_empty() || token.chars().any(char::is_whitespace) {
        return Err(format!(
            "--token-file {}: its first line must be the token, without spaces",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// The database password in `path` (`--store-password-file`): its first line as it is (a
/// password may hold spaces).
fn read_password(path: &std::path::Path) -> Result<ferry_util::Secret, String> {
    let line = first_line("--store-password-file", path)?;
    if line.is_empty() {
        return Err(format!(
            "--store-password-file {}: its first line must be the password",
            path.display()
        ));
    }
    Ok(ferry_util::Secret::new(line))
}

/// Whether every address `addr` (`host:port`) names is a loopback one.
fn is_loopback(addr: &str) -> Result<bool, String> {
    use std::net::ToSocketAddrs as _;
    let mut addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: not an address to listen on: {e}"))?
        .peekable();
    if addrs.peek().is_none() {
        return Err(format!("{addr}: names no address"));
    }
    Ok(addrs.all(|a| a.ip().is_loopback()))
}

/// `Ok(None)` means help was asked for. Values stay `OsString` until they must be text, so a data
/// directory whose name is not UTF-8 still works.
fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Option<cloud::Config>, String> {
    let mut listen = None;
    let mut data = None;
    let mut store = None;
    let mut store_ca = None;
    let mut store_password_file = None;
    let mut reject_marker = None;
    let mut token = None;
    let mut token_file = None;
    let mut operators = None;
    let mut max_rate = None;
    let mut ws_listen = None;
    let mut tls_cert = None;
    let mut tls_key = None;
    let mut client_ca = None;
    let mut silent_after = None;
    let mut max_record_age = None;
    let mut idle_timeout = None;
    let mut max_connections = None;
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(OsString::from(value)))
            }
            _ => (text.into_owned(), None),
        };
        let slot = match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => &mut listen,
            "--data" => &mut data,
            "--store" => &mut store,
            "--store-ca" => &mut store_ca,
            "--store-password-file" => &mut store_password_file,
            "--reject-marker" => &mut reject_marker,
            "--token" => &mut token,
            "--token-file" => &mut token_file,
            "--operators" => &mut operators,
            "--max-records-per-sec" => &mut max_rate,
            "--ws-listen" => &mut ws_listen,
            "--tls-cert" => &mut tls_cert,
            "--tls-key" => &mut tls_key,
            "--client-ca" => &mut client_ca,
            "--silent-after" => &mut silent_after,
            "--max-record-age" => &mut max_record_age,
            "--idle-timeout" => &mut idle_timeout,
            "--max-connections" => &mut max_connections,
            _ => return Err(format!("unknown argument {flag}")),
        };
        let value = match inline.or_else(|| args.next()) {
            Some(value) if !value.is_empty() => value,
            _ => return Err(format!("{flag} needs a non-empty value")),
        };
        if slot.replace(value).is_some() {
            return Err(format!("{flag} given twice"));
        }
    }
    let text = |flag: &str, value: OsString| {
        value
            .into_string()
            .map_err(|_| format!("{flag} is not valid UTF-8"))
    };
    // A flag's value that must be a positive integer (`what` names it in the error).
    let positive = |flag: &str, value: OsString, what: &str| -> Result<u64, String> {
        text(flag, value)?
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{flag} needs a positive {what}"))
    };
    let secs = std::time::Duration::from_secs;
    let ws_tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(
            ferry_tls::server_config(
                &PathBuf::from(cert),
                &PathBuf::from(key),
                client_ca.map(PathBuf::from).as_deref(),
            )
            .map_err(|e| ferry_util::error_chain(&e))?,
        ),
        (None, None) if client_ca.is_none() => None,
        _ => {
            return Err("--tls-cert and --tls-key go together (and --client-ca needs them)".into());
        }
    };
    if ws_tls.is_some() && ws_listen.is_none() {
        return Err("--tls-cert applies to the downlink: give --ws-listen too".into());
    }
    let listen = text("--listen", listen.ok_or("--listen is required")?)?;
    let ws_listen = ws_listen.map(|v| text("--ws-listen", v)).transpose()?;
    let token = match (token, token_file) {
        (Some(_), Some(_)) => return Err("--token and --token-file exclude each other".into()),
        (Some(v), None) => Some(text("--token", v)?),
        (None, Some(path)) => Some(read_token(&PathBuf::from(path))?),
        (None, None) => None,
    };
    let operators = match operators {
        Some(path) => cloud::operators::Operators::load(&PathBuf::from(path), token.as_deref())?,
        None => cloud::operators::Operators::default(),
    };
    for addr in std::iter::once(&listen).chain(&ws_listen) {
        if !is_loopback(addr)? && (token.is_none() || operators.is_open()) {
            return Err(format!(
                "{addr} is reachable beyond this host: give --token (for the devices) and \
                 --operators (for the fleet API and commands), or listen on loopback"
            ));
        }
    }
    Ok(Some(cloud::Config {
        listen,
        store: match (data, store) {
            (_, None) if store_ca.is_some() => return Err("--store-ca goes with --store".into()),
            (_, None) if store_password_file.is_some() => {
                return Err("--store-password-file goes with --store".into());
            }
            (Some(dir), None) => cloud::store::Location::Files(PathBuf::from(dir)),
            (None, Some(url)) => cloud::store::Location::Postgres {
                url: text("--store", url)?,
                ca_file: store_ca.map(PathBuf::from),
                password: store_password_file
                    .map(|path| read_password(&PathBuf::from(path)))
                    .transpose()?,
            },
            (None, None) => return Err("--data DIR or --store postgres://... is required".into()),
            (Some(_), Some(_)) => return Err("--data and --store exclude each other".into()),
        },
        reject_marker: reject_marker
            .map(|v| text("--reject-marker", v))
            .transpose()?,
        token,
        operators,
        max_records_per_sec: max_rate
            .map(|v| positive("--max-records-per-sec", v, "integer"))
            .transpose()?,
        silent_after: match silent_after {
            None => cloud::DEFAULT_SILENT_AFTER,
            Some(v) => secs(positive("--silent-after", v, "number of seconds")?),
        },
        max_record_age: max_record_age
            .map(|v| positive("--max-record-age", v, "number of seconds").map(secs))
            .transpose()?,
        idle_timeout: match idle_timeout {
            None => cloud::DEFAULT_IDLE_TIMEOUT,
            Some(v) => secs(positive("--idle-timeout", v, "number of seconds")?),
        },
        max_connections: match max_connections {
            None => cloud::DEFAULT_MAX_CONNECTIONS,
            Some(v) => usize::try_from(positive("--max-connections", v, "integer")?)
                .map_err(|_| "--max-connections is too large".to_string())?,
        },
        workers: WORKERS,
        ws_listen,
        ws_tls,
    }))
}
