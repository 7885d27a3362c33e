//! The allocation ledger: which worker holds which GPUs, fleet-wide.
//!
//! The operator is the only writer of placement. The ledger is its in-memory
//! record while it leads, rebuilt from every `ModelDeployment`'s status when
//! it starts, updated under one lock by each reconcile before status is
//! written, so two deployments reconciled at once can never be given the
//! same GPU. It refuses any change that would assign a GPU twice.

use std::collections::{BTreeMap, BTreeSet};

use crate::crd::{ModelDeploymentStatus, NodeGpus, Pool, RackAllocation, RackStatus};
use crate::inventory::RackView;

/// One worker's GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// `namespace/name` of the deployment.
    pub deployment: String,
    pub worker: String,
    pub role: Pool,
    pub rack: String,
    pub placement: Vec<NodeGpus>,
}

impl LedgerEntry {
    pub fn gpus(&self) -> u32 {
        self.placement.iter().map(|n| n.gpus.len() as u32).sum()
    }

    fn gpu_refs(&self) -> impl Iterator<Item = (String, u32)> + '_ {
        self.placement
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| (n.node.clone(), *g)))
    }
}

/// Fleet-wide GPU allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    entries: BTreeMap<(String, String), LedgerEntry>,
}

impl Ledger {
    /// Rebuilds the ledger from deployments' statuses (on start-up).
    pub fn from_statuses<'a>(
        statuses: impl IntoIterator<Item = (String, &'a ModelDeploymentStatus)>,
    ) -> Self {
        let mut ledger = Ledger::default();
        for (deployment, status) in statuses {
            let entries = status
                .workers
                .iter()
                .map(|w| LedgerEntry {
                    deployment: deployment.clone(),
                    worker: w.name.clone(),
                    role: w.role,
                    rack: w.rack.clone(),
                    placement: w.placement.clone(),
                })
                .collect();
            // A status that collides with another is dropped: that
            // deployment is re-placed on its next reconcile.
            let _ = ledger.replace_deployment(&deployment, entries);
        }
        ledger
    }

    pub fn entries(&self) -> impl Iterator<Item = &LedgerEntry> {
        self.entries.values()
    }

    /// The workers of one deployment.
    pub fn of_deployment<'a>(
        &'a self,
        deployment: &'a str,
    ) -> impl Iterator<Item = &'a LedgerEntry> {
        self.entries
            .values()
            .filter(move |e| e.deployment == deployment)
    }

    /// Replaces a deployment's workers; fails (changing nothing) if a GPU
    /// would be held twice.
    pub fn replace_deployment(
        &mut self,
        deployment: &str,
        entries: Vec<LedgerEntry>,
    ) -> Result<(), String> {
        let held: BTreeSet<(String, u32)> = self
            .entries
            .values()
            .filter(|e| e.deployment != deployment)
            .flat_map(|e| e.gpu_refs())
            .collect();
        let mut new = BTreeSet::new();
        for e in &entries {
            for g in e.gpu_refs() {
                if held.contains(&g) || !new.insert(g.clone()) {
                    return Err(format!(
                        "GPU {} on {} would be assigned twice (worker {} of {deployment})",
                        g.1, g.0, e.worker
                    ));
                }
            }
        }
        self.release(deployment);
        for e in entries {
            self.entries
                .insert((deployment.to_string(), e.worker.clone()), e);
        }
        Ok(())
    }

    /// Frees every GPU of a deployment.
    pub fn release(&mut self, deployment: &str) {
        self.entries.retain(|(d, _), _| d != deployment);
    }

    /// The status of one rack: capacity, health and who holds what.
    pub fn rack_status(&self, rack: &RackView) -> RackStatus {
        let nodes: BTreeSet<&str> = rack.trays.iter().map(|t| t.node.as_str()).collect();
        let mut allocated = 0;
        let mut by_owner: BTreeMap<(String, Pool), u32> = BTreeMap::new();
        for e in self.entries.values().filter(|e| e.rack == rack.name) {
            let n = e
                .placement
                .iter()
                .filter(|p| nodes.contains(p.node.as_str()))
                .map(|p| p.gpus.len() as u32)
                .sum::<u32>();
            allocated += n;
            *by_owner.entry((e.deployment.clone(), e.role)).or_default() += n;
        }
        let healthy = rack.gpus_healthy();
        // GPUs held by a worker but now unhealthy are counted once, as allocated.
        let held_unhealthy: u32 = rack
            .trays
            .iter()
            .map(|t| {
                self.entries
                    .values()
                    .flat_map(|e| e.placement.iter())
                    .filter(|p| p.node == t.node)
                    .flat_map(|p| p.gpus.iter())
                    .filter(|g| t.unhealthy.contains(g))
                    .count() as u32
            })
            .sum();
        RackStatus {
            sku: rack.sku.map(|s| s.as_str().to_string()),
            trays: rack.trays.len() as u32,
            gpus_total: rack.gpus_total(),
            gpus_healthy: healthy,
            gpus_allocated: allocated,
            gpus_free: healthy.saturating_sub(allocated - held_unhealthy),
            nodes: rack.trays.iter().map(|t| t.node.clone()).collect(),
            allocations: by_owner
                .into_iter()
                .map(|((deployment, pool), gpus)| RackAllocation {
                    deployment,
                    pool,
                    gpus,
                })
                .collect(),
            warnings: rack.warnings.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Tray;

    fn entry(dep: &str, worker: &str, node: &str, gpus: &[u32]) -> LedgerEntry {
        LedgerEntry {
            deployment: dep.into(),
            worker: worker.into(),
            role: Pool::Decode,
            rack: "r".into(),
            placement: vec![NodeGpus {
                node: node.into(),
                gpus: gpus.to_vec(),
            }],
        }
    }

    #[test]
    fn refuses_double_booking_and_releases() {
        let mut l = Ledger::default();
        l.replace_deployment("a", vec![entry("a", "decode-0", "n0", &[0, 1])])
            .unwrap();
        let err = l.replace_deployment("b", vec![entry("b", "decode-0", "n0", &[1, 2])]);
        assert!(err.unwrap_err().contains("assigned twice"));
        assert!(l.of_deployment("b").next().is_none());
        // Replacing a deployment's own GPUs is fine.
        l.replace_deployment("a", vec![entry("a", "decode-0", "n0", &[1, 2])])
            .unwrap();
        l.release("a");
        assert_eq!(l.entries().count(), 0);
    }

    #[test]
    fn rack_status_counts_pools_and_health() {
        let rack = RackView {
            name: "r".into(),
            clique: "c.1".into(),
            product: "NVIDIA-GB300".into(),
            sku: Some(crate::crd::SkuName::Gb300),
            gpu_memory_mib: None,
            trays: vec![
                Tray {
                    node: "n0".into(),
                    gpus: 4,
                    unhealthy: [3].into(),
                },
                Tray {
                    node: "n1".into(),
                    gpus: 4,
                    unhealthy: BTreeSet::new(),
                },
            ],
            warnings: vec![],
        };
        let mut l = Ledger::default();
        let mut p = entry("ns/a", "prefill-0", "n1", &[0, 1, 2, 3]);
        p.role = Pool::Prefill;
        l.replace_deployment("ns/a", vec![p, entry("ns/a", "decode-0", "n0", &[0])])
            .unwrap();
        let s = l.rack_status(&rack);
        assert_eq!(
            (s.gpus_total, s.gpus_healthy, s.gpus_allocated, s.gpus_free),
            (8, 7, 5, 2)
        );
        assert_eq!(s.allocations.len(), 2);
        assert_eq!(s.trays, 2);
    }
}
