#[allow(unused_imports)]
use super::*;

pub use ferry_testkit::Nginx;

/// A real nginx on a free port in front of `upstream_port` (see [`Nginx::start`]).
pub fn nginx(dir: &Path, upstream_port: u16) -> Nginx {
    nginx_many(dir, &[upstream_port])
}

/// A real nginx on a free port, round robin over `upstream_ports`.
pub fn nginx_many(dir: &Path, upstream_ports: &[u16]) -> Nginx {
    Nginx::start(dir, free_port(), upstream_ports).unwrap_or_else(|e| panic!("{e}"))
}
