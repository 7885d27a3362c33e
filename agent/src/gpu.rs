//! GPU discovery and the node's GPU health table.
//!
//! A [`GpuSource`] says which GPUs the node has. Only [`SimulatedGpus`]
//! exists in this round: NVML discovery belongs behind the `nvml` cargo
//! feature, which is declared but empty (the `nvml` crate is not a
//! dependency yet). [`GpuTable`] owns the current health of every GPU; health
//! changes (from a fault-injection hook today, NVML XID events later) go
//! through it so that exactly one place decides what "healthy" means.

use std::sync::{Arc, Mutex, PoisonError};

use proto::types::{Gpu, GpuHealth};

/// What a node reports about itself, besides its GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Kubernetes node name.
    pub node: String,
    /// GPU SKU, e.g. `GB200`.
    pub sku: String,
    /// NVLink domain (`nvidia.com/gpu.clique`).
    pub clique: String,
}

/// A source of the node's GPUs.
pub trait GpuSource: Send + Sync {
    /// Every GPU of the node, indexed `0..n`, with its health at discovery.
    fn discover(&self) -> crate::Result<Vec<Gpu>>;
}

/// GPUs described by flags, for simulated racks and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedGpus {
    /// How many GPUs.
    pub count: u32,
    /// Memory of each, in MiB.
    pub memory_mib: u64,
    /// Product name in GFD spelling, e.g. `NVIDIA-GB200`.
    pub product: String,
    /// Node name, used to make stable fake UUIDs.
    pub node: String,
}

impl GpuSource for SimulatedGpus {
    fn discover(&self) -> crate::Result<Vec<Gpu>> {
        Ok((0..self.count)
            .map(|index| Gpu {
                index,
                uuid: format!("GPU-sim-{}-{index}", self.node),
                product: self.product.clone(),
                memory_mib: self.memory_mib,
                health: GpuHealth::Healthy,
                reason: String::new(),
            })
            .collect())
    }
}

/// A health change of one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// The GPU with its new health.
    pub gpu: Gpu,
    /// Health before the change.
    pub previous: GpuHealth,
}

/// The node's GPUs with their current health. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct GpuTable {
    gpus: Arc<Mutex<Vec<Gpu>>>,
}

impl GpuTable {
    /// Builds the table from discovered GPUs.
    pub fn new(gpus: Vec<Gpu>) -> Self {
        Self {
            gpus: Arc::new(Mutex::new(gpus)),
        }
    }

    /// Snapshot of every GPU.
    pub fn snapshot(&self) -> Vec<Gpu> {
        self.gpus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many GPUs the node has.
    pub fn len(&self) -> usize {
        self.gpus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the node has no GPU.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the health of GPU `index` (the fault-injection hook); returns the
    /// change, or `None` when the health and reason are already those.
    pub fn set_health(
        &self,
        index: u32,
        health: GpuHealth,
        reason: impl Into<String>,
    ) -> crate::Result<Option<HealthChange>> {
        let mut gpus = self.gpus.lock().unwrap_or_else(PoisonError::into_inner);
        let count = gpus.len();
        let gpu = gpus
            .iter_mut()
            .find(|g| g.index == index)
            .ok_or(crate::Error::UnknownGpu { index, count })?;
        let reason = if health == GpuHealth::Healthy {
            String::new()
        } else {
            reason.into()
        };
        if gpu.health == health && gpu.reason == reason {
            return Ok(None);
        }
        let previous = gpu.health;
        gpu.health = health;
        gpu.reason = reason;
        Ok(Some(HealthChange {
            gpu: gpu.clone(),
            previous,
        }))
    }
}

/// Lower-case name of a health, for messages and metric labels.
pub fn health_label(health: GpuHealth) -> &'static str {
    match health {
        GpuHealth::Unknown => "unknown",
        GpuHealth::Healthy => "healthy",
        GpuHealth::Degraded => "degraded",
        GpuHealth::Unhealthy => "unhealthy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> GpuTable {
        let gpus = SimulatedGpus {
            count: 4,
            memory_mib: 1000,
            product: "NVIDIA-GB200".into(),
            node: "n1".into(),
        }
        .discover()
        .unwrap();
        GpuTable::new(gpus)
    }

    #[test]
    fn simulated_gpus_are_indexed_and_healthy() {
        let gpus = table().snapshot();
        assert_eq!(gpus.len(), 4);
        assert!(gpus.iter().enumerate().all(|(i, g)| g.index as usize == i
            && g.health == GpuHealth::Healthy
            && g.memory_mib == 1000));
        assert_eq!(gpus[2].uuid, "GPU-sim-n1-2");
    }

    #[test]
    fn set_health_reports_changes_once() {
        let t = table();
        let change = t.set_health(1, GpuHealth::Unhealthy, "xid 79").unwrap();
        let change = change.unwrap();
        assert_eq!(change.previous, GpuHealth::Healthy);
        assert_eq!(change.gpu.reason, "xid 79");
        assert!(
            t.set_health(1, GpuHealth::Unhealthy, "xid 79")
                .unwrap()
                .is_none()
        );
        let back = t
            .set_health(1, GpuHealth::Healthy, "ignored")
            .unwrap()
            .unwrap();
        assert_eq!(back.gpu.reason, "");
        assert!(matches!(
            t.set_health(9, GpuHealth::Healthy, ""),
            Err(crate::Error::UnknownGpu { index: 9, count: 4 })
        ));
    }
}
