//! rackscale's node agent, one per compute tray.
//!
//! Owns GPU discovery ([`gpu`]: simulated GPUs, or NVML with the `nvml` cargo
//! feature and `--gpu-source nvml`), the
//! [`supervisor`] of engine rank processes, the `AgentService` gRPC server
//! ([`service`]), the agent's lease in the registry ([`registration`]) and
//! its Prometheus metrics ([`metrics`], served with the fault-injection hook by [`http`]). [`node::Node`] ties them together;
//! [`withdraw`] removes an exited rank's registry keys at once.
//! [`config`] turns the binary's flags into a validated configuration.

pub mod config;
pub mod error;
pub mod events;
pub mod gpu;
pub mod http;
pub mod metrics;
pub mod node;
pub mod rank;
pub mod registration;
pub mod service;
pub mod supervisor;
pub mod wire;
pub mod withdraw;

pub use error::{Error, Result};
