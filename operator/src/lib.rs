//! rackscale's control plane.
//!
//! Owns the `ModelDeployment` and `Rack` custom resources, the rack inventory
//! built from GPU Feature Discovery labels, topology-aware placement, the
//! planner edge over `perfmodel`, reconcile and the rebalancer. Decision logic
//! is pure; only thin edges talk to Kubernetes, etcd or gRPC.
//!
//! Empty until the operator issue lands: this crate holds only what works.
