//! The operators' console: a page served at `/console`, embedded in the binary (no CDN, no build
//! step: plain HTML, CSS and JavaScript), that reads the operator API (`/v1/fleet`,
//! `/v1/devices`, a device's ledger, downlink and commands) with the operator's token, which the
//! page keeps in the tab's `sessionStorage` only. The assets hold no data and need no credential;
//! every request for data does ([`crate::operators`]).
//!
//! Views: the fleet overview (devices by state, records/s over the last ten minutes, the backlog
//! held on gateways and its age), the device table (server-side paging, sorting, filtering by
//! state and id prefix), and a device's page (its ledger drawn along the seq axis, its downlink,
//! commands with a confirmation for those that change something, and their results).

/// An embedded asset: its content type and bytes.
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// The asset served at `path` (under `/console`), if any.
pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, body): (&str, &[u8]) = match path {
        "/console" | "/console/" => ("text/html; charset=utf-8", include_bytes!("index.html")),
        "/console/app.js" => ("text/javascript; charset=utf-8", include_bytes!("app.js")),
        "/console/style.css" => ("text/css; charset=utf-8", include_bytes!("style.css")),
        _ => return None,
    };
    Some(Asset { content_type, body })
}

/// Headers of every console answer: only this origin's scripts and styles run, the page is
/// never framed, and types are not sniffed.
pub const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
];
