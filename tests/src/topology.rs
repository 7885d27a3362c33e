//! Rack fixtures: GPU racks described by a small builder and turned into
//! Node objects labelled the way NVIDIA GPU Feature Discovery labels them.
//!
//! Each rack is one NVLink domain and one clique: every tray (node) of a
//! rack carries the same `nvidia.com/gpu.clique` value
//! `<clusterUUID>.<cliqueId>`. The cluster UUID is derived from the rack
//! name, so a fixture names the same clique in every run. Building the Node
//! objects ([`Topology::nodes`]) is pure; [`Topology::create`] sends them.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

/// GFD label keys, and the well-known ones the fixtures also set.
pub mod labels {
    /// `true` on nodes with NVIDIA GPUs.
    pub const GPU_PRESENT: &str = "nvidia.com/gpu.present";
    /// Product name, e.g. `NVIDIA-GB200`.
    pub const GPU_PRODUCT: &str = "nvidia.com/gpu.product";
    /// GPUs on the node.
    pub const GPU_COUNT: &str = "nvidia.com/gpu.count";
    /// Memory per GPU in MiB.
    pub const GPU_MEMORY: &str = "nvidia.com/gpu.memory";
    /// NVLink clique: `<clusterUUID>.<cliqueId>`.
    pub const GPU_CLIQUE: &str = "nvidia.com/gpu.clique";
    /// The node's host name.
    pub const HOSTNAME: &str = "kubernetes.io/hostname";
    /// CPU architecture (Grace is arm64).
    pub const ARCH: &str = "kubernetes.io/arch";
    /// Operating system.
    pub const OS: &str = "kubernetes.io/os";
}

/// Extended resource name the NVIDIA device plugin advertises.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Clique ID given to each rack unless set otherwise: an NVLink domain that
/// is not partitioned reports a single clique.
pub const DEFAULT_CLIQUE_ID: u32 = 32766;

/// A compute-tray SKU of an NVL72-class rack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sku {
    /// Grace Blackwell GB200 (192 GB HBM3e per GPU).
    Gb200,
    /// Grace Blackwell Ultra GB300 (288 GB HBM3e per GPU).
    Gb300,
}

impl Sku {
    /// `nvidia.com/gpu.product` as GFD reports it.
    pub fn gpu_product(self) -> &'static str {
        match self {
            Sku::Gb200 => "NVIDIA-GB200",
            Sku::Gb300 => "NVIDIA-GB300",
        }
    }

    /// `nvidia.com/gpu.memory`: memory per GPU in MiB (192 GiB / 288 GiB).
    pub fn gpu_memory_mib(self) -> u64 {
        match self {
            Sku::Gb200 => 196_608,
            Sku::Gb300 => 294_912,
        }
    }
}

/// One rack: a name, a SKU, and how many trays of how many GPUs it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackSpec {
    /// Rack name as given, e.g. `A`; nodes are named `rack-a-tray-00`, ….
    pub name: String,
    /// Tray SKU, the same for the whole rack.
    pub sku: Sku,
    /// Compute trays (= nodes) in the rack.
    pub trays: u32,
    /// GPUs per tray.
    pub gpus_per_tray: u32,
    /// NVLink domain (cluster) UUID of the rack.
    pub cluster_uuid: String,
    /// Clique ID within the domain.
    pub clique_id: u32,
}

impl RackSpec {
    /// A rack with a cluster UUID derived from its name and the default
    /// clique ID.
    pub fn new(name: &str, sku: Sku, trays: u32, gpus_per_tray: u32) -> Self {
        Self {
            name: name.to_owned(),
            sku,
            trays,
            gpus_per_tray,
            cluster_uuid: uuid_from_name(name),
            clique_id: DEFAULT_CLIQUE_ID,
        }
    }

    /// The `nvidia.com/gpu.clique` value shared by the rack's nodes.
    pub fn clique(&self) -> String {
        format!("{}.{}", self.cluster_uuid, self.clique_id)
    }

    /// Label selector matching exactly this rack's nodes.
    pub fn selector(&self) -> String {
        format!("{}={}", labels::GPU_CLIQUE, self.clique())
    }

    /// Name of tray `tray`'s node, e.g. `rack-a-tray-07`.
    pub fn node_name(&self, tray: u32) -> String {
        format!("rack-{}-tray-{tray:02}", self.name.to_lowercase())
    }

    /// Names of all the rack's nodes, in tray order.
    pub fn node_names(&self) -> Vec<String> {
        (0..self.trays).map(|tray| self.node_name(tray)).collect()
    }

    /// GPUs in the rack.
    pub fn gpus(&self) -> u32 {
        self.trays * self.gpus_per_tray
    }

    /// The Node object of tray `tray` (labels and spec; no status).
    pub fn node(&self, tray: u32) -> Node {
        let name = self.node_name(tray);
        let labels: BTreeMap<String, String> = [
            (labels::GPU_PRESENT, "true".to_owned()),
            (labels::GPU_PRODUCT, self.sku.gpu_product().to_owned()),
            (labels::GPU_COUNT, self.gpus_per_tray.to_string()),
            (labels::GPU_MEMORY, self.sku.gpu_memory_mib().to_string()),
            (labels::GPU_CLIQUE, self.clique()),
            (labels::HOSTNAME, name.clone()),
            (labels::ARCH, "arm64".to_owned()),
            (labels::OS, "linux".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Node {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The status a kubelet with the NVIDIA device plugin would report:
    /// GPU, CPU and memory capacity (all allocatable) and `Ready=True`.
    pub fn node_status_patch(&self) -> serde_json::Value {
        let resources = json!({
            GPU_RESOURCE: self.gpus_per_tray.to_string(),
            "cpu": "144",
            "memory": "960Gi",
            "pods": "110",
        });
        json!({
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "node created by the rackscale test harness",
                }],
            }
        })
    }
}

/// A set of racks, built with [`Topology::rack`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    racks: Vec<RackSpec>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds rack `name` of `trays` trays with `gpus_per_tray` GPUs each.
    pub fn rack(self, name: &str, sku: Sku, trays: u32, gpus_per_tray: u32) -> Self {
        self.with_rack(RackSpec::new(name, sku, trays, gpus_per_tray))
    }

    /// Adds a fully specified rack (e.g. with its own clique ID).
    pub fn with_rack(mut self, rack: RackSpec) -> Self {
        self.racks.push(rack);
        self
    }

    /// The racks, in the order they were added.
    pub fn racks(&self) -> &[RackSpec] {
        &self.racks
    }

    /// The rack called `name`, if any.
    pub fn rack_named(&self, name: &str) -> Option<&RackSpec> {
        self.racks.iter().find(|rack| rack.name == name)
    }

    /// Every rack's Node objects (without status), rack by rack.
    pub fn nodes(&self) -> Vec<Node> {
        self.racks
            .iter()
            .flat_map(|rack| (0..rack.trays).map(|tray| rack.node(tray)))
            .collect()
    }

    /// Creates every Node, then sets its capacity and `Ready` condition
    /// through the `nodes/status` subresource. Returns the final Nodes.
    pub async fn create(&self, client: &kube::Client) -> Result<Vec<Node>> {
        let api = Api::<Node>::all(client.clone());
        let work = self
            .racks
            .iter()
            .flat_map(|rack| (0..rack.trays).map(move |tray| (rack, tray)))
            .map(|(rack, tray)| create_node(&api, rack, tray));
        stream::iter(work).buffered(8).try_collect().await
    }
}

async fn create_node(api: &Api<Node>, rack: &RackSpec, tray: u32) -> Result<Node> {
    let node = rack.node(tray);
    let name = rack.node_name(tray);
    api.create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating node {name}"))?;
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(rack.node_status_patch()),
    )
    .await
    .with_context(|| format!("setting the status of node {name}"))
}

/// A UUID-formatted identifier derived from `name` (FNV-1a, not RFC 4122).
fn uuid_from_name(name: &str) -> String {
    let fnv = |seed: u64| {
        name.bytes().fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        })
    };
    let (hi, lo) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_racks() -> Topology {
        Topology::new()
            .rack("A", Sku::Gb200, 18, 4)
            .rack("B", Sku::Gb300, 2, 4)
    }

    #[test]
    fn nodes_carry_gfd_labels() {
        let topo = two_racks();
        let nodes = topo.nodes();
        assert_eq!(nodes.len(), 20);
        let first = &nodes[0];
        assert_eq!(first.metadata.name.as_deref(), Some("rack-a-tray-00"));
        let labels = first.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[labels::GPU_PRODUCT], "NVIDIA-GB200");
        assert_eq!(labels[labels::GPU_COUNT], "4");
        assert_eq!(labels[labels::GPU_MEMORY], "196608");
        assert_eq!(labels[labels::GPU_PRESENT], "true");
        let last = nodes.last().unwrap();
        assert_eq!(last.metadata.name.as_deref(), Some("rack-b-tray-01"));
        assert_eq!(
            last.metadata.labels.as_ref().unwrap()[labels::GPU_MEMORY],
            "294912"
        );
    }

    #[test]
    fn one_clique_per_rack() {
        let topo = two_racks();
        let (a, b) = (topo.rack_named("A").unwrap(), topo.rack_named("B").unwrap());
        assert_ne!(a.clique(), b.clique());
        for node in topo.nodes() {
            let name = node.metadata.name.unwrap();
            let rack = if name.starts_with("rack-a-") { a } else { b };
            assert_eq!(
                node.metadata.labels.unwrap()[labels::GPU_CLIQUE],
                rack.clique()
            );
        }
    }

    #[test]
    fn clique_is_uuid_dot_id_and_stable() {
        let clique = RackSpec::new("A", Sku::Gb200, 1, 4).clique();
        assert_eq!(clique, RackSpec::new("A", Sku::Gb300, 9, 8).clique());
        let (uuid, id) = clique.rsplit_once('.').unwrap();
        assert_eq!(id, DEFAULT_CLIQUE_ID.to_string());
        let groups: Vec<usize> = uuid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(uuid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn status_patch_reports_gpus() {
        let patch = RackSpec::new("A", Sku::Gb200, 1, 4).node_status_patch();
        assert_eq!(patch["status"]["capacity"][GPU_RESOURCE], "4");
        assert_eq!(patch["status"]["allocatable"][GPU_RESOURCE], "4");
    }
}
