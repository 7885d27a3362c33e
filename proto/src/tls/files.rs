//! Reading PEM files and rebuilding a TLS configuration when they change.
//!
//! [`Reloading`] owns one built value (a rustls server or client
//! configuration) and the file stamps it was built from. [`Reloading::current`]
//! is called on every handshake; at most once per interval it compares the
//! stamps (modification time, size, inode) with the files', and rebuilds on a
//! difference. A rebuild that fails keeps the previous value and logs a
//! warning once per change of the files, so a rotation caught half-written
//! recovers on the next write without flooding the log.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsFiles;
use crate::error::{Error, Result};

/// The certificate chain in `path` (leaf first), at least one certificate.
pub(super) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::tls(format!("reading certificates from {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::tls(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in `path`.
pub(super) fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::tls(format!(
            "reading a private key from {}: {e}",
            path.display()
        ))
    })
}

/// Every CA certificate in `path`, as trust anchors.
pub(super) fn roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store
            .add(cert)
            .map_err(|e| Error::tls(format!("CA certificate in {}: {e}", path.display())))?;
    }
    Ok(Arc::new(store))
}

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<Stamp>> {
    paths
        .iter()
        .map(|p| {
            // Follows symlinks: a Kubernetes Secret volume swaps a link.
            std::fs::metadata(p).ok().map(|m| Stamp {
                modified: m.modified().ok(),
                len: m.len(),
                inode: m.ino(),
            })
        })
        .collect()
}

type Build<T> = dyn Fn(&TlsFiles) -> Result<T> + Send + Sync;

#[derive(Debug)]
struct State<T> {
    current: Arc<T>,
    stamps: Vec<Option<Stamp>>,
    checked: Instant,
}

/// A value built from [`TlsFiles`] and rebuilt when they change.
pub(super) struct Reloading<T> {
    files: TlsFiles,
    paths: Vec<PathBuf>,
    interval: Duration,
    build: Box<Build<T>>,
    state: Mutex<State<T>>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.files)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl<T> Reloading<T> {
    /// Builds the first value now: a file set that does not load is an error
    /// here (at start-up), only a warning on a later reload.
    pub(super) fn new(
        files: &TlsFiles,
        interval: Duration,
        build: impl Fn(&TlsFiles) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let paths = vec![files.ca.clone(), files.cert.clone(), files.key.clone()];
        let stamps = stamps(&paths);
        let current = Arc::new(build(files)?);
        Ok(Self {
            files: files.clone(),
            paths,
            interval,
            build: Box::new(build),
            state: Mutex::new(State {
                current,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The value for a new connection: rebuilt first when the interval has
    /// passed and a file changed.
    pub(super) fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() < self.interval {
            return Arc::clone(&state.current);
        }
        state.checked = Instant::now();
        let now = stamps(&self.paths);
        if now == state.stamps {
            return Arc::clone(&state.current);
        }
        state.stamps = now;
        match (self.build)(&self.files) {
            Ok(value) => {
                tracing::info!(cert = %self.files.cert.display(), ca = %self.files.ca.display(), "TLS files changed: reloaded");
                state.current = Arc::new(value);
            }
            Err(e) => tracing::warn!(
                error = %e,
                cert = %self.files.cert.display(),
                "TLS files changed but do not load; keeping the previous configuration"
            ),
        }
        Arc::clone(&state.current)
    }
}
