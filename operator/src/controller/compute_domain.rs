//! IMEX channels for workers that span trays: one NVIDIA DRA driver
//! `ComputeDomain` (`resource.nvidia.com/v1beta1`) per such worker, created
//! only when that CRD is installed, removed with the deployment.

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Context;
use super::reconcile::FIELD_MANAGER;
use crate::crd::ModelDeployment;
use crate::error::Result;
use crate::ledger::LedgerEntry;

pub const CRD_NAME: &str = "computedomains.resource.nvidia.com";
const LABEL_DEPLOYMENT: &str = "rackscale.io/deployment";

fn api(ctx: &Context, ns: &str) -> (Api<DynamicObject>, ApiResource) {
    let gvk = GroupVersionKind::gvk("resource.nvidia.com", "v1beta1", "ComputeDomain");
    let ar = ApiResource::from_gvk(&gvk);
    (Api::namespaced_with(ctx.client.clone(), ns, &ar), ar)
}

/// Name of the ComputeDomain of one worker.
pub fn name(md: &str, worker: &str) -> String {
    format!("{md}-{worker}")
}

/// Ensures a ComputeDomain for each worker on more than one tray.
pub async fn ensure(ctx: &Context, md: &ModelDeployment, entries: &[LedgerEntry]) -> Result<()> {
    let ns = md.namespace().unwrap_or_default();
    let (api, _) = api(ctx, &ns);
    let owner = md.controller_owner_ref(&());
    for e in entries.iter().filter(|e| e.placement.len() > 1) {
        let cd_name = name(&md.name_any(), &e.worker);
        let obj = json!({
            "apiVersion": "resource.nvidia.com/v1beta1",
            "kind": "ComputeDomain",
            "metadata": {
                "name": cd_name,
                "labels": { LABEL_DEPLOYMENT: md.name_any(), "rackscale.io/worker": e.worker },
                "ownerReferences": owner.iter().collect::<Vec<_>>(),
            },
            "spec": {
                "numNodes": e.placement.len(),
                "channel": { "resourceClaimTemplate": { "name": format!("{cd_name}-channel") } },
            },
        });
        api.patch(
            &cd_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await?;
    }
    Ok(())
}

/// Deletes every ComputeDomain of a deployment.
pub async fn remove_all(ctx: &Context, md: &ModelDeployment) -> Result<()> {
    let ns = md.namespace().unwrap_or_default();
    let (api, _) = api(ctx, &ns);
    let lp = ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={}", md.name_any()));
    api.delete_collection(&DeleteParams::default(), &lp).await?;
    Ok(())
}
