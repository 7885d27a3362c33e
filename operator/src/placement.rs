//! Placement: which GPUs each worker of a deployment runs on.
//!
//! Owns the decision that maps a deployment's requested workers (role, GPU
//! count) onto concrete GPUs (`node`, `index`) of the rack inventory, given
//! every allocation that already exists. It is pure (std only: no kube, tokio
//! or perfmodel types) and deterministic: reconcile feeds it the inventory
//! (GPU Feature Discovery labels joined with agent health) and the
//! allocations recorded in the custom resources, and applies the returned
//! [`Plan`]. The `Rack` status reads [`free_gpus`]; fragmentation metrics
//! read [`stranded_gpus`].
//!
//! # Vocabulary
//!
//! A *rack* is one NVLink domain (`nvidia.com/gpu.clique`); a *tray* is one
//! Kubernetes node of it (4 GPUs on GB200/GB300 NVL72, 18 trays per rack). A
//! rack's *tray size* `T` is the largest GPU count of its trays. A tray is
//! *whole-free* when it has `T` GPUs, all healthy and none allocated. Trays
//! are taken in the order the inventory lists them (physical order); racks
//! and workers are ordered by name.
//!
//! # Rules (invariants of every [`Plan`] returned)
//!
//! 1. **One NVLink domain per worker**: all GPUs of an assignment are in the
//!    rack named by [`Allocation::rack`].
//! 2. **Tray-aligned shapes**: a new worker of `g = a·T + r` GPUs (`r < T`)
//!    takes `a` whole-free trays plus `r` GPUs on one more tray. So a multiple
//!    of `T` takes only whole trays (never GPUs of a partly used or partly
//!    unhealthy tray); a worker smaller than a tray stays on one tray; a
//!    worker of 6 takes one whole tray plus 2 GPUs on another. The `r` part is
//!    packed best-fit into the partly used tray with the fewest free GPUs that
//!    still fit (trays with an unhealthy GPU count as partly used and host
//!    such remainders on their healthy GPUs); only when none fits does it
//!    open a whole-free tray. Every worker therefore shares at most one tray
//!    with other workers.
//! 3. **Co-location**: a deployment's prefill and decode workers share a rack
//!    where possible, so KV moves over NVLink. Workers to place go first into
//!    racks where the deployment keeps running workers (most of its GPUs
//!    first); then, all together, into a rack a moved worker came from; then
//!    all together into the best-fitting allowed rack. Only when no rack can
//!    hold them all are they spread, whole workers at a time, each step
//!    filling the rack that takes the most of them; the plan then says
//!    [`Plan::split_across_racks`].
//! 4. **Health**: an unhealthy GPU is never assigned (a kept worker holding
//!    one is moved).
//! 5. **Stability**: a worker of this deployment whose allocation is still
//!    valid (same size, rack allowed by the filter, every GPU present in that
//!    rack and healthy, no GPU held by anyone else) keeps exactly its GPUs
//!    ([`Plan::kept`]) even when its shape is not the one rule 2 would pick
//!    today. Invalid ones are re-placed ([`Plan::moved`], with a
//!    [`MoveReason`]), preferably in the same rack; workers no longer
//!    requested are [`Plan::released`]. Other deployments' allocations are
//!    never changed; they only occupy GPUs. A worker's role plays no part in
//!    its GPUs, so the rebalancer can flip prefill and decode in place.
//! 6. **Exclusive**: no GPU is assigned twice, within the plan or against any
//!    other allocation.
//! 7. **Low fragmentation**: among racks that fit, prefer the one that breaks
//!    the fewest whole-free trays, then the one left with the fewest whole-free
//!    trays (best fit, so large blocks stay intact elsewhere), then the fewest
//!    free GPUs, then the name. Within a rack whole trays come from the
//!    smallest run of consecutive whole-free trays that holds them (first
//!    trays of the run); a worker that no run holds takes the largest runs
//!    first. Within a tray the lowest free indices are used.
//! 8. **Deterministic**: the result depends only on the input values, not on
//!    the order of racks, allocations or requested workers (which orders
//!    only the plan's lists); tray order within a rack is physical order and
//!    does count. Ordered maps and explicit tie-breaks by index and name
//!    throughout; the one hash map is only looked up, never iterated.
//!
//! Placement is all or nothing: on error nothing changes, the running
//! workers keep running and the error says why (see [`PlacementError`]).
//!
//! # Cost
//!
//! Each rack keeps its free-GPU count, its whole-free-tray count and a
//! histogram of free GPUs per partly used tray, so judging whether a rack
//! fits a deployment costs O(workers), not O(GPUs); choosing a rack scans the
//! racks' counters once. [`Cluster`] keeps that state between deployments
//! (placing one more deployment into 1,000 racks holding 5,000 workers takes
//! well under a millisecond); [`place`] rebuilds it from the inputs each
//! time, remembering only the placed deployment's allocations (a few
//! milliseconds at that scale). `benches/placement.rs` measures both.

mod error;
mod place;
mod state;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use error::{PlacementError, Result};
pub use state::Cluster;
use state::Remember;

/// One compute tray: a Kubernetes node and its GPUs (indices `0..gpus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrayInventory {
    /// The Kubernetes node name; unique across the whole inventory.
    pub node: String,
    /// GPUs on the tray (4 on GB200/GB300; at most 64).
    pub gpus: u32,
    /// Indices of GPUs that must not be used; indices `>= gpus` are ignored.
    pub unhealthy: BTreeSet<u32>,
}

/// One NVLink domain and its trays, in physical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackInventory {
    /// The NVLink domain id; unique.
    pub name: String,
    pub trays: Vec<TrayInventory>,
}

/// Who holds an allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId {
    /// `namespace/name` of the `ModelDeployment`.
    pub deployment: String,
    /// The worker's name within the deployment, e.g. `prefill-0`.
    pub worker: String,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpuRef {
    pub node: String,
    pub index: u32,
}

/// The GPUs one worker holds, all in one rack. Within a new assignment GPUs
/// are listed in tray order, then index order (rank order for the engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub owner: WorkerId,
    pub rack: String,
    pub gpus: Vec<GpuRef>,
}

/// A worker's pool. Placement does not depend on it (see rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Prefill,
    Decode,
}

/// One worker to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRequest {
    /// Unique within the deployment.
    pub worker: String,
    pub role: Role,
    /// GPUs of the worker (its TP × EP width); at least 1.
    pub gpus: u32,
}

/// Everything a deployment should run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRequest {
    /// `namespace/name`; matches [`WorkerId::deployment`].
    pub deployment: String,
    pub workers: Vec<WorkerRequest>,
    /// Racks the deployment may use; `None` allows all. Names that are not in
    /// the inventory are ignored. Cordoned racks are left out by the caller.
    pub rack_filter: Option<BTreeSet<String>>,
}

/// Why a running worker gets new GPUs. Checked in this order; the first that
/// applies is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MoveReason {
    /// The requested GPU count differs from the allocation's.
    SizeChanged,
    /// The allocation's rack is not in the request's rack filter.
    RackNotAllowed,
    /// A GPU's node (or the rack, or the GPU index) is no longer in the
    /// inventory under the allocation's rack.
    NodeGone,
    /// A GPU of the allocation is unhealthy.
    UnhealthyGpu,
    /// A GPU is also held by another worker (another deployment's, or an
    /// earlier-named worker of this one).
    Conflict,
}

impl MoveReason {
    /// A bounded label for metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::SizeChanged => "size_changed",
            MoveReason::RackNotAllowed => "rack_not_allowed",
            MoveReason::NodeGone => "node_gone",
            MoveReason::UnhealthyGpu => "unhealthy_gpu",
            MoveReason::Conflict => "conflict",
        }
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of placing one deployment. Worker lists follow the request's
/// order except [`Plan::released`], which is sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub deployment: String,
    /// One per requested worker, in request order.
    pub assignments: Vec<Allocation>,
    /// Workers that keep exactly the GPUs they had.
    pub kept: Vec<String>,
    /// Workers that had an invalid allocation and got new GPUs.
    pub moved: Vec<(String, MoveReason)>,
    /// Workers that had no allocation before.
    pub added: Vec<String>,
    /// Workers of this deployment that held GPUs but are no longer requested.
    pub released: Vec<String>,
    /// Racks the deployment uses, sorted.
    pub racks: Vec<String>,
    /// The deployment's workers are in more than one rack, so some KV
    /// transfers leave NVLink.
    pub split_across_racks: bool,
}

/// GPU counts of one rack, as the `Rack` status shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RackUsage {
    /// GPUs the inventory lists.
    pub total: u32,
    /// Of those, not marked unhealthy.
    pub healthy: u32,
    /// GPUs held by at least one allocation (healthy or not).
    pub allocated: u32,
    /// Healthy GPUs no allocation holds.
    pub free: u32,
    /// Trays whose GPUs are all healthy and free.
    pub whole_free_trays: u32,
}

/// Free healthy GPUs that no worker of one size can use under rule 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stranded {
    /// The worker size the measure is for.
    pub worker_gpus: u32,
    /// Free healthy GPUs in all racks.
    pub free: u32,
    /// Free healthy GPUs left over after packing as many workers of
    /// `worker_gpus` as the rules allow into every rack.
    pub stranded: u32,
    /// The same per rack (every rack listed).
    pub per_rack: BTreeMap<String, u32>,
}

/// Places one deployment. Builds a [`Cluster`] from the inventory and the
/// existing allocations (of every deployment, including this one's current
/// workers) and calls [`Cluster::place`].
pub fn place(
    inventory: &[RackInventory],
    allocations: &[Allocation],
    request: &DeploymentRequest,
) -> Result<Plan> {
    let only = Remember::Deployment(&request.deployment);
    Cluster::build(inventory, allocations, only)?.place(request)
}

/// Per-rack GPU counts (total, healthy, allocated, free), keyed by rack name.
pub fn free_gpus(
    inventory: &[RackInventory],
    allocations: &[Allocation],
) -> Result<BTreeMap<String, RackUsage>> {
    Ok(Cluster::build(inventory, allocations, Remember::Nothing)?.usage())
}

/// Free healthy GPUs that cannot host a worker of `worker_gpus` GPUs: a
/// fragmentation measure (see [`Cluster::stranded`]).
pub fn stranded_gpus(
    inventory: &[RackInventory],
    allocations: &[Allocation],
    worker_gpus: u32,
) -> Result<Stranded> {
    Ok(Cluster::build(inventory, allocations, Remember::Nothing)?.stranded(worker_gpus))
}
