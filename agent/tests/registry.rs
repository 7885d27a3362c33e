//! Registration against a real etcd (started by the harness): the agent
//! record appears under `/rackscale/v1/agents/<node>`, follows GPU health, and
//! expires with the lease once the agent stops without revoking it.

use std::time::Duration;

use agent::gpu::{NodeIdentity, SimulatedGpus};
use agent::metrics::Metrics;
use agent::node::Node;
use agent::registration::{self, RegistrationConfig};
use agent::supervisor::{EngineCommand, RestartPolicy, SupervisorConfig};
use anyhow::Result;
use harness::{Etcd, wait_for};
use proto::registry::Registry;
use proto::types::GpuHealth;
use tokio::sync::oneshot;

const CALL: Duration = Duration::from_secs(5);

#[tokio::test]
async fn the_agent_record_follows_health_and_expires_with_the_lease() -> Result<()> {
    let etcd = Etcd::start().await?;
    let registry = Registry::connect(&[etcd.endpoint().to_owned()], CALL).await?;
    assert_eq!(
        proto::registry::agent_key("tray-7"),
        "/rackscale/v1/agents/tray-7"
    );

    let node = Node::new(
        NodeIdentity {
            node: "tray-7".into(),
            sku: "GB300".into(),
            clique: "uuid.3".into(),
        },
        &SimulatedGpus {
            count: 4,
            memory_mib: 1000,
            product: "NVIDIA-GB300".into(),
            node: "tray-7".into(),
        },
        SupervisorConfig {
            engine: EngineCommand {
                program: "/bin/true".into(),
                args: vec![],
                env: vec![],
            },
            restart: RestartPolicy::default(),
        },
        Metrics::new()?,
    )?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(registration::run(
        registry.clone(),
        node.clone(),
        RegistrationConfig {
            address: "127.0.0.1:7400".into(),
            ttl: Duration::from_secs(2),
            call_timeout: CALL,
            revoke_on_shutdown: false,
        },
        async {
            let _ = stopped.await;
        },
    ));

    let record = wait_for("the agent record", Duration::from_secs(10), || {
        let registry = registry.clone();
        async move { Ok(registry.get_agent("tray-7", CALL).await?) }
    })
    .await?;
    assert_eq!(record.address, "127.0.0.1:7400");
    assert_eq!(
        (record.sku.as_str(), record.clique.as_str()),
        ("GB300", "uuid.3")
    );
    assert_eq!(record.gpus.len(), 4);

    node.set_gpu_health(2, GpuHealth::Unhealthy, "xid 79")?;
    wait_for(
        "the record to show GPU 2 unhealthy",
        Duration::from_secs(10),
        || {
            let registry = registry.clone();
            async move {
                let record = registry.get_agent("tray-7", CALL).await?;
                Ok(record.filter(|r| r.gpus[2].health == GpuHealth::Unhealthy))
            }
        },
    )
    .await?;

    // Stop without revoking: the record outlives the agent by at most the TTL.
    let _ = stop.send(());
    task.await?;
    assert!(registry.get_agent("tray-7", CALL).await?.is_some());
    wait_for("the record to expire", Duration::from_secs(10), || {
        let registry = registry.clone();
        async move {
            let gone = registry.get_agent("tray-7", CALL).await?.is_none();
            Ok(gone.then_some(()))
        }
    })
    .await?;
    Ok(())
}
