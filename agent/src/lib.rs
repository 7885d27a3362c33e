//! rackscale's node agent, one per compute tray.
//!
//! Owns GPU discovery (NVML behind a feature, simulated GPUs otherwise), the
//! supervisor of engine rank processes, the `AgentService` gRPC server and the
//! agent's lease in the registry.
//!
//! Empty until the agents issue lands: this crate holds only what works.
