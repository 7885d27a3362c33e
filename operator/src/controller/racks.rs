//! Keeps one `Rack` object per NVLink domain, with status computed from the
//! inventory and the ledger, and the fleet GPU gauges in step with it. Node
//! label problems become a Warning event on the rack (once per change) and
//! stay listed in its status; they never stop reconcile.

use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use serde_json::json;

use super::Context;
use super::reconcile::{FIELD_MANAGER, node_facts};
use crate::crd::{Pool, Rack};
use crate::error::Result;
use crate::inventory::{self, NodeFacts};
use crate::ledger::Ledger;
use crate::telemetry::{GpuCounts, GpuPool, GpuState};

/// Server-side applies every rack and its status.
pub async fn sync_racks(ctx: &Context, inv: &inventory::Inventory, ledger: &Ledger) -> Result<()> {
    let api: Api<Rack> = Api::all(ctx.client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut counts = GpuCounts::default();
    for rack in inv.racks.values() {
        let status = ledger.rack_status(rack);
        let object = json!({
            "apiVersion": "rackscale.io/v1alpha1",
            "kind": "Rack",
            "metadata": {
                "name": rack.name,
                "labels": {
                    "rackscale.io/sku": rack.sku.map(|s| s.as_str()).unwrap_or("unknown"),
                },
            },
            "spec": { "clique": rack.clique },
        });
        let applied = api.patch(&rack.name, &pp, &Patch::Apply(&object)).await?;
        if !rack.warnings.is_empty() && ctx.warnings_changed(&rack.name, &rack.warnings) {
            let event = Event {
                type_: EventType::Warning,
                reason: "InconsistentLabels".into(),
                note: Some(rack.warnings.join("; ").chars().take(1000).collect()),
                action: "Inventory".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &applied.object_ref(&())).await {
                tracing::debug!(error = %e, "could not publish event");
            }
        }
        let body =
            json!({ "apiVersion": "rackscale.io/v1alpha1", "kind": "Rack", "status": status });
        api.patch_status(&rack.name, &pp, &Patch::Apply(&body))
            .await?;

        let unhealthy = u64::from(status.gpus_total - status.gpus_healthy);
        counts.add(
            GpuState::Healthy,
            GpuPool::None,
            u64::from(status.gpus_healthy),
        );
        counts.add(GpuState::Unhealthy, GpuPool::None, unhealthy);
        counts.add(GpuState::Free, GpuPool::None, u64::from(status.gpus_free));
        for a in &status.allocations {
            let pool = match a.pool {
                Pool::Prefill => GpuPool::Prefill,
                Pool::Decode => GpuPool::Decode,
            };
            counts.add(GpuState::Allocated, pool, u64::from(a.gpus));
        }
    }
    ctx.metrics.set_gpus(&counts);
    Ok(())
}

/// Rebuilds the inventory from the node cache and syncs every rack.
pub async fn sync_all(ctx: &Context) -> Result<()> {
    let facts: Vec<NodeFacts> = ctx.nodes.state().iter().map(|n| node_facts(n)).collect();
    let inv = inventory::build(&facts, ctx.health.as_ref());
    let ledger = ctx.ledger.lock().await.clone();
    sync_racks(ctx, &inv, &ledger).await
}
