//! The processes of a local rack and their orderly stop: etcd (or
//! kube-apiserver and etcd with `--kube`), one
//! `rackscale-agent` per tray, `rackscale-operator standalone` and one
//! `--role frontend` engine per deployment, all on loopback, each logging to
//! `<log dir>/<name>.log`.
//!
//! Every gRPC link of the rack is mutual TLS by default: [`Transport::mtls`]
//! creates one CA for the run (in `<log dir>/pki/`) and one certificate per
//! component, as the Helm chart issues them: the agents' (which their engine
//! ranks inherit), the operator's and the frontends'. `--insecure-plaintext`
//! starts every process with that flag instead.
//!
//! Invariant: [`LocalRack::stop`] leaves no process behind. The order
//! matters: with `--kube` the deployments are deleted first (the operator's
//! finalizer releases them); frontends next, then the operator (SIGTERM: it releases every
//! deployment, so agents stop their engine ranks), then the agents
//! (SIGTERM: each stops any rank it still runs, and its engines exit with
//! it), then etcd. Anything that does not exit in time is killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use harness::process::{ManagedProcess, StartFailure, free_port};
use harness::{Etcd, Topology};

/// How long a process gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(30);

/// The rackscale binaries, found beside this one (`make build` builds all).
#[derive(Debug, Clone)]
pub struct Bins {
    pub operator: PathBuf,
    pub agent: PathBuf,
    pub engine: PathBuf,
    pub rackscale: PathBuf,
}

impl Bins {
    pub fn beside_me() -> Result<Self> {
        let me = std::env::current_exe().context("locating the rackscale binary")?;
        let find = |name: &str| -> Result<PathBuf> {
            let bin = me.with_file_name(name);
            if !bin.is_file() {
                bail!(
                    "{} is missing: build it with `cargo build --workspace --bins` (make build)",
                    bin.display()
                );
            }
            Ok(bin)
        };
        Ok(Self {
            operator: find("rackscale-operator")?,
            agent: find("rackscale-agent")?,
            engine: find("rackscale-engine")?,
            rackscale: me.clone(),
        })
    }
}

/// Sends SIGTERM to `p` and waits for it to exit; kills it after `grace`.
/// Returns whether it exited on its own.
async fn terminate(p: &mut ManagedProcess, grace: Duration) -> bool {
    if p.ensure_running().is_err() {
        return true;
    }
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()
        .await;
    let deadline = Instant::now() + grace;
    while p.ensure_running().is_ok() {
        if Instant::now() > deadline {
            let _ = p.kill();
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Whether `p` still runs; its exit (with its log's tail) as an error.
fn alive(p: &mut ManagedProcess) -> Result<()> {
    match p.ensure_running() {
        Ok(()) => Ok(()),
        Err(StartFailure::Failed(e)) => Err(e),
        Err(StartFailure::PortTaken) => bail!("its port was taken; log {}", p.log_path().display()),
    }
}

/// The transport flags of each kind of process in the rack.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// Agents (and, through them, every engine rank).
    pub agent: Vec<String>,
    /// The operator.
    pub operator: Vec<String>,
    /// The frontends.
    pub frontend: Vec<String>,
    /// The CA certificate, when the rack runs mutual TLS.
    pub ca: Option<PathBuf>,
}

impl Transport {
    /// A fresh CA in `dir` and one certificate per component.
    pub fn mtls(dir: &Path) -> Result<Self> {
        let pki = harness::pki::Pki::create(dir, "rackscale up CA")?;
        Ok(Self {
            agent: pki.args("rackscale-agent")?,
            operator: pki.args("rackscale-operator")?,
            frontend: pki.args("rackscale-frontend")?,
            ca: Some(pki.ca_path().to_path_buf()),
        })
    }

    /// Every process with `--insecure-plaintext`.
    pub fn plaintext() -> Self {
        let flags = harness::pki::plaintext_flags();
        Self {
            agent: flags.clone(),
            operator: flags.clone(),
            frontend: flags,
            ca: None,
        }
    }
}

/// A frontend serving one deployment.
#[derive(Debug)]
pub struct Frontend {
    /// `namespace/name` of the deployment.
    pub key: String,
    pub port: u16,
    pub process: ManagedProcess,
}

/// Everything started so far; [`LocalRack::stop`] stops it in order.
#[derive(Debug, Default)]
pub struct LocalRack {
    /// How the rack's gRPC links are secured.
    pub transport: Transport,
    pub etcd: Option<Etcd>,
    /// kube-apiserver and its etcd (`--kube`), instead of `etcd`.
    pub cluster: Option<harness::Cluster>,
    pub agents: Vec<ManagedProcess>,
    pub operator: Option<ManagedProcess>,
    pub status_port: u16,
    pub frontends: Vec<Frontend>,
}

impl LocalRack {
    /// The etcd client URL (once etcd runs).
    pub fn etcd_endpoint(&self) -> Result<String> {
        let etcd = match (&self.etcd, &self.cluster) {
            (Some(etcd), _) => etcd,
            (None, Some(cluster)) => cluster.etcd(),
            (None, None) => bail!("etcd is not running"),
        };
        Ok(etcd.endpoint().to_string())
    }

    /// One agent per tray of `topology`, each registered in etcd before
    /// this returns (an agent that lost its port race is restarted).
    pub async fn start_agents(
        &mut self,
        topology: &Topology,
        bins: &Bins,
        time_scale: u32,
        logs: &Path,
    ) -> Result<()> {
        let etcd = self.etcd_endpoint()?;
        let engine = bins.engine.display().to_string();
        let opts = harness::fleet::AgentOptions {
            etcd: &etcd,
            engine_bin: &engine,
            time_scale,
            lease_ttl_seconds: 10,
            flags: &self.transport.agent,
        };
        let mut fleet = harness::fleet::spawn_agents(topology, &bins.agent, &opts, logs)?;
        let registry =
            proto::registry::Registry::connect(std::slice::from_ref(&etcd), Duration::from_secs(5))
                .await
                .context("connecting to etcd")?;
        let waited = harness::fleet::wait_registered(
            &registry,
            &mut fleet,
            &bins.agent,
            &opts,
            logs,
            Duration::from_secs(120),
        )
        .await;
        self.agents = fleet.into_iter().map(|a| a.process).collect();
        waited
    }

    /// The standalone operator on `specs`, serving `/status` on a free port.
    /// `time_scale` is the engines': the rebalancer times its decisions and
    /// reads load rates in their modelled time.
    pub fn start_operator(
        &mut self,
        bins: &Bins,
        specs: &Path,
        time_scale: u32,
        logs: &Path,
    ) -> Result<()> {
        let port = free_port()?;
        let mut args: Vec<String> = vec![
            "standalone".into(),
            "--specs".into(),
            specs.display().to_string(),
            "--etcd-endpoints".into(),
            self.etcd_endpoint()?,
            "--status-addr".into(),
            format!("127.0.0.1:{port}"),
            format!("--time-scale={time_scale}"),
        ];
        args.extend(self.transport.operator.iter().cloned());
        self.operator = Some(ManagedProcess::spawn(
            "rackscale-operator",
            &bins.operator,
            &args,
            logs,
        )?);
        self.status_port = port;
        Ok(())
    }

    /// A `--role frontend` engine for deployment `namespace/name`, whose
    /// engines run `backend` (`sim` or `cpu`).
    pub fn start_frontend(
        &mut self,
        bins: &Bins,
        namespace: &str,
        name: &str,
        profile: &str,
        backend: &str,
        logs: &Path,
    ) -> Result<u16> {
        let port = free_port()?;
        let mut args: Vec<String> = self.transport.frontend.clone();
        args.extend([
            "--role=frontend".into(),
            format!("--model={profile}"),
            format!("--listen=127.0.0.1:{port}"),
            format!("--etcd-endpoints={}", self.etcd_endpoint()?),
            format!("--namespace={namespace}"),
            format!("--deployment={name}"),
            format!("--backend={backend}"),
        ]);
        let process =
            ManagedProcess::spawn(&format!("frontend-{name}"), &bins.engine, &args, logs)?;
        self.frontends.push(Frontend {
            key: format!("{namespace}/{name}"),
            port,
            process,
        });
        Ok(port)
    }

    /// Fails when a started process exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(op) = self.operator.as_mut() {
            alive(op).context("rackscale-operator stopped")?;
        }
        for f in &mut self.frontends {
            alive(&mut f.process).with_context(|| format!("frontend of {} stopped", f.key))?;
        }
        Ok(())
    }

    /// Stops everything in order (see the module docs) and says what it did.
    pub async fn stop(&mut self) {
        if self.cluster.is_some() && self.operator.is_some() {
            match super::kube::delete_all(self).await {
                Ok(n) => println!(
                    "[up] deleted {n} ModelDeployment(s): the operator released their GPUs and stopped their ranks"
                ),
                Err(e) => eprintln!("[up] deleting the deployments failed: {e:#}"),
            }
        }
        if !self.frontends.is_empty() {
            for f in &mut self.frontends {
                terminate(&mut f.process, GRACE).await;
            }
            println!("[up] stopped {} frontend(s)", self.frontends.len());
            self.frontends.clear();
        }
        if let Some(mut op) = self.operator.take() {
            let clean = terminate(&mut op, GRACE).await;
            println!(
                "[up] stopped the operator{}",
                if !clean {
                    ": it did not exit in time and was killed"
                } else if self.cluster.is_some() {
                    " (it released its leader lease)"
                } else {
                    " (on the way out it released every deployment, asking the agents to stop their ranks)"
                }
            );
        }
        if !self.agents.is_empty() {
            let mut killed = 0;
            let agents = std::mem::take(&mut self.agents);
            let waits = agents.into_iter().map(|mut a| async move {
                let clean = terminate(&mut a, GRACE).await;
                (a, clean)
            });
            for (_, clean) in futures::future::join_all(waits).await {
                if !clean {
                    killed += 1;
                }
            }
            println!(
                "[up] stopped the agents (SIGTERM: each stops its engine ranks){}",
                if killed > 0 {
                    format!("; {killed} had to be killed")
                } else {
                    String::new()
                }
            );
        }
        if self.etcd.take().is_some() {
            println!("[up] stopped etcd");
        }
        if self.cluster.take().is_some() {
            println!("[up] stopped kube-apiserver and etcd");
        }
    }
}
