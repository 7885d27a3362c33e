//! GPU discovery and the node's GPU health table.
//!
//! A [`GpuSource`] says which GPUs the node has: [`SimulatedGpus`] describes
//! them from flags; `NvmlGpus` (module `nvml`, only with the `nvml` cargo
//! feature) asks the NVIDIA driver. [`ConfiguredGpus`] is the one the flags
//! chose. Product names use GPU Feature Discovery's spelling
//! ([`gfd_product`]) whichever source reports them. [`GpuTable`] owns the
//! current health of every GPU; health changes (from a fault-injection hook
//! today, NVML XID events later) go through it so that exactly one place
//! decides what "healthy" means.

use std::sync::{Arc, Mutex, PoisonError};

use proto::types::{Gpu, GpuHealth};

#[cfg(feature = "nvml")]
mod nvml;
#[cfg(feature = "nvml")]
pub use nvml::NvmlGpus;

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

/// The GPU source the configuration selected (`--gpu-source`).
///
/// An enum rather than a boxed trait object so that `Config` stays `Clone`
/// and `Debug`. The `Nvml` variant exists only in builds with the `nvml`
/// feature, so a build without it cannot be configured to use NVML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfiguredGpus {
    /// GPUs described by flags.
    Simulated(SimulatedGpus),
    /// GPUs discovered through NVML.
    #[cfg(feature = "nvml")]
    Nvml(NvmlGpus),
}

impl GpuSource for ConfiguredGpus {
    fn discover(&self) -> crate::Result<Vec<Gpu>> {
        match self {
            Self::Simulated(source) => source.discover(),
            #[cfg(feature = "nvml")]
            Self::Nvml(source) => source.discover(),
        }
    }
}

/// A product name as GPU Feature Discovery spells it in the
/// `nvidia.com/gpu.product` label: NVML's name with every space replaced by a
/// dash (`NVIDIA GB200` becomes `NVIDIA-GB200`), so that what the agent
/// reports matches the node labels the operator reads.
pub fn gfd_product(nvml_name: &str) -> String {
    nvml_name.replace(' ', "-")
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
    fn gfd_product_replaces_spaces_with_dashes() {
        assert_eq!(gfd_product("NVIDIA GB200"), "NVIDIA-GB200");
        assert_eq!(
            gfd_product("NVIDIA H100 80GB HBM3"),
            "NVIDIA-H100-80GB-HBM3"
        );
        assert_eq!(gfd_product("NVIDIA-GB200"), "NVIDIA-GB200");
        assert_eq!(gfd_product(""), "");
    }

    #[test]
    fn configured_simulated_source_discovers_like_the_simulation() {
        let sim = SimulatedGpus {
            count: 2,
            memory_mib: 10,
            product: "NVIDIA-GB200".into(),
            node: "n1".into(),
        };
        assert_eq!(
            ConfiguredGpus::Simulated(sim.clone()).discover().unwrap(),
            sim.discover().unwrap()
        );
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
