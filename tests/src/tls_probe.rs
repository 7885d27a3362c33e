//! Probes of a gRPC server's mutual TLS, shared by every server's tests:
//! the right client is served, and a client without a certificate, one
//! with a certificate from another CA and a plaintext client are refused.
//! Each probe is a real `grpc.health.v1.Health/Check` call (every
//! rackscale gRPC server serves it), so "refused" means no RPC got through,
//! not merely that a handshake looked odd.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::tls::{Alpn, ClientTls, TlsFiles};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::pki::Pki;
use crate::wait::{Deadline, POLL_INTERVAL};

/// Deadline of one probe call.
const CALL: Duration = Duration::from_secs(5);

/// One health check over `channel`.
pub async fn health(channel: Channel) -> Result<()> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(CALL);
    HealthClient::new(channel).check(request).await?;
    Ok(())
}

/// A health check through `client` (the workspace's own TLS client).
pub async fn check(address: &str, client: &ClientTls) -> Result<()> {
    let endpoint = client
        .endpoint(address)?
        .connect_timeout(CALL)
        .timeout(CALL);
    health(client.channel(&endpoint).await?).await
}

/// Waits until `address` answers a health check through `client`.
pub async fn wait_served(address: &str, client: &ClientTls, timeout: Duration) -> Result<()> {
    let deadline = Deadline::after(timeout);
    loop {
        let last = match check(address, client).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        deadline.check(
            format_args!("{address} to serve gRPC over mTLS"),
            Some(&last),
        )?;
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `host:port` of `address` (`http://`, `https://` or bare).
fn host_port(address: &str) -> &str {
    address
        .trim_start_matches("https://")
        .trim_start_matches("http://")
}

/// A health check through tonic's own TLS client with `tls` (a client the
/// workspace would never build: no certificate, or one from another CA).
async fn check_with(address: &str, tls: ClientTlsConfig) -> Result<()> {
    let endpoint = Endpoint::from_shared(format!("https://{}", host_port(address)))?
        .tls_config(tls)?
        .connect_timeout(CALL)
        .timeout(CALL);
    health(endpoint.connect().await?).await
}

fn pem(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// What each kind of client got from one server.
#[derive(Debug)]
pub struct Probes {
    /// The right client (certificate from the server's CA).
    pub trusted: Result<()>,
    /// A TLS client that trusts the CA but presents no certificate.
    pub no_certificate: Result<()>,
    /// A TLS client that trusts the CA and presents a certificate another
    /// CA signed.
    pub other_ca: Result<()>,
    /// A client without TLS.
    pub plaintext: Result<()>,
}

impl Probes {
    /// Runs every probe against `address`, whose server trusts `pki`;
    /// `stranger` is another CA.
    pub async fn run(address: &str, pki: &Pki, stranger: &Pki) -> Result<Self> {
        let trusted = ClientTls::new(&settings(&pki.issue("probe-trusted")?))?;
        let ca = Certificate::from_pem(pem(pki.ca_path())?);
        let intruder = stranger.issue("probe-intruder")?;
        let identity = Identity::from_pem(pem(&intruder.cert)?, pem(&intruder.key)?);
        Ok(Self {
            trusted: check(address, &trusted).await,
            no_certificate: check_with(
                address,
                ClientTlsConfig::new()
                    .ca_certificate(ca.clone())
                    .domain_name("localhost"),
            )
            .await,
            other_ca: check_with(
                address,
                ClientTlsConfig::new()
                    .ca_certificate(ca)
                    .identity(identity)
                    .domain_name("localhost"),
            )
            .await,
            // Dialled as `http://`: the plaintext client really sends.
            plaintext: check(
                &format!("http://{}", host_port(address)),
                &ClientTls::plaintext(),
            )
            .await,
        })
    }

    /// Fails unless the trusted client was served and every other
    /// refused. (Why is in each error: rustls' alert, CertificateRequired or
    /// UnknownCA, when it reached the client before the connection closed.)
    pub fn assert_enforced(&self) -> Result<()> {
        if let Err(e) = &self.trusted {
            bail!("the trusted client was refused: {e:#}");
        }
        for (what, got) in [
            ("a client without a certificate", &self.no_certificate),
            ("a client with another CA's certificate", &self.other_ca),
            ("a plaintext client", &self.plaintext),
        ] {
            if got.is_ok() {
                bail!("{what} was served");
            }
        }
        Ok(())
    }
}

/// Client settings for `files`, checking every file change at once.
pub fn settings(files: &TlsFiles) -> proto::tls::TlsSettings {
    proto::tls::TlsSettings {
        files: files.clone(),
        server_name: None,
        reload: Duration::ZERO,
    }
}

/// The leaf certificate (DER) the server at `address` presents to `client`.
pub async fn server_certificate(address: &str, client: &ClientTls) -> Result<Vec<u8>> {
    let uri: http::Uri = format!("https://{}", host_port(address)).parse()?;
    let io = client.dial(&uri, Alpn::H2).await?;
    let chain = io
        .peer_certificates()
        .context("the server presented no certificate")?;
    let leaf = chain.first().context("empty certificate chain")?;
    Ok(leaf.as_ref().to_vec())
}

/// The DER of the first certificate in a PEM file.
pub fn certificate_der(path: &std::path::Path) -> Result<Vec<u8>> {
    let cert = CertificateDer::from_pem_file(path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(cert.as_ref().to_vec())
}
