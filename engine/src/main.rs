//! `rackscale-engine`: one engine worker (simulated or CPU reference
//! backend) serving `EngineService`, gRPC health and reflection, and
//! `GET /metrics`, all on `--listen`, until SIGINT/SIGTERM. With the CPU
//! backend and `--world-size` above 1, ranks other than 0 serve their share
//! of the routed experts on `--listen` instead (see `engine::cpu::ep`).
//! `--write-cpu-model DIR` writes the CPU reference model and exits.
//!
//! Every link (the port's gRPC and HTTP, KV pulls, expert ranks, the
//! frontend's calls) is mutual TLS with `--tls-ca/--tls-cert/--tls-key`
//! (agents hand theirs down as `RACKSCALE_TLS_*`); only
//! `--insecure-plaintext` turns it off, and without either the engine
//! refuses to start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use engine::{
    BackendConfig, CpuOptions, EngineConfig, EngineMetrics, EngineTls, Role, WorkerIdent,
};
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::registry::{EtcdArgs, EtcdSecurity, Registry};
use proto::tls::{Alpn, TlsArgs, Transport};

/// Flags; every one also reads an environment variable.
#[derive(Debug, Parser)]
// A later flag overrides an earlier one: a deployment's `engine.args` come after
// the agent's own engine flags on the command line.
#[command(name = "rackscale-engine", version, about, args_override_self = true)]
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
    /// Endpoint other engines use to pull KV (default: https://<listen>, or
    /// http://<listen> with --insecure-plaintext).
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
    /// What computes the steps: `sim` (modelled) or `cpu` (the CPU
    /// reference model; agents pass `cpu-reference`).
    #[arg(long, env = "RACKSCALE_BACKEND", default_value = "sim")]
    backend: String,
    /// CPU backend: directory with `config.json` and `model.safetensors`
    /// (agents pass the model's weights path); empty: the model generated
    /// from --cpu-model-seed, written under the temporary directory.
    #[arg(long, env = "RACKSCALE_MODEL_WEIGHTS", default_value = "")]
    model_dir: String,
    /// CPU backend: seed of the generated model.
    #[arg(long, env = "RACKSCALE_CPU_MODEL_SEED", default_value_t = 7)]
    cpu_model_seed: u64,
    /// Every rank's endpoint, by rank, comma-separated (agents pass it).
    /// CPU backend: rank 0 dispatches routed experts to ranks 1..; when
    /// empty, it reads them from the rank records in the registry.
    #[arg(long, env = "RACKSCALE_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Simulated backend: wait out the modelled weight load and engine
    /// start-up (perfmodel's, for this shape; scaled by --time-scale) before
    /// registering, as a real engine is unavailable while it loads. Off by
    /// default so tests and local racks start at once.
    #[arg(long, env = "RACKSCALE_ENGINE_MODEL_STARTUP", default_value_t = false)]
    model_startup: bool,
    /// Write the CPU reference model (from --cpu-model-seed) into this
    /// directory and exit.
    #[arg(long)]
    write_cpu_model: Option<PathBuf>,
    /// Mutual TLS of every link.
    #[command(flatten)]
    tls: TlsArgs,
    /// TLS and authentication to etcd.
    #[command(flatten)]
    etcd_security: EtcdArgs,
}

/// The backend a `--backend` value names.
fn parse_backend(name: &str) -> anyhow::Result<bool> {
    match name.trim().to_ascii_lowercase().as_str() {
        "sim" | "" => Ok(false),
        "cpu" | "cpu-reference" | "cpu_reference" => Ok(true),
        other => anyhow::bail!("unknown backend `{other}`; expected sim or cpu"),
    }
}

impl Args {
    /// The validated transport and etcd security (refuses a start without
    /// TLS files or `--insecure-plaintext`).
    fn security(&self) -> anyhow::Result<(Transport, EtcdSecurity)> {
        Ok((self.tls.transport()?, self.etcd_security.security()?))
    }

    /// The registry client, through `etcd`'s TLS and user.
    async fn registry(&self, etcd: &EtcdSecurity) -> anyhow::Result<Registry> {
        Registry::connect_with(&self.etcd_endpoints, etcd, Duration::from_secs(5))
            .await
            .context("connecting to the etcd registry")
    }

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
        if parse_backend(&self.backend)? {
            c.backend = BackendConfig::Cpu(CpuOptions {
                model_dir: self.cpu_model_dir()?,
                ep_peers: Vec::new(),
            });
        }
        c.validate()?;
        Ok(c)
    }

    fn cpu_model_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(if self.model_dir.is_empty() {
            engine::cpu::generated_model_dir(self.cpu_model_seed)?
        } else {
            PathBuf::from(&self.model_dir)
        })
    }

    /// The peers' endpoints (ranks 1..) as given, if given for every rank.
    fn given_peers(&self) -> Option<Vec<String>> {
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        (peers.len() == self.world_size as usize).then(|| peers[1..].to_vec())
    }
}

/// Endpoints of ranks 1.. of this worker's generation, from their rank
/// records in the registry (waits until every rank has registered).
async fn peers_from_registry(
    registry: &proto::registry::Registry,
    args: &Args,
) -> anyhow::Result<Vec<String>> {
    let worker = proto::types::WorkerId::new(&args.namespace, &args.deployment, &args.worker);
    let prefix = proto::registry::ranks_prefix(&worker);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let listing = registry
            .list::<proto::records::RankRecord>(&prefix, Duration::from_secs(5))
            .await?;
        let peers: Option<Vec<String>> = (1..args.world_size)
            .map(|r| {
                listing
                    .records
                    .iter()
                    .find(|m| m.endpoint.rank == r && m.generation == args.generation)
                    .map(|m| m.endpoint.grpc_endpoint.clone())
            })
            .collect();
        if let Some(peers) = peers {
            return Ok(peers);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "expert ranks 1..{} of {worker} did not register in time",
            args.world_size
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
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

/// `--role frontend`: the OpenAI API over the deployment's workers (its
/// own HTTP port is the user-facing edge and stays plain HTTP; its calls to
/// the workers go through `transport`).
async fn frontend(args: Args, transport: Transport, etcd: EtcdSecurity) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.etcd_endpoints.is_empty() && !args.deployment.is_empty(),
        "--role frontend needs --etcd-endpoints and --deployment (and --namespace) to find the workers"
    );
    let model = ModelProfile::builtin(&args.model)?;
    let timeout = Duration::from_secs(5);
    let registry = args.registry(&etcd).await?;
    let pool = engine::frontend::pool::Pool::new(timeout, transport.client()?);
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
    let tokenizer: Arc<dyn engine::openai::Tokenizer> = if parse_backend(&args.backend)? {
        Arc::new(engine::cpu::ByteTokenizer)
    } else {
        Arc::new(engine::openai::SimTokenizer::new(model.vocab))
    };
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
    if let Some(dir) = &args.write_cpu_model {
        engine::cpu::write_model(dir, args.cpu_model_seed)?;
        println!(
            "wrote the CPU reference model (seed {}) to {}",
            args.cpu_model_seed,
            dir.display()
        );
        return Ok(());
    }
    let (transport, etcd) = args.security()?;
    if args.role == "frontend" {
        return frontend(args, transport, etcd).await;
    }
    let mut config = args.config()?;
    config.tls = EngineTls::from_transport(&transport)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, role = config.role.as_str(), tls = transport.is_tls(), "engine serving");
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
        .unwrap_or_else(|| format!("{}://{local}", transport.scheme()));
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let mut registry_client = None;
    let registration = if args.etcd_endpoints.is_empty() {
        None
    } else {
        let timeout = Duration::from_secs(5);
        let registry = args.registry(&etcd).await?;
        registry_client = Some(registry.clone());
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
            tls: config.tls.client.clone(),
        };
        let mut rx = stopped_rx.clone();
        let startup = if args.model_startup {
            let modelled = config.start_seconds();
            tracing::info!(
                modelled_seconds = modelled,
                "loading weights (modelled) before registering"
            );
            Duration::from_secs_f64(modelled / config.time_scale)
        } else {
            Duration::ZERO
        };
        Some(tokio::spawn(async move {
            tokio::time::sleep(startup).await;
            engine::registration::run(reg, endpoint, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        }))
    };
    let served = match &mut config.backend {
        BackendConfig::Cpu(options) if args.world_size > 1 && args.rank > 0 => {
            // An expert rank: its shard of the routed experts, no worker.
            let shard = engine::cpu::ExpertShard {
                rank: args.rank as usize,
                ranks: args.world_size as usize,
            };
            let weights = engine::cpu::Weights::load(&options.model_dir, shard)?;
            let model = Arc::new(engine::cpu::Model::new(&weights, shard)?);
            tracing::info!(
                rank = args.rank,
                ranks = args.world_size,
                "serving routed experts"
            );
            let tls = transport.server(Alpn::None)?;
            engine::cpu::ep::serve(listener, model, tls, shutdown)
                .await
                .map_err(engine::Error::from)
        }
        BackendConfig::Cpu(options) if args.world_size > 1 => {
            options.ep_peers = match (args.given_peers(), &registry_client) {
                (Some(peers), _) => peers,
                (None, Some(registry)) => peers_from_registry(registry, &args).await?,
                (None, None) => anyhow::bail!(
                    "--world-size {} with the cpu backend needs --peers (every rank's endpoint) or --etcd-endpoints",
                    args.world_size
                ),
            };
            tracing::info!(peers = ?options.ep_peers, "dispatching routed experts to ranks 1..");
            engine::serve(config, listener, metrics, shutdown).await
        }
        _ => engine::serve(config, listener, metrics, shutdown).await,
    };
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Args;

    #[test]
    fn a_later_flag_overrides_the_agents_earlier_one() {
        let args = Args::try_parse_from([
            "rackscale-engine",
            "--insecure-plaintext",
            "--max-context=4096",
            "--max-context=16384",
        ])
        .unwrap();
        assert_eq!(args.max_context, 16384);
    }
}
