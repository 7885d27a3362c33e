//! `Rack`: one NVLink domain (GB200/GB300 NVL72: 18 trays x 4 GPUs), as the
//! operator's inventory sees it. The operator creates one per
//! `nvidia.com/gpu.clique` value and keeps its status current; users read it
//! with `kubectl get racks`.

// kube's derive repeats `printcolumn`/`x_kube` attributes by design.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One NVLink domain.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rackscale.io",
    version = "v1alpha1",
    kind = "Rack",
    plural = "racks",
    singular = "rack",
    category = "rackscale",
    status = "RackStatus",
    doc = "One NVLink domain (rack) and how its GPUs are used.",
    printcolumn(name = "SKU", type_ = "string", json_path = ".status.sku"),
    printcolumn(name = "TRAYS", type_ = "integer", json_path = ".status.trays"),
    printcolumn(name = "GPUS", type_ = "integer", json_path = ".status.gpusTotal"),
    printcolumn(name = "HEALTHY", type_ = "integer", json_path = ".status.gpusHealthy"),
    printcolumn(
        name = "ALLOCATED",
        type_ = "integer",
        json_path = ".status.gpusAllocated"
    ),
    printcolumn(name = "FREE", type_ = "integer", json_path = ".status.gpusFree"),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RackSpec {
    /// The `nvidia.com/gpu.clique` value of the domain's nodes
    /// (`<clusterUUID>.<cliqueId>`).
    pub clique: String,
}

/// What the rack has and who uses it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RackStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    pub trays: u32,
    pub gpus_total: u32,
    pub gpus_healthy: u32,
    pub gpus_allocated: u32,
    pub gpus_free: u32,
    /// Nodes (compute trays) of the domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// GPUs held per deployment and pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<RackAllocation>,
    /// Label problems found on the rack's nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RackAllocation {
    /// `namespace/name` of the ModelDeployment.
    pub deployment: String,
    pub pool: super::Pool,
    pub gpus: u32,
}
