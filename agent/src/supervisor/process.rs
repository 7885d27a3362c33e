//! Spawning and signalling one engine process.
//!
//! Each rank runs in its own process group (`process_group(0)`), so a stop
//! reaches whatever the engine forked. Unsafe code is forbidden in the
//! workspace, so signals are sent by running `kill(1)` (`kill -TERM -- -<pgid>`)
//! rather than through `libc`/`nix`; the hard kill falls back to
//! [`tokio::process::Child::start_kill`] on the leader. `kill_on_drop` makes
//! sure a dropped supervisor leaves no process behind.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::rank::RankSpec;

/// Names of the environment variables a rank receives.
pub mod env {
    /// Rank index within the worker.
    pub const RANK: &str = "RACKSCALE_RANK";
    /// Number of ranks in the worker.
    pub const WORLD_SIZE: &str = "RACKSCALE_WORLD_SIZE";
    /// Comma-separated GPU indices.
    pub const GPU_INDICES: &str = "RACKSCALE_GPU_INDICES";
    /// Same list, for CUDA.
    pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
    /// `prefill`, `decode` or `both`.
    pub const ROLE: &str = "RACKSCALE_ROLE";
    /// Worker namespace.
    pub const NAMESPACE: &str = "RACKSCALE_NAMESPACE";
    /// Worker deployment.
    pub const DEPLOYMENT: &str = "RACKSCALE_DEPLOYMENT";
    /// Worker name.
    pub const WORKER: &str = "RACKSCALE_WORKER";
    /// Launch generation.
    pub const GENERATION: &str = "RACKSCALE_GENERATION";
    /// Tensor-parallel width.
    pub const TP: &str = "RACKSCALE_TP";
    /// Expert-parallel width.
    pub const EP: &str = "RACKSCALE_EP";
    /// Rank 0's group endpoint.
    pub const LEADER_ADDRESS: &str = "RACKSCALE_LEADER_ADDRESS";
    /// Comma-separated peer endpoints, by rank.
    pub const PEERS: &str = "RACKSCALE_PEERS";
    /// Registry key for rendezvous.
    pub const RENDEZVOUS_KEY: &str = "RACKSCALE_RENDEZVOUS_KEY";
    /// Model name.
    pub const MODEL: &str = "RACKSCALE_MODEL";
    /// Model `config.json` path.
    pub const MODEL_CONFIG: &str = "RACKSCALE_MODEL_CONFIG";
    /// Weights path.
    pub const MODEL_WEIGHTS: &str = "RACKSCALE_MODEL_WEIGHTS";
    /// Quantisation recipe.
    pub const QUANTIZATION: &str = "RACKSCALE_QUANTIZATION";
    /// `sim` or `cpu-reference`.
    pub const BACKEND: &str = "RACKSCALE_BACKEND";
    /// Tells the engine to stop when the agent that started it dies.
    pub const EXIT_WITH_PARENT: &str = "RACKSCALE_EXIT_WITH_PARENT";
    /// The agent's node name.
    pub const NODE: &str = "RACKSCALE_NODE";
    /// The agent's GPU SKU, lower case (`gb200`, `gb300`).
    pub const SKU: &str = "RACKSCALE_SKU";
    /// The registry's etcd endpoints, comma-separated.
    pub const ETCD_ENDPOINTS: &str = "RACKSCALE_ETCD_ENDPOINTS";
}

/// The engine command line every rank starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineCommand {
    /// The engine binary.
    pub program: PathBuf,
    /// Arguments before the per-rank ones.
    pub args: Vec<String>,
    /// Environment every rank inherits from its agent (its node, SKU and
    /// registry endpoints), so engines register without extra flags.
    /// Explicit `args` win: clap prefers a flag over its variable.
    pub env: Vec<(String, String)>,
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Builds the command for `spec`: the engine's fixed args, then one
/// `--name=value` per extra engine argument; everything else goes in env.
pub fn command(engine: &EngineCommand, spec: &RankSpec) -> Command {
    let mut cmd = Command::new(&engine.program);
    cmd.envs(engine.env.iter().map(|(k, v)| (k, v)))
        .args(&engine.args)
        .args(
            spec.engine_args
                .iter()
                .map(|(name, value)| format!("--{name}={value}")),
        )
        .env(env::RANK, spec.key.rank.to_string())
        .env(env::WORLD_SIZE, spec.world_size.to_string())
        .env(env::GPU_INDICES, join(&spec.gpus))
        .env(env::CUDA_VISIBLE_DEVICES, join(&spec.gpus))
        .env(env::ROLE, spec.role.as_str())
        .env(env::NAMESPACE, &spec.key.worker.namespace)
        .env(env::DEPLOYMENT, &spec.key.worker.deployment)
        .env(env::WORKER, &spec.key.worker.worker)
        .env(env::GENERATION, spec.generation.to_string())
        .env(env::TP, spec.shape.tp.to_string())
        .env(env::EP, spec.shape.ep.to_string())
        .env(env::LEADER_ADDRESS, &spec.leader_address)
        .env(env::PEERS, join(&spec.peers))
        .env(env::RENDEZVOUS_KEY, &spec.registry_key)
        .env(env::MODEL, &spec.model.name)
        .env(env::MODEL_CONFIG, &spec.model.config_path)
        .env(env::MODEL_WEIGHTS, &spec.model.weights_path)
        .env(env::QUANTIZATION, &spec.model.quantization)
        .env(env::BACKEND, spec.backend.as_str())
        .env(env::EXIT_WITH_PARENT, "true")
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// Sends `signal` (`TERM`, `KILL`) to the process group `pgid` via `kill(1)`.
async fn signal_group(pgid: u32, signal: &str) -> bool {
    if pgid == 0 {
        return false;
    }
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Stops `child`: SIGTERM to its group, up to `grace` to exit, then SIGKILL.
pub async fn stop(child: &mut Child, pid: u32, grace: Duration) -> std::io::Result<ExitStatus> {
    if !grace.is_zero()
        && signal_group(pid, "TERM").await
        && let Ok(status) = tokio::time::timeout(grace, child.wait()).await
    {
        return status;
    }
    if !signal_group(pid, "KILL").await {
        // The group is gone or kill(1) failed: kill at least the leader.
        let _ = child.start_kill();
    }
    child.wait().await
}

/// The exit code, or `128 + signal` when killed by a signal (shell convention).
pub fn code_or_signal(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// A short description of an abnormal exit.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "exited abnormally".to_owned(),
    }
}
