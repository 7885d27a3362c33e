//! rackscale's data plane.
//!
//! Owns the worker runtime (roles prefill, decode, both), the
//! continuous-batching scheduler, paged KV accounting, KV transfer and the
//! simulated backend. One process per rank; rank 0 serves the worker and
//! forms its rank group in the registry ([`registration`]).
//!
//! - [`config`]: typed worker configuration and budgets from the memory fit.
//! - [`backend`]: the seam between the scheduler and what computes steps.
//! - [`sim`]: step times from perfmodel, scaled sleeps, synthetic tokens/KV.
//! - [`cpu`]: the CPU reference backend, a small DeepSeek-style MoE
//!   computed for real, experts optionally sharded over rank processes.
//! - [`blocks`]: the paged KV-block pool.
//! - [`scheduler`]: the batching actor.
//! - [`kv`]: prefilled KV held for pulling.
//! - [`server`]: the `EngineService` gRPC edge, with health, reflection and
//!   `/metrics` on the same port.
//! - [`frontend`]: the disaggregated router (registry-following worker pool,
//!   prefill -> KV transfer -> decode).
//! - [`generate`]: the seam between the OpenAI HTTP surface and what
//!   produces tokens (a local worker, or the disaggregated router).
//! - [`metrics`]: Prometheus metrics with the vLLM gauge names.
//! - [`openai`]: the OpenAI-compatible HTTP API in front of any
//!   [`generate::Generator`], and the aggregated-mode generator of a worker.

pub mod backend;
pub mod blocks;
pub mod config;
pub mod cpu;
pub mod error;
pub mod frontend;
pub mod generate;
pub mod kv;
pub mod metrics;
pub mod openai;
pub mod registration;
pub mod scheduler;
pub mod server;
pub mod sim;

pub use config::{BackendConfig, CpuOptions, EngineConfig, EngineTls, Role, WorkerIdent};
pub use error::{Error, Result};
pub use metrics::EngineMetrics;
pub use server::serve;
