//! The typed registry client against a real etcd that secures its client
//! port: TLS with client certificates required (`--client-cert-auth`), and
//! etcd's user authentication. The right options connect and read and
//! write the registry; missing or wrong ones are refused.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use harness::Etcd;
use harness::etcd::EtcdTls;
use harness::pki::Pki;
use proto::records::fixtures;
use proto::registry::security::{EtcdTls as ClientTls, EtcdUser};
use proto::registry::{EtcdSecurity, Registry};

const T: Duration = Duration::from_secs(5);

/// Connects with `security` and proves the registry works: a put under a
/// lease, then a listing that finds it.
async fn use_registry(endpoint: &str, security: &EtcdSecurity) -> Result<()> {
    let registry = Registry::connect_with(&[endpoint.to_owned()], security, T).await?;
    let lease = registry.grant_lease(Duration::from_secs(10), T).await?;
    registry
        .put_agent(lease, &fixtures::agent("tray-secure"), T)
        .await?;
    let listing = registry.list_agents(T).await?;
    anyhow::ensure!(
        listing.records.iter().any(|r| r.node == "tray-secure"),
        "the record written is not listed"
    );
    Ok(())
}

#[tokio::test]
async fn with_client_certificates_required_only_the_right_certificate_gets_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("etcd-ca"), "etcd CA")?;
    let stranger = Pki::create(&dir.path().join("other"), "another CA")?;
    let etcd = Etcd::start_with(Some(EtcdTls {
        server: pki.issue("etcd")?,
        client: pki.issue("harness")?,
        client_cert_auth: true,
        server_name: None,
    }))
    .await?;
    let endpoint = etcd.endpoint().to_owned();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let client = pki.issue("rackscale")?;
    let right = EtcdSecurity {
        tls: Some(ClientTls {
            ca: client.ca.clone(),
            identity: Some((client.cert.clone(), client.key.clone())),
            server_name: None,
        }),
        user: None,
    };
    use_registry(&endpoint, &right).await?;

    // No TLS options against an https:// endpoint: refused before dialling.
    let err = use_registry(&endpoint, &EtcdSecurity::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--etcd-ca"), "{err:#}");
    // Plain HTTP to the TLS port.
    let plain = endpoint.replacen("https://", "http://", 1);
    assert!(
        use_registry(&plain, &EtcdSecurity::default())
            .await
            .is_err()
    );
    // TLS that trusts etcd but presents no certificate.
    let anonymous = EtcdSecurity {
        tls: Some(ClientTls {
            identity: None,
            ..right.tls.clone().unwrap()
        }),
        user: None,
    };
    assert!(use_registry(&endpoint, &anonymous).await.is_err());
    // A certificate another CA signed.
    let intruder = stranger.issue("intruder")?;
    let foreign = EtcdSecurity {
        tls: Some(ClientTls {
            identity: Some((intruder.cert, intruder.key)),
            ..right.tls.clone().unwrap()
        }),
        user: None,
    };
    assert!(use_registry(&endpoint, &foreign).await.is_err());
    Ok(())
}

#[tokio::test]
async fn with_authentication_enabled_only_the_right_password_gets_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start().await?;
    etcd.enable_auth("root-secret", "rackscale", "s3cret")
        .await?;
    let endpoint = etcd.endpoint().to_owned();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n")?;
    let user = |file: &std::path::Path| EtcdSecurity {
        tls: None,
        user: Some(EtcdUser {
            name: "rackscale".into(),
            password_file: file.to_path_buf(),
        }),
    };
    use_registry(&endpoint, &user(&password)).await?;

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess")?;
    let err = use_registry(&endpoint, &user(&wrong)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("authentication failed"),
        "{err:#}"
    );
    // No user at all: etcd refuses the calls.
    assert!(
        use_registry(&endpoint, &EtcdSecurity::default())
            .await
            .is_err()
    );
    Ok(())
}
