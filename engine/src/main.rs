//! `rackscale-engine`: one engine worker (simulated backend) serving
//! `EngineService`, gRPC health and reflection, and `GET /metrics`, all on
//! `--listen`, until SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use engine::{EngineConfig, EngineMetrics, Role, WorkerIdent};
use perfmodel::{ModelProfile, Parallelism, Sku};

/// Flags; every one also reads an environment variable.
#[derive(Debug, Parser)]
#[command(name = "rackscale-engine", version, about)]
struct Args {
    /// Worker role: prefill, decode or both; or `frontend`: the OpenAI API
    /// routing each request prefill -> KV transfer -> decode over the
    /// registered workers of --namespace/--deployment.
    #[arg(long, env = "RACKSCALE_ROLE", default_value = "both")]
    role: String,
    /// Built-in model profile.
    #[arg(long, env = "RACKSCALE_MODEL", default_value = "deepseek-v4-pro")]
    model: String,
    /// GPU SKU (gb200, gb300, b200, h200).
    #[arg(long, env = "RACKSCALE_SKU", default_value = "gb200")]
    sku: String,
    /// Tensor-parallel width (exclusive with --ep).
    #[arg(long, env = "RACKSCALE_TP")]
    tp: Option<u32>,
    /// Expert-parallel width (exclusive with --tp).
    #[arg(long, env = "RACKSCALE_EP")]
    ep: Option<u32>,
    /// Modelled seconds per wall second.
    #[arg(long, env = "RACKSCALE_ENGINE_TIME_SCALE", default_value_t = 1.0)]
    time_scale: f64,
    /// Prompt length the prefill budget is sized for.
    #[arg(long, env = "RACKSCALE_ENGINE_ISL", default_value_t = 8192)]
    isl: u32,
    /// Context (prompt + output) the decode KV budget is sized for.
    #[arg(long, env = "RACKSCALE_ENGINE_MAX_CONTEXT", default_value_t = 9216)]
    max_context: u32,
    /// Address to listen on.
    #[arg(long, env = "RACKSCALE_ENGINE_LISTEN", default_value = "0.0.0.0:50061")]
    listen: String,
    /// Endpoint other engines use to pull KV (default: http://<listen>).
    #[arg(long, env = "RACKSCALE_ENGINE_ADVERTISE")]
    advertise: Option<String>,
    /// Seconds a prefilled KV waits to be pulled.
    #[arg(long, env = "RACKSCALE_ENGINE_KV_TTL_SECONDS", default_value_t = 60)]
    kv_ttl_seconds: u64,
    /// Namespace of the owning ModelDeployment.
    #[arg(long, env = "RACKSCALE_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Name of the owning ModelDeployment.
    #[arg(long, env = "RACKSCALE_DEPLOYMENT", default_value = "")]
    deployment: String,
    /// This worker's name.
    #[arg(long, env = "RACKSCALE_WORKER", default_value = "")]
    worker: String,
    /// Launch generation.
    #[arg(long, env = "RACKSCALE_GENERATION", default_value_t = 0)]
    generation: u64,
    /// etcd endpoints of the registry; rank 0 registers the worker there.
    #[arg(long, env = "RACKSCALE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// This rank's index in the worker; rank 0 forms the group and
    /// registers the worker once every rank is up.
    #[arg(long, env = "RACKSCALE_RANK", default_value_t = 0)]
    rank: u32,
    /// Ranks (processes, one per tray) in the worker.
    #[arg(long, env = "RACKSCALE_WORLD_SIZE", default_value_t = 1)]
    world_size: u32,
    /// Node (compute tray) this rank runs on, as registered (an agent passes
    /// it among the engine arguments it is configured with).
    #[arg(long, env = "RACKSCALE_NODE", default_value = "unknown")]
    node: String,
    /// GPU indices of this rank, comma-separated.
    #[arg(long, env = "RACKSCALE_GPU_INDICES", value_delimiter = ',')]
    gpu_indices: Vec<u32>,
    /// Frontend: requests admitted at once; more get 429.
    #[arg(long, env = "RACKSCALE_FRONTEND_MAX_IN_FLIGHT", default_value_t = 4096)]
    max_in_flight: u32,
    /// Stop when the parent process (the node agent that started this rank)
    /// dies, so no rank outlives its supervisor. Agents set it.
    #[arg(long, env = "RACKSCALE_EXIT_WITH_PARENT", default_value_t = false)]
    exit_with_parent: bool,
    /// Registry lease TTL in seconds: how long after a crash the worker's
    /// keys disappear.
    #[arg(long, env = "RACKSCALE_ENGINE_LEASE_TTL_SECONDS", default_value_t = 10)]
    lease_ttl_seconds: u64,
}

impl Args {
    fn config(&self) -> anyhow::Result<EngineConfig> {
        let role: Role = self.role.parse()?;
        anyhow::ensure!(
            self.world_size >= 1 && self.rank < self.world_size,
            "--rank {} must be below --world-size {}",
            self.rank,
            self.world_size
        );
        let model = ModelProfile::builtin(&self.model)?;
        let sku: Sku = self.sku.parse()?;
        // A width of 1 on one axis means "not split" (the agent passes both).
        let parallelism = match (self.tp.filter(|&t| t > 1), self.ep.filter(|&e| e > 1)) {
            (Some(t), None) => Parallelism::Tp(t),
            (None, Some(e)) => Parallelism::Ep(e),
            (None, None) if self.tp == Some(1) || self.ep == Some(1) => Parallelism::Tp(1),
            (None, None) if role == Role::Prefill => Parallelism::Tp(8),
            (None, None) => Parallelism::Ep(8),
            (Some(_), Some(_)) => anyhow::bail!("give a TP or an EP width above 1, not both"),
        };
        let mut c = EngineConfig::new(role, model, sku, parallelism);
        c.time_scale = self.time_scale;
        c.isl = self.isl;
        c.max_context = self.max_context;
        c.advertise = self.advertise.clone();
        c.kv_ttl = Duration::from_secs(self.kv_ttl_seconds);
        c.worker = WorkerIdent {
            namespace: self.namespace.clone(),
            deployment: self.deployment.clone(),
            worker: self.worker.clone(),
        };
        c.generation = self.generation;
        c.validate()?;
        Ok(c)
    }
}

/// Resolves when the process that started the engine (its node agent) has
/// died: a rank must not outlive the agent that supervises and reports it,
/// or a re-placed worker could find its old ranks still serving.
async fn orphaned() {
    let parent = std::os::unix::process::parent_id();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}

/// SIGINT or SIGTERM.
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// `--role frontend`: the OpenAI API over the deployment's workers.
async fn frontend(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.etcd_endpoints.is_empty() && !args.deployment.is_empty(),
        "--role frontend needs --etcd-endpoints and --deployment (and --namespace) to find the workers"
    );
    let model = ModelProfile::builtin(&args.model)?;
    let timeout = Duration::from_secs(5);
    let registry = proto::registry::Registry::connect(&args.etcd_endpoints, timeout)
        .await
        .context("connecting to the etcd registry")?;
    let pool = engine::frontend::pool::Pool::new(timeout);
    pool.follow(registry, &args.namespace, &args.deployment);
    // The workers' pool sizes and load on this frontend's /metrics.
    let metrics = prometheus::Registry::new();
    metrics.register(Box::new(
        engine::frontend::pool_metrics::PoolCollector::new(pool.clone())?,
    ))?;
    let mut config = engine::frontend::RouterConfig::new(model.name.clone());
    config.max_in_flight = args.max_in_flight;
    let router = engine::frontend::Router::new(pool, config);
    let limits = engine::openai::Limits {
        max_queue: args.max_in_flight,
        ..engine::openai::Limits::for_context(args.max_context)
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, deployment = %format!("{}/{}", args.namespace, args.deployment), "frontend serving");
    let tokenizer = std::sync::Arc::new(engine::openai::SimTokenizer::new(model.vocab));
    engine::frontend::serve(listener, router, tokenizer, limits, metrics, async {
        if let Err(e) = stop_signal().await {
            tracing::warn!(error = %e, "no signal handler; stopping");
        }
    })
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    if args.role == "frontend" {
        return frontend(args).await;
    }
    let config = args.config()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, role = config.role.as_str(), "engine serving");
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::register(&registry)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let exit_with_parent = args.exit_with_parent;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = orphaned(), if exit_with_parent => tracing::warn!("parent process (the node agent) is gone; stopping"),
        }
    };
    let local = listener.local_addr()?;
    let endpoint = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let registration = if args.etcd_endpoints.is_empty() {
        None
    } else {
        let timeout = Duration::from_secs(5);
        let registry = proto::registry::Registry::connect(&args.etcd_endpoints, timeout)
            .await
            .context("connecting to the etcd registry")?;
        let shape = match config.parallelism {
            perfmodel::Parallelism::Tp(t) => proto::types::Shape { tp: t, ep: 1 },
            perfmodel::Parallelism::Ep(e) => proto::types::Shape { tp: 1, ep: e },
        };
        let rank = proto::records::RankRecord {
            worker: proto::types::WorkerId::new(&args.namespace, &args.deployment, &args.worker),
            endpoint: proto::records::RankEndpoint {
                rank: args.rank,
                node: args.node.clone(),
                gpu_indices: if args.gpu_indices.is_empty() {
                    // Started by hand, not by an agent: this rank's share
                    // of the worker's GPUs, counted from 0.
                    let width = args.tp.max(args.ep).unwrap_or(1).max(1);
                    (0..width.div_ceil(args.world_size.max(1))).collect()
                } else {
                    args.gpu_indices.clone()
                },
                grpc_endpoint: endpoint.clone(),
                kv_endpoint: endpoint.clone(),
            },
            generation: args.generation,
            world_size: args.world_size,
        };
        let reg = engine::registration::Registration {
            registry,
            rank,
            role: match config.role {
                Role::Prefill => proto::types::Role::Prefill,
                Role::Decode => proto::types::Role::Decode,
                Role::Both => proto::types::Role::Both,
            },
            shape,
            ttl: Duration::from_secs(args.lease_ttl_seconds),
            interval: Duration::from_secs(1),
            timeout,
        };
        let mut rx = stopped_rx.clone();
        Some(tokio::spawn(engine::registration::run(
            reg,
            endpoint,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )))
    };
    let served = engine::serve(config, listener, metrics, shutdown).await;
    let _ = stopped_tx.send(true);
    if let Some(task) = registration {
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "registration ended with an error"),
            Err(e) => tracing::warn!(error = %e, "registration task failed"),
            Ok(Ok(())) => {}
        }
    }
    served?;
    Ok(())
}
