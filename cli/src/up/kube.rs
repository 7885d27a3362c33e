//! `rackscale up --kube`: the same local rack through Kubernetes. etcd and
//! kube-apiserver on loopback (the test harness's [`harness::Cluster`]),
//! the CRDs, one GFD-labelled Node per tray, the operator in Kubernetes mode
//! (`rackscale-operator run`), and the spec files applied as
//! ModelDeployment objects, so `kubectl get md,racks` works. Deployments are
//! read back from the API server in the same shape as the standalone
//! operator's `/status`, so progress, frontends, bench and summary are the
//! same code in both modes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use harness::process::{ManagedProcess, free_port};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};

use super::rack::{Bins, LocalRack};

fn resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "rackscale.io",
        "v1alpha1",
        "ModelDeployment",
    ))
}

/// Starts kube-apiserver (with its etcd), installs the CRDs from `crds` and
/// creates one Node per tray of `topology`.
pub async fn start_cluster(
    rack: &mut LocalRack,
    topology: &harness::Topology,
    crds: &Path,
) -> Result<usize> {
    let cluster = harness::Cluster::start().await?;
    let n = harness::install_crds(&cluster.client(), crds).await?;
    topology.create(&cluster.client()).await?;
    rack.cluster = Some(cluster);
    Ok(n)
}

/// The operator in Kubernetes mode, metrics on a free port.
pub fn start_operator(
    rack: &mut LocalRack,
    bins: &Bins,
    time_scale: u32,
    logs: &Path,
) -> Result<()> {
    let cluster = rack
        .cluster
        .as_ref()
        .context("kube-apiserver is not running")?;
    let port = free_port()?;
    let mut args = harness::fleet::operator_args(
        cluster.kubeconfig_path(),
        &rack.etcd_endpoint()?,
        port,
        &rack.transport.operator,
    );
    args.push(format!("--time-scale={time_scale}"));
    rack.operator = Some(ManagedProcess::spawn(
        "rackscale-operator",
        &bins.operator,
        &args,
        logs,
    )?);
    rack.status_port = port;
    Ok(())
}

/// Applies every ModelDeployment of `specs` (a file or directory), checked
/// by the API server against the CRD's schema and CEL rules.
pub async fn apply_specs(rack: &LocalRack, specs: &Path) -> Result<Vec<(String, String)>> {
    let cluster = rack
        .cluster
        .as_ref()
        .context("kube-apiserver is not running")?;
    let files: Vec<std::path::PathBuf> = if specs.is_dir() {
        let mut f: Vec<_> = std::fs::read_dir(specs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        f.sort();
        f
    } else {
        vec![specs.to_path_buf()]
    };
    let ar = resource();
    let mut applied = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_json::from_value(value)
                .with_context(|| format!("{}: not a Kubernetes object", file.display()))?;
            let name = obj
                .metadata
                .name
                .clone()
                .context("a spec without metadata.name")?;
            let ns = obj
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            Api::<DynamicObject>::namespaced_with(cluster.client(), &ns, &ar)
                .patch(
                    &name,
                    &PatchParams::apply("rackscale-up").force(),
                    &Patch::Apply(&obj),
                )
                .await
                .with_context(|| format!("applying {}", file.display()))?;
            applied.push((ns, name));
        }
    }
    Ok(applied)
}

/// Every ModelDeployment as the standalone operator's `/status` shows it.
pub async fn board(rack: &LocalRack) -> Result<Value> {
    let cluster = rack
        .cluster
        .as_ref()
        .context("kube-apiserver is not running")?;
    let list = Api::<DynamicObject>::all_with(cluster.client(), &resource())
        .list(&Default::default())
        .await?;
    let deployments: Vec<Value> = list
        .items
        .iter()
        .map(|o| {
            json!({
                "namespace": o.metadata.namespace.clone().unwrap_or_default(),
                "name": o.metadata.name.clone().unwrap_or_default(),
                "generation": o.metadata.generation,
                "spec": o.data["spec"],
                "status": o.data["status"],
            })
        })
        .collect();
    let ready =
        !deployments.is_empty() && deployments.iter().all(|d| d["status"]["phase"] == "Ready");
    Ok(json!({"ready": ready, "deployments": deployments}))
}

/// Deletes every ModelDeployment and waits until the operator released
/// them (its finalizer stops every rank).
pub async fn delete_all(rack: &LocalRack) -> Result<usize> {
    let cluster = rack
        .cluster
        .as_ref()
        .context("kube-apiserver is not running")?;
    let ar = resource();
    let all = Api::<DynamicObject>::all_with(cluster.client(), &ar)
        .list(&Default::default())
        .await?;
    for o in &all.items {
        let ns = o.metadata.namespace.clone().unwrap_or_default();
        let name = o.metadata.name.clone().unwrap_or_default();
        Api::<DynamicObject>::namespaced_with(cluster.client(), &ns, &ar)
            .delete(&name, &Default::default())
            .await?;
    }
    let client = cluster.client();
    harness::wait_until("every deployment released", Duration::from_secs(60), || {
        let (client, ar) = (client.clone(), ar.clone());
        async move {
            let left = Api::<DynamicObject>::all_with(client, &ar)
                .list(&Default::default())
                .await?;
            Ok(left.items.is_empty())
        }
    })
    .await?;
    Ok(all.items.len())
}

/// Where kubectl is and how to point it at the cluster.
pub fn kubectl_hint(rack: &LocalRack) -> Option<String> {
    let cluster = rack.cluster.as_ref()?;
    let kubectl = harness::bins::binary(harness::bins::KUBECTL)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "kubectl".into());
    Some(format!(
        "KUBECONFIG={} {kubectl} get md,racks",
        cluster.kubeconfig_path().display()
    ))
}

/// `kubectl get md,racks -A`, as text.
pub async fn get_md_racks(rack: &LocalRack) -> Result<String> {
    let cluster = rack
        .cluster
        .as_ref()
        .context("kube-apiserver is not running")?;
    let out = cluster
        .apiserver()
        .kubectl()?
        .args(["get", "md,racks", "-A"])
        .output()
        .await?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}
