//! `rackscale-engine`: one engine worker (simulated backend) serving
//! `EngineService` until SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use engine::{EngineConfig, EngineMetrics, Role, WorkerIdent};
use perfmodel::{ModelProfile, Parallelism, Sku};

/// Flags; every one also reads an environment variable.
#[derive(Debug, Parser)]
#[command(name = "rackscale-engine", version, about)]
struct Args {
    /// Worker role: prefill, decode or both.
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
}

impl Args {
    fn config(&self) -> anyhow::Result<EngineConfig> {
        let role: Role = self.role.parse()?;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let config = args.config()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, role = config.role.as_str(), "engine serving");
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::register(&registry)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    engine::serve(config, listener, metrics, shutdown).await?;
    Ok(())
}
