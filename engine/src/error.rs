//! The engine's one error type and its mapping onto gRPC status codes.

/// Everything that can go wrong inside an engine worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration (model, SKU, shape, flags) is unusable.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The performance model rejected the inputs.
    #[error(transparent)]
    PerfModel(#[from] perfmodel::Error),
    /// A request is malformed (empty prompt, zero `max_tokens`, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// This worker's role does not serve the call.
    #[error("this worker's role is {role}; it does not serve {call}")]
    WrongRole {
        role: &'static str,
        call: &'static str,
    },
    /// The worker is draining and admits nothing new.
    #[error("worker is draining")]
    Draining,
    /// The request can never fit the KV-block budget, or the queue is full.
    #[error("out of capacity: {0}")]
    Capacity(String),
    /// A KV handle names nothing held here (never existed, pulled or expired).
    #[error("unknown or expired KV handle `{0}`")]
    UnknownKv(String),
    /// The pulled KV does not match its handle (size, offsets or checksum).
    #[error("KV transfer corrupt: {0}")]
    KvCorrupt(String),
    /// The KV holder could not be reached or failed mid-stream.
    #[error("KV transfer failed: {0}")]
    KvTransfer(String),
    /// The scheduler task is gone (shutdown).
    #[error("scheduler stopped")]
    SchedulerStopped,
    /// Binding or serving the gRPC endpoint failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Registering metrics failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Socket I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The etcd registry refused or timed out.
    #[error("registry: {0}")]
    Registry(String),
    /// The CPU reference backend failed (weights, tensor math, EP peers).
    #[error("cpu backend: {0}")]
    Backend(#[from] crate::cpu::CpuError),
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::PerfModel(_) => "perfmodel",
            Error::InvalidRequest(_) => "invalid_request",
            Error::WrongRole { .. } => "wrong_role",
            Error::Draining => "draining",
            Error::Capacity(_) => "capacity",
            Error::UnknownKv(_) => "unknown_kv",
            Error::KvCorrupt(_) => "kv_corrupt",
            Error::KvTransfer(_) => "kv_transfer",
            Error::SchedulerStopped => "scheduler_stopped",
            Error::Transport(_) => "transport",
            Error::Metrics(_) => "metrics",
            Error::Io(_) => "io",
            Error::Registry(_) => "registry",
            Error::Backend(_) => "backend",
        }
    }

    /// Whether retrying the same call (here or on another worker) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Draining
                | Error::Capacity(_)
                | Error::KvTransfer(_)
                | Error::SchedulerStopped
                | Error::Transport(_)
                | Error::Io(_)
                | Error::Registry(_)
        )
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidRequest(_) => tonic::Status::invalid_argument(msg),
            Error::WrongRole { .. } => tonic::Status::failed_precondition(msg),
            Error::Draining | Error::SchedulerStopped => tonic::Status::unavailable(msg),
            Error::Capacity(_) => tonic::Status::resource_exhausted(msg),
            Error::UnknownKv(_) => tonic::Status::not_found(msg),
            Error::KvCorrupt(_) => tonic::Status::data_loss(msg),
            Error::KvTransfer(_) | Error::Transport(_) | Error::Io(_) | Error::Registry(_) => {
                tonic::Status::unavailable(msg)
            }
            Error::Config(_) | Error::PerfModel(_) | Error::Metrics(_) | Error::Backend(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
