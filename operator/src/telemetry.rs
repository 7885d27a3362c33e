//! The operator's own observability: Prometheus metrics and the
//! `/metrics`, `/healthz` and `/readyz` endpoints.
//!
//! Owns the metric registry (every name under the `rackscale_operator`
//! prefix, spelled once in [`names`]), the liveness heartbeat and readiness
//! flag ([`Health`]), and the HTTP server ([`serve`]). Invariants: label
//! values come from closed enums or `&'static str` categories, never from
//! request or error text; the server takes a bound listener and a shutdown
//! future, so tests bind port 0 and stop it deterministically.

mod health;
mod metrics;
pub mod names;
mod server;

pub use health::{DEFAULT_STALE_AFTER, Health, Readiness};
pub use metrics::{
    ABANDONED, GpuCounts, GpuPool, GpuState, Metrics, ReconcileResult, ReconcileTimer,
    track_leadership,
};
pub use server::{TelemetryState, router, serve};
