//! The agent's one error type.
//!
//! Launch refusals (a GPU already held, unhealthy or unknown; a bad spec) are
//! permanent for that request: retrying the same spec cannot help until the
//! node changes. Registry and spawn failures are transient. [`Error::category`]
//! gives a bounded label for metrics; messages never go into labels.

use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (missing field, bad enum, inconsistent shape).
    #[error("invalid request: {0}")]
    InvalidSpec(String),
    /// A requested GPU index does not exist on this node.
    #[error("GPU {index} does not exist on this node ({count} GPUs)")]
    UnknownGpu {
        /// The requested index.
        index: u32,
        /// How many GPUs the node has.
        count: usize,
    },
    /// A requested GPU is not healthy.
    #[error("GPU {index} is not usable: health {health}")]
    GpuUnusable {
        /// The GPU index.
        index: u32,
        /// Its health, as a lower-case word.
        health: &'static str,
    },
    /// A requested GPU is already held by another rank.
    #[error("GPU {index} is already used by rank {holder}")]
    GpuInUse {
        /// The GPU index.
        index: u32,
        /// The holding rank, `namespace/deployment/worker#rank@generation`.
        holder: String,
    },
    /// The same rank runs with another generation; stop it first.
    #[error("rank {rank} already runs with generation {running}; stop it first")]
    RankConflict {
        /// The rank, `namespace/deployment/worker#rank`.
        rank: String,
        /// The generation that runs.
        running: u64,
    },
    /// The same rank and generation runs on other GPUs (the worker moved);
    /// stop it first.
    #[error("rank {rank} already runs on GPUs {gpus:?}; stop it first")]
    RankMoved {
        /// The rank, `namespace/deployment/worker#rank`.
        rank: String,
        /// The GPUs it holds.
        gpus: Vec<u32>,
    },
    /// No such rank is supervised.
    #[error("no rank {0} on this node")]
    RankNotFound(String),
    /// The engine process could not be spawned.
    #[error("spawning the engine failed: {0}")]
    Spawn(#[source] std::io::Error),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A registry call failed.
    #[error(transparent)]
    Registry(#[from] proto::Error),
    /// A stop did not complete within its deadline.
    #[error("rank did not exit within {0:?}")]
    StopTimeout(Duration),
    /// The supervisor is shutting down.
    #[error("the agent is shutting down")]
    ShuttingDown,
}

impl Error {
    /// A bounded label naming the kind of error, for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "invalid_spec",
            Self::UnknownGpu { .. } => "unknown_gpu",
            Self::GpuUnusable { .. } => "gpu_unusable",
            Self::GpuInUse { .. } => "gpu_in_use",
            Self::RankConflict { .. } => "rank_conflict",
            Self::RankMoved { .. } => "rank_moved",
            Self::RankNotFound(_) => "rank_not_found",
            Self::Spawn(_) => "spawn",
            Self::Config(_) => "config",
            Self::Registry(_) => "registry",
            Self::StopTimeout(_) => "stop_timeout",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Registry(err) => err.is_transient(),
            Self::Spawn(_) | Self::StopTimeout(_) | Self::ShuttingDown => true,
            _ => false,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::InvalidSpec(_) | Error::UnknownGpu { .. } => Self::invalid_argument(message),
            Error::GpuUnusable { .. }
            | Error::GpuInUse { .. }
            | Error::RankConflict { .. }
            | Error::RankMoved { .. } => Self::failed_precondition(message),
            Error::RankNotFound(_) => Self::not_found(message),
            Error::StopTimeout(_) => Self::deadline_exceeded(message),
            Error::ShuttingDown | Error::Registry(_) => Self::unavailable(message),
            Error::Spawn(_) | Error::Config(_) => Self::internal(message),
        }
    }
}
