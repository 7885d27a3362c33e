//! [`Node`]: the agent's state, tying GPUs, the supervisor and events together.
//!
//! GPU health changes go through [`Node::set_gpu_health`] (the fault-injection
//! hook, and later NVML's), which publishes a health event, updates the
//! metrics and bumps a version that the registration task watches to re-put
//! the agent record.

use std::sync::Arc;
use std::time::SystemTime;

use proto::records::AgentRecord;
use proto::types::GpuHealth;
use tokio::sync::watch;

use crate::Result;
use crate::events::{EventBus, EventKind};
use crate::gpu::{GpuSource, GpuTable, HealthChange, NodeIdentity};
use crate::metrics::Metrics;
use crate::supervisor::{Supervisor, SupervisorConfig};

/// The agent's state. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Node {
    identity: NodeIdentity,
    gpus: GpuTable,
    events: EventBus,
    supervisor: Supervisor,
    metrics: Metrics,
    health_version: Arc<watch::Sender<u64>>,
}

impl Node {
    /// Discovers the GPUs from `source` and builds an idle node.
    pub fn new(
        identity: NodeIdentity,
        source: &dyn GpuSource,
        config: SupervisorConfig,
        metrics: Metrics,
    ) -> Result<Self> {
        let gpus = GpuTable::new(source.discover()?);
        metrics.set_gpus(&gpus.snapshot());
        let events = EventBus::new();
        let supervisor = Supervisor::new(config, gpus.clone(), events.clone(), metrics.clone());
        Ok(Self {
            identity,
            gpus,
            events,
            supervisor,
            metrics,
            health_version: Arc::new(watch::channel(0).0),
        })
    }

    /// Who this node is.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The GPU table.
    pub fn gpus(&self) -> &GpuTable {
        &self.gpus
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The rank supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sets GPU `index`'s health (fault injection: mark failed or healthy).
    /// Publishes a `GpuHealth` event when it changed. Ranks already running
    /// on the GPU are left alone: whether to move them is the operator's call.
    pub fn set_gpu_health(
        &self,
        index: u32,
        health: GpuHealth,
        reason: &str,
    ) -> Result<Option<HealthChange>> {
        let change = self.gpus.set_health(index, health, reason)?;
        if let Some(change) = &change {
            self.metrics.set_gpus(&self.gpus.snapshot());
            self.events.publish(EventKind::GpuHealth(change.clone()));
            self.health_version.send_modify(|v| *v += 1);
        }
        Ok(change)
    }

    /// A receiver that changes whenever a GPU's health does.
    pub fn health_changes(&self) -> watch::Receiver<u64> {
        self.health_version.subscribe()
    }

    /// The registry record describing this node, reachable at `address`.
    pub fn record(&self, address: &str) -> AgentRecord {
        AgentRecord {
            node: self.identity.node.clone(),
            address: address.to_owned(),
            gpus: self.gpus.snapshot(),
            sku: self.identity.sku.clone(),
            clique: self.identity.clique.clone(),
            heartbeat: SystemTime::now(),
        }
    }
}
