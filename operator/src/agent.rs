//! The seam between reconcile and the node agents that start engine ranks.
//!
//! Reconcile decides where each worker runs; an [`AgentControl`] makes it so
//! and says what state each worker is in. [`crate::agent_grpc::GrpcAgents`]
//! drives the agents' `AgentService`; [`PlacementOnly`] records placement
//! without launching anything and reports every worker as `Placed` (never
//! Running), for clusters where no agents run yet.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;

use futures::stream::BoxStream;

use crate::crd::{NodeGpus, Pool, WorkerState};

/// A worker to run: its identity, role, shape and GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLaunch {
    /// `namespace/name` of the deployment.
    pub deployment: String,
    pub worker: String,
    pub role: Pool,
    /// Tensor-parallel width (1 for a DEP worker).
    pub tp: u32,
    /// Expert-parallel width (1 for a TP worker).
    pub ep: u32,
    /// perfmodel profile the engine simulates or serves.
    pub model: String,
    /// `sim` or `cpu`.
    pub backend: String,
    /// The deployment's `engine.args`, flag name (without dashes) -> value.
    pub engine_args: BTreeMap<String, String>,
    /// Spec generation the worker belongs to; a newer one replaces it.
    pub generation: u64,
    /// One rank per node, in rank order.
    pub placement: Vec<NodeGpus>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What an [`AgentControl`] knows about one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub state: WorkerState,
    /// Why it is not running (a rank's exit, a refused launch), if known.
    pub message: Option<String>,
}

impl WorkerReport {
    pub fn new(state: WorkerState) -> Self {
        Self {
            state,
            message: None,
        }
    }

    pub fn with(state: WorkerState, message: impl Into<String>) -> Self {
        Self {
            state,
            message: Some(message.into()),
        }
    }
}

/// Launches and stops workers on the agents of the nodes they are placed on.
pub trait AgentControl: Send + Sync {
    /// Makes `workers` (every worker of one deployment) the deployment's
    /// running set: ranks of it that run anywhere else, on other GPUs or
    /// for another generation are stopped first. Returns each worker's state.
    fn ensure(&self, workers: &[WorkerLaunch]) -> BoxFuture<'_, Vec<WorkerReport>>;
    /// Stops every worker of `deployment`.
    fn release(&self, deployment: &str) -> BoxFuture<'_, ()>;
    /// Nodes with a live agent; `None` when this control cannot tell (then
    /// every node counts as live). Nodes missing from the set are treated as
    /// down: nothing is placed there and workers there are re-placed.
    fn live_nodes(&self) -> BoxFuture<'_, Option<BTreeSet<String>>> {
        Box::pin(async { None })
    }
    /// A stream that yields whenever agents or workers change (an agent
    /// registered or went, a worker formed or was withdrawn), so deployments
    /// are reconciled at once rather than at the next resync.
    fn changes(&self) -> Option<BoxStream<'static, ()>> {
        None
    }
}

/// Records placement only: nothing is launched until agents exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementOnly;

impl AgentControl for PlacementOnly {
    fn ensure(&self, workers: &[WorkerLaunch]) -> BoxFuture<'_, Vec<WorkerReport>> {
        let states = vec![WorkerReport::new(WorkerState::Placed); workers.len()];
        Box::pin(async move { states })
    }

    fn release(&self, _deployment: &str) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
