//! Mutual TLS on every link between rackscale processes.
//!
//! One CA signs every process's certificate. Servers ([`ServerTls`], used by
//! [`incoming`] for tonic and axum, and [`ServerTls::accept_blocking`] for
//! the CPU backend's synchronous expert links) require a client certificate
//! that chains to the CA (rustls' `WebPkiClientVerifier`); clients
//! ([`ClientTls`]) trust only that CA and present their own certificate.
//! Every gRPC channel of the workspace is built by [`ClientTls::channel`] or
//! [`ClientTls::channel_lazy`], and every other outbound stream by
//! [`ClientTls::dial`] / [`ClientTls::dial_blocking`], so a new link gets the
//! process's transport by construction.
//!
//! Reload: the CA, certificate and key files are re-read when one of them
//! changes (modification time, size or inode, checked at most once per
//! reload interval, on the next handshake). A new server configuration
//! (certificate *and* client CA) applies to new connections; open ones keep
//! theirs. A file set that does not load (a half-written rotation, a key
//! that does not match) keeps the previous configuration and logs a warning.
//!
//! Server names: a client checks that the server's certificate chains to
//! the CA *and* names the host it dials (an IP SAN for an address, a DNS SAN
//! for a name). Where servers are dialled at addresses no certificate can
//! name in advance (pod IPs), `--tls-server-name` makes clients check that
//! one name instead, e.g. the name every agent certificate carries.
//!
//! Plaintext exists only as [`Transport::Plaintext`], which a binary gets
//! from an explicit `--insecure-plaintext` ([`TlsArgs`]); without TLS files
//! and without that flag [`TlsArgs::transport`] refuses to start.

mod args;
mod client;
mod files;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use args::TlsArgs;
pub use client::{BlockingClientStream, ClientIo, ClientTls, Connector};
pub use server::{BlockingServerStream, Incoming, ServerIo, ServerTls, incoming};

/// Names of the environment variables every binary reads its TLS settings
/// from (the twins of the `--tls-*` flags). An agent hands them to the
/// engine ranks it starts, so one agent's settings configure its ranks.
pub mod env {
    /// PEM file of the CA that signs every rackscale certificate.
    pub const CA: &str = "RACKSCALE_TLS_CA";
    /// PEM file of this process's certificate chain (leaf first).
    pub const CERT: &str = "RACKSCALE_TLS_CERT";
    /// PEM file of this process's private key (PKCS#8, PKCS#1 or SEC1).
    pub const KEY: &str = "RACKSCALE_TLS_KEY";
    /// The name server certificates must carry, instead of the dialled host.
    pub const SERVER_NAME: &str = "RACKSCALE_TLS_SERVER_NAME";
    /// Seconds between checks of the files for a change.
    pub const RELOAD_SECONDS: &str = "RACKSCALE_TLS_RELOAD_SECONDS";
    /// `true`: serve and dial without TLS (local runs only).
    pub const INSECURE_PLAINTEXT: &str = "RACKSCALE_INSECURE_PLAINTEXT";
}

/// Default time between two checks of the TLS files for a change.
pub const DEFAULT_RELOAD: Duration = Duration::from_secs(5);

/// How long a server waits for a client to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The three PEM files of one process's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA every peer's certificate must chain to.
    pub ca: PathBuf,
    /// This process's certificate chain.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The environment a child process needs to use the same files.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (env::CA.to_owned(), self.ca.display().to_string()),
            (env::CERT.to_owned(), self.cert.display().to_string()),
            (env::KEY.to_owned(), self.key.display().to_string()),
        ]
    }
}

/// Mutual TLS settings of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Its files.
    pub files: TlsFiles,
    /// The name server certificates must carry; `None`: the dialled host.
    pub server_name: Option<String>,
    /// Time between two checks of the files for a change.
    pub reload: Duration,
}

/// How a process's gRPC links are carried, as chosen at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Mutual TLS with these settings.
    Mtls(TlsSettings),
    /// No TLS: only behind an explicit `--insecure-plaintext`.
    Plaintext,
}

impl Transport {
    /// A mutual-TLS transport with default reload and server-name checks.
    pub fn mtls(files: TlsFiles) -> Self {
        Self::Mtls(TlsSettings {
            files,
            server_name: None,
            reload: DEFAULT_RELOAD,
        })
    }

    /// Whether links are encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Mtls(_))
    }

    /// The URL scheme endpoints served over this transport advertise.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() { "https" } else { "http" }
    }

    /// A client for this transport (loads the files now, so a bad file
    /// fails at start-up).
    pub fn client(&self) -> crate::Result<ClientTls> {
        match self {
            Self::Mtls(settings) => ClientTls::new(settings),
            Self::Plaintext => Ok(ClientTls::plaintext()),
        }
    }

    /// A server acceptor for this transport speaking `alpn`; `None` for
    /// plaintext.
    pub fn server(&self, alpn: Alpn) -> crate::Result<Option<ServerTls>> {
        match self {
            Self::Mtls(settings) => ServerTls::new(settings, alpn).map(Some),
            Self::Plaintext => Ok(None),
        }
    }

    /// The environment a child process (an engine rank) needs to use the
    /// same transport.
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Self::Mtls(s) => {
                let mut env = s.files.env();
                if let Some(name) = &s.server_name {
                    env.push((env::SERVER_NAME.to_owned(), name.clone()));
                }
                env.push((
                    env::RELOAD_SECONDS.to_owned(),
                    s.reload.as_secs().to_string(),
                ));
                env
            }
            Self::Plaintext => vec![(env::INSECURE_PLAINTEXT.to_owned(), "true".to_owned())],
        }
    }
}

/// Application protocols negotiated in the handshake (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: `h2` only.
    H2,
    /// A port serving gRPC and HTTP/1.1 (the engine's): `h2`, `http/1.1`.
    H2Http1,
    /// Plain HTTP/1.1 (the frontend's pass-through to workers).
    Http1,
    /// No ALPN: a custom protocol (the CPU backend's expert links).
    None,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Self::H2 => vec![b"h2".to_vec()],
            Self::H2Http1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Self::Http1 => vec![b"http/1.1".to_vec()],
            Self::None => Vec::new(),
        }
    }
}

/// The one crypto provider: ring (the tree builds no aws-lc).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_inherit_the_transport_through_env() {
        let files = TlsFiles {
            ca: "/p/ca.pem".into(),
            cert: "/p/c.pem".into(),
            key: "/p/k.pem".into(),
        };
        let env = Transport::mtls(files).env();
        assert!(env.contains(&(env::CA.to_owned(), "/p/ca.pem".to_owned())));
        assert!(env.contains(&(env::KEY.to_owned(), "/p/k.pem".to_owned())));
        assert!(env.iter().all(|(k, _)| k != env::INSECURE_PLAINTEXT));
        assert_eq!(
            Transport::Plaintext.env(),
            [(env::INSECURE_PLAINTEXT.to_owned(), "true".to_owned())]
        );
        assert_eq!(Transport::Plaintext.scheme(), "http");
    }

    #[test]
    fn alpn_lists() {
        assert_eq!(Alpn::H2.protocols(), [b"h2".to_vec()]);
        assert_eq!(Alpn::H2Http1.protocols().len(), 2);
        assert!(Alpn::None.protocols().is_empty());
    }
}
