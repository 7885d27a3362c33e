//! A real single-member etcd on loopback, one per test.
//!
//! Client and peer ports are picked free at random, data lives in the
//! instance's [`Workdir`], and [`Etcd::start`] returns only once this very
//! member (checked by name, not just "something answers on the port") serves
//! requests.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, ConnectOptions};

use crate::bins;
use crate::process::{ManagedProcess, StartFailure, free_port, start_with_retries};
use crate::secrets::random_hex;
use crate::wait::{Deadline, POLL_INTERVAL};
use crate::workdir::Workdir;

/// How long etcd may take to answer after it was spawned.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(60);

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
    workdir: Workdir,
}

impl Etcd {
    /// Starts etcd on random free loopback ports and waits until it serves.
    pub async fn start() -> Result<Self> {
        let binary = bins::binary(bins::ETCD)?;
        start_with_retries("etcd", || Self::try_start(&binary)).await
    }

    async fn try_start(binary: &Path) -> Result<Self, StartFailure> {
        let mut workdir = Workdir::new("etcd")?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let name = format!("harness-{}", random_hex(4)?);
        let endpoint = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let args = vec![
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
        let mut process = ManagedProcess::spawn("etcd", binary, &args, workdir.path())?;
        match wait_ready(&mut process, &endpoint, &name).await {
            Ok(()) => Ok(Self {
                process,
                endpoint,
                name,
                binary: binary.to_path_buf(),
                args,
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
        wait_ready(&mut self.process, &self.endpoint, &self.name)
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

    /// A new client connected to this etcd.
    pub async fn client(&self) -> Result<Client> {
        connect(&self.endpoint)
            .await
            .with_context(|| format!("connecting to etcd at {}", self.endpoint))
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

async fn connect(endpoint: &str) -> Result<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    Ok(Client::connect([endpoint], Some(options)).await?)
}

/// Polls until a member named `name` answers at `endpoint`.
async fn wait_ready(
    process: &mut ManagedProcess,
    endpoint: &str,
    name: &str,
) -> Result<(), StartFailure> {
    let deadline = Deadline::after(ETCD_START_TIMEOUT);
    loop {
        process.ensure_running()?;
        let last_error = match serves_as(endpoint, name).await {
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
async fn serves_as(endpoint: &str, name: &str) -> Result<bool> {
    let mut client = connect(endpoint).await?;
    let members = client.member_list().await?;
    if !members.members().iter().any(|m| m.name() == name) {
        return Ok(false);
    }
    client.get("harness/ready-probe", None).await?;
    Ok(true)
}
