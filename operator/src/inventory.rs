//! Rack inventory: NVLink domains built from the labels NVIDIA GPU Feature
//! Discovery puts on nodes, joined with GPU health.
//!
//! A node belongs to the rack named by its `nvidia.com/gpu.clique` label
//! (`<clusterUUID>.<cliqueId>`: one NVLink domain). Nodes without the label
//! are not GPU trays of a rack and are ignored; labels that disagree (a bad
//! count, a product that differs from the rest of the rack) become warnings on
//! the rack, never a crash. GPU health comes from the node annotation
//! `rackscale.io/unhealthy-gpus` (comma-separated indices, set by an admin or
//! a health checker) and from a [`GpuHealth`] source (what the agents report
//! in their registry records: `agent_grpc::ReportedHealth`). Pure: it takes
//! plain facts, not API objects.

use std::collections::{BTreeMap, BTreeSet};

use crate::crd::SkuName;

pub const LABEL_CLIQUE: &str = "nvidia.com/gpu.clique";
pub const LABEL_PRODUCT: &str = "nvidia.com/gpu.product";
pub const LABEL_COUNT: &str = "nvidia.com/gpu.count";
pub const LABEL_MEMORY: &str = "nvidia.com/gpu.memory";
/// Node annotation listing GPU indices taken out of service.
pub const ANNOTATION_UNHEALTHY: &str = "rackscale.io/unhealthy-gpus";

/// What the inventory needs from one Kubernetes node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The node's Ready condition; a NotReady tray offers no healthy GPU.
    pub ready: bool,
}

/// A source of GPU health beyond node annotations (agent reports).
pub trait GpuHealth: Send + Sync {
    /// GPU indices on `node` that must not be used.
    fn unhealthy(&self, node: &str) -> BTreeSet<u32>;
}

/// Health from node annotations only (no registry to read agent reports from).
#[derive(Debug, Clone, Copy, Default)]
pub struct AnnotationsOnly;

impl GpuHealth for AnnotationsOnly {
    fn unhealthy(&self, _node: &str) -> BTreeSet<u32> {
        BTreeSet::new()
    }
}

/// One compute tray (node) of a rack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tray {
    pub node: String,
    pub gpus: u32,
    pub unhealthy: BTreeSet<u32>,
}

impl Tray {
    pub fn healthy(&self) -> u32 {
        self.gpus - self.unhealthy.iter().filter(|&&i| i < self.gpus).count() as u32
    }
}

/// One NVLink domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackView {
    /// Name of the `Rack` object (the clique, lowercased).
    pub name: String,
    pub clique: String,
    pub product: String,
    pub sku: Option<SkuName>,
    pub gpu_memory_mib: Option<u64>,
    pub trays: Vec<Tray>,
    pub warnings: Vec<String>,
}

impl RackView {
    pub fn gpus_total(&self) -> u32 {
        self.trays.iter().map(|t| t.gpus).sum()
    }

    pub fn gpus_healthy(&self) -> u32 {
        self.trays.iter().map(Tray::healthy).sum()
    }
}

/// Every rack, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub racks: BTreeMap<String, RackView>,
}

/// The SKU a GFD product label names, if the operator places on it.
pub fn sku_of_product(product: &str) -> Option<SkuName> {
    let p = product.to_ascii_uppercase();
    if p.contains("GB300") {
        Some(SkuName::Gb300)
    } else if p.contains("GB200") {
        Some(SkuName::Gb200)
    } else {
        None
    }
}

/// A DNS-subdomain name for a clique (`Rack` objects are named after it).
pub fn rack_name(clique: &str) -> String {
    let mut name: String = clique
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    name.truncate(253);
    if name.is_empty() {
        "rack".to_string()
    } else {
        name
    }
}

fn parse_indices(text: &str) -> Result<BTreeSet<u32>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| format!("`{s}` is not a GPU index"))
        })
        .collect()
}

/// Builds racks from node facts and health.
pub fn build<'a>(
    nodes: impl IntoIterator<Item = &'a NodeFacts>,
    health: &dyn GpuHealth,
) -> Inventory {
    let mut racks: BTreeMap<String, RackView> = BTreeMap::new();
    let mut products: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut sorted: Vec<&NodeFacts> = nodes.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for node in sorted {
        let Some(clique) = node.labels.get(LABEL_CLIQUE).filter(|c| !c.is_empty()) else {
            continue;
        };
        let name = rack_name(clique);
        let rack = racks.entry(name.clone()).or_insert_with(|| RackView {
            name: name.clone(),
            clique: clique.clone(),
            product: String::new(),
            sku: None,
            gpu_memory_mib: None,
            trays: Vec::new(),
            warnings: Vec::new(),
        });
        let gpus = match node.labels.get(LABEL_COUNT).map(|c| c.parse::<u32>()) {
            Some(Ok(n)) if n > 0 => n,
            Some(_) => {
                rack.warnings.push(format!(
                    "node {}: label {LABEL_COUNT} is not a positive count; its GPUs are not used",
                    node.name
                ));
                0
            }
            None => {
                rack.warnings.push(format!(
                    "node {}: label {LABEL_COUNT} is missing; its GPUs are not used",
                    node.name
                ));
                0
            }
        };
        if let Some(p) = node.labels.get(LABEL_PRODUCT) {
            *products
                .entry(name.clone())
                .or_default()
                .entry(p.clone())
                .or_default() += 1;
        }
        if let Some(m) = node
            .labels
            .get(LABEL_MEMORY)
            .and_then(|m| m.parse::<u64>().ok())
        {
            match rack.gpu_memory_mib {
                None => rack.gpu_memory_mib = Some(m),
                Some(prev) if prev != m => rack.warnings.push(format!(
                    "node {}: {LABEL_MEMORY}={m} differs from the rack's {prev}",
                    node.name
                )),
                Some(_) => {}
            }
        }
        let mut unhealthy = health.unhealthy(&node.name);
        if let Some(text) = node.annotations.get(ANNOTATION_UNHEALTHY) {
            match parse_indices(text) {
                Ok(set) => unhealthy.extend(set),
                Err(e) => {
                    rack.warnings.push(format!(
                        "node {}: annotation {ANNOTATION_UNHEALTHY}: {e}; treating every GPU as unhealthy",
                        node.name
                    ));
                    unhealthy.extend(0..gpus);
                }
            }
        }
        if !node.ready {
            unhealthy.extend(0..gpus);
        }
        unhealthy.retain(|&i| i < gpus);
        rack.trays.push(Tray {
            node: node.name.clone(),
            gpus,
            unhealthy,
        });
    }
    for (name, counts) in products {
        let Some(rack) = racks.get_mut(&name) else {
            continue;
        };
        // The majority product names the rack; any other is a label problem.
        let (product, _) = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(p, n)| (p.clone(), *n))
            .unwrap_or_default();
        for other in counts.keys().filter(|p| **p != product) {
            rack.warnings.push(format!(
                "nodes labelled {LABEL_PRODUCT}={other} share NVLink domain {} with {product}",
                rack.clique
            ));
        }
        rack.sku = sku_of_product(&product);
        rack.product = product;
    }
    Inventory { racks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, clique: &str, product: &str, count: &str) -> NodeFacts {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_CLIQUE.to_string(), clique.to_string());
        labels.insert(LABEL_PRODUCT.to_string(), product.to_string());
        labels.insert(LABEL_COUNT.to_string(), count.to_string());
        labels.insert(LABEL_MEMORY.to_string(), "294912".to_string());
        NodeFacts {
            name: name.to_string(),
            labels,
            annotations: BTreeMap::new(),
            ready: true,
        }
    }

    #[test]
    fn racks_follow_cliques_and_ignore_unlabelled_nodes() {
        let mut nodes: Vec<NodeFacts> = (0..18)
            .map(|i| node(&format!("a-{i:02}"), "UUID-A.1", "NVIDIA-GB300", "4"))
            .collect();
        nodes.extend((0..18).map(|i| node(&format!("b-{i:02}"), "uuid-b.1", "NVIDIA-GB200", "4")));
        nodes.push(NodeFacts {
            name: "cpu-0".into(),
            ready: true,
            ..Default::default()
        });
        let inv = build(&nodes, &AnnotationsOnly);
        assert_eq!(inv.racks.len(), 2);
        let a = &inv.racks["uuid-a.1"];
        assert_eq!(
            (a.sku, a.gpus_total(), a.trays.len()),
            (Some(SkuName::Gb300), 72, 18)
        );
        assert_eq!(inv.racks["uuid-b.1"].sku, Some(SkuName::Gb200));
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn health_comes_from_annotations_readiness_and_reports() {
        struct Reports;
        impl GpuHealth for Reports {
            fn unhealthy(&self, node: &str) -> BTreeSet<u32> {
                if node == "a-01" {
                    [2].into()
                } else {
                    BTreeSet::new()
                }
            }
        }
        let mut nodes: Vec<NodeFacts> = (0..3)
            .map(|i| node(&format!("a-{i:02}"), "c.1", "NVIDIA-GB300", "4"))
            .collect();
        nodes[0]
            .annotations
            .insert(ANNOTATION_UNHEALTHY.into(), "0, 3".into());
        nodes[2].ready = false;
        let inv = build(&nodes, &Reports);
        let r = &inv.racks["c.1"];
        assert_eq!(r.trays[0].unhealthy, [0, 3].into());
        assert_eq!(r.trays[1].unhealthy, [2].into());
        assert_eq!(r.trays[2].healthy(), 0);
        assert_eq!(r.gpus_healthy(), 12 - 2 - 1 - 4);
    }

    #[test]
    fn inconsistent_labels_warn_instead_of_failing() {
        let mut nodes = vec![
            node("a-00", "c.1", "NVIDIA-GB300", "4"),
            node("a-01", "c.1", "NVIDIA-GB300", "four"),
            node("a-02", "c.1", "NVIDIA-GB200", "4"),
        ];
        nodes[0]
            .annotations
            .insert(ANNOTATION_UNHEALTHY.into(), "x".into());
        let inv = build(&nodes, &AnnotationsOnly);
        let r = &inv.racks["c.1"];
        assert_eq!(r.sku, Some(SkuName::Gb300));
        assert_eq!(r.trays[1].gpus, 0);
        assert_eq!(r.trays[0].healthy(), 0);
        assert_eq!(r.warnings.len(), 3, "{:?}", r.warnings);
    }

    #[test]
    fn rack_names_are_dns_safe() {
        assert_eq!(rack_name("ABC_1.32766"), "abc-1.32766");
        assert_eq!(rack_name("--"), "rack");
    }
}
