//! The server side: [`ServerTls`] (a reloading rustls server configuration
//! that requires client certificates) and [`incoming`], the accepted
//! connections of a listener, handshaken concurrently, as tonic's
//! `serve_with_incoming_shutdown` and axum's `Listener` take them.
//!
//! Invariant: with TLS, no connection reaches a service before its client
//! presented a certificate that chains to the CA; a failed or slow
//! handshake ([`super::HANDSHAKE_TIMEOUT`]) is dropped and logged, and never
//! holds up other connections.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::server::WebPkiClientVerifier;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::files::{self, Reloading};
use super::{Alpn, HANDSHAKE_TIMEOUT, TlsFiles, TlsSettings, provider};
use crate::error::{Error, Result};

/// Builds a server configuration: the certificate and key of `files`, and a
/// verifier that requires client certificates chaining to its CA.
fn server_config(files: &TlsFiles, alpn: Alpn) -> Result<ServerConfig> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(files::roots(&files.ca)?, provider.clone())
            .build()
            .map_err(|e| Error::tls(format!("client verifier for {}: {e}", files.ca.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(files::certs(&files.cert)?, files::key(&files.key)?)
        .map_err(|e| {
            Error::tls(format!(
                "certificate {} with key {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = alpn.protocols();
    Ok(config)
}

/// A server's TLS: cheap to clone, re-reads its files when they change.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<Reloading<ServerConfig>>,
}

impl ServerTls {
    /// Loads `settings`' files now (an error names the bad file) and
    /// negotiates `alpn`.
    pub fn new(settings: &TlsSettings, alpn: Alpn) -> Result<Self> {
        let config = Reloading::new(&settings.files, settings.reload, move |f| {
            server_config(f, alpn)
        })?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The configuration a new connection gets.
    fn current(&self) -> Arc<ServerConfig> {
        self.config.current()
    }

    /// Runs the handshake on an accepted connection.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
            )),
        }
    }

    /// The handshake on a blocking socket (the CPU backend's expert links),
    /// completed before this returns so that a refused client is an error
    /// here; `timeout` bounds the handshake's reads and writes (the socket
    /// has none afterwards: an idle link waits for its next request).
    pub fn accept_blocking(
        &self,
        mut tcp: std::net::TcpStream,
        timeout: Duration,
    ) -> io::Result<BlockingServerStream> {
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let mut conn = ServerConnection::new(self.current()).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)?;
        Ok(BlockingServerStream::Tls(Box::new(StreamOwned::new(
            conn, tcp,
        ))))
    }
}

/// A blocking server connection: plain, or TLS over it.
#[derive(Debug)]
pub enum BlockingServerStream {
    /// Without TLS.
    Plain(std::net::TcpStream),
    /// With TLS, handshake done.
    Tls(Box<StreamOwned<ServerConnection, std::net::TcpStream>>),
}

impl io::Read for BlockingServerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl io::Write for BlockingServerStream {
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

/// One accepted connection, ready for a service.
#[derive(Debug)]
pub enum ServerIo {
    /// Without TLS (`--insecure-plaintext`).
    Plain(TcpStream),
    /// Mutual TLS, handshake done, client certificate verified.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ServerIo {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// The client's verified certificate chain (leaf first); `None` without TLS.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(s) => s.get_ref().1.peer_certificates(),
        }
    }
}

impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

impl AsyncRead for ServerIo {
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

impl AsyncWrite for ServerIo {
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

/// Accepted connections of one listener; the accept task stops when this
/// is dropped.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<ServerIo>,
    local: Option<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
}

impl Incoming {
    /// The listener's address (`None` if the OS would not tell).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The next connection ready for a service (`None` only once the
    /// listener failed for good).
    pub async fn next_connection(&mut self) -> Option<ServerIo> {
        self.rx.recv().await
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// Accepts on `listener` (`TCP_NODELAY` on every connection: gRPC streams
/// small messages) and, with `tls`, runs each handshake in its own task.
pub fn incoming(listener: TcpListener, tls: Option<ServerTls>) -> Incoming {
    let local = listener.local_addr().ok();
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(accept_loop(listener, tls, tx));
    Incoming { rx, local, task }
}

async fn accept_loop(listener: TcpListener, tls: Option<ServerTls>, tx: mpsc::Sender<ServerIo>) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        match &tls {
            None => {
                if tx.send(ServerIo::Plain(tcp)).await.is_err() {
                    return;
                }
            }
            Some(tls) => {
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls.accept(tcp).await {
                        Ok(stream) => {
                            let _ = tx.send(ServerIo::Tls(Box::new(stream))).await;
                        }
                        // A TCP probe (the kubelet's) connects and closes.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%peer, "closed before a TLS handshake");
                        }
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "TLS handshake refused");
                        }
                    }
                });
            }
        }
    }
}
