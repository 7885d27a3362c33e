//! The reconcile core both operator modes run for one `ModelDeployment`:
//! plan (when the spec changed) -> inventory -> place under the ledger lock
//! -> launch through the agents -> status -> rebalance (when enabled). Kubernetes mode
//! (`controller::reconcile`) wraps it in a finalizer, writes the status to
//! the API server and publishes [`Note`]s as events; standalone mode
//! (`standalone`) reads specs from files, prints the notes and serves the
//! statuses. Neither repeats any of this logic.
//!
//! Invariants: a deployment's GPUs are taken only while holding the ledger
//! lock, so concurrent reconciles never share a GPU; a node without a live
//! agent offers no GPU, so its workers are re-placed in the rack; a status
//! always names the generation it describes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::agent::{AgentControl, WorkerLaunch, WorkerReport};
use crate::conditions::{self, DEGRADED, PLACED, PLANNED, READY, REBALANCING};
use crate::crd::{
    Backend, ModelDeploymentSpec, ModelDeploymentStatus, NodeGpus, Phase, Pool, RebalanceStatus,
    RecipeStatus, WorkerState, WorkerStatus,
};
use crate::error::{Error, Result};
use crate::inventory::{self, GpuHealth, NodeFacts};
use crate::ledger::{Ledger, LedgerEntry};
use crate::placement::{self, DeploymentRequest, WorkerRequest};
use crate::planner::{self, WorkerPlan};
use crate::rebalancing::Rebalancing;
use crate::telemetry::Metrics;

/// Periodic re-check even without events.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Re-check while workers are launching or draining.
pub const SETTLING: Duration = Duration::from_secs(2);

/// What the core works with, shared by every reconcile of one operator.
#[derive(Clone, Copy)]
pub struct Core<'a> {
    pub ledger: &'a Mutex<Ledger>,
    pub agents: &'a dyn AgentControl,
    pub health: &'a dyn GpuHealth,
    pub metrics: &'a Metrics,
    /// The live rebalancer, where engines can be reached (registry mode).
    pub rebalancing: Option<&'a Rebalancing>,
}

impl std::fmt::Debug for Core<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

/// One deployment as the core sees it: identity, spec and last status.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    /// Spec generation (`metadata.generation`).
    pub generation: Option<i64>,
    pub spec: &'a ModelDeploymentSpec,
    /// The status as last written (default when none).
    pub status: &'a ModelDeploymentStatus,
}

/// Something worth telling a person: a Kubernetes event or a printed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    /// CamelCase reason, e.g. `RecipeChosen`.
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    fn normal(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason,
            message: message.into(),
        }
    }

    fn warning(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason,
            message: message.into(),
        }
    }
}

/// A deployment planned and placed, not yet launched.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Status with the recipe and `Planned` set.
    pub status: ModelDeploymentStatus,
    pub recipe: RecipeStatus,
    /// One ledger entry per worker, in plan order.
    pub entries: Vec<LedgerEntry>,
    /// Workers moved off trays that went away, with why.
    pub moved: Vec<String>,
    /// The `RecipeChosen` note when the recipe was (re)planned this time.
    pub planned: Option<Note>,
    /// Workers the rebalancer is draining or relaunching in the other role:
    /// while they are not running the deployment is not Degraded.
    pub switching: BTreeSet<String>,
}

/// What [`decide`] concluded.
#[derive(Debug)]
pub enum Decision {
    Placed(Box<Placed>),
    /// Planning or placement failed: `status` records why (write it), and
    /// `error` says whether to retry (transient) or wait for a change.
    Failed {
        status: Box<ModelDeploymentStatus>,
        error: Error,
    },
}

/// What [`launch`] observed.
#[derive(Debug, Clone)]
pub struct Applied {
    pub status: ModelDeploymentStatus,
    pub notes: Vec<Note>,
    /// When to look again (soon while workers are still starting).
    pub requeue: Duration,
}

/// RFC 3339 seconds, as conditions carry.
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The workers of a deployment whose spec is unchanged: the rebalancer's
/// pools once it has moved a worker, else the recipe's.
pub fn workers_for(recipe: &RecipeStatus, rebalance: Option<&RebalanceStatus>) -> Vec<WorkerPlan> {
    let Some(r) = rebalance.filter(|r| !(r.prefill.is_empty() && r.decode.is_empty())) else {
        return workers_of(recipe);
    };
    let decode_gpus = recipe.decode_ep.or(recipe.decode_tp).unwrap_or(1);
    r.prefill
        .iter()
        .map(|name| WorkerPlan {
            name: name.clone(),
            role: Pool::Prefill,
            gpus: recipe.prefill_tp,
        })
        .chain(r.decode.iter().map(|name| WorkerPlan {
            name: name.clone(),
            role: Pool::Decode,
            gpus: decode_gpus,
        }))
        .collect()
}

/// The workers a recipe in status stands for (when the spec is unchanged).
pub fn workers_of(recipe: &RecipeStatus) -> Vec<WorkerPlan> {
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

/// `status` after `error` in step `condition`: the condition and Ready are
/// false with the error's reason, the phase Failed (permanent), Planned (a
/// recipe chosen but not placeable yet) or Pending (any other transient error).
pub fn failed_status(
    mut status: ModelDeploymentStatus,
    generation: Option<i64>,
    condition: &str,
    error: &Error,
) -> ModelDeploymentStatus {
    let now = now();
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
    status.phase = Some(if !error.is_transient() {
        Phase::Failed
    } else if condition == PLACED && status.recipe.is_some() {
        // The recipe is chosen; the GPUs for it are not there yet.
        Phase::Planned
    } else {
        Phase::Pending
    });
    status.observed_generation = generation;
    status
}

fn failed(
    input: &Input<'_>,
    status: ModelDeploymentStatus,
    condition: &str,
    error: Error,
) -> Decision {
    Decision::Failed {
        status: Box::new(failed_status(status, input.generation, condition, &error)),
        error,
    }
}

/// Plans (when the spec changed or nothing is planned) and places the
/// deployment on the racks of `nodes` its SKU and selector admit.
/// `rack_labels` are the labels of each rack (only read when the spec has
/// a rack selector). `Err` only for failures that leave status untouched.
pub async fn decide(
    core: Core<'_>,
    input: &Input<'_>,
    nodes: Vec<NodeFacts>,
    rack_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<Decision> {
    let key = input.key;
    let generation = input.generation;
    let spec = input.spec;
    let mut status = input.status.clone();

    // Plan: only when the spec changed or nothing is planned yet.
    let replan = status.observed_generation != generation
        || status.recipe.is_none()
        || !conditions::is_true(&status.conditions, PLANNED);
    let recorded = if replan { None } else { status.recipe.clone() };
    if replan {
        // A new recipe starts from its own pools; a move under way is
        // abandoned (every worker relaunches for the new generation).
        status.rebalance = None;
        status.conditions.retain(|c| c.type_ != REBALANCING);
    }
    let (recipe, workers, note) = match recorded {
        Some(recipe) => {
            let workers = workers_for(&recipe, status.rebalance.as_ref());
            (recipe, workers, None)
        }
        None => {
            let spec_owned = spec.clone();
            let planned = tokio::task::spawn_blocking(move || planner::plan(&spec_owned))
                .await
                .map_err(|e| Error::Invalid(format!("planner task failed: {e}")))?;
            match planned {
                Ok(p) => (p.recipe, p.workers, p.note),
                Err(e) => return Ok(failed(input, status, PLANNED, e)),
            }
        }
    };
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
    conditions::set(
        &mut status.conditions,
        PLANNED,
        true,
        "RecipeChosen",
        planned_msg.clone(),
        generation,
        &now(),
    );
    status.recipe = Some(recipe.clone());

    // Inventory: racks of the right SKU that the selector admits. A node
    // whose agent is gone (its lease expired) can run nothing: it counts as
    // not ready, so workers there are re-placed in the rack.
    let live = core.agents.live_nodes().await;
    let facts: Vec<NodeFacts> = nodes
        .into_iter()
        .map(|mut f| {
            if live.as_ref().is_some_and(|l| !l.contains(&f.name)) {
                f.ready = false;
            }
            f
        })
        .collect();
    let inv = inventory::build(&facts, core.health);
    let selector = &spec.hardware.rack_selector;
    let allowed: BTreeSet<String> = inv
        .racks
        .values()
        .filter(|r| r.sku == Some(spec.hardware.sku))
        .filter(|r| {
            selector.is_empty()
                || rack_labels
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
        return Ok(failed(input, status, PLACED, e));
    }

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
        deployment: key.to_string(),
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

    // Place under the ledger lock: no other reconcile can take these GPUs.
    let mut ledger = core.ledger.lock().await;
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
        let _t = core.metrics.placement_timer();
        placement::place(&racks_inv, &allocations, &request)
    };
    let plan = match placed {
        Ok(plan) => plan,
        Err(e) => {
            drop(ledger);
            return Ok(failed(
                input,
                status,
                PLACED,
                Error::Placement(e.to_string()),
            ));
        }
    };
    let entries: Vec<LedgerEntry> = plan
        .assignments
        .iter()
        .map(|a| LedgerEntry {
            deployment: key.to_string(),
            worker: a.owner.worker.clone(),
            role: roles.get(&a.owner.worker).copied().unwrap_or(Pool::Decode),
            rack: a.rack.clone(),
            placement: group_by_node(&a.gpus),
        })
        .collect();
    ledger
        .replace_deployment(key, entries.clone())
        .map_err(Error::Placement)?;
    drop(ledger);
    let moved = plan
        .moved
        .iter()
        .map(|(w, why)| format!("{w}: {why}"))
        .collect();
    let switching = status
        .rebalance
        .as_ref()
        .and_then(|r| r.in_progress.as_ref())
        .map(|m| m.draining.iter().chain(&m.launching).cloned().collect())
        .unwrap_or_default();
    Ok(Decision::Placed(Box::new(Placed {
        status,
        recipe,
        entries,
        moved,
        planned: replan.then(|| Note::normal("RecipeChosen", planned_msg)),
        switching,
    })))
}

/// The launches that make `placed` run.
pub fn launches(input: &Input<'_>, placed: &Placed) -> Vec<WorkerLaunch> {
    let recipe = &placed.recipe;
    placed
        .entries
        .iter()
        .map(|e| {
            let (tp, ep) = match e.role {
                Pool::Prefill => (recipe.prefill_tp, 1),
                Pool::Decode => (recipe.decode_tp.unwrap_or(1), recipe.decode_ep.unwrap_or(1)),
            };
            WorkerLaunch {
                deployment: input.key.to_string(),
                worker: e.worker.clone(),
                role: e.role,
                tp,
                ep,
                model: input.spec.model.profile.as_str().to_string(),
                backend: match input.spec.engine.backend {
                    Backend::Sim => "sim".to_string(),
                    Backend::Cpu => "cpu".to_string(),
                },
                // Entries the CRD's rule refuses never reach a spec here.
                engine_args: input
                    .spec
                    .engine
                    .args
                    .iter()
                    .filter_map(|a| crate::crd::engine_arg(a))
                    .map(|(name, value)| (name.to_string(), value.to_string()))
                    .collect(),
                generation: input.generation.unwrap_or_default().max(0) as u64,
                placement: e.placement.clone(),
            }
        })
        .collect()
}

/// Asks the agents to run `placed` and derives the status from what they
/// report: worker states, Placed / Ready / Degraded and the phase.
pub async fn launch(core: Core<'_>, input: &Input<'_>, placed: Placed) -> Applied {
    let reports = core.agents.ensure(&launches(input, &placed)).await;
    let mut applied = observe(input, placed, reports);
    if let Some(r) = core.rebalancing {
        r.step(core, input, &mut applied).await;
    }
    applied
}

/// Pure: the status after the agents reported `reports` (one per entry).
pub fn observe(input: &Input<'_>, placed: Placed, reports: Vec<WorkerReport>) -> Applied {
    let Placed {
        mut status,
        recipe,
        entries,
        moved,
        planned,
        switching,
    } = placed;
    let generation = input.generation;
    let previous = input.status;
    let now = now();
    let was_placed = conditions::is_true(&previous.conditions, PLACED);
    // A deployment that served this generation and lost a worker is
    // Degraded (not merely Placed) until the worker is back.
    let was_serving = previous.observed_generation == generation
        && matches!(previous.phase, Some(Phase::Ready | Phase::Degraded));
    let was_running: BTreeSet<String> = previous
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
        .filter(|w| !switching.contains(&w.name))
        .map(|w| match &w.message {
            Some(m) => format!("{}: {m}", w.name),
            None => format!("{}: {:?}", w.name, w.state),
        })
        .collect();
    let count = |state| status.workers.iter().filter(|w| w.state == state).count();
    let running = count(WorkerState::Running);
    let failed = count(WorkerState::Failed);
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
    // Workers changing role are expected to be down for a while.
    let changing = status
        .workers
        .iter()
        .filter(|w| switching.contains(&w.name) && w.state != WorkerState::Running)
        .count();
    let ready = total > 0 && running > 0 && running + changing == total;
    conditions::set(
        &mut status.conditions,
        READY,
        ready,
        if ready && changing > 0 {
            "Rebalancing"
        } else if ready {
            "AllWorkersRunning"
        } else {
            "WorkersNotRunning"
        },
        if changing > 0 {
            format!("{running}/{total} workers running ({changing} changing role)")
        } else {
            format!("{running}/{total} workers running")
        },
        generation,
        &now,
    );
    let recovering = was_serving && !ready;
    let degraded = failed > 0 || !moved.is_empty() || recovering;
    let failing: Vec<String> = status
        .workers
        .iter()
        .filter(|w| w.state != WorkerState::Running && !switching.contains(&w.name))
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

    let mut notes: Vec<Note> = planned.into_iter().collect();
    if !was_placed {
        notes.push(Note::normal("Placed", placed_msg));
    }
    if !down.is_empty() {
        notes.push(Note::warning("WorkersDown", down.join("; ")));
    }
    if ready && !degraded && previous.phase == Some(Phase::Degraded) {
        notes.push(Note::normal(
            "Recovered",
            format!("{running}/{total} workers running again"),
        ));
    }
    if !moved.is_empty() {
        notes.push(Note::warning("WorkersMoved", moved.join("; ")));
    }
    // Workers still starting are checked again soon, so Ready follows them.
    let settling = status
        .workers
        .iter()
        .any(|w| !matches!(w.state, WorkerState::Running | WorkerState::Placed));
    Applied {
        status,
        notes,
        requeue: if settling { SETTLING } else { RESYNC },
    }
}

/// Stops every worker of `key` and returns its GPUs to the ledger.
pub async fn release(core: Core<'_>, key: &str) {
    if let Some(r) = core.rebalancing {
        r.forget(key);
    }
    core.agents.release(key).await;
    core.ledger.lock().await.release(key);
}

/// GPUs grouped per node, nodes in first-seen order, indices sorted.
pub fn group_by_node(gpus: &[placement::GpuRef]) -> Vec<NodeGpus> {
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
    fn a_planned_deployment_waiting_for_gpus_is_planned_not_pending() {
        let recipe = RecipeStatus {
            prefill: "1xTP4".into(),
            decode: "1xDEP8".into(),
            prefill_workers: 1,
            prefill_tp: 4,
            decode_workers: 1,
            decode_ep: Some(8),
            decode_tp: None,
            concurrency: 64,
            gpus: 12,
            source: "planner".into(),
            predicted: None,
        };
        let no_room = Error::Placement("no room".into());
        let planned = ModelDeploymentStatus {
            recipe: Some(recipe),
            ..Default::default()
        };
        let waiting = failed_status(planned.clone(), Some(3), PLACED, &no_room);
        assert_eq!(waiting.phase, Some(Phase::Planned));
        assert_eq!(waiting.observed_generation, Some(3));
        let unplanned = failed_status(Default::default(), Some(3), PLACED, &no_room);
        assert_eq!(unplanned.phase, Some(Phase::Pending));
        let refused = failed_status(planned, Some(3), PLANNED, &Error::NoRecipe("slo".into()));
        assert_eq!(refused.phase, Some(Phase::Failed));
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

    fn placed_one(status: ModelDeploymentStatus) -> Placed {
        Placed {
            status,
            recipe: RecipeStatus {
                prefill: "1xTP4".into(),
                decode: "1xDEP4".into(),
                prefill_workers: 1,
                prefill_tp: 4,
                decode_workers: 1,
                decode_ep: Some(4),
                decode_tp: None,
                concurrency: 8,
                gpus: 8,
                source: "spec".into(),
                predicted: None,
            },
            entries: ["prefill-0", "decode-0"]
                .iter()
                .enumerate()
                .map(|(i, w)| LedgerEntry {
                    deployment: "ns/md".into(),
                    worker: (*w).into(),
                    role: if i == 0 { Pool::Prefill } else { Pool::Decode },
                    rack: "rack-a".into(),
                    placement: vec![NodeGpus {
                        node: format!("tray-{i}"),
                        gpus: vec![0, 1, 2, 3],
                    }],
                })
                .collect(),
            moved: vec![],
            planned: None,
            switching: BTreeSet::new(),
        }
    }

    fn spec() -> ModelDeploymentSpec {
        serde_yaml::from_str(
            "model: {name: m, profile: deepseek-v4-pro}\nhardware: {sku: gb200, gpuBudget: 8}\n\
             workload: {isl: 1024, osl: 128}\nslo: {maxTpotMs: 50}\n\
             recipe: {mode: explicit, prefill: {workers: 1, tp: 4}, decode: {workers: 1, ep: 4}}",
        )
        .unwrap()
    }

    #[test]
    fn all_running_is_ready_and_a_lost_worker_degrades() {
        let spec = spec();
        let fresh = ModelDeploymentStatus::default();
        let input = Input {
            key: "ns/md",
            generation: Some(1),
            spec: &spec,
            status: &fresh,
        };
        let running = vec![WorkerReport::new(WorkerState::Running); 2];
        let ready = observe(&input, placed_one(fresh.clone()), running);
        assert_eq!(ready.status.phase, Some(Phase::Ready));
        assert_eq!(ready.status.ready.as_deref(), Some("2/2"));
        assert!(ready.notes.iter().any(|n| n.reason == "Placed"));

        let input = Input {
            status: &ready.status,
            ..input
        };
        let lost = vec![
            WorkerReport::new(WorkerState::Running),
            WorkerReport::with(WorkerState::Launching, "rank 0 exited"),
        ];
        let after = observe(&input, placed_one(ready.status.clone()), lost);
        assert_eq!(after.status.phase, Some(Phase::Degraded));
        assert_eq!(after.requeue, SETTLING);
        assert!(
            after
                .notes
                .iter()
                .any(|n| n.warning && n.reason == "WorkersDown" && n.message.contains("decode-0"))
        );
    }
}
