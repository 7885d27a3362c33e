//! rackscale's data plane.
//!
//! Owns the worker runtime (roles prefill, decode, both), EP/TP rank groups,
//! the continuous-batching scheduler, paged KV accounting, KV transfer, the
//! backends (simulated, CPU reference) and the OpenAI-compatible frontend.
//!
//! Empty until the engine issue lands: this crate holds only what works.
