//! The inventory's node facts from the agents' registry records, for
//! standalone mode (where no Kubernetes node carries GFD labels).
//!
//! Each agent record becomes the labels GPU Feature Discovery would have
//! put on its node (clique, product, count, memory) and the unhealthy-GPU
//! annotation, so [`crate::inventory::build`] sees the same racks (NVLink
//! cliques) as in Kubernetes mode. Pure.

use std::collections::BTreeMap;

use proto::records::AgentRecord;
use proto::types::GpuHealth;

use crate::inventory::{
    ANNOTATION_UNHEALTHY, LABEL_CLIQUE, LABEL_COUNT, LABEL_MEMORY, LABEL_PRODUCT, NodeFacts,
};

/// One node per registered agent; a GPU not reported Healthy is unhealthy.
pub fn node_facts(records: &[AgentRecord]) -> Vec<NodeFacts> {
    records.iter().map(one).collect()
}

fn one(r: &AgentRecord) -> NodeFacts {
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_CLIQUE.to_string(), r.clique.clone());
    let product = r
        .gpus
        .first()
        .map(|g| g.product.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| format!("NVIDIA-{}", r.sku));
    labels.insert(LABEL_PRODUCT.to_string(), product);
    labels.insert(LABEL_COUNT.to_string(), r.gpus.len().to_string());
    if let Some(g) = r.gpus.first() {
        labels.insert(LABEL_MEMORY.to_string(), g.memory_mib.to_string());
    }
    let unhealthy: Vec<String> = r
        .gpus
        .iter()
        .filter(|g| g.health != GpuHealth::Healthy)
        .map(|g| g.index.to_string())
        .collect();
    let mut annotations = BTreeMap::new();
    if !unhealthy.is_empty() {
        annotations.insert(ANNOTATION_UNHEALTHY.to_string(), unhealthy.join(","));
    }
    NodeFacts {
        name: r.node.clone(),
        labels,
        annotations,
        ready: true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proto::types::Gpu;

    use super::*;
    use crate::inventory::{AnnotationsOnly, build};

    fn record(node: &str, clique: &str, sick: &[u32]) -> AgentRecord {
        AgentRecord {
            node: node.into(),
            address: "http://127.0.0.1:1".into(),
            gpus: (0..4)
                .map(|index| Gpu {
                    index,
                    uuid: format!("GPU-{node}-{index}"),
                    product: "NVIDIA-GB300".into(),
                    memory_mib: 294_912,
                    health: if sick.contains(&index) {
                        GpuHealth::Unhealthy
                    } else {
                        GpuHealth::Healthy
                    },
                    reason: String::new(),
                })
                .collect(),
            sku: "GB300".into(),
            clique: clique.into(),
            heartbeat: UNIX_EPOCH + Duration::from_secs(1),
        }
    }

    #[test]
    fn cliques_become_racks_and_sick_gpus_are_left_out() {
        let facts = node_facts(&[
            record("a-0", "c.1", &[]),
            record("a-1", "c.1", &[2]),
            record("b-0", "c.2", &[]),
        ]);
        let inv = build(&facts, &AnnotationsOnly);
        assert_eq!(inv.racks.len(), 2);
        let rack = &inv.racks["c.1"];
        assert_eq!(rack.sku, Some(crate::crd::SkuName::Gb300));
        assert_eq!(rack.gpus_total(), 8);
        assert_eq!(rack.gpus_healthy(), 7);
        assert!(rack.warnings.is_empty(), "{:?}", rack.warnings);
    }
}
