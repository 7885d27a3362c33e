//! A real kube-apiserver on loopback, started the way envtest starts one.
//!
//! It serves on a random free port with a self-signed cert in its cert dir,
//! stores under a unique prefix in the given etcd, authorises with RBAC and
//! authenticates an admin (group `system:masters`) by bearer token. Once
//! `/readyz` answers and the `default` namespace exists, a kubeconfig is on
//! disk and a ready `kube::Client` is handed out. No controller-manager,
//! scheduler or kubelet runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;

use crate::bins;
use crate::etcd::Etcd;
use crate::kubeconfig::{ca_from_bundle, client_from_kubeconfig, write_kubeconfig};
use crate::process::{ManagedProcess, StartFailure, free_port, start_with_retries};
use crate::secrets::{random_hex, write_admin_token_file, write_service_account_keys};
use crate::wait::{Deadline, POLL_INTERVAL};
use crate::workdir::Workdir;

/// How long kube-apiserver may take to become ready after it was spawned
/// (several start at once in parallel tests on small machines).
pub const APISERVER_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Service CIDR handed to the apiserver; nothing routes it.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";

/// A running kube-apiserver; killed on drop, its directory kept if the test
/// failed. Keep the [`Etcd`] it was started on alive longer than it.
pub struct KubeApiServer {
    // Field order is drop order: kill the process before removing its dir.
    process: ManagedProcess,
    client: kube::Client,
    url: String,
    token: String,
    etcd_prefix: String,
    kubeconfig: PathBuf,
    workdir: Workdir,
}

impl KubeApiServer {
    /// Starts kube-apiserver against `etcd` and waits until it is ready.
    pub async fn start(etcd: &Etcd) -> Result<Self> {
        let binary = bins::binary(bins::KUBE_APISERVER)?;
        start_with_retries("kube-apiserver", || {
            Self::try_start(&binary, etcd.endpoint())
        })
        .await
    }

    async fn try_start(binary: &Path, etcd_endpoint: &str) -> Result<Self, StartFailure> {
        let mut workdir = Workdir::new("apiserver")?;
        let dir = workdir.path().to_path_buf();
        let port = free_port()?;
        let url = format!("https://127.0.0.1:{port}");
        let token = random_hex(16)?;
        let etcd_prefix = format!("/rackscale-{}", random_hex(6)?);
        let cert_dir = dir.join("certs");
        std::fs::create_dir(&cert_dir).context("creating the cert dir")?;
        let token_file = dir.join("tokens.csv");
        write_admin_token_file(&token_file, &token)?;
        let sa = write_service_account_keys(&dir)?;
        let args = vec![
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", cert_dir.display()),
            format!("--etcd-servers={etcd_endpoint}"),
            format!("--etcd-prefix={etcd_prefix}"),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            format!("--service-account-issuer={url}"),
            format!("--service-account-key-file={}", sa.public_key.display()),
            format!(
                "--service-account-signing-key-file={}",
                sa.private_key.display()
            ),
            "--authorization-mode=RBAC".to_owned(),
            format!("--token-auth-file={}", token_file.display()),
            "--allow-privileged=true".to_owned(),
            "--disable-admission-plugins=ServiceAccount".to_owned(),
            // Loopback advertise addresses are refused by the default
            // (lease) endpoint reconciler; no Service routes here anyway.
            "--endpoint-reconciler-type=none".to_owned(),
        ];
        let mut process = ManagedProcess::spawn("kube-apiserver", binary, &args, &dir)?;
        let files = ClientFiles {
            bundle: cert_dir.join("apiserver.crt"),
            ca: dir.join("ca.crt"),
            kubeconfig: dir.join("kubeconfig"),
            url: &url,
            token: &token,
        };
        match wait_ready(&mut process, &files).await {
            Ok(client) => Ok(Self {
                process,
                client,
                kubeconfig: files.kubeconfig,
                url,
                token,
                etcd_prefix,
                workdir,
            }),
            Err(StartFailure::PortTaken) => Err(StartFailure::PortTaken),
            Err(StartFailure::Failed(err)) => {
                workdir.keep();
                Err(StartFailure::Failed(err.context(format!(
                    "kube-apiserver log: {}",
                    process.log_path().display()
                ))))
            }
        }
    }

    /// A ready client authenticated as the admin (cheap to clone).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A fresh client from the kubeconfig file, not sharing connections.
    pub async fn new_client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Path of a kubeconfig for this apiserver (`kubectl --kubeconfig`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server URL, e.g. `https://127.0.0.1:40123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The etcd key prefix this apiserver stores objects under.
    pub fn etcd_prefix(&self) -> &str {
        &self.etcd_prefix
    }

    /// The instance's directory (certs, kubeconfig, `kube-apiserver.log`).
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// The file holding kube-apiserver's output.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// A `kubectl` command (the pinned binary) pointed at this apiserver.
    ///
    /// Its discovery cache lives in this instance's directory: the shared
    /// `~/.kube/cache` is keyed by host and port, and a port reused from an
    /// earlier apiserver without our CRDs would answer from stale discovery.
    pub fn kubectl(&self) -> Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(bins::binary(bins::KUBECTL)?);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.workdir.path().join("kubectl-cache"))
            .kill_on_drop(true);
        Ok(cmd)
    }
}

impl std::fmt::Debug for KubeApiServer {
    // Hand-written: `kube::Client` is not `Debug`, and the token stays out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiServer")
            .field("process", &self.process)
            .field("url", &self.url)
            .field("etcd_prefix", &self.etcd_prefix)
            .field("kubeconfig", &self.kubeconfig)
            .field("workdir", &self.workdir)
            .finish_non_exhaustive()
    }
}

/// Where the client-side files go, and what they contain.
struct ClientFiles<'a> {
    /// Serving cert bundle the apiserver writes into its cert dir.
    bundle: PathBuf,
    ca: PathBuf,
    kubeconfig: PathBuf,
    url: &'a str,
    token: &'a str,
}

impl ClientFiles<'_> {
    /// (Re)writes CA and kubeconfig from `bundle` and builds a client.
    async fn client_from(&self, bundle: &str) -> Result<kube::Client> {
        let ca = ca_from_bundle(bundle)?;
        std::fs::write(&self.ca, ca).with_context(|| format!("writing {}", self.ca.display()))?;
        write_kubeconfig(&self.kubeconfig, self.url, &self.ca, self.token)?;
        client_from_kubeconfig(&self.kubeconfig).await
    }
}

/// Polls until `/readyz` answers and the `default` namespace exists.
async fn wait_ready(
    process: &mut ManagedProcess,
    files: &ClientFiles<'_>,
) -> Result<kube::Client, StartFailure> {
    let deadline = Deadline::after(APISERVER_START_TIMEOUT);
    // The bundle the current client trusts; it is re-read until ready in
    // case a poll caught it half written.
    let mut used: Option<(String, kube::Client)> = None;
    let mut last_error = None;
    loop {
        process.ensure_running()?;
        if let Ok(bundle) = std::fs::read_to_string(&files.bundle)
            && used.as_ref().is_none_or(|(seen, _)| *seen != bundle)
        {
            match files.client_from(&bundle).await {
                Ok(client) => used = Some((bundle, client)),
                Err(err) => last_error = Some(err),
            }
        }
        if let Some((_, client)) = &used {
            match is_ready(client).await {
                Ok(()) => {
                    process.ensure_running()?;
                    return Ok(client.clone());
                }
                Err(err) => last_error = Some(err),
            }
        }
        let what = format_args!("kube-apiserver at {} to be ready", files.url);
        deadline.check(what, last_error.as_ref())?;
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `Ok` once `/readyz` says `ok` and the `default` namespace exists.
async fn is_ready(client: &kube::Client) -> Result<()> {
    let probe = async {
        let request = http::Request::get("/readyz").body(Vec::new())?;
        let body = client.request_text(request).await.context("GET /readyz")?;
        anyhow::ensure!(body.trim() == "ok", "/readyz said {body:?}");
        let namespaces = Api::<Namespace>::all(client.clone());
        let default = namespaces
            .get_opt("default")
            .await
            .context("GET namespace default")?;
        anyhow::ensure!(default.is_some(), "namespace default does not exist yet");
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .context("readiness probe took over 5 s")?
}
