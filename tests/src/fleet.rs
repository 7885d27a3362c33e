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

/// One started agent: its node and process.
#[derive(Debug)]
pub struct FleetAgent {
    pub node: String,
    pub process: crate::process::ManagedProcess,
}

/// Starts one `rackscale-agent` per tray of every rack of `topology`,
/// logging to `dir`.
pub fn spawn_agents(
    topology: &crate::Topology,
    agent_bin: &std::path::Path,
    opts: &AgentOptions<'_>,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<FleetAgent>> {
    let mut agents = Vec::new();
    for rack in topology.racks() {
        for node in rack.node_names() {
            let args = agent_args(rack, &node, crate::process::free_port()?, opts);
            let process = crate::process::ManagedProcess::spawn(&node, agent_bin, &args, dir)?;
            agents.push(FleetAgent { node, process });
        }
    }
    Ok(agents)
}

/// Waits until `count` agents have registered in etcd.
pub async fn wait_registered(
    registry: &proto::registry::Registry,
    count: usize,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let call = std::time::Duration::from_secs(5);
    crate::wait_until(format!("{count} agents registered"), timeout, || {
        let registry = registry.clone();
        async move { Ok(registry.list_agents(call).await?.records.len() == count) }
    })
    .await
}

/// `rackscale-operator run` arguments against `kubeconfig`, with the
/// registry at `etcd` and metrics on `metrics_port`.
pub fn operator_args(kubeconfig: &std::path::Path, etcd: &str, metrics_port: u16) -> Vec<String> {
    [
        "run",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--lease-namespace",
        "default",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--etcd-endpoints",
        etcd,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
