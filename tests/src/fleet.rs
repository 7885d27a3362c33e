//! Command lines for a simulated fleet: one `rackscale-agent` per tray of a
//! [`RackSpec`], each launching `rackscale-engine` ranks (simulated backend)
//! that register in etcd. Shared by `local-rack` and the end-to-end tests so
//! both start agents the same way. Every command line carries the gRPC
//! transport explicitly: TLS flags (one certificate for every agent, as the
//! chart's DaemonSet has; ranks inherit it) or `--insecure-plaintext`.

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
    /// Flags put first on every agent's command line: its transport
    /// ([`crate::pki::Pki::args`] or [`crate::pki::plaintext_flags`]) and
    /// whatever else a test needs (e.g. `--engine-arg=--model-startup`).
    pub flags: &'a [String],
}

/// Arguments of the agent for `node` of `rack`, listening on `port`.
pub fn agent_args(rack: &RackSpec, node: &str, port: u16, opts: &AgentOptions<'_>) -> Vec<String> {
    let (sku, product, memory) = match rack.sku {
        Sku::Gb300 => ("gb300", "NVIDIA-GB300", "294912"),
        Sku::Gb200 => ("gb200", "NVIDIA-GB200", "196608"),
    };
    let ttl = opts.lease_ttl_seconds.to_string();
    let mut args = opts.flags.to_vec();
    args.extend([
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
    ]);
    args
}

/// Agent flags that serve `/metrics` and the fault-injection hook
/// (`POST /debug/gpus/{index}/health/{health}`) on loopback `port`.
pub fn fault_hook_flags(port: u16) -> [String; 2] {
    [
        format!("--metrics-listen=127.0.0.1:{port}"),
        "--enable-fault-injection".into(),
    ]
}

/// One started agent: its node, process and how it was started.
#[derive(Debug)]
pub struct FleetAgent {
    pub node: String,
    pub process: crate::process::ManagedProcess,
    rack: crate::RackSpec,
}

/// Starts one `rackscale-agent` per tray of every rack of `topology`,
/// logging to `dir`. Follow with [`wait_registered`], which also restarts
/// an agent that lost the race for its port.
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
            agents.push(FleetAgent {
                node,
                process,
                rack: rack.clone(),
            });
        }
    }
    Ok(agents)
}

/// Waits until every agent of `agents` has registered in etcd. An agent
/// that exited because its port was taken meanwhile (free ports are picked
/// before the process binds them) is started again on another port; any
/// other exit, or a timeout, is an error naming the missing nodes.
pub async fn wait_registered(
    registry: &proto::registry::Registry,
    agents: &mut [FleetAgent],
    agent_bin: &std::path::Path,
    opts: &AgentOptions<'_>,
    dir: &std::path::Path,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    use crate::process::StartFailure;
    let call = std::time::Duration::from_secs(5);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        for a in agents.iter_mut() {
            match a.process.ensure_running() {
                Ok(()) => {}
                Err(StartFailure::PortTaken) => {
                    let args = agent_args(&a.rack, &a.node, crate::process::free_port()?, opts);
                    a.process =
                        crate::process::ManagedProcess::spawn(&a.node, agent_bin, &args, dir)?;
                }
                Err(StartFailure::Failed(e)) => return Err(e),
            }
        }
        let listing = registry.list_agents(call).await?;
        let registered: std::collections::BTreeSet<&str> =
            listing.records.iter().map(|r| r.node.as_str()).collect();
        let missing: Vec<&str> = agents
            .iter()
            .map(|a| a.node.as_str())
            .filter(|n| !registered.contains(n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "agents not registered after {timeout:?}: {}",
                missing.join(", ")
            );
        }
        tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
    }
}

/// `rackscale-operator run` arguments against `kubeconfig`, with the
/// registry at `etcd`, metrics on `metrics_port` and the transport flags
/// `tls`.
pub fn operator_args(
    kubeconfig: &std::path::Path,
    etcd: &str,
    metrics_port: u16,
    tls: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = [
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
    .collect();
    args.extend(tls.iter().cloned());
    args
}
