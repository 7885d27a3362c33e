//! Mutual TLS of the `rackscale-agent` binary: `AgentService` serves only
//! clients whose certificate the agent's CA signed (no certificate, another
//! CA's certificate and plaintext are refused); a rotated certificate is
//! served to new connections without a restart; without TLS files or
//! `--insecure-plaintext` the agent refuses to start and says which flags
//! to give. With the `--etcd-*` flags it registers in an etcd that requires
//! client certificates and a user.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use harness::pki::{Pki, flags};
use harness::tls_probe::{self, Probes};
use harness::wait::Deadline;

const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn agent(port: u16, tls: &[String]) -> Result<tokio::process::Child> {
    Ok(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rackscale-agent"))
            .args(tls)
            .args([
                "--node=tray-tls",
                &format!("--listen=127.0.0.1:{port}"),
                "--engine-bin=/bin/true",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?,
    )
}

#[tokio::test]
async fn agent_service_refuses_clients_outside_its_ca_and_reloads_its_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("ca"), "rackscale CA")?;
    let stranger = Pki::create(&dir.path().join("other"), "another CA")?;
    let files = pki.issue("tray-tls")?;
    let port = free_port()?;
    let mut tls = flags(&files);
    tls.push("--tls-reload-seconds=1".into());
    let _agent = agent(port, &tls)?;
    let address = format!("https://127.0.0.1:{port}");
    let client = tls_probe::settings(&pki.issue("operator")?);
    let client = proto::tls::ClientTls::new(&client)?;
    tls_probe::wait_served(&address, &client, WAIT).await?;

    let probes = Probes::run(&address, &pki, &stranger).await?;
    probes.assert_enforced()?;

    // Rotate: same CA, new key and certificate in the same files.
    let before = tls_probe::server_certificate(&address, &client).await?;
    assert_eq!(before, tls_probe::certificate_der(&files.cert)?);
    let rotated = pki.issue("tray-tls")?;
    let want = tls_probe::certificate_der(&rotated.cert)?;
    let deadline = Deadline::after(WAIT);
    loop {
        let seen = tls_probe::server_certificate(&address, &client).await?;
        if seen == want {
            break;
        }
        if deadline.passed() {
            bail!("the agent still serves its old certificate after {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tls_probe::check(&address, &client).await?;
    Ok(())
}

#[tokio::test]
async fn without_tls_files_or_the_plaintext_flag_the_agent_refuses_to_start() -> Result<()> {
    let child = agent(free_port()?, &[])?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .context("the agent kept running")??;
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    for want in [
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--insecure-plaintext",
    ] {
        assert!(text.contains(want), "{want} not named: {text}");
    }
    Ok(())
}

#[tokio::test]
async fn the_agent_registers_in_an_etcd_that_requires_certificates_and_a_user() -> Result<()> {
    use harness::etcd::EtcdTls;
    use proto::registry::security::{EtcdTls as RegistryTls, EtcdUser};
    use proto::registry::{EtcdSecurity, Registry};

    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("etcd-ca"), "etcd CA")?;
    let etcd = harness::Etcd::start_with(Some(EtcdTls {
        server: pki.issue("etcd")?,
        client: pki.issue("harness")?,
        client_cert_auth: true,
        server_name: None,
    }))
    .await?;
    etcd.enable_auth("root-secret", "rackscale", "s3cret")
        .await?;
    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "s3cret\n")?;
    let client = pki.issue("rackscale-agent")?;
    let args = vec![
        "--insecure-plaintext".to_string(),
        format!("--etcd={}", etcd.endpoint()),
        format!("--etcd-ca={}", client.ca.display()),
        format!("--etcd-cert={}", client.cert.display()),
        format!("--etcd-key={}", client.key.display()),
        "--etcd-username=rackscale".to_string(),
        format!("--etcd-password-file={}", password.display()),
    ];
    let port = free_port()?;
    let _agent = agent(port, &args)?;
    let security = EtcdSecurity {
        tls: Some(RegistryTls {
            ca: client.ca.clone(),
            identity: Some((client.cert.clone(), client.key.clone())),
            server_name: None,
        }),
        user: Some(EtcdUser {
            name: "rackscale".into(),
            password_file: password.clone(),
        }),
    };
    let registry = Registry::connect_with(
        &[etcd.endpoint().to_owned()],
        &security,
        Duration::from_secs(5),
    )
    .await?;
    harness::wait_until("the agent's record", WAIT, || {
        let registry = registry.clone();
        async move {
            let agent = registry
                .get_agent("tray-tls", Duration::from_secs(5))
                .await?;
            Ok(agent.is_some())
        }
    })
    .await?;

    Ok(())
}
