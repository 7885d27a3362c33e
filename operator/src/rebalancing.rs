//! The live rebalancing step both operator modes run after each launch of a
//! deployment with `rebalance.enabled`: every `intervalSeconds` it reads the
//! engines' load reports, asks [`Rebalancer::decide`] for hold or move, and
//! carries a move out in place:
//!
//! 1. **Drain**: the leaving workers are told to drain (`EngineService.Drain`):
//!    they take no new work (their registry records say Draining, so
//!    frontends route around them), in-flight prefills finish and hand their
//!    KV over, in-flight decodes finish. A drain that outlasts
//!    [`DRAIN_DEADLINE_S`] cancels what is left; each such request ends with
//!    a clear error, none silently.
//! 2. **Swap**: once every leaving worker is idle, its GPUs are cut into
//!    workers of the other role ([`live::carve`]) and the ledger hands them
//!    over under its lock; the deployment's worker list changes.
//! 3. **Load**: the next reconcile stops the drained ranks and launches the
//!    new ones on the same GPUs (weights reload); when they serve, the move
//!    is over.
//!
//! Every decision is a metric (`rebalance_decisions_total{action,reason}`)
//! and `status.rebalance.lastDecision`; every move, and every change of the
//! reason to hold, is also a [`Note`] (an event in Kubernetes mode).
//!
//! State: the per-deployment policy state ([`Rebalancer`]'s smoothing and
//! pending wish, the load sampler, the next decision time) lives here, one
//! entry per deployment; the move itself lives in the status, so a
//! restarted operator resumes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use perfmodel::{Calibration, ModelProfile, Parallelism};

use crate::conditions::{self, REBALANCING};
use crate::crd::{
    DecisionRecord, ModelDeploymentSpec, MovePhase, MoveStatus, Phase, Pool, RebalanceStatus,
    RecipeStatus, WorkerState, WorkerStatus,
};
use crate::engines::{DrainState, EngineControl};
use crate::ledger::LedgerEntry;
use crate::pipeline::{Applied, Core, Input, Note, now};
use crate::planner;
use crate::rebalance::live::{self, LoadSample, SampleContext, Sampler};
use crate::rebalance::{Action, CapacityModel, Rebalancer, Settings, Shapes, SloTarget, Split};

/// Modelled seconds a drain may take before what is still in flight is
/// cancelled: ten minutes holds a 4K-token output at 100 ms per token with
/// room to spare.
pub const DRAIN_DEADLINE_S: f64 = 600.0;
/// How soon to look again while a move drains or loads (wall time).
pub const MOVE_POLL: Duration = Duration::from_millis(500);
/// Moves kept in `status.rebalance.moves`.
const MOVES_KEPT: usize = 10;

/// Modelled time: wall time since the operator started, times the engines'
/// time scale (1 on real hardware).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    scale: f64,
}

impl Clock {
    pub fn new(scale: f64) -> Self {
        Self {
            start: Instant::now(),
            scale: if scale.is_finite() && scale > 0.0 {
                scale
            } else {
                1.0
            },
        }
    }

    pub fn now_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.scale
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Wall time of `modelled` seconds.
    pub fn wall(&self, modelled: f64) -> Duration {
        Duration::from_secs_f64((modelled / self.scale).max(0.0))
    }
}

/// One deployment's policy state.
struct Live {
    generation: Option<i64>,
    rebalancer: Rebalancer,
    sampler: Sampler,
    /// Modelled time of the next decision.
    next_at: f64,
    /// The reason of the last hold that was announced.
    announced: Option<&'static str>,
    /// When the move under way was decided (modelled; wall for the metric).
    move_started: Option<(f64, Instant)>,
}

/// The rebalancer of every deployment this operator reconciles.
pub struct Rebalancing {
    engines: Arc<dyn EngineControl>,
    clock: Clock,
    book: Mutex<BTreeMap<String, Live>>,
}

impl std::fmt::Debug for Rebalancing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebalancing")
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// The two shapes and the budget of `recipe` under `spec`.
fn shapes(spec: &ModelDeploymentSpec, recipe: &RecipeStatus) -> Shapes {
    Shapes {
        prefill_tp: recipe.prefill_tp,
        decode: match (recipe.decode_ep, recipe.decode_tp) {
            (Some(e), _) => Parallelism::Ep(e),
            (None, Some(t)) => Parallelism::Tp(t),
            (None, None) => Parallelism::Tp(1),
        },
        gpu_budget: spec.hardware.gpu_budget,
    }
}

fn pool_name(p: Pool) -> &'static str {
    match p {
        Pool::Prefill => "prefill",
        Pool::Decode => "decode",
    }
}

fn split_text(s: Split) -> String {
    s.to_string()
}

impl Rebalancing {
    pub fn new(engines: Arc<dyn EngineControl>, clock: Clock) -> Self {
        Self {
            engines,
            clock,
            book: Mutex::new(BTreeMap::new()),
        }
    }

    /// Forgets a deployment (deleted, or its spec file removed).
    pub fn forget(&self, key: &str) {
        self.book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    fn take(&self, key: &str) -> Option<Live> {
        self.book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
    }

    fn put(&self, key: &str, live: Live) {
        self.book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_string(), live);
    }

    /// The policy state for this generation, built on first use.
    fn live_for(&self, input: &Input<'_>, recipe: &RecipeStatus) -> Result<Live, String> {
        if let Some(l) = self
            .take(input.key)
            .filter(|l| l.generation == input.generation)
        {
            return Ok(l);
        }
        let spec = input.spec;
        let model =
            ModelProfile::builtin(spec.model.profile.as_str()).map_err(|e| e.to_string())?;
        let slo = SloTarget::from_slo(&planner::slo(spec))
            .ok_or("the SLO has no per-token bound to rebalance for")?;
        let capacity = CapacityModel::new(
            model,
            planner::sku(spec.hardware.sku),
            Calibration::fitted(),
            shapes(spec, recipe),
            slo,
        )
        .map_err(|e| e.to_string())?;
        let settings = Settings::from_spec(&spec.rebalance);
        Ok(Live {
            generation: input.generation,
            rebalancer: Rebalancer::new(capacity, settings),
            sampler: Sampler::default(),
            next_at: self.clock.now_s() + settings.interval_s,
            announced: None,
            move_started: None,
        })
    }

    /// One step after `applied` came back from the agents: may change the
    /// status (worker list, move, last decision), add notes and shorten the
    /// requeue.
    pub async fn step(&self, core: Core<'_>, input: &Input<'_>, applied: &mut Applied) {
        let spec = input.spec;
        if !spec.rebalance.enabled {
            self.forget(input.key);
            return;
        }
        let Some(recipe) = applied.status.recipe.clone() else {
            return;
        };
        let moving = applied
            .status
            .rebalance
            .as_ref()
            .is_some_and(|r| r.in_progress.is_some());
        let serving = matches!(applied.status.phase, Some(Phase::Ready | Phase::Degraded));
        if !moving && !serving {
            return;
        }
        let mut live = match self.live_for(input, &recipe) {
            Ok(l) => l,
            Err(why) => {
                // Said once per generation: the entry is kept without a
                // policy by not putting anything back, so say it each time
                // the deployment is re-planned only.
                if applied.status.rebalance.is_none() {
                    applied.notes.push(Note {
                        warning: true,
                        reason: "RebalanceUnavailable",
                        message: format!("rebalancing is enabled but cannot run: {why}"),
                    });
                    applied.status.rebalance = Some(RebalanceStatus::default());
                }
                return;
            }
        };
        let wait = if moving {
            self.advance(core, input, &recipe, &mut live, applied).await
        } else {
            self.decide(core, input, &mut live, applied).await
        };
        applied.requeue = applied.requeue.min(wait);
        self.put(input.key, live);
        set_condition(input, applied);
    }

    /// No move under way: decide when the interval is up.
    async fn decide(
        &self,
        core: Core<'_>,
        input: &Input<'_>,
        live: &mut Live,
        applied: &mut Applied,
    ) -> Duration {
        let now_s = self.clock.now_s();
        if now_s < live.next_at {
            return self.clock.wall(live.next_at - now_s);
        }
        let interval = Settings::from_spec(&input.spec.rebalance).interval_s;
        live.next_at = now_s + interval;
        let wait = self.clock.wall(interval);
        let samples = match self.samples(input.key, &applied.status.workers).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(deployment = %input.key, error = %e, "no load reports; holding");
                return wait;
            }
        };
        let split = live::split_of(&applied.status.workers);
        let workload = &input.spec.workload;
        let obs = live.sampler.observe(
            SampleContext {
                now_s,
                split,
                switching: false,
                time_scale: self.clock.scale(),
                fallback_isl: f64::from(workload.isl) * 0.9,
                fallback_osl: f64::from(workload.osl) * 0.9,
            },
            &samples,
        );
        let decision = live.rebalancer.decide(&obs);
        let status = &mut applied.status;
        let rebalance = status
            .rebalance
            .get_or_insert_with(RebalanceStatus::default);
        let action = match decision.action {
            Action::Hold => "hold",
            Action::Move(_) => "move",
        };
        let record = DecisionRecord {
            time: now(),
            action: action.to_string(),
            reason: decision.reason.as_str().to_string(),
            message: decision.message.clone(),
            split: split_text(split),
        };
        rebalance.last_decision = Some(record.clone());
        let Action::Move(t) = decision.action else {
            let reason = decision.reason.as_str();
            core.metrics.record_rebalance(action, reason);
            if live.announced != Some(reason) {
                live.announced = Some(reason);
                applied.notes.push(Note {
                    warning: false,
                    reason: "RebalanceHold",
                    message: format!("holding {split}: {} ({reason})", decision.message),
                });
            }
            return wait;
        };
        let drains = live::choose_drains(&t, &status.workers, &samples);
        if drains.len() < (t.drain_prefill + t.drain_decode) as usize {
            let reason = "too_few_running";
            core.metrics.record_rebalance("hold", reason);
            if live.announced != Some(reason) {
                live.announced = Some(reason);
                applied.notes.push(Note {
                    warning: true,
                    reason: "RebalanceHold",
                    message: format!(
                        "wanted {} -> {} but only {} of the {} workers to drain are running",
                        t.from,
                        t.to,
                        drains.len(),
                        t.drain_prefill + t.drain_decode
                    ),
                });
            }
            return wait;
        }
        core.metrics
            .record_rebalance(action, decision.reason.as_str());
        live.announced = None;
        for worker in &drains {
            match self.engines.drain(input.key, worker, None).await {
                DrainState::Unreachable(why) => {
                    tracing::warn!(deployment = %input.key, worker = %worker, error = %why, "drain request failed; asking again next pass");
                }
                state => {
                    tracing::info!(deployment = %input.key, worker = %worker, ?state, "draining")
                }
            }
        }
        let status = &mut applied.status;
        mark_draining(&mut status.workers, &drains, None);
        let rebalance = status
            .rebalance
            .get_or_insert_with(RebalanceStatus::default);
        rebalance.in_progress = Some(MoveStatus {
            from: split_text(t.from),
            to: split_text(t.to),
            phase: MovePhase::Draining,
            started: record.time.clone(),
            draining: drains.clone(),
            launching: Vec::new(),
            launch_prefill: t.launch_prefill,
            launch_decode: t.launch_decode,
        });
        rebalance.moves.push(record);
        let excess = rebalance.moves.len().saturating_sub(MOVES_KEPT);
        rebalance.moves.drain(..excess);
        live.move_started = Some((now_s, Instant::now()));
        applied.notes.push(Note {
            warning: false,
            reason: "Rebalance",
            message: format!(
                "{} -> {}: draining {}; {}",
                t.from,
                t.to,
                drains.join(", "),
                decision.message
            ),
        });
        MOVE_POLL
    }

    /// A move under way: poll the drain, swap, or wait for the new workers.
    async fn advance(
        &self,
        core: Core<'_>,
        input: &Input<'_>,
        recipe: &RecipeStatus,
        live: &mut Live,
        applied: &mut Applied,
    ) -> Duration {
        let Some(m) = applied
            .status
            .rebalance
            .as_ref()
            .and_then(|r| r.in_progress.clone())
        else {
            return MOVE_POLL;
        };
        let now_s = self.clock.now_s();
        let started = *live.move_started.get_or_insert((now_s, Instant::now()));
        match m.phase {
            MovePhase::Draining => {
                let overdue = now_s - started.0 > DRAIN_DEADLINE_S;
                let cancel = overdue.then(|| self.clock.wall(1.0).max(Duration::from_millis(100)));
                let mut busy = Vec::new();
                for worker in &m.draining {
                    match self.engines.drain(input.key, worker, cancel).await {
                        DrainState::Drained | DrainState::Gone => {}
                        DrainState::Busy { in_flight, kv_held } => {
                            busy.push((worker.clone(), in_flight, kv_held));
                        }
                        DrainState::Unreachable(why) => {
                            tracing::warn!(deployment = %input.key, worker = %worker, error = %why, "cannot reach a draining worker");
                            busy.push((worker.clone(), 0, 0));
                        }
                    }
                }
                if !busy.is_empty() {
                    let detail: BTreeMap<String, String> = busy
                        .iter()
                        .map(|(w, f, k)| {
                            (
                                w.clone(),
                                format!("draining: {f} in flight, {k} KV to hand over"),
                            )
                        })
                        .collect();
                    mark_draining(&mut applied.status.workers, &m.draining, Some(&detail));
                    if overdue {
                        applied.notes.push(Note {
                            warning: true,
                            reason: "DrainCancelled",
                            message: format!(
                                "draining {} took over {DRAIN_DEADLINE_S:.0} s; cancelling what is left",
                                m.draining.join(", ")
                            ),
                        });
                    }
                    return MOVE_POLL;
                }
                self.swap(core, input, recipe, &m, applied).await;
                live.announced = None;
                // Launch at once.
                Duration::from_millis(50)
            }
            MovePhase::Loading => {
                let serving: BTreeSet<&str> = applied
                    .status
                    .workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Running)
                    .map(|w| w.name.as_str())
                    .collect();
                if !m.launching.iter().all(|w| serving.contains(w.as_str())) {
                    return MOVE_POLL;
                }
                let rebalance = applied
                    .status
                    .rebalance
                    .get_or_insert_with(RebalanceStatus::default);
                rebalance.in_progress = None;
                let took = started.1.elapsed();
                core.metrics.record_move(took);
                applied.notes.push(Note {
                    warning: false,
                    reason: "Rebalanced",
                    message: format!(
                        "{} -> {} done: {} serving, in {:.0} modelled s",
                        m.from,
                        m.to,
                        m.launching.join(", "),
                        now_s - started.0
                    ),
                });
                live.move_started = None;
                // Fresh baselines: the move's interval says nothing about demand.
                if let Ok(samples) = self.samples(input.key, &applied.status.workers).await {
                    let _ = live.sampler.observe(
                        SampleContext {
                            now_s,
                            split: live::split_of(&applied.status.workers),
                            switching: false,
                            time_scale: self.clock.scale(),
                            fallback_isl: 0.0,
                            fallback_osl: 0.0,
                        },
                        &samples,
                    );
                }
                let interval = Settings::from_spec(&input.spec.rebalance).interval_s;
                live.next_at = now_s + interval;
                self.clock.wall(interval)
            }
        }
    }

    /// The drained workers leave; workers of the other role take their GPUs.
    async fn swap(
        &self,
        core: Core<'_>,
        input: &Input<'_>,
        recipe: &RecipeStatus,
        m: &MoveStatus,
        applied: &mut Applied,
    ) {
        let status = &mut applied.status;
        let leaving: BTreeSet<&str> = m.draining.iter().map(String::as_str).collect();
        let freed: Vec<WorkerStatus> = status
            .workers
            .iter()
            .filter(|w| leaving.contains(w.name.as_str()))
            .cloned()
            .collect();
        let taken: BTreeSet<String> = status.workers.iter().map(|w| w.name.clone()).collect();
        let new_prefill = live::fresh_names(Pool::Prefill, m.launch_prefill, &taken);
        let new_decode = live::fresh_names(Pool::Decode, m.launch_decode, &taken);
        let decode_gpus = recipe.decode_ep.or(recipe.decode_tp).unwrap_or(1);
        let wanted: Vec<(String, u32)> = new_decode
            .iter()
            .map(|n| (n.clone(), decode_gpus))
            .chain(new_prefill.iter().map(|n| (n.clone(), recipe.prefill_tp)))
            .collect();
        let carved = live::carve(&freed, &wanted);
        let role_of = |name: &str| {
            if new_prefill.iter().any(|n| n == name) {
                Pool::Prefill
            } else {
                Pool::Decode
            }
        };
        {
            let mut ledger = core.ledger.lock().await;
            let mut entries: Vec<LedgerEntry> = ledger
                .of_deployment(input.key)
                .filter(|e| !leaving.contains(e.worker.as_str()))
                .cloned()
                .collect();
            entries.extend(carved.iter().map(|c| LedgerEntry {
                deployment: input.key.to_string(),
                worker: c.worker.clone(),
                role: role_of(&c.worker),
                rack: c.rack.clone(),
                placement: c.placement.clone(),
            }));
            if let Err(e) = ledger.replace_deployment(input.key, entries) {
                tracing::warn!(deployment = %input.key, error = %e, "handing drained GPUs over failed; placement will choose");
            }
        }
        for from in [Pool::Prefill, Pool::Decode] {
            let n = freed.iter().filter(|w| w.role == from).count() as u64;
            core.metrics.add_role_switches(pool_name(from), n);
        }
        status
            .workers
            .retain(|w| !leaving.contains(w.name.as_str()));
        status.workers.extend(carved.iter().map(|c| WorkerStatus {
            name: c.worker.clone(),
            role: role_of(&c.worker),
            rack: c.rack.clone(),
            placement: c.placement.clone(),
            state: WorkerState::Launching,
            message: Some("loading weights in its new role".into()),
        }));
        let names = |pool: Pool| -> Vec<String> {
            let mut v: Vec<String> = status
                .workers
                .iter()
                .filter(|w| w.role == pool)
                .map(|w| w.name.clone())
                .chain(
                    match pool {
                        Pool::Prefill => &new_prefill,
                        Pool::Decode => &new_decode,
                    }
                    .iter()
                    .cloned(),
                )
                .collect();
            v.sort_by_key(|n| live_order(n));
            v.dedup();
            v
        };
        let (prefill, decode) = (names(Pool::Prefill), names(Pool::Decode));
        let launching: Vec<String> = new_decode.iter().chain(&new_prefill).cloned().collect();
        let on_same = carved.len();
        let rebalance = status
            .rebalance
            .get_or_insert_with(RebalanceStatus::default);
        rebalance.prefill = prefill;
        rebalance.decode = decode;
        rebalance.switches += freed.len() as u32;
        rebalance.in_progress = Some(MoveStatus {
            phase: MovePhase::Loading,
            draining: Vec::new(),
            launching: launching.clone(),
            ..m.clone()
        });
        applied.notes.push(Note {
            warning: false,
            reason: "RoleSwitch",
            message: format!(
                "drained {}; launching {} ({} of them on the drained GPUs)",
                m.draining.join(", "),
                launching.join(", "),
                on_same
            ),
        });
    }

    /// Load samples of the workers serving now, with their pools.
    async fn samples(
        &self,
        key: &str,
        workers: &[WorkerStatus],
    ) -> Result<BTreeMap<String, (Pool, LoadSample)>, String> {
        let loads = self.engines.loads(key).await?;
        Ok(workers
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .filter_map(|w| loads.get(&w.name).map(|s| (w.name.clone(), (w.role, *s))))
            .collect())
    }
}

/// `prefill-10` after `prefill-9`.
fn live_order(name: &str) -> (String, u64) {
    match name.rsplit_once('-') {
        Some((stem, n)) => (stem.to_string(), n.parse().unwrap_or(u64::MAX)),
        None => (name.to_string(), u64::MAX),
    }
}

/// Workers in `names` are Draining (with a message from `detail`).
fn mark_draining(
    workers: &mut [WorkerStatus],
    names: &[String],
    detail: Option<&BTreeMap<String, String>>,
) {
    for w in workers.iter_mut().filter(|w| names.contains(&w.name)) {
        if w.state == WorkerState::Running || w.state == WorkerState::Draining {
            w.state = WorkerState::Draining;
            w.message = Some(
                detail
                    .and_then(|d| d.get(&w.name).cloned())
                    .unwrap_or_else(|| "draining: finishing in-flight work".into()),
            );
        }
    }
}

/// The Rebalancing condition from the move under way.
fn set_condition(input: &Input<'_>, applied: &mut Applied) {
    let status = &mut applied.status;
    let (on, reason, message) = match status
        .rebalance
        .as_ref()
        .and_then(|r| r.in_progress.as_ref())
    {
        Some(m) => (
            true,
            match m.phase {
                MovePhase::Draining => "Draining",
                MovePhase::Loading => "Loading",
            },
            match m.phase {
                MovePhase::Draining => {
                    format!("{} -> {}: draining {}", m.from, m.to, m.draining.join(", "))
                }
                MovePhase::Loading => {
                    format!("{} -> {}: loading {}", m.from, m.to, m.launching.join(", "))
                }
            },
        ),
        None => (
            false,
            "Idle",
            status
                .rebalance
                .as_ref()
                .and_then(|r| r.last_decision.as_ref())
                .map_or_else(
                    || "no decision yet".to_string(),
                    |d| format!("last decision: {} ({})", d.action, d.reason),
                ),
        ),
    };
    conditions::set(
        &mut status.conditions,
        REBALANCING,
        on,
        reason,
        message,
        input.generation,
        &now(),
    );
}
