//! `rackscale-operator`: the control plane binary.
//!
//! - `run`: joins leader election on a `coordination.k8s.io` Lease, serves
//!   `/metrics`, `/healthz` and `/readyz`, and reconciles ModelDeployments
//!   and Racks while it leads. A replica that loses leadership exits so its
//!   supervisor restarts it as a follower; SIGTERM / Ctrl-C release the lease
//!   so the other replica takes over at once.
//! - `standalone`: no Kubernetes: ModelDeployments from YAML files, racks
//!   from the agents' registry records, the same reconcile core; statuses
//!   printed as they change and served on `/status` beside `/metrics`,
//!   `/healthz` and `/readyz`. SIGTERM / Ctrl-C release every deployment.
//! - `crds`: writes the CustomResourceDefinitions generated from the Rust
//!   types (checked in under `deploy/crds/` and `charts/rackscale/crds/`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use operator::agent::PlacementOnly;
use operator::agent_grpc::{GrpcAgents, RegistryDirectory};
use operator::controller::{self, ControllerParts};
use operator::engines::GrpcEngines;
use operator::inventory::{AnnotationsOnly, GpuHealth};
use operator::leader::{LeaderConfig, LeaderElector};
use operator::rebalancing::{Clock, Rebalancing};
use operator::telemetry::{Health, Metrics, TelemetryState, serve, track_leadership};
use proto::registry::{EtcdArgs, Registry};
use proto::tls::{ClientTls, TlsArgs};
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    name = "rackscale-operator",
    version,
    about = "rackscale control plane"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator (reads KUBECONFIG or the in-cluster config).
    Run(RunArgs),
    /// Run without Kubernetes: specs from files, agents from the registry.
    Standalone(StandaloneArgs),
    /// Print the CRDs as YAML, or write one file per CRD into each --out-dir.
    Crds {
        #[arg(long, env = "RACKSCALE_CRD_OUT_DIR")]
        out_dir: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "RACKSCALE_LEASE_NAMESPACE",
        default_value = "rackscale-system"
    )]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "RACKSCALE_LEASE_NAME",
        default_value = "rackscale-operator"
    )]
    lease_name: String,
    /// This replica's identity (default: POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "RACKSCALE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Lease duration in milliseconds.
    #[arg(long, env = "RACKSCALE_LEASE_DURATION_MS", default_value_t = 15_000)]
    lease_duration_ms: u64,
    /// Renew deadline in milliseconds (shorter than the lease duration).
    #[arg(long, env = "RACKSCALE_RENEW_DEADLINE_MS", default_value_t = 10_000)]
    renew_deadline_ms: u64,
    /// Retry period in milliseconds (shorter than the renew deadline).
    #[arg(long, env = "RACKSCALE_RETRY_PERIOD_MS", default_value_t = 2_000)]
    retry_period_ms: u64,
    /// Log as JSON lines.
    #[arg(long, env = "RACKSCALE_LOG_JSON")]
    log_json: bool,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// etcd endpoints of the registry where agents register; without them
    /// the operator places workers but launches nothing.
    #[arg(long, env = "RACKSCALE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Deadline of every call to etcd and to agents, in milliseconds.
    #[arg(long, env = "RACKSCALE_CALL_TIMEOUT_MS", default_value_t = 5_000)]
    call_timeout_ms: u64,
    /// Modelled seconds per wall second of the engines (their
    /// --time-scale): the rebalancer's interval, window and load rates are
    /// in modelled time. 1 on real hardware.
    #[arg(long, env = "RACKSCALE_TIME_SCALE", default_value_t = 1.0)]
    time_scale: f64,
    /// Mutual TLS of the calls to agents (and engines).
    #[command(flatten)]
    tls: TlsArgs,
    /// TLS and authentication to etcd.
    #[command(flatten)]
    etcd_security: EtcdArgs,
}

#[derive(Debug, clap::Args)]
struct StandaloneArgs {
    /// A ModelDeployment YAML file, or a directory of them (*.yaml, *.yml).
    #[arg(long, env = "RACKSCALE_SPECS")]
    specs: PathBuf,
    /// etcd endpoints of the registry where agents register.
    #[arg(
        long,
        env = "RACKSCALE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    etcd_endpoints: Vec<String>,
    /// Address of the /status, /metrics, /healthz and /readyz server.
    #[arg(long, env = "RACKSCALE_STATUS_ADDR", default_value = "127.0.0.1:8080")]
    status_addr: SocketAddr,
    /// Longest time between two reconciles of every deployment, milliseconds.
    #[arg(long, env = "RACKSCALE_RESYNC_MS", default_value_t = 10_000)]
    resync_ms: u64,
    /// Deadline of every call to etcd and to agents, in milliseconds.
    #[arg(long, env = "RACKSCALE_CALL_TIMEOUT_MS", default_value_t = 5_000)]
    call_timeout_ms: u64,
    /// Modelled seconds per wall second of the engines (their
    /// --time-scale): the rebalancer's interval, window and load rates are
    /// in modelled time. 1 on real hardware.
    #[arg(long, env = "RACKSCALE_TIME_SCALE", default_value_t = 1.0)]
    time_scale: f64,
    /// Log as JSON lines.
    #[arg(long, env = "RACKSCALE_LOG_JSON")]
    log_json: bool,
    /// Mutual TLS of the calls to agents (and engines).
    #[command(flatten)]
    tls: TlsArgs,
    /// TLS and authentication to etcd.
    #[command(flatten)]
    etcd_security: EtcdArgs,
}

fn check_time_scale(scale: f64) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0) {
        bail!("--time-scale must be a positive number, got {scale}");
    }
    Ok(())
}

/// The live rebalancer over the registry's load reports and the engines'
/// Drain.
fn rebalancing(
    registry: &Registry,
    tls: &ClientTls,
    timeout: Duration,
    time_scale: f64,
) -> Arc<Rebalancing> {
    let engines = Arc::new(GrpcEngines {
        registry: registry.clone(),
        tls: tls.clone(),
        timeout,
    });
    Arc::new(Rebalancing::new(engines, Clock::new(time_scale)))
}

async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().command {
        Command::Crds { out_dir } => write_crds(&out_dir),
        Command::Run(args) => run(args).await,
        Command::Standalone(args) => standalone(args).await,
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(args: RunArgs) -> Result<()> {
    init_tracing(args.log_json);
    // Refuses a start without TLS files or --insecure-plaintext, and bad files.
    let tls = args.tls.transport()?.client()?;
    let etcd = args.etcd_security.security()?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let client = client(args.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Metrics::new().context("registering metrics")?;
    let health = Health::new(Duration::from_secs(60));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, identity = %identity, "serving /metrics, /healthz, /readyz");
    let server = tokio::spawn(serve(
        listener,
        TelemetryState::new(metrics.clone(), health.clone()),
        stopped(stop_rx.clone()),
    ));
    let beat = health.clone();
    tokio::spawn(async move {
        loop {
            beat.beat();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });

    let timeout = Duration::from_millis(args.call_timeout_ms);
    check_time_scale(args.time_scale)?;
    // GPU health: node annotations always; with the registry also what
    // the agents report (their records, watched).
    let (agents, rebalancing, health_source): (Arc<dyn operator::agent::AgentControl>, _, _) =
        if args.etcd_endpoints.is_empty() {
            tracing::warn!("no --etcd-endpoints: workers are placed but not launched");
            let annotations: Arc<dyn GpuHealth> = Arc::new(AnnotationsOnly);
            (Arc::new(PlacementOnly), None, annotations)
        } else {
            let registry = Registry::connect_with(&args.etcd_endpoints, &etcd, timeout)
                .await
                .context("connecting to the etcd registry")?;
            let rebalancing = rebalancing(&registry, &tls, timeout, args.time_scale);
            let directory = Arc::new(RegistryDirectory::new(registry, timeout));
            let reported: Arc<dyn GpuHealth> = Arc::new(directory.health.clone());
            (
                Arc::new(GrpcAgents::new(
                    directory,
                    tls,
                    timeout,
                    Duration::from_secs(30),
                )),
                Some(rebalancing),
                reported,
            )
        };
    let mut config = LeaderConfig::new(&args.lease_namespace, &args.lease_name, &identity);
    config.lease_duration = Duration::from_millis(args.lease_duration_ms);
    config.renew_deadline = Duration::from_millis(args.renew_deadline_ms);
    config.retry_period = Duration::from_millis(args.retry_period_ms);
    let elector = LeaderElector::new(client.clone(), config).context("leader election config")?;
    let mut leadership = elector.leadership();
    tokio::spawn(track_leadership(metrics.clone(), elector.leadership()));
    let election = tokio::spawn(elector.run(stopped(stop_rx.clone())));
    health.set_not_ready("waiting for leadership");

    let mut stop_wait = stop_rx.clone();
    let leading = tokio::select! {
        l = leadership.wait_leading() => l,
        _ = stop_wait.wait_for(|s| *s) => false,
    };
    let mut lost = false;
    if leading {
        tracing::info!(identity = %identity, "leading: starting reconcile");
        let mut follower = leadership.clone();
        let stop_ctl = stop_rx.clone();
        let (lost_tx, lost_rx) = watch::channel(false);
        let ending = async move {
            let mut stop_ctl = stop_ctl;
            tokio::select! {
                _ = follower.wait_not_leading() => { let _ = lost_tx.send(true); }
                _ = stop_ctl.wait_for(|s| *s) => {}
            }
        };
        let ready_health = health.clone();
        controller::run(
            ControllerParts {
                client: client.clone(),
                metrics: metrics.clone(),
                agents,
                health: health_source,
                instance: identity.clone(),
                rebalancing,
            },
            ending,
            move || ready_health.set_ready(),
        )
        .await
        .context("running the controller")?;
        lost = *lost_rx.borrow();
    }
    if lost {
        bail!(
            "lost leadership of {}/{}; exiting so a fresh replica rejoins as follower",
            args.lease_namespace,
            args.lease_name
        );
    }
    match election.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "releasing the lease failed"),
        Err(e) => tracing::warn!(error = %e, "election task failed"),
        Ok(Ok(())) => tracing::info!("lease released"),
    }
    let _ = server.await;
    Ok(())
}

async fn standalone(args: StandaloneArgs) -> Result<()> {
    init_tracing(args.log_json);
    if args.resync_ms == 0 {
        bail!("--resync-ms must be positive");
    }
    // Bad spec files, missing or bad TLS settings fail before anything
    // connects or binds.
    operator::standalone::specs::load(&args.specs)?;
    let tls = args.tls.transport()?.client()?;
    let etcd = args.etcd_security.security()?;
    let timeout = Duration::from_millis(args.call_timeout_ms);
    let metrics = Metrics::new().context("registering metrics")?;
    let health = Health::new(Duration::from_secs(60));
    health.set_not_ready("first reconcile pending");
    let board = operator::standalone::board::Board::default();
    let registry = Registry::connect_with(&args.etcd_endpoints, &etcd, timeout)
        .await
        .context("connecting to the etcd registry")?;
    check_time_scale(args.time_scale)?;
    let rebalancing = rebalancing(&registry, &tls, timeout, args.time_scale);
    let directory = Arc::new(RegistryDirectory::new(registry.clone(), timeout));
    let agents = Arc::new(GrpcAgents::new(
        directory,
        tls,
        timeout,
        Duration::from_secs(30),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let listener = tokio::net::TcpListener::bind(args.status_addr)
        .await
        .with_context(|| format!("binding {}", args.status_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /status, /metrics, /healthz, /readyz");
    let server = tokio::spawn(operator::standalone::board::serve(
        listener,
        board.clone(),
        TelemetryState::new(metrics.clone(), health.clone()),
        stopped(stop_rx.clone()),
    ));
    let parts = operator::standalone::Parts {
        specs: args.specs,
        registry,
        agents,
        metrics,
        health,
        board,
        timeout,
        resync: Duration::from_millis(args.resync_ms),
        rebalancing: Some(rebalancing),
    };
    let result = operator::standalone::run(parts, stopped(stop_rx.clone())).await;
    server.abort();
    result.context("standalone operator")
}

fn write_crds(dirs: &[PathBuf]) -> Result<()> {
    let files = operator::crd::rendered().context("rendering CRDs")?;
    if dirs.is_empty() {
        for (_, body) in &files {
            print!("---\n{body}");
        }
        return Ok(());
    }
    for dir in dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, body) in &files {
            let path = dir.join(name);
            std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
