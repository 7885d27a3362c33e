//! A real single-member etcd on loopback, one per test.
//!
//! Client and peer ports are picked free at random, data lives in the
//! instance's [`Workdir`], and [`Etcd::start`] returns only once this very
//! member (checked by name, not just "something answers on the port") serves
//! requests. [`Etcd::start_with`] serves clients over TLS (optionally
//! requiring client certificates, etcd's `--client-cert-auth`), and
//! [`Etcd::enable_auth`] turns on etcd's user authentication, so the
//! registry client's TLS and auth options meet the real thing.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
use proto::tls::TlsFiles;

use crate::bins;
use crate::process::{ManagedProcess, StartFailure, free_port, start_with_retries};
use crate::secrets::random_hex;
use crate::wait::{Deadline, POLL_INTERVAL};
use crate::workdir::Workdir;

/// How long etcd may take to answer after it was spawned.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(60);

/// TLS of a harness etcd's client port.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// etcd's serving certificate (its CA is the one clients must trust).
    pub server: TlsFiles,
    /// The certificate the harness itself connects with.
    pub client: TlsFiles,
    /// Require client certificates signed by the server's CA.
    pub client_cert_auth: bool,
    /// The name the harness checks etcd's certificate for; default: the
    /// endpoint's host (127.0.0.1).
    pub server_name: Option<String>,
}

/// A running etcd; killed on drop, its directory kept if the test failed.
#[derive(Debug)]
pub struct Etcd {
    // Field order is drop order: kill the process before removing its dir.
    process: ManagedProcess,
    endpoint: String,
    name: String,
    /// How it was started, for [`Etcd::restart`].
    binary: std::path::PathBuf,
    args: Vec<String>,
    tls: Option<EtcdTls>,
    workdir: Workdir,
}

impl Etcd {
    /// Starts etcd on random free loopback ports and waits until it serves.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts etcd serving clients over `tls` (plain HTTP without it).
    pub async fn start_with(tls: Option<EtcdTls>) -> Result<Self> {
        let binary = bins::binary(bins::ETCD)?;
        start_with_retries("etcd", || Self::try_start(&binary, tls.clone())).await
    }

    async fn try_start(binary: &Path, tls: Option<EtcdTls>) -> Result<Self, StartFailure> {
        let mut workdir = Workdir::new("etcd")?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let name = format!("harness-{}", random_hex(4)?);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut args = vec![
            format!("--name={name}"),
            format!("--data-dir={}", workdir.path().join("data").display()),
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={name}={peer}"),
            "--initial-cluster-state=new".to_owned(),
            // Throwaway data: skip fsync, as envtest does.
            "--unsafe-no-fsync=true".to_owned(),
        ];
        if let Some(tls) = &tls {
            args.push(format!("--cert-file={}", tls.server.cert.display()));
            args.push(format!("--key-file={}", tls.server.key.display()));
            args.push(format!("--trusted-ca-file={}", tls.server.ca.display()));
            if tls.client_cert_auth {
                args.push("--client-cert-auth=true".to_owned());
            }
        }
        let mut process = ManagedProcess::spawn("etcd", binary, &args, workdir.path())?;
        match wait_ready(&mut process, &endpoint, &name, tls.as_ref()).await {
            Ok(()) => Ok(Self {
                process,
                endpoint,
                name,
                binary: binary.to_path_buf(),
                args,
                tls,
                workdir,
            }),
            Err(StartFailure::PortTaken) => Err(StartFailure::PortTaken),
            Err(StartFailure::Failed(err)) => {
                workdir.keep();
                Err(StartFailure::Failed(err.context(format!(
                    "etcd log: {}",
                    process.log_path().display()
                ))))
            }
        }
    }

    /// Kills etcd with SIGKILL (a crash) and starts it again on the same
    /// ports and data, waiting until it serves; returns how long it was
    /// down. Leases survive in the data (etcd renews their TTL on start).
    pub async fn restart(&mut self, down_for: Duration) -> Result<Duration> {
        let start = std::time::Instant::now();
        self.process.kill()?;
        tokio::time::sleep(down_for).await;
        // The log of the second life goes to its own file.
        self.process = ManagedProcess::spawn(
            "etcd-restarted",
            &self.binary,
            &self.args,
            self.workdir.path(),
        )?;
        wait_ready(
            &mut self.process,
            &self.endpoint,
            &self.name,
            self.tls.as_ref(),
        )
        .await
        .map_err(|e| match e {
            StartFailure::PortTaken => {
                anyhow::anyhow!("etcd's port was taken while it was down")
            }
            StartFailure::Failed(e) => e,
        })?;
        Ok(start.elapsed())
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The member name, unique per instance.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new client connected to this etcd (as the harness: its TLS
    /// client certificate, no user).
    pub async fn client(&self) -> Result<Client> {
        connect(&self.endpoint, self.tls.as_ref(), None)
            .await
            .with_context(|| format!("connecting to etcd at {}", self.endpoint))
    }

    /// Turns on etcd's authentication: user `root` (password
    /// `root_password`) with the root role, and `user` (`password`) with
    /// read-write on the registry's prefix only, as an operator of a real
    /// etcd would grant rackscale. Later calls need a user.
    pub async fn enable_auth(&self, root_password: &str, user: &str, password: &str) -> Result<()> {
        let mut client = self.client().await?;
        client
            .role_add("root")
            .await
            .context("adding the root role")?;
        client.user_add("root", root_password, None).await?;
        client.user_grant_role("root", "root").await?;
        client.role_add("rackscale").await?;
        client
            .role_grant_permission(
                "rackscale",
                Permission::read_write(proto::registry::PREFIX).with_prefix(),
            )
            .await?;
        client.user_add(user, password, None).await?;
        client.user_grant_role(user, "rackscale").await?;
        client
            .auth_enable()
            .await
            .context("enabling authentication")?;
        Ok(())
    }

    /// The instance's directory (data and `etcd.log`).
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// The file holding etcd's output.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }
}

/// A client of `endpoint`, over `tls` (trusting the server's CA, presenting
/// the harness's certificate) and as `user` (name, password) when given.
pub async fn connect(
    endpoint: &str,
    tls: Option<&EtcdTls>,
    user: Option<(&str, &str)>,
) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut t = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&tls.server.ca)?))
            .identity(Identity::from_pem(
                read(&tls.client.cert)?,
                read(&tls.client.key)?,
            ));
        if let Some(name) = &tls.server_name {
            t = t.domain_name(name.clone());
        }
        options = options.with_tls(t);
    }
    if let Some((name, password)) = user {
        options = options.with_user(name, password);
    }
    Ok(Client::connect([endpoint], Some(options)).await?)
}

/// Polls until a member named `name` answers at `endpoint`.
async fn wait_ready(
    process: &mut ManagedProcess,
    endpoint: &str,
    name: &str,
    tls: Option<&EtcdTls>,
) -> Result<(), StartFailure> {
    let deadline = Deadline::after(ETCD_START_TIMEOUT);
    loop {
        process.ensure_running()?;
        let last_error = match serves_as(endpoint, name, tls).await {
            Ok(true) => {
                // A port race can let another etcd answer while ours dies.
                process.ensure_running()?;
                return Ok(());
            }
            Ok(false) => None,
            Err(err) => Some(err),
        };
        let what = format_args!("etcd at {endpoint} to serve");
        deadline.check(what, last_error.as_ref())?;
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether member `name` answers at `endpoint`; `Err` while it cannot.
async fn serves_as(endpoint: &str, name: &str, tls: Option<&EtcdTls>) -> Result<bool> {
    let mut client = connect(endpoint, tls, None).await?;
    let members = client.member_list().await?;
    if !members.members().iter().any(|m| m.name() == name) {
        return Ok(false);
    }
    client.get("harness/ready-probe", None).await?;
    Ok(true)
}
