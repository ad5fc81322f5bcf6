//! A real nginx in front of ferry-cloud: the integration tests' and the fleet benchmark's load
//! balancer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, is_root, port_open, signal_pid};

/// A real nginx (master and one worker) on `port`, proxying `/v1/` over keepalive connections
/// to one upstream (or round robin over several), with everything it writes (pid, logs, temp
/// files) in its own directory. Stopped (TERM, then KILL) when dropped.
pub struct Nginx {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Nginx {
    /// Round robin over `upstream_ports` (replicas of ferry-cloud). A request that fails on one
    /// is not tried on another (`proxy_next_upstream off`): the sender's retry is the one retry.
    /// Returns once nginx listens.
    pub fn start(dir: &Path, port: u16, upstream_ports: &[u16]) -> Result<Nginx> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let d = dir.display();
        // As root the workers would otherwise run as `nobody`, which cannot write the temp dir.
        // The access log records nginx's connection serial and its request count on that
        // connection, so a test can see how many connections a sender used.
        let conf = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               log_format ferry '$connection $connection_requests $status $request_time';\n\
               access_log {d}/access.log ferry;\n\
               client_body_temp_path {d}/client_body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               client_max_body_size 16m;\n\
               upstream cloud {{\n\
                 {servers}\
                 keepalive 8;\n\
                 keepalive_timeout 30s;\n\
               }}\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 location /v1/ {{\n\
                   proxy_pass http://cloud;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_connect_timeout 2s;\n\
                   proxy_read_timeout 10s;\n\
                   proxy_next_upstream off;\n\
                 }}\n\
               }}\n\
             }}\n",
            servers = upstream_ports
                .iter()
                .map(|p| format!("server 127.0.0.1:{p} max_fails=0;\n"))
                .collect::<String>(),
            user = if is_root() { "user root;\n" } else { "" },
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)
            .map_err(|e| format!("write {}: {e}", conf_path.display()))?;
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx (scripts/ensure-deps.sh installs it): {e}"))?;
        let mut n = Nginx {
            port,
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !port_open(port) {
            let exited = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "nginx exited at start ({status}):\n{}",
                    n.error_log()
                ));
            }
            if Instant::now() >= end {
                return Err(format!("nginx did not listen on {port} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }

    /// Where a gateway posts its batches through this nginx.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// The access log: one `connection requests_on_it status request_time` line per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL on the master would leave its worker behind, holding the port: TERM first.
        if let Some(mut c) = self.child.take() {
            signal_pid(c.id(), "TERM");
            let end = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nginx_bin() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}
