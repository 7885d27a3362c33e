//! rackscale's data plane.
//!
//! Owns the worker runtime (roles prefill, decode, both), the
//! continuous-batching scheduler, paged KV accounting, KV transfer and the
//! simulated backend. Today: one process per worker, single rank.
//!
//! - [`config`]: typed worker configuration and budgets from the memory fit.
//! - [`sim`]: step times from perfmodel, scaled sleeps, synthetic tokens/KV.
//! - [`blocks`]: the paged KV-block pool.
//! - [`scheduler`]: the batching actor.
//! - [`kv`]: prefilled KV held for pulling.
//! - [`server`]: the `EngineService` gRPC edge.
//! - [`metrics`]: Prometheus metrics with the vLLM gauge names.

pub mod blocks;
pub mod config;
pub mod error;
pub mod kv;
pub mod metrics;
pub mod registration;
pub mod scheduler;
pub mod server;
pub mod sim;

pub use config::{EngineConfig, Role, WorkerIdent};
pub use error::{Error, Result};
pub use metrics::EngineMetrics;
pub use server::serve;
