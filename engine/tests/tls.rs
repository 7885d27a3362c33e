//! Mutual TLS of the `rackscale-engine` binary: its one port (gRPC
//! `EngineService`, health, reflection, and the OpenAI API / `/metrics` over
//! HTTP/1.1) serves only clients whose certificate its CA signed; a client
//! without a certificate, one with another CA's certificate and plaintext
//! are refused. Without TLS files or `--insecure-plaintext` the engine (and
//! the frontend role) refuses to start and names the flags.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use axum::body::Bytes;
use harness::pki::{Pki, flags};
use harness::tls_probe::{self, Probes};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proto::tls::Alpn;

const WAIT: Duration = Duration::from_secs(30);
const ENGINE: &str = env!("CARGO_BIN_EXE_rackscale-engine");

fn engine(args: &[String]) -> tokio::process::Child {
    tokio::process::Command::new(ENGINE)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_port_serves_only_clients_of_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("ca"), "rackscale CA").unwrap();
    let stranger = Pki::create(&dir.path().join("other"), "another CA").unwrap();
    let port = harness::process::free_port().unwrap();
    let mut args = flags(&pki.issue("engine").unwrap());
    args.extend([
        "--role=both".to_string(),
        "--ep=8".to_string(),
        "--sku=gb300".to_string(),
        "--time-scale=100".to_string(),
        format!("--listen=127.0.0.1:{port}"),
    ]);
    let _engine = engine(&args);
    let address = format!("https://127.0.0.1:{port}");
    let client = pki.transport("client").unwrap().client().unwrap();
    tls_probe::wait_served(&address, &client, WAIT)
        .await
        .unwrap();
    let probes = Probes::run(&address, &pki, &stranger).await.unwrap();
    probes.assert_enforced().unwrap();

    // HTTP/1.1 on the same port: served over mutual TLS (ALPN http/1.1)...
    let https = Client::builder(TokioExecutor::new())
        .build::<_, Empty<Bytes>>(client.connector(Alpn::Http1));
    let response = https
        .get(format!("{address}/metrics").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("vllm:num_requests_running"));
    // ... and never in plaintext.
    let plain = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        plain.get(format!("http://127.0.0.1:{port}/metrics").parse().unwrap()),
    )
    .await
    .unwrap();
    assert!(refused.is_err(), "plain HTTP was answered: {refused:?}");
}

#[tokio::test]
async fn without_tls_files_or_the_plaintext_flag_the_engine_refuses_to_start() {
    for role in ["--role=both", "--role=frontend"] {
        let child = engine(&[role.to_string(), "--listen=127.0.0.1:0".to_string()]);
        let out = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .expect("the engine kept running")
            .unwrap();
        assert!(!out.status.success(), "{role}");
        let text = String::from_utf8_lossy(&out.stderr);
        for want in [
            "--tls-ca",
            "--tls-cert",
            "--tls-key",
            "--insecure-plaintext",
        ] {
            assert!(text.contains(want), "{role}: {want} not named: {text}");
        }
    }
}
