//! The wire between rackscale processes.
//!
//! This crate owns every contract that crosses a process boundary: the gRPC
//! services (agent control, engine data plane) and the etcd registry layout.
//! Generated code stays inside this crate; other crates convert at their edges
//! so that decision logic never depends on wire types.
//!
//! So far it owns the registry key layout; the gRPC services arrive with the
//! agents and engines that speak them.

pub mod registry;
