//! One reconcile of one `ModelDeployment` on Kubernetes: the shared core
//! ([`crate::pipeline`]: plan, place under the ledger lock, launch, status)
//! between the Kubernetes edges (finalizer, `Rack` labels, ComputeDomains,
//! status patch, events, rack refresh). Cleanup (finalizer) releases every
//! GPU.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::{Context, compute_domain, racks};
use crate::crd::{ModelDeployment, ModelDeploymentStatus, Rack};
use crate::error::{Error, Result};
use crate::inventory::NodeFacts;
use crate::pipeline::{self, Decision, Note};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "rackscale-operator";
/// Finalizer that releases a deployment's GPUs before it disappears.
pub const FINALIZER: &str = "rackscale.io/release-gpus";

/// The inventory's view of a Kubernetes node.
pub fn node_facts(node: &Node) -> NodeFacts {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True");
    NodeFacts {
        name: node.name_any(),
        labels: node.labels().clone(),
        annotations: node.annotations().clone(),
        ready,
    }
}

fn key_of(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

/// Entry point for the controller: metrics around the finalizer pipeline.
#[instrument(skip(md, ctx), fields(deployment = %key_of(&md)))]
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let timer = ctx.metrics.reconcile_timer();
    let ns = md.namespace().unwrap_or_default();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of(&md);
    let result = finalizer(&api, FINALIZER, md, |event| async {
        match event {
            finalizer::Event::Apply(md) => apply(md, &ctx).await,
            finalizer::Event::Cleanup(md) => cleanup(md, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    match &result {
        Ok(_) => {
            ctx.note_success(&key);
            timer.success();
        }
        Err(e) => timer.error(e.category()),
    }
    result
}

async fn publish(
    ctx: &Context,
    md: &ModelDeployment,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}

async fn write_status(
    ctx: &Context,
    md: &ModelDeployment,
    status: &ModelDeploymentStatus,
) -> Result<()> {
    let api: Api<ModelDeployment> =
        Api::namespaced(ctx.client.clone(), &md.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "rackscale.io/v1alpha1",
        "kind": "ModelDeployment",
        "status": status,
    });
    api.patch_status(
        &md.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn publish_note(ctx: &Context, md: &ModelDeployment, note: Note) {
    let type_ = if note.warning {
        EventType::Warning
    } else {
        EventType::Normal
    };
    publish(ctx, md, type_, note.reason, note.message).await;
}

/// The shared core ([`pipeline`]) with the Kubernetes edges around it:
/// nodes from the reflector, rack labels from `Rack` objects, IMEX
/// channels before launch, status and events written to the API server.
async fn apply(md: Arc<ModelDeployment>, ctx: &Context) -> Result<Action> {
    let key = key_of(&md);
    let status = md.status.clone().unwrap_or_default();
    let input = pipeline::Input {
        key: &key,
        generation: md.metadata.generation,
        spec: &md.spec,
        status: &status,
    };
    let facts: Vec<NodeFacts> = ctx.nodes.state().iter().map(|n| node_facts(n)).collect();
    let labelled: BTreeMap<String, BTreeMap<String, String>> =
        if md.spec.hardware.rack_selector.is_empty() {
            BTreeMap::new()
        } else {
            Api::<Rack>::all(ctx.client.clone())
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .map(|r| (r.name_any(), r.labels().clone()))
                .collect()
        };
    let placed = match pipeline::decide(ctx.core(), &input, facts, &labelled).await? {
        Decision::Placed(placed) => *placed,
        Decision::Failed { status, error } => {
            write_status(ctx, &md, &status).await?;
            publish(
                ctx,
                &md,
                EventType::Warning,
                error.reason(),
                error.to_string(),
            )
            .await;
            return Err(error);
        }
    };
    // IMEX channels for workers spanning trays, then the agents.
    if ctx.compute_domains {
        compute_domain::ensure(ctx, &md, &placed.entries).await?;
    }
    let applied = pipeline::launch(ctx.core(), &input, placed).await;
    write_status(ctx, &md, &applied.status).await?;
    for note in applied.notes {
        publish_note(ctx, &md, note).await;
    }
    racks::sync_all(ctx).await?;
    Ok(Action::requeue(applied.requeue))
}

async fn cleanup(md: Arc<ModelDeployment>, ctx: &Context) -> Result<Action> {
    let key = key_of(&md);
    if ctx.compute_domains {
        compute_domain::remove_all(ctx, &md).await?;
    }
    pipeline::release(ctx.core(), &key).await;
    racks::sync_all(ctx).await?;
    publish(
        ctx,
        &md,
        EventType::Normal,
        "Released",
        format!("released every GPU of {key}"),
    )
    .await;
    Ok(Action::await_change())
}
