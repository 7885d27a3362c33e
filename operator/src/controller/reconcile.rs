//! One reconcile of one `ModelDeployment`: plan (when the spec changed),
//! place under the ledger lock, apply (ComputeDomains, agents), write status
//! and events, refresh the racks. Cleanup (finalizer) releases every GPU.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::{Context, compute_domain, racks};
use crate::agent::{WorkerLaunch, WorkerReport};
use crate::conditions::{self, DEGRADED, PLACED, PLANNED, READY};
use crate::crd::{
    ModelDeployment, ModelDeploymentStatus, NodeGpus, Phase, Pool, Rack, RecipeStatus, WorkerState,
    WorkerStatus,
};
use crate::error::{Error, Result};
use crate::inventory::{self, NodeFacts};
use crate::ledger::LedgerEntry;
use crate::placement::{self, DeploymentRequest, WorkerRequest};
use crate::planner::{self, WorkerPlan};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "rackscale-operator";
/// Finalizer that releases a deployment's GPUs before it disappears.
pub const FINALIZER: &str = "rackscale.io/release-gpus";
/// Periodic re-check even without events.
const RESYNC: Duration = Duration::from_secs(300);
/// Re-check while workers are launching or draining.
const SETTLING: Duration = Duration::from_secs(2);

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

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
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

/// The workers a recipe in status stands for (when the spec is unchanged).
fn workers_of(recipe: &RecipeStatus) -> Vec<WorkerPlan> {
    let decode_gpus = recipe.decode_ep.or(recipe.decode_tp).unwrap_or(1);
    (0..recipe.prefill_workers)
        .map(|i| WorkerPlan {
            name: format!("prefill-{i}"),
            role: Pool::Prefill,
            gpus: recipe.prefill_tp,
        })
        .chain((0..recipe.decode_workers).map(|i| WorkerPlan {
            name: format!("decode-{i}"),
            role: Pool::Decode,
            gpus: decode_gpus,
        }))
        .collect()
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

/// Records a failure in status and an event, then hands the error to the
/// error policy (transient: retry with backoff; permanent: wait for a change).
async fn fail(
    ctx: &Context,
    md: &ModelDeployment,
    mut status: ModelDeploymentStatus,
    condition: &str,
    error: Error,
) -> Result<Action> {
    let now = now();
    let generation = md.metadata.generation;
    conditions::set(
        &mut status.conditions,
        condition,
        false,
        error.reason(),
        error.to_string(),
        generation,
        &now,
    );
    conditions::set(
        &mut status.conditions,
        READY,
        false,
        error.reason(),
        "not placed",
        generation,
        &now,
    );
    status.phase = Some(if error.is_transient() {
        Phase::Pending
    } else {
        Phase::Failed
    });
    status.observed_generation = generation;
    write_status(ctx, md, &status).await?;
    publish(
        ctx,
        md,
        EventType::Warning,
        error.reason(),
        error.to_string(),
    )
    .await;
    Err(error)
}

async fn apply(md: Arc<ModelDeployment>, ctx: &Context) -> Result<Action> {
    let key = key_of(&md);
    let generation = md.metadata.generation;
    let mut status = md.status.clone().unwrap_or_default();
    let spec = &md.spec;

    // Plan: only when the spec changed or nothing is planned yet.
    let replan = status.observed_generation != generation
        || status.recipe.is_none()
        || !conditions::is_true(&status.conditions, PLANNED);
    let recorded = if replan { None } else { status.recipe.clone() };
    let (recipe, workers, note) = match recorded {
        Some(recipe) => {
            let workers = workers_of(&recipe);
            (recipe, workers, None)
        }
        None => {
            let spec_owned = spec.clone();
            let planned = tokio::task::spawn_blocking(move || planner::plan(&spec_owned))
                .await
                .map_err(|e| Error::Invalid(format!("planner task failed: {e}")))?;
            match planned {
                Ok(p) => (p.recipe, p.workers, p.note),
                Err(e) => return fail(ctx, &md, status, PLANNED, e).await,
            }
        }
    };
    let now = now();
    let mut planned_msg = format!(
        "{} + {} on {} GPUs",
        recipe.prefill, recipe.decode, recipe.gpus
    );
    if let Some(p) = &recipe.predicted {
        planned_msg.push_str(&format!(
            ", predicted {} tok/s/GPU at {} tok/s/user",
            p.tok_s_per_gpu, p.tok_s_per_user
        ));
    }
    if let Some(n) = &note {
        planned_msg.push_str(&format!("; {n}"));
    }
    let newly_planned = replan;
    conditions::set(
        &mut status.conditions,
        PLANNED,
        true,
        "RecipeChosen",
        planned_msg.clone(),
        generation,
        &now,
    );
    status.recipe = Some(recipe.clone());

    // Inventory: racks of the right SKU that the selector admits.
    // A node whose agent is gone (its lease expired) can run nothing: it
    // counts as not ready, so workers there are re-placed in the rack.
    let live = ctx.agents.live_nodes().await;
    let facts: Vec<NodeFacts> = ctx
        .nodes
        .state()
        .iter()
        .map(|n| {
            let mut f = node_facts(n);
            if live.as_ref().is_some_and(|l| !l.contains(&f.name)) {
                f.ready = false;
            }
            f
        })
        .collect();
    let inv = inventory::build(&facts, ctx.health.as_ref());
    let selector = &spec.hardware.rack_selector;
    let labelled: BTreeMap<String, BTreeMap<String, String>> = if selector.is_empty() {
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
    let allowed: BTreeSet<String> = inv
        .racks
        .values()
        .filter(|r| r.sku == Some(spec.hardware.sku))
        .filter(|r| {
            selector.is_empty()
                || labelled
                    .get(&r.name)
                    .is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .map(|r| r.name.clone())
        .collect();
    if allowed.is_empty() {
        let e = Error::Placement(format!(
            "no Rack of SKU {}{} is known; racks come from nodes labelled nvidia.com/gpu.clique",
            spec.hardware.sku.as_str(),
            if selector.is_empty() {
                String::new()
            } else {
                format!(" matching {selector:?}")
            }
        ));
        return fail(ctx, &md, status, PLACED, e).await;
    }

    // Place under the ledger lock: no other reconcile can take these GPUs.
    let racks_inv: Vec<placement::RackInventory> = inv
        .racks
        .values()
        .map(|r| placement::RackInventory {
            name: r.name.clone(),
            trays: r
                .trays
                .iter()
                .map(|t| placement::TrayInventory {
                    node: t.node.clone(),
                    gpus: t.gpus,
                    unhealthy: t.unhealthy.clone(),
                })
                .collect(),
        })
        .collect();
    let roles: BTreeMap<String, Pool> = workers.iter().map(|w| (w.name.clone(), w.role)).collect();
    let request = DeploymentRequest {
        deployment: key.clone(),
        workers: workers
            .iter()
            .map(|w| WorkerRequest {
                worker: w.name.clone(),
                role: match w.role {
                    Pool::Prefill => placement::Role::Prefill,
                    Pool::Decode => placement::Role::Decode,
                },
                gpus: w.gpus,
            })
            .collect(),
        rack_filter: Some(allowed),
    };
    let (entries, moved) = {
        let mut ledger = ctx.ledger.lock().await;
        let allocations: Vec<placement::Allocation> = ledger
            .entries()
            .map(|e| placement::Allocation {
                owner: placement::WorkerId {
                    deployment: e.deployment.clone(),
                    worker: e.worker.clone(),
                },
                rack: e.rack.clone(),
                gpus: e
                    .placement
                    .iter()
                    .flat_map(|n| {
                        n.gpus.iter().map(|&i| placement::GpuRef {
                            node: n.node.clone(),
                            index: i,
                        })
                    })
                    .collect(),
            })
            .collect();
        let placed = {
            let _t = ctx.metrics.placement_timer();
            placement::place(&racks_inv, &allocations, &request)
        };
        let plan = match placed {
            Ok(plan) => plan,
            Err(e) => {
                drop(ledger);
                return fail(ctx, &md, status, PLACED, Error::Placement(e.to_string())).await;
            }
        };
        let entries: Vec<LedgerEntry> = plan
            .assignments
            .iter()
            .map(|a| LedgerEntry {
                deployment: key.clone(),
                worker: a.owner.worker.clone(),
                role: roles.get(&a.owner.worker).copied().unwrap_or(Pool::Decode),
                rack: a.rack.clone(),
                placement: group_by_node(&a.gpus),
            })
            .collect();
        ledger
            .replace_deployment(&key, entries.clone())
            .map_err(Error::Placement)?;
        let moved: Vec<String> = plan
            .moved
            .iter()
            .map(|(w, why)| format!("{w}: {why}"))
            .collect();
        (entries, moved)
    };

    // Apply: IMEX channels for workers spanning trays, then the agents.
    if ctx.compute_domains {
        compute_domain::ensure(ctx, &md, &entries).await?;
    }
    let launches: Vec<WorkerLaunch> = entries
        .iter()
        .map(|e| {
            let (tp, ep) = match e.role {
                Pool::Prefill => (recipe.prefill_tp, 1),
                Pool::Decode => (recipe.decode_tp.unwrap_or(1), recipe.decode_ep.unwrap_or(1)),
            };
            WorkerLaunch {
                deployment: key.clone(),
                worker: e.worker.clone(),
                role: e.role,
                tp,
                ep,
                model: spec.model.profile.as_str().to_string(),
                backend: match spec.engine.backend {
                    crate::crd::Backend::Sim => "sim".to_string(),
                    crate::crd::Backend::Cpu => "cpu".to_string(),
                },
                generation: generation.unwrap_or_default().max(0) as u64,
                placement: e.placement.clone(),
            }
        })
        .collect();
    let reports = ctx.agents.ensure(&launches).await;

    // Status.
    let was_placed = conditions::is_true(&status.conditions, PLACED);
    // A deployment that served this generation and lost a worker is
    // Degraded (not merely Placed) until the worker is back.
    let was_serving = status.observed_generation == generation
        && matches!(status.phase, Some(Phase::Ready | Phase::Degraded));
    let was_running: BTreeSet<String> = status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Running)
        .map(|w| w.name.clone())
        .collect();
    status.workers = entries
        .iter()
        .zip(
            reports
                .into_iter()
                .chain(std::iter::repeat(WorkerReport::new(WorkerState::Placed))),
        )
        .map(|(e, report)| WorkerStatus {
            name: e.worker.clone(),
            role: e.role,
            rack: e.rack.clone(),
            placement: e.placement.clone(),
            state: report.state,
            message: report.message,
        })
        .collect();
    let down: Vec<String> = status
        .workers
        .iter()
        .filter(|w| was_running.contains(&w.name) && w.state != WorkerState::Running)
        .map(|w| match &w.message {
            Some(m) => format!("{}: {m}", w.name),
            None => format!("{}: {:?}", w.name, w.state),
        })
        .collect();
    let running = status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Running)
        .count();
    let failed = status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Failed)
        .count();
    let total = status.workers.len();
    let racks_used: BTreeSet<&str> = status.workers.iter().map(|w| w.rack.as_str()).collect();
    let placed_msg = format!(
        "{total} workers on {} GPUs in rack {}",
        recipe.gpus,
        racks_used.iter().copied().collect::<Vec<_>>().join(", ")
    );
    conditions::set(
        &mut status.conditions,
        PLACED,
        true,
        "Placed",
        placed_msg.clone(),
        generation,
        &now,
    );
    let ready = total > 0 && running == total;
    conditions::set(
        &mut status.conditions,
        READY,
        ready,
        if ready {
            "AllWorkersRunning"
        } else {
            "WorkersNotRunning"
        },
        format!("{running}/{total} workers running"),
        generation,
        &now,
    );
    let recovering = was_serving && !ready;
    let degraded = failed > 0 || !moved.is_empty() || recovering;
    let failing: Vec<String> = status
        .workers
        .iter()
        .filter(|w| w.state != WorkerState::Running)
        .filter_map(|w| w.message.as_ref().map(|m| format!("{}: {m}", w.name)))
        .collect();
    conditions::set(
        &mut status.conditions,
        DEGRADED,
        degraded,
        if failed > 0 {
            "WorkersFailed"
        } else if !moved.is_empty() {
            "WorkersMoved"
        } else if recovering {
            "WorkersRecovering"
        } else {
            "Healthy"
        },
        if !moved.is_empty() {
            moved.join("; ")
        } else if degraded {
            format!(
                "{}/{total} workers running; {}",
                running,
                failing.join("; ")
            )
        } else {
            format!("{running}/{total} workers running")
        },
        generation,
        &now,
    );
    status.phase = Some(if degraded {
        Phase::Degraded
    } else if ready {
        Phase::Ready
    } else {
        Phase::Placed
    });
    status.ready = Some(format!("{running}/{total}"));
    status.observed_generation = generation;
    write_status(ctx, &md, &status).await?;

    if newly_planned {
        publish(ctx, &md, EventType::Normal, "RecipeChosen", planned_msg).await;
    }
    if !was_placed {
        publish(ctx, &md, EventType::Normal, "Placed", placed_msg).await;
    }
    if !down.is_empty() {
        publish(ctx, &md, EventType::Warning, "WorkersDown", down.join("; ")).await;
    }
    let previously_degraded = md.status.as_ref().and_then(|s| s.phase) == Some(Phase::Degraded);
    if ready && !degraded && previously_degraded {
        publish(
            ctx,
            &md,
            EventType::Normal,
            "Recovered",
            format!("{running}/{total} workers running again"),
        )
        .await;
    }
    if !moved.is_empty() {
        publish(
            ctx,
            &md,
            EventType::Warning,
            "WorkersMoved",
            moved.join("; "),
        )
        .await;
    }
    racks::sync_all(ctx).await?;
    // Workers still starting are checked again soon, so Ready follows them.
    let settling = status
        .workers
        .iter()
        .any(|w| !matches!(w.state, WorkerState::Running | WorkerState::Placed));
    Ok(Action::requeue(if settling { SETTLING } else { RESYNC }))
}

/// GPUs grouped per node, nodes in first-seen order, indices sorted.
fn group_by_node(gpus: &[placement::GpuRef]) -> Vec<NodeGpus> {
    let mut out: Vec<NodeGpus> = Vec::new();
    for g in gpus {
        match out.iter_mut().find(|n| n.node == g.node) {
            Some(n) => n.gpus.push(g.index),
            None => out.push(NodeGpus {
                node: g.node.clone(),
                gpus: vec![g.index],
            }),
        }
    }
    for n in &mut out {
        n.gpus.sort_unstable();
    }
    out
}

async fn cleanup(md: Arc<ModelDeployment>, ctx: &Context) -> Result<Action> {
    let key = key_of(&md);
    ctx.agents.release(&key).await;
    if ctx.compute_domains {
        compute_domain::remove_all(ctx, &md).await?;
    }
    ctx.ledger.lock().await.release(&key);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_group_per_node_in_rank_order() {
        let g = |n: &str, i| placement::GpuRef {
            node: n.into(),
            index: i,
        };
        let grouped = group_by_node(&[g("b", 2), g("a", 1), g("b", 0), g("a", 0)]);
        assert_eq!(grouped.len(), 2);
        assert_eq!(
            (grouped[0].node.as_str(), grouped[0].gpus.clone()),
            ("b", vec![0, 2])
        );
        assert_eq!(grouped[1].gpus, vec![0, 1]);
    }

    #[test]
    fn workers_follow_the_recorded_recipe() {
        let r = RecipeStatus {
            prefill: "2xTP4".into(),
            decode: "1xDEP16".into(),
            prefill_workers: 2,
            prefill_tp: 4,
            decode_workers: 1,
            decode_ep: Some(16),
            decode_tp: None,
            concurrency: 512,
            gpus: 24,
            source: "planner".into(),
            predicted: None,
        };
        let w = workers_of(&r);
        assert_eq!(w.len(), 3);
        assert_eq!(w.iter().map(|w| w.gpus).sum::<u32>(), 24);
        assert_eq!(w[2].name, "decode-0");
    }
}
