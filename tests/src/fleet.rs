//! Command lines for a simulated fleet: one `rackscale-agent` per tray of a
//! [`RackSpec`], each launching `rackscale-engine` ranks (simulated backend)
//! that register in etcd. Shared by `local-rack` and the end-to-end tests so
//! both start agents the same way.

use crate::topology::{RackSpec, Sku};

/// How the agents of a fleet are started.
#[derive(Debug, Clone)]
pub struct AgentOptions<'a> {
    /// etcd endpoint of the registry (agents and engines register there).
    pub etcd: &'a str,
    /// The `rackscale-engine` binary agents start for each rank.
    pub engine_bin: &'a str,
    /// Modelled seconds per wall second in the engines.
    pub time_scale: u32,
    /// Lease TTL of agents and engines, seconds.
    pub lease_ttl_seconds: u32,
}

/// Arguments of the agent for `node` of `rack`, listening on `port`.
pub fn agent_args(rack: &RackSpec, node: &str, port: u16, opts: &AgentOptions<'_>) -> Vec<String> {
    let (sku, product, memory) = match rack.sku {
        Sku::Gb300 => ("gb300", "NVIDIA-GB300", "294912"),
        Sku::Gb200 => ("gb200", "NVIDIA-GB200", "196608"),
    };
    let ttl = opts.lease_ttl_seconds.to_string();
    vec![
        "--node".into(),
        node.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--etcd".into(),
        opts.etcd.into(),
        "--lease-ttl-seconds".into(),
        ttl.clone(),
        "--sku".into(),
        sku.to_uppercase(),
        "--gpu-product".into(),
        product.into(),
        "--gpu-memory-mib".into(),
        memory.into(),
        "--clique".into(),
        rack.clique(),
        "--engine-bin".into(),
        opts.engine_bin.into(),
        format!("--engine-arg=--sku={sku}"),
        format!("--engine-arg=--time-scale={}", opts.time_scale),
        "--engine-arg=--listen=127.0.0.1:0".into(),
        format!("--engine-arg=--node={node}"),
        format!("--engine-arg=--etcd-endpoints={}", opts.etcd),
        format!("--engine-arg=--lease-ttl-seconds={ttl}"),
    ]
}
