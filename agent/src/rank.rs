//! Domain types of a supervised rank: its identity, launch spec and status.
//!
//! Converted from the wire in [`crate::wire`]; the supervisor only sees these
//! validated types, so a spec that reaches it always names a worker, a role,
//! a rank inside its world and a non-empty set of distinct GPU indices.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use proto::types::{Role, Shape, WorkerId};

/// Names one rank of one worker, across generations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankKey {
    /// The worker.
    pub worker: WorkerId,
    /// Rank index within the worker.
    pub rank: u32,
}

impl fmt::Display for RankKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.worker, self.rank)
    }
}

/// Engine implementation a rank runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Simulated engine.
    Sim,
    /// CPU reference backend.
    CpuReference,
}

impl Backend {
    /// The name passed to the engine.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sim => "sim",
            Self::CpuReference => "cpu-reference",
        }
    }
}

/// The model a rank serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Model name as users request it.
    pub name: String,
    /// Path of the HF `config.json`.
    pub config_path: String,
    /// Path of the weights; empty for the simulated backend.
    pub weights_path: String,
    /// Quantisation recipe.
    pub quantization: String,
}

/// Everything needed to start one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSpec {
    /// Which rank.
    pub key: RankKey,
    /// Launch generation of the worker.
    pub generation: u64,
    /// Role the worker serves.
    pub role: Role,
    /// Parallel shape of the worker.
    pub shape: Shape,
    /// Number of ranks in the worker.
    pub world_size: u32,
    /// Distinct GPU indices on this node, non-empty.
    pub gpus: Vec<u32>,
    /// Rank 0's group endpoint.
    pub leader_address: String,
    /// Every rank's peer endpoint, by rank (may be empty).
    pub peers: Vec<String>,
    /// Registry key for rendezvous through etcd, if any.
    pub registry_key: String,
    /// The model.
    pub model: Model,
    /// Engine backend.
    pub backend: Backend,
    /// Extra engine arguments, passed as `--name=value`.
    pub engine_args: BTreeMap<String, String>,
}

/// Lifecycle phase of a supervised rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Spawned, not yet serving.
    Starting,
    /// Process running. The agent has no readiness probe yet, so a spawned
    /// process counts as running.
    Running,
    /// Asked to stop, within its grace period.
    Stopping,
    /// Exited after a stop or with status 0.
    Exited,
    /// Crashed (possibly waiting to restart) or gave up.
    Failed,
}

impl Phase {
    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Exited => "exited",
            Self::Failed => "failed",
        }
    }
}

/// What the agent knows about one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankStatus {
    /// Which rank.
    pub key: RankKey,
    /// Its launch generation.
    pub generation: u64,
    /// Role it was launched with.
    pub role: Role,
    /// Current phase.
    pub phase: Phase,
    /// OS process id; 0 when not running.
    pub pid: u32,
    /// GPU indices it holds.
    pub gpus: Vec<u32>,
    /// Ranks in its worker.
    pub world_size: u32,
    /// When the current process was started.
    pub started_at: Option<SystemTime>,
    /// Exit code of the last exit; `None` while running or when killed by a signal.
    pub exit_code: Option<i32>,
    /// How many times it was restarted after a crash.
    pub restarts: u32,
    /// Short human-readable detail.
    pub message: String,
}
