//! The seam between reconcile and the node agents that start engine ranks.
//!
//! Reconcile decides where each worker runs; an [`AgentControl`] makes it so
//! and says what state each worker is in. [`crate::agent_grpc::GrpcAgents`]
//! drives the agents' `AgentService`; [`PlacementOnly`] records placement
//! without launching anything and reports every worker as `Placed` (never
//! Running), for clusters where no agents run yet.

use std::future::Future;
use std::pin::Pin;

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
    /// Spec generation the worker belongs to; a newer one replaces it.
    pub generation: u64,
    /// One rank per node, in rank order.
    pub placement: Vec<NodeGpus>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Launches and stops workers on the agents of the nodes they are placed on.
pub trait AgentControl: Send + Sync {
    /// Makes `workers` the deployment's running set; returns each worker's state.
    fn ensure(&self, workers: &[WorkerLaunch]) -> BoxFuture<'_, Vec<WorkerState>>;
    /// Stops every worker of `deployment`.
    fn release(&self, deployment: &str) -> BoxFuture<'_, ()>;
}

/// Records placement only: nothing is launched until agents exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementOnly;

impl AgentControl for PlacementOnly {
    fn ensure(&self, workers: &[WorkerLaunch]) -> BoxFuture<'_, Vec<WorkerState>> {
        let states = vec![WorkerState::Placed; workers.len()];
        Box::pin(async move { states })
    }

    fn release(&self, _deployment: &str) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
