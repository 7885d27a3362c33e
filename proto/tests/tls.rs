//! `proto::tls` against real sockets: a tonic server over
//! [`proto::tls::incoming`] serves only clients whose certificate its CA
//! signed; rotated files apply to new connections without a restart (and a
//! broken rotation keeps the old ones); clients check the server's name;
//! the blocking variants (the CPU backend's expert links) do the same.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::Result;
use harness::pki::Pki;
use harness::tls_probe::{self, Probes};
use proto::tls::{Alpn, ClientTls, ServerTls, TlsSettings};

/// Serves the gRPC health service over `tls` on a loopback port.
async fn health_server(tls: ServerTls) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("https://{}", listener.local_addr()?);
    let (_reporter, service) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(proto::tls::incoming(listener, Some(tls)), async {
                let _ = stopped.await;
            }),
    );
    Ok((address, stop))
}

fn settings(files: &proto::tls::TlsFiles) -> TlsSettings {
    tls_probe::settings(files)
}

#[tokio::test]
async fn only_clients_of_the_ca_are_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("ca"), "rackscale test CA")?;
    let stranger = Pki::create(&dir.path().join("other"), "another CA")?;
    let server = ServerTls::new(&settings(&pki.issue("server")?), Alpn::H2)?;
    let (address, _stop) = health_server(server).await?;
    let probes = Probes::run(&address, &pki, &stranger).await?;
    eprintln!("{probes:#?}");
    probes.assert_enforced()?;
    // A client that trusts another CA refuses the server in turn.
    let wary = ClientTls::new(&settings(&stranger.issue("wary")?))?;
    assert!(tls_probe::check(&address, &wary).await.is_err());
    Ok(())
}

#[tokio::test]
async fn rotated_files_apply_to_new_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path(), "rackscale test CA")?;
    let files = pki.issue("server")?;
    let server = ServerTls::new(&settings(&files), Alpn::H2)?;
    let (address, _stop) = health_server(server).await?;
    let client = ClientTls::new(&settings(&pki.issue("client")?))?;
    let first = tls_probe::server_certificate(&address, &client).await?;
    assert_eq!(first, tls_probe::certificate_der(&files.cert)?);

    // Same CA, new key and certificate, same paths: no restart.
    let rotated = pki.issue("server")?;
    let second = tls_probe::server_certificate(&address, &client).await?;
    assert_ne!(second, first);
    assert_eq!(second, tls_probe::certificate_der(&rotated.cert)?);
    tls_probe::check(&address, &client).await?;

    // A broken rotation keeps the last good configuration.
    std::fs::write(&files.cert, "not a certificate")?;
    let third = tls_probe::server_certificate(&address, &client).await?;
    assert_eq!(third, second);
    tls_probe::check(&address, &client).await?;
    Ok(())
}

#[tokio::test]
async fn clients_check_the_name_or_the_configured_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path(), "rackscale test CA")?;
    // A certificate for a service name only, as in a cluster where servers
    // are dialled by pod IP.
    let files = pki.issue_for("agent", &["rackscale-agent.rackscale-system.svc"])?;
    let (address, _stop) = health_server(ServerTls::new(&settings(&files), Alpn::H2)?).await?;
    let client_files = pki.issue("client")?;
    let by_ip = ClientTls::new(&settings(&client_files))?;
    let err = tls_probe::check(&address, &by_ip).await.unwrap_err();
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    let named = ClientTls::new(&TlsSettings {
        server_name: Some("rackscale-agent.rackscale-system.svc".into()),
        ..settings(&client_files)
    })?;
    tls_probe::check(&address, &named).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_streams_are_mutually_authenticated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("ca"), "rackscale test CA")?;
    let stranger = Pki::create(&dir.path().join("other"), "another CA")?;
    let server = ServerTls::new(&settings(&pki.issue("rank-1")?), Alpn::None)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?.to_string();
    let served = std::thread::spawn(move || {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().unwrap();
            let result = server
                .accept_blocking(tcp, Duration::from_secs(5))
                .and_then(|mut s| {
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf)?;
                    s.write_all(&buf)?;
                    s.flush()
                });
            results.push(result.is_ok());
        }
        results
    });
    let timeout = Duration::from_secs(5);
    let good = ClientTls::new(&settings(&pki.issue("rank-0")?))?;
    let mut s = good.dial_blocking(&format!("http://{address}"), timeout)?;
    s.write_all(b"ping")?;
    s.flush()?;
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo)?;
    assert_eq!(&echo, b"ping");
    // Another CA's certificate: this client refuses the server, and the
    // server refuses the client.
    let bad = ClientTls::new(&settings(&stranger.issue("intruder")?))?;
    assert!(bad.dial_blocking(&address, timeout).is_err());
    assert_eq!(served.join().unwrap(), [true, false]);
    Ok(())
}
