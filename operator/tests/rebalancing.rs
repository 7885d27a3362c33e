//! The live rebalancer through the reconcile core, with in-process fakes for
//! its neighbours: agents that run whatever they are asked to (a relaunched
//! worker takes one pass to start) and engines whose load reports follow a
//! scripted demand. A shift from long prompts to long outputs must move
//! prefill workers to decode on the same GPUs: drain first (no new work,
//! in-flight work finishes), then swap, then load, with the deployment
//! serving throughout and every decision recorded with its reason.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use operator::agent::{AgentControl, BoxFuture, WorkerLaunch, WorkerReport};
use operator::crd::{ModelDeploymentSpec, ModelDeploymentStatus, Phase, Pool, WorkerState};
use operator::engines::{DrainState, EngineControl};
use operator::inventory::{
    AnnotationsOnly, LABEL_CLIQUE, LABEL_COUNT, LABEL_MEMORY, LABEL_PRODUCT, NodeFacts,
};
use operator::ledger::Ledger;
use operator::pipeline::{self, Core, Decision, Input, Note};
use operator::rebalance::live::LoadSample;
use operator::rebalancing::{Clock, Rebalancing};
use operator::telemetry::Metrics;

/// Modelled seconds per wall second: a 30 s interval passes in 3 ms.
const SCALE: f64 = 10_000.0;

const SPEC: &str = r#"
model: {name: deepseek-ai/DeepSeek-V4-Pro, profile: deepseek-v4-pro}
hardware: {sku: gb300, gpuBudget: 24}
workload: {isl: 8192, osl: 256}
slo: {maxTpotMs: 50, maxTtftMs: 10000}
recipe: {mode: explicit, prefill: {workers: 4, tp: 4}, decode: {workers: 1, ep: 8}}
rebalance: {enabled: true, intervalSeconds: 30, stabilizationWindowSeconds: 60, maxMovesPerInterval: 2}
"#;

fn tray(i: usize) -> NodeFacts {
    let labels = [
        (LABEL_CLIQUE, "rack-a.1"),
        (LABEL_PRODUCT, "NVIDIA-GB300"),
        (LABEL_COUNT, "4"),
        (LABEL_MEMORY, "294912"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    NodeFacts {
        name: format!("tray-{i}"),
        labels,
        annotations: BTreeMap::new(),
        ready: true,
    }
}

/// What one `ensure` asked for: each worker's pool and GPUs.
type Asked = BTreeMap<String, (Pool, Vec<String>)>;

/// Runs every worker it is asked to; a worker it has not seen yet reports
/// Launching once (it loads weights), then Running.
#[derive(Default)]
struct Agents {
    seen: Mutex<BTreeSet<String>>,
    /// Every worker each ensure asked for, by role.
    asked: Mutex<Vec<Asked>>,
}

impl AgentControl for Agents {
    fn ensure(&self, workers: &[WorkerLaunch]) -> BoxFuture<'_, Vec<WorkerReport>> {
        let mut seen = self.seen.lock().unwrap();
        let reports = workers
            .iter()
            .map(|w| {
                if seen.insert(w.worker.clone()) {
                    WorkerReport::new(WorkerState::Launching)
                } else {
                    WorkerReport::new(WorkerState::Running)
                }
            })
            .collect();
        self.asked.lock().unwrap().push(
            workers
                .iter()
                .map(|w| {
                    let gpus = w
                        .placement
                        .iter()
                        .flat_map(|n| n.gpus.iter().map(move |g| format!("{}/{g}", n.node)))
                        .collect();
                    (w.worker.clone(), (w.role, gpus))
                })
                .collect(),
        );
        Box::pin(async move { reports })
    }

    fn release(&self, _deployment: &str) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Demand per modelled second and lengths, switched by the test.
#[derive(Clone, Copy)]
struct Demand {
    rate: f64,
    isl: u64,
    osl: u64,
}

/// Engines whose counters grow with the scripted demand, split evenly over
/// the workers of each pool; a drained worker needs two polls to finish.
struct Engines {
    clock: Clock,
    state: Mutex<EngineState>,
}

struct EngineState {
    demand: Demand,
    roles: BTreeMap<String, Pool>,
    counters: BTreeMap<String, LoadSample>,
    last_s: f64,
    drains: BTreeMap<String, u32>,
}

impl Engines {
    fn new(clock: Clock, demand: Demand) -> Self {
        Self {
            clock,
            state: Mutex::new(EngineState {
                demand,
                roles: BTreeMap::new(),
                counters: BTreeMap::new(),
                last_s: clock.now_s(),
                drains: BTreeMap::new(),
            }),
        }
    }

    fn set_demand(&self, d: Demand) {
        self.state.lock().unwrap().demand = d;
    }

    fn set_roles(&self, status: &ModelDeploymentStatus) {
        self.state.lock().unwrap().roles = status
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .map(|w| (w.name.clone(), w.role))
            .collect();
    }

    fn drains(&self) -> BTreeMap<String, u32> {
        self.state.lock().unwrap().drains.clone()
    }
}

impl EngineControl for Engines {
    fn loads(
        &self,
        _deployment: &str,
    ) -> BoxFuture<'_, Result<BTreeMap<String, LoadSample>, String>> {
        let mut s = self.state.lock().unwrap();
        let now = self.clock.now_s();
        let dt = now - s.last_s;
        s.last_s = now;
        let d = s.demand;
        let per_pool = |pool: Pool, roles: &BTreeMap<String, Pool>| {
            roles.values().filter(|r| **r == pool).count().max(1) as f64
        };
        let (np, nd) = (
            per_pool(Pool::Prefill, &s.roles),
            per_pool(Pool::Decode, &s.roles),
        );
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let roles = s.roles.clone();
        for (name, role) in &roles {
            let c = s.counters.entry(name.clone()).or_default();
            let arrivals = (d.rate * dt).round() as u64;
            match role {
                Pool::Prefill => {
                    let n = (arrivals as f64 / np).round() as u64;
                    c.prefills += n;
                    c.prompt_tokens += n * d.isl;
                }
                Pool::Decode => {
                    let n = (arrivals as f64 / nd).round() as u64;
                    c.decodes += n;
                    c.requested_output_tokens += n * d.osl;
                    c.kv_total = 1000;
                    c.kv_used = 300;
                }
            }
            c.at_s = wall;
        }
        let out = s
            .counters
            .iter()
            .filter(|(w, _)| roles.contains_key(*w))
            .map(|(w, c)| (w.clone(), *c))
            .collect();
        Box::pin(async move { Ok(out) })
    }

    fn drain(
        &self,
        _deployment: &str,
        worker: &str,
        _cancel_after: Option<Duration>,
    ) -> BoxFuture<'_, DrainState> {
        let mut s = self.state.lock().unwrap();
        let n = s.drains.entry(worker.to_string()).or_default();
        *n += 1;
        let state = if *n < 3 {
            DrainState::Busy {
                in_flight: 3 - *n,
                kv_held: 0,
            }
        } else {
            DrainState::Drained
        };
        Box::pin(async move { state })
    }
}

struct Run {
    status: ModelDeploymentStatus,
    notes: Vec<Note>,
    phases: Vec<Phase>,
}

/// Reconciles `passes` times (sleeping each requeue, capped), like the
/// standalone loop does.
async fn reconcile(
    core: Core<'_>,
    spec: &ModelDeploymentSpec,
    engines: &Engines,
    run: &mut Run,
    until: impl Fn(&ModelDeploymentStatus) -> bool,
) {
    let nodes: Vec<NodeFacts> = (0..6).map(tray).collect();
    for _ in 0..2000 {
        let previous = run.status.clone();
        let input = Input {
            key: "llm/shift",
            generation: Some(1),
            spec,
            status: &previous,
        };
        let placed = match pipeline::decide(core, &input, nodes.clone(), &BTreeMap::new())
            .await
            .unwrap()
        {
            Decision::Placed(p) => *p,
            Decision::Failed { error, .. } => panic!("placement failed: {error}"),
        };
        let applied = pipeline::launch(core, &input, placed).await;
        engines.set_roles(&applied.status);
        run.notes.extend(applied.notes.iter().cloned());
        if let Some(p) = applied.status.phase {
            run.phases.push(p);
        }
        run.status = applied.status;
        if until(&run.status) {
            return;
        }
        tokio::time::sleep(applied.requeue.min(Duration::from_millis(5))).await;
    }
    panic!(
        "gave up; status: {}",
        serde_json::to_string_pretty(&run.status).unwrap()
    );
}

fn gpus_of(status: &ModelDeploymentStatus, worker: &str) -> BTreeSet<String> {
    status
        .workers
        .iter()
        .filter(|w| w.name == worker)
        .flat_map(|w| {
            w.placement
                .iter()
                .flat_map(|n| n.gpus.iter().map(move |g| format!("{}/{g}", n.node)))
        })
        .collect()
}

#[tokio::test]
async fn a_shift_to_long_outputs_moves_prefill_workers_to_decode_in_place() {
    let spec: ModelDeploymentSpec = serde_yaml::from_str(SPEC).unwrap();
    let clock = Clock::new(SCALE);
    // Long prompts, short outputs: four TP4 prefill workers and one DEP8
    // decode worker are what this load wants.
    let engines = Arc::new(Engines::new(
        clock,
        Demand {
            rate: 4.0,
            isl: 7_400,
            osl: 230,
        },
    ));
    let rebalancing = Rebalancing::new(engines.clone(), clock);
    let agents = Agents::default();
    let ledger = tokio::sync::Mutex::new(Ledger::default());
    let metrics = Metrics::new().unwrap();
    let core = Core {
        ledger: &ledger,
        agents: &agents,
        health: &AnnotationsOnly,
        metrics: &metrics,
        rebalancing: Some(&rebalancing),
    };
    let mut run = Run {
        status: ModelDeploymentStatus::default(),
        notes: Vec::new(),
        phases: Vec::new(),
    };

    // Serving, then a few decisions that hold.
    reconcile(core, &spec, &engines, &mut run, |s| {
        s.rebalance
            .as_ref()
            .and_then(|r| r.last_decision.as_ref())
            .is_some_and(|d| d.reason != "no_demand")
    })
    .await;
    let held = run.status.rebalance.clone().unwrap();
    assert!(held.moves.is_empty(), "{held:?}");
    assert_eq!(held.last_decision.as_ref().unwrap().action, "hold");
    assert_eq!(run.status.phase, Some(Phase::Ready));
    let before = run.status.clone();

    // Short prompts, long outputs: decode is now the bottleneck.
    engines.set_demand(Demand {
        rate: 30.0,
        isl: 900,
        osl: 3_700,
    });
    reconcile(core, &spec, &engines, &mut run, |s| {
        s.rebalance
            .as_ref()
            .is_some_and(|r| !r.moves.is_empty() && r.in_progress.is_none())
    })
    .await;

    let status = &run.status;
    let r = status.rebalance.as_ref().unwrap();
    let mv = r.moves.last().unwrap();
    assert_eq!(mv.action, "move");
    assert_eq!(mv.reason, "rebalance");
    assert_eq!(mv.split, "4P:1D");
    assert_eq!((r.prefill.len(), r.decode.len()), (2, 2), "{r:?}");
    assert_eq!(r.switches, 2);
    let count = |p| status.workers.iter().filter(|w| w.role == p).count();
    assert_eq!((count(Pool::Prefill), count(Pool::Decode)), (2, 2));
    assert!(
        status
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Running)
    );

    // The two drained prefill workers were asked to drain (and polled until
    // idle) and their two trays became the new decode worker.
    let drains = engines.drains();
    let drained: Vec<&String> = drains.keys().collect();
    assert_eq!(drained.len(), 2, "{drains:?}");
    assert!(drains.values().all(|n| *n >= 3), "{drains:?}");
    let freed: BTreeSet<String> = drained.iter().flat_map(|w| gpus_of(&before, w)).collect();
    let new_decode = r.decode.iter().find(|d| *d != "decode-0").unwrap();
    assert_eq!(gpus_of(status, new_decode), freed);
    // Nothing drained kept running next to its successor, no GPU twice.
    let mut seen = BTreeSet::new();
    for w in &status.workers {
        for g in gpus_of(status, &w.name) {
            assert!(seen.insert(g.clone()), "GPU {g} twice");
        }
    }
    let last = agents.asked.lock().unwrap().last().cloned().unwrap();
    assert!(drained.iter().all(|w| !last.contains_key(*w)));

    // Never Degraded: a planned move is not a failure.
    assert!(!run.phases.contains(&Phase::Degraded), "{:?}", run.phases);
    let reasons: Vec<&str> = run.notes.iter().map(|n| n.reason).collect();
    for want in ["RebalanceHold", "Rebalance", "RoleSwitch", "Rebalanced"] {
        assert!(reasons.contains(&want), "no {want} note in {reasons:?}");
    }
    let text = metrics.encode().unwrap();
    assert!(
        text.contains(
            r#"rackscale_operator_rebalance_decisions_total{action="move",reason="rebalance"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"rackscale_operator_role_switches_total{pool="prefill"} 2"#));
}
