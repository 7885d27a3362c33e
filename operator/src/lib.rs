//! rackscale's control plane.
//!
//! Owns the `ModelDeployment` and `Rack` custom resources, the rack inventory
//! built from GPU Feature Discovery labels, topology-aware placement, the
//! planner edge over `perfmodel`, the rebalancer's decision core and the
//! simulator that exercises it, reconcile, leader election and the
//! operator's metrics. Decision logic (placement, planning, rebalancing) is
//! pure; only thin edges talk to Kubernetes.

pub mod agent;
pub mod agent_grpc;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod engines;
pub mod error;
pub mod inventory;
pub mod leader;
pub mod ledger;
pub mod pipeline;
pub mod placement;
pub mod planner;
pub mod rebalance;
pub mod rebalancing;
pub mod simulate;
pub mod standalone;
pub mod telemetry;
