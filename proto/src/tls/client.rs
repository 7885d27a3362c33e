//! The client side: [`ClientTls`], the one way rackscale opens a link to
//! another process. gRPC channels come from [`ClientTls::channel`] and
//! [`ClientTls::channel_lazy`] (tonic `Endpoint`s the caller tuned: deadlines,
//! h2 windows, frame sizes), other streams from [`ClientTls::dial`] (async)
//! and [`ClientTls::dial_blocking`].
//!
//! With TLS every new TCP connection (also a lazy channel's reconnect) takes
//! the current client configuration, so rotated files apply without a
//! restart. The server's certificate must chain to the CA and name the
//! dialled host, or the configured server name. Endpoints may be written
//! `http://` or `https://`: the transport, not the scheme, decides; a
//! plaintext client refuses `https://` rather than send plaintext to a TLS
//! port.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use super::files::{self, Reloading};
use super::{Alpn, TlsFiles, TlsSettings, provider};
use crate::error::{Error, Result};

/// The client configurations of one file set, one per ALPN use.
#[derive(Debug)]
struct Configs {
    h2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    raw: Arc<ClientConfig>,
}

impl Configs {
    fn load(files: &TlsFiles) -> Result<Self> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::tls(format!("TLS versions: {e}")))?
            .with_root_certificates(files::roots(&files.ca)?)
            .with_client_auth_cert(files::certs(&files.cert)?, files::key(&files.key)?)
            .map_err(|e| {
                Error::tls(format!(
                    "client certificate {} with key {}: {e}",
                    files.cert.display(),
                    files.key.display()
                ))
            })?;
        let with = |config: &mut ClientConfig, alpn: Alpn| {
            config.alpn_protocols = alpn.protocols();
            Arc::new(config.clone())
        };
        Ok(Self {
            h2: with(&mut config, Alpn::H2),
            http1: with(&mut config, Alpn::Http1),
            raw: with(&mut config, Alpn::None),
        })
    }

    fn get(&self, alpn: Alpn) -> Arc<ClientConfig> {
        match alpn {
            Alpn::H2 | Alpn::H2Http1 => Arc::clone(&self.h2),
            Alpn::Http1 => Arc::clone(&self.http1),
            Alpn::None => Arc::clone(&self.raw),
        }
    }
}

#[derive(Debug)]
struct Mtls {
    configs: Reloading<Configs>,
    server_name: Option<String>,
}

/// How this process dials others; cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientTls {
    mtls: Option<Arc<Mtls>>,
}

impl ClientTls {
    /// No TLS: only for a process started with `--insecure-plaintext`, and
    /// for tests of in-process plaintext servers.
    pub fn plaintext() -> Self {
        Self { mtls: None }
    }

    /// Mutual TLS with `settings` (files loaded now).
    pub fn new(settings: &TlsSettings) -> Result<Self> {
        let configs = Reloading::new(&settings.files, settings.reload, Configs::load)?;
        Ok(Self {
            mtls: Some(Arc::new(Mtls {
                configs,
                server_name: settings.server_name.clone(),
            })),
        })
    }

    /// Whether links are encrypted.
    pub fn is_tls(&self) -> bool {
        self.mtls.is_some()
    }

    /// A tonic endpoint for `uri` (`http://`, `https://` or bare
    /// `host:port`); tune it (deadlines, windows), then open it with
    /// [`Self::channel`] or [`Self::channel_lazy`].
    pub fn endpoint(&self, uri: &str) -> Result<Endpoint> {
        let uri = self.normalise(uri)?;
        Endpoint::from_shared(uri.clone()).map_err(|e| Error::tls(format!("endpoint {uri}: {e}")))
    }

    /// Connects `endpoint` now through this transport.
    pub async fn channel(&self, endpoint: &Endpoint) -> Result<Channel> {
        endpoint
            .connect_with_connector(self.connector(Alpn::H2))
            .await
            .map_err(|e| Error::Connect {
                endpoint: endpoint.uri().to_string(),
                reason: chain(&e),
            })
    }

    /// A channel that connects (and reconnects) on first use.
    pub fn channel_lazy(&self, endpoint: &Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector(Alpn::H2))
    }

    /// A connector (a `tower` service from `Uri` to a stream) dialling
    /// through this transport with `alpn`: what tonic channels use (`h2`),
    /// and what an HTTP/1.1 client (hyper's) takes for `http1`.
    pub fn connector(&self, alpn: Alpn) -> Connector {
        Connector {
            tls: self.clone(),
            alpn,
            connect_timeout: None,
        }
    }

    /// Rewrites `uri` to what tonic dials: tonic must see `http://` (the TLS
    /// is ours, in the connector); a plaintext client refuses `https://`.
    fn normalise(&self, uri: &str) -> Result<String> {
        if let Some(rest) = uri.strip_prefix("https://") {
            if !self.is_tls() {
                return Err(Error::tls(format!(
                    "{uri} is served over TLS, but this process runs with --insecure-plaintext; \
                     give it --tls-ca, --tls-cert and --tls-key"
                )));
            }
            return Ok(format!("http://{rest}"));
        }
        if uri.starts_with("http://") {
            return Ok(uri.to_owned());
        }
        Ok(format!("http://{uri}"))
    }

    /// The name the server's certificate must carry when dialling `host`.
    fn server_name(mtls: &Mtls, host: &str) -> io::Result<ServerName<'static>> {
        let name = mtls.server_name.as_deref().unwrap_or(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(name.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{name}` is not a valid TLS server name: {e}"),
            )
        })
    }

    /// Opens a stream to `uri`'s host and port (`http://h:p`, `https://h:p`
    /// or `h:p`) speaking `alpn`, with TLS when this transport has it.
    pub async fn dial(&self, uri: &Uri, alpn: Alpn) -> io::Result<ClientIo> {
        let (host, port) = host_port(uri)?;
        if !self.is_tls() && uri.scheme_str() == Some("https") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{uri} is served over TLS, but this process runs with --insecure-plaintext"
                ),
            ));
        }
        let tcp =
            TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
        tcp.set_nodelay(true)?;
        let Some(mtls) = &self.mtls else {
            return Ok(ClientIo::Plain(tcp));
        };
        let name = Self::server_name(mtls, host)?;
        let connector = tokio_rustls::TlsConnector::from(mtls.configs.current().get(alpn));
        let stream = connector.connect(name, tcp).await?;
        Ok(ClientIo::Tls(Box::new(stream)))
    }

    /// Opens a blocking stream to `addr` (`host:port`, an `http://` prefix
    /// allowed); `timeout` bounds the connect and every later read and write.
    /// The handshake completes before this returns.
    pub fn dial_blocking(&self, addr: &str, timeout: Duration) -> io::Result<BlockingClientStream> {
        let uri: Uri = if addr.contains("://") {
            addr.parse()
        } else {
            format!("http://{addr}").parse()
        }
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
        let (host, port) = host_port(&uri)?;
        let target = std::net::ToSocketAddrs::to_socket_addrs(&(
            host.trim_start_matches('[').trim_end_matches(']'),
            port,
        ))?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address")))?;
        let mut tcp = std::net::TcpStream::connect_timeout(&target, timeout)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let Some(mtls) = &self.mtls else {
            return Ok(BlockingClientStream::Plain(tcp));
        };
        let name = Self::server_name(mtls, host)?;
        let mut conn = ClientConnection::new(mtls.configs.current().get(Alpn::None), name)
            .map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(BlockingClientStream::Tls(Box::new(StreamOwned::new(
            conn, tcp,
        ))))
    }
}

/// The error and its causes on one line (tonic's transport errors hide the
/// TLS reason in their sources).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn host_port(uri: &Uri) -> io::Result<(&str, u16)> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host")))?;
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Ok((host, port))
}

/// Dials through a [`ClientTls`] for tonic or hyper (see
/// [`ClientTls::connector`]).
#[derive(Debug, Clone)]
pub struct Connector {
    tls: ClientTls,
    alpn: Alpn,
    connect_timeout: Option<Duration>,
}

impl Connector {
    /// Fails a connect (TCP and handshake) that takes longer than `timeout`
    /// (tonic channels bound it themselves).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<ClientIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (tls, alpn, timeout) = (self.tls.clone(), self.alpn, self.connect_timeout);
        Box::pin(async move {
            let dial = tls.dial(&uri, alpn);
            let io = match timeout {
                None => dial.await?,
                Some(t) => tokio::time::timeout(t, dial).await.map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting to {uri} took over {t:?}"),
                    )
                })??,
            };
            Ok(TokioIo::new(io))
        })
    }
}

/// One outbound connection: plain, or TLS over it.
#[derive(Debug)]
pub enum ClientIo {
    /// Without TLS.
    Plain(TcpStream),
    /// Mutual TLS, handshake done.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientIo {
    /// The server's certificate chain (leaf first); `None` without TLS.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(s) => s.get_ref().1.peer_certificates(),
        }
    }

    /// The protocol ALPN settled on, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

/// What hyper's pooled HTTP/1.1 client needs to know of a connection.
impl hyper_util::client::legacy::connect::Connection for ClientIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A blocking client connection: plain, or TLS over it.
#[derive(Debug)]
pub enum BlockingClientStream {
    /// Without TLS.
    Plain(std::net::TcpStream),
    /// With TLS, handshake done.
    Tls(Box<StreamOwned<ClientConnection, std::net::TcpStream>>),
}

impl io::Read for BlockingClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl io::Write for BlockingClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised_for_tonic() {
        let plain = ClientTls::plaintext();
        assert_eq!(
            plain.normalise("127.0.0.1:1").unwrap(),
            "http://127.0.0.1:1"
        );
        assert_eq!(plain.normalise("http://a:1").unwrap(), "http://a:1");
        let err = plain.normalise("https://a:1").unwrap_err().to_string();
        assert!(err.contains("--tls-ca"), "{err}");
    }

    #[test]
    fn ports_default_by_scheme() {
        let uri: Uri = "https://example.org".parse().unwrap();
        assert_eq!(host_port(&uri).unwrap(), ("example.org", 443));
        let uri: Uri = "http://[::1]:9".parse().unwrap();
        assert_eq!(host_port(&uri).unwrap(), ("[::1]", 9));
    }
}
