//! The wire between rackscale processes.
//!
//! This crate owns every contract that crosses a process boundary: the gRPC
//! services (agent control in `agent.proto`, the engine data plane in
//! `engine.proto`), the protobuf values of the etcd registry
//! (`registry.proto`) with their key layout and a typed client
//! ([`registry`]). Generated code lives in [`pb`] and is meant for the thin
//! edges that serve or call gRPC; decision logic uses the domain types in
//! [`types`] and [`records`], converted with `From`/`TryFrom`, which validate
//! what the wire cannot (required fields, enum values, shapes). [`tls`]
//! secures every link: mutual TLS for gRPC and the engines' other streams,
//! built through one client type so that no link is left plaintext by
//! accident.

pub mod error;
pub mod records;
pub mod registry;
pub mod tls;
pub mod types;

pub use error::{Error, Result};

/// Generated protobuf messages, gRPC clients (`*_client`) and servers
/// (`*_server`) of package `rackscale.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("rackscale.v1");
}

/// Encoded `FileDescriptorSet` of every rackscale `.proto` (with imports), for
/// gRPC server reflection
/// (`tonic_reflection::server::Builder::register_encoded_file_descriptor_set`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rackscale_descriptor.bin"));
