//! TLS material shared by the uplink (HTTPS) and the downlink (WSS): one crypto provider, one set of
//! trust roots, one optional client certificate.
//!
//! rustls panics at the first handshake when more than one crypto provider is compiled in and none is
//! chosen, so ferry compiles in exactly one (ring, the one ureq's `rustls` feature uses), installs it
//! as the process default at start ([`install_provider`]) and builds every config from it. The PEM
//! files of `[tls]` are read and parsed when the config is loaded ([`Material::load`]), so a bad file
//! is a configuration error at start, never a panic or a failed handshake later.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("tls setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{host:?} is not a valid tls server name")]
    ServerName { host: String },
}

/// The one crypto provider ferry uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider. Idempotent; called first thing in `main`.
pub fn install_provider() {
    // Err means a provider is installed already: the same one, since only ring is compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Parsed `[tls]` files: extra trust roots and an optional client certificate (mTLS).
#[derive(Debug, Clone, Default)]
pub struct Material {
    /// `None`: the Mozilla roots of `webpki-roots`.
    pub roots: Option<Vec<CertificateDer<'static>>>,
    pub client: Option<ClientIdentity>,
}

#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The key file as read (ureq takes PEM).
    pub key_pem: Vec<u8>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl Material {
    /// Reads and parses the PEM files; the client certificate and key are given together or not at
    /// all (the config checks that). Also builds a client config once so that a key that does not
    /// match its certificate type is refused now.
    pub fn load(
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
    ) -> Result<Material, Error> {
        let roots = ca_file.map(|p| read_certs("tls.ca_file", p)).transpose()?;
        let client = match (cert_file, key_file) {
            (Some(c), Some(k)) => {
                let pem_err = |message: String| Error::Pem {
                    what: "tls.key_file",
                    path: k.to_owned(),
                    message,
                };
                let key_pem = std::fs::read(k).map_err(|e| pem_err(e.to_string()))?;
                let key =
                    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(e.to_string()))?;
                Some(ClientIdentity {
                    chain: read_certs("tls.cert_file", c)?,
                    key,
                    key_pem,
                })
            }
            _ => None,
        };
        let material = Material { roots, client };
        material.client_config()?;
        Ok(material)
    }

    /// A client config trusting the certificates of `ca_file` (named `what` in errors), or the
    /// Mozilla roots without one; no client certificate.
    pub fn roots_only(what: &'static str, ca_file: Option<&Path>) -> Result<Material, Error> {
        Ok(Material {
            roots: ca_file.map(|p| read_certs(what, p)).transpose()?,
            client: None,
        })
    }

    /// A rustls client config from ring, these roots and this identity.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Some(certs) => {
                for c in certs {
                    store.add(c.clone())?;
                }
            }
            None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store);
        let config = match &self.client {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// A TLS client session to `host` (SNI and certificate name).
pub fn client_connection(
    config: Arc<rustls::ClientConfig>,
    host: &str,
) -> Result<rustls::ClientConnection, Error> {
    // An ipv6 literal arrives bracketed from a url.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(bare.to_owned()).map_err(|_| Error::ServerName {
        host: host.to_owned(),
    })?;
    Ok(rustls::ClientConnection::new(config, name)?)
}

/// A server config for `ferry-cloud --tls-cert/--tls-key [--client-ca]`: with `client_ca`, clients
/// must present a certificate signed by it.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let chain = read_certs("--tls-cert", cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| Error::Pem {
        what: "--tls-key",
        path: key_file.to_owned(),
        message: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut store = RootCertStore::empty();
            for c in read_certs("--client-ca", ca)? {
                store.add(c)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(store),
                provider(),
            )
            .build()
            .map_err(|e| Error::Rustls(rustls::Error::General(e.to_string())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

/// A TCP socket, with or without TLS on it: `C` is `rustls::ClientConnection` or
/// `rustls::ServerConnection`. What the WebSocket of either end runs over.
pub enum Stream<C> {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<C, TcpStream>>),
}

impl<C> Stream<C> {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl<C, S> Read for Stream<C>
where
    C: DerefMut + Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl<C, S> Write for Stream<C>
where
    C: DerefMut + Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem_err = |message: String| Error::Pem {
        what,
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(Error::Empty {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let e = Material::load(Some(&p), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.ca_file") && e.contains("ca.pem"), "{e}");
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let e = Material::load(Some(Path::new("/nonexistent/ca.pem")), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn default_roots_build_a_client_config() {
        install_provider();
        Material::default().client_config().unwrap();
    }
}
