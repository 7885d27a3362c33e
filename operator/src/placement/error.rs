//! Why a deployment could not be placed. Every message names the numbers an
//! operator needs to act (GPUs needed, free, largest block and where).

/// Placement failures. Capacity errors are transient (GPUs free up, nodes
/// heal, racks join); a malformed request is permanent until the spec
/// changes; a malformed inventory is transient (the inventory is rebuilt).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("invalid placement request: {0}")]
    InvalidRequest(String),
    #[error("invalid rack inventory: {0}")]
    InvalidInventory(String),
    #[error("deployment {deployment} may use no rack in the inventory (rack filter: {filter})")]
    NoRackAllowed { deployment: String, filter: String },
    #[error(
        "deployment {deployment} needs {needed} GPUs for {workers} worker(s) to place, but the \
         {racks} allowed rack(s) have {free} free healthy GPUs ({healthy} healthy of {total})"
    )]
    InsufficientGpus {
        deployment: String,
        needed: u32,
        workers: usize,
        racks: usize,
        free: u32,
        healthy: u32,
        total: u32,
    },
    #[error(
        "worker {worker} of {deployment} needs {gpus} GPUs in one NVLink domain ({}); the largest \
         free block is {largest_block} GPUs in rack {rack}{}",
        shape(*.whole_trays, *.remainder),
        after(*.placed_before)
    )]
    WorkerDoesNotFit {
        deployment: String,
        worker: String,
        gpus: u32,
        /// Whole free trays the worker needs in that rack.
        whole_trays: u32,
        /// GPUs it needs on one more tray.
        remainder: u32,
        /// The largest worker any allowed rack could still take.
        largest_block: u32,
        /// The rack with that block.
        rack: String,
        /// Workers of this deployment placed before this one in the attempt.
        placed_before: usize,
    },
}

impl PlacementError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            PlacementError::InvalidRequest(_) => "invalid_request",
            PlacementError::InvalidInventory(_) => "invalid_inventory",
            PlacementError::NoRackAllowed { .. } => "no_rack_allowed",
            PlacementError::InsufficientGpus { .. } => "insufficient_gpus",
            PlacementError::WorkerDoesNotFit { .. } => "worker_does_not_fit",
        }
    }

    /// Whether retrying later (with backoff) may succeed without a spec
    /// change.
    pub fn is_transient(&self) -> bool {
        !matches!(self, PlacementError::InvalidRequest(_))
    }
}

/// `Result` with [`PlacementError`].
pub type Result<T, E = PlacementError> = std::result::Result<T, E>;

/// "4 whole free trays", "1 whole free tray + 2 GPUs on one tray", "2 GPUs
/// on one tray".
fn shape(whole_trays: u32, remainder: u32) -> String {
    let trays = match whole_trays {
        0 => String::new(),
        1 => "1 whole free tray".to_string(),
        n => format!("{n} whole free trays"),
    };
    let rest = match remainder {
        0 => String::new(),
        1 => "1 GPU on one tray".to_string(),
        n => format!("{n} GPUs on one tray"),
    };
    match (trays.is_empty(), rest.is_empty()) {
        (false, false) => format!("{trays} + {rest}"),
        (false, true) => trays,
        _ => rest,
    }
}

fn after(placed_before: usize) -> String {
    match placed_before {
        0 => String::new(),
        1 => " (after placing 1 other worker of this deployment)".to_string(),
        n => format!(" (after placing {n} other workers of this deployment)"),
    }
}
