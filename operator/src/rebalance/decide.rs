//! The rebalancing policy: one [`Rebalancer::decide`] call per interval
//! turns the pools' load reports into hold-or-move, with a reason.
//!
//! Order of the checks (the first that stops a move names the reason):
//! 1. a move still draining or loading: hold;
//! 2. the best split for the corrected demand is the current one: hold;
//! 3. it serves less than `min_gain` more than the current split, and the
//!    current split is not overloaded or the desired one would not serve
//!    all the demand either: hold (hysteresis; the pending wish is
//!    forgotten);
//! 4. the wish (same direction) has not lasted the stabilization window:
//!    hold;
//! 5. the step is cut to at most `max_moves` moves toward the wish;
//! 6. the step's cost (GPU-seconds unavailable while draining and
//!    reloading, valued at the target's requests per GPU-second) exceeds its
//!    gain (extra requests served over `payback_s`): hold.
//!
//! State kept between calls: the latency corrections (exponentially
//! smoothed) and the pending wish. Nothing else, so a restarted operator
//! loses at most one stabilization window.

use serde::Serialize;

use super::capacity::{CapacityModel, Corrections, Pools};
use super::{Demand, Split, Transition};
use crate::crd::RebalanceSpec;

/// Seconds over which a queued backlog is planned to be cleared: queued
/// requests add `queued / BACKLOG_CLEAR_S` to the arrival rate.
pub const BACKLOG_CLEAR_S: f64 = 120.0;
/// Weight of the newest observation in the smoothed corrections.
const CORRECTION_ALPHA: f64 = 0.3;
/// Corrections are kept within these factors of the model.
const CORRECTION_RANGE: (f64, f64) = (0.5, 3.0);
/// Prefill TTFT is compared with its prediction only below this predicted
/// utilization and with at most one queued prompt per worker (above it,
/// queueing noise and backlog swamp the signal).
const PREFILL_CORRECTION_MAX_RHO: f64 = 0.8;
/// ... and only while decode has KV room (a full decode pool delays first
/// tokens, which is not prefill's doing).
const PREFILL_CORRECTION_MAX_KV_USE: f64 = 0.85;

/// The knobs, from `spec.rebalance`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Settings {
    pub interval_s: f64,
    pub window_s: f64,
    pub min_workers: u32,
    pub max_moves: u32,
    /// Fraction by which the served rate must rise before a move is wanted.
    pub min_gain: f64,
    /// Seconds over which a move's gain is counted against its cost.
    pub payback_s: f64,
}

impl Settings {
    pub fn from_spec(spec: &RebalanceSpec) -> Self {
        Self {
            interval_s: f64::from(spec.interval_seconds),
            window_s: f64::from(spec.stabilization_window_seconds),
            min_workers: spec.min_workers_per_pool,
            max_moves: spec.max_moves_per_interval,
            min_gain: f64::from(spec.min_gain_percent) / 100.0,
            payback_s: f64::from(spec.payback_seconds),
        }
    }
}

/// One pool's load over the last interval.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PoolLoad {
    /// Requests waiting for this pool.
    pub queued: u32,
    /// Requests in this pool's batches now.
    pub running: u32,
    /// Fraction of the pool's KV capacity in use (decode).
    pub kv_use: f64,
    /// Mean TTFT of requests that got their first token in the interval.
    pub ttft_s: Option<f64>,
    /// Mean TPOT of requests that finished in the interval.
    pub tpot_s: Option<f64>,
}

/// What the rebalancer sees at one decision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Observation {
    pub now_s: f64,
    /// Workers serving in each pool now.
    pub split: Split,
    /// A previous move is still draining or reloading.
    pub switching: bool,
    pub demand: Demand,
    pub prefill: PoolLoad,
    pub decode: PoolLoad,
}

/// Why a decision came out as it did: a bounded label for metrics and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    NoDemand,
    SwitchInProgress,
    Balanced,
    BelowHysteresis,
    Stabilizing,
    CapTooSmall,
    CostExceedsGain,
    Rebalance,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoDemand => "no_demand",
            Reason::SwitchInProgress => "switch_in_progress",
            Reason::Balanced => "balanced",
            Reason::BelowHysteresis => "below_hysteresis",
            Reason::Stabilizing => "stabilizing",
            Reason::CapTooSmall => "cap_too_small",
            Reason::CostExceedsGain => "cost_exceeds_gain",
            Reason::Rebalance => "rebalance",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    Hold,
    Move(Transition),
}

/// One decision and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub at_s: f64,
    pub action: Action,
    pub reason: Reason,
    /// The reason in words, with the figures behind it.
    pub message: String,
    pub current: Split,
    /// The best split for the demand now (which may differ from the move).
    pub desired: Split,
    /// Requests per second the current and desired splits serve in SLO.
    pub served_current: f64,
    pub served_desired: f64,
}

/// A wish to move in one direction, and since when.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    direction: (i8, i8),
    since_s: f64,
    last_s: f64,
}

/// The stateful rebalancing policy of one deployment.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    model: CapacityModel,
    settings: Settings,
    corrections: Corrections,
    pending: Option<Pending>,
}

impl Rebalancer {
    pub fn new(model: CapacityModel, settings: Settings) -> Self {
        Self {
            model,
            settings,
            corrections: Corrections::default(),
            pending: None,
        }
    }

    pub fn model(&self) -> &CapacityModel {
        &self.model
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn corrections(&self) -> Corrections {
        self.corrections
    }

    /// Demand with the backlog folded in.
    pub fn effective_demand(obs: &Observation) -> Demand {
        let queued = f64::from(obs.prefill.queued + obs.decode.queued);
        Demand {
            rate: obs.demand.rate + queued / BACKLOG_CLEAR_S,
            ..obs.demand
        }
    }

    /// Decides what to do after observing `obs`.
    pub fn decide(&mut self, obs: &Observation) -> Decision {
        let current = obs.split;
        let demand = Self::effective_demand(obs);
        let hold = |reason, message: String, desired, sc, sd| Decision {
            at_s: obs.now_s,
            action: Action::Hold,
            reason,
            message,
            current,
            desired,
            served_current: sc,
            served_desired: sd,
        };
        if !(demand.rate > 0.0 && demand.isl > 0.0 && demand.osl > 0.0) {
            self.pending = None;
            return hold(
                Reason::NoDemand,
                format!(
                    "no requests arrived in the last {:.0} s: keeping {current}",
                    self.settings.interval_s
                ),
                current,
                0.0,
                0.0,
            );
        }
        self.update_corrections(obs);
        let pools = self.model.pools(demand, self.corrections);
        let s = self.settings;
        let desired = self.model.best_split(&pools, s.min_workers, Some(current));
        let (sc, sd) = (pools.served(current), pools.served(desired));
        let figures = format!(
            "demand {:.2} req/s at ISL {:.0} / OSL {:.0}; {current} serves {sc:.2}, {desired} would serve {sd:.2} (prefill x{:.2}, decode x{:.2} of predicted)",
            demand.rate, demand.isl, demand.osl, self.corrections.prefill, self.corrections.decode
        );
        if obs.switching {
            self.pending = None;
            return hold(
                Reason::SwitchInProgress,
                format!("a move is still draining or reloading; {figures}"),
                desired,
                sc,
                sd,
            );
        }
        if desired == current {
            self.pending = None;
            return hold(
                Reason::Balanced,
                format!("{current} is the best split: {figures}"),
                desired,
                sc,
                sd,
            );
        }
        // An overloaded split (demand above what it serves) builds a backlog
        // without bound, so relieving it needs no hysteresis margin; the
        // stabilization window still guards against spikes.
        let overloaded = sc < demand.rate * (1.0 - 1e-6);
        let relieves = sd >= demand.rate * (1.0 - 1e-6);
        if !((sd > sc * (1.0 + s.min_gain) || (overloaded && relieves)) && sd > sc + 1e-9) {
            self.pending = None;
            return hold(
                Reason::BelowHysteresis,
                format!(
                    "gain under {:.0}% and no overload to relieve: {figures}",
                    s.min_gain * 100.0
                ),
                desired,
                sc,
                sd,
            );
        }
        let direction = (
            sign(desired.prefill, current.prefill),
            sign(desired.decode, current.decode),
        );
        let pending = match self.pending {
            Some(p) if p.direction == direction && obs.now_s - p.last_s <= 1.5 * s.interval_s => {
                Pending {
                    last_s: obs.now_s,
                    ..p
                }
            }
            _ => Pending {
                direction,
                since_s: obs.now_s,
                last_s: obs.now_s,
            },
        };
        self.pending = Some(pending);
        let held = obs.now_s - pending.since_s + s.interval_s;
        if held < s.window_s - 1e-6 {
            return hold(
                Reason::Stabilizing,
                format!(
                    "wanted for {held:.0} s of the {:.0} s window: {figures}",
                    s.window_s
                ),
                desired,
                sc,
                sd,
            );
        }
        let Some(step) = self.step(&pools, current, desired) else {
            let need = self.model.shapes.transition(current, desired).moves;
            return hold(
                Reason::CapTooSmall,
                format!(
                    "the smallest step toward {desired} needs more than maxMovesPerInterval={} moves ({need} to get there): {figures}",
                    s.max_moves
                ),
                desired,
                sc,
                sd,
            );
        };
        let served_step = pools.served(step.to);
        let gain = (served_step - sc) * s.payback_s;
        let cost_gpu_s = self.cost_gpu_seconds(&pools, &step);
        let per_gpu_s = served_step / f64::from(self.model.shapes.gpu_budget.max(1));
        let cost = cost_gpu_s * per_gpu_s;
        if gain <= cost {
            return hold(
                Reason::CostExceedsGain,
                format!(
                    "moving to {} costs {cost_gpu_s:.0} GPU-s (~{cost:.0} requests) for {gain:.0} more requests over {:.0} s: {figures}",
                    step.to, s.payback_s
                ),
                desired,
                sc,
                sd,
            );
        }
        self.pending = None;
        Decision {
            at_s: obs.now_s,
            action: Action::Move(step),
            reason: Reason::Rebalance,
            message: format!(
                "{current} -> {} ({} move(s)): +{:.2} req/s in SLO, {gain:.0} requests over {:.0} s against {cost_gpu_s:.0} GPU-s of draining and reloading; {figures}",
                step.to,
                step.moves,
                served_step - sc,
                s.payback_s
            ),
            current,
            desired,
            served_current: sc,
            served_desired: sd,
        }
    }

    /// The best split on the way from `current` to `desired` within the cap
    /// on moves (the furthest one when several serve alike).
    fn step(&self, pools: &Pools, current: Split, desired: Split) -> Option<Transition> {
        let shapes = &self.model.shapes;
        let (lo, hi) = (
            current.decode.min(desired.decode),
            current.decode.max(desired.decode),
        );
        let mut best: Option<(Transition, f64, u32)> = None;
        for s in shapes.splits(self.settings.min_workers) {
            if s == current || s.decode < lo || s.decode > hi {
                continue;
            }
            let t = shapes.transition(current, s);
            if t.moves > self.settings.max_moves {
                continue;
            }
            let served = pools.served(s);
            let distance = s.decode.abs_diff(desired.decode) + s.prefill.abs_diff(desired.prefill);
            let better = match best {
                None => true,
                Some((_, v, d)) => {
                    served > v * (1.0 + 1e-9) || (served >= v * (1.0 - 1e-9) && distance < d)
                }
            };
            if better {
                best = Some((t, served, distance));
            }
        }
        best.map(|b| b.0)
    }

    /// GPU-seconds a transition keeps out of service: every drained GPU from
    /// the start of its drain until it serves in the other role.
    pub fn cost_gpu_seconds(&self, pools: &Pools, t: &Transition) -> f64 {
        let shapes = &self.model.shapes;
        f64::from(t.drain_prefill * shapes.prefill_gpus())
            * (pools.prefill_drain_s + pools.decode_reload_s)
            + f64::from(t.drain_decode * shapes.decode_gpus())
                * (pools.decode_drain_s + pools.prefill_reload_s)
    }

    /// Folds the observed latencies into the smoothed corrections.
    fn update_corrections(&mut self, obs: &Observation) {
        let pools = self.model.pools(obs.demand, Corrections::default());
        if let Some(tpot) = obs.decode.tpot_s
            && obs.split.decode > 0
            && obs.decode.running > 0
        {
            let batch = f64::from(obs.decode.running) / f64::from(obs.split.decode);
            let predicted = pools.predicted_tpot(batch);
            if predicted > 0.0 && tpot > 0.0 {
                self.corrections.decode = smooth(self.corrections.decode, tpot / predicted);
            }
        }
        let workers = obs.split.prefill;
        let rho = obs.demand.rate * pools.prefill_service_s / f64::from(workers.max(1));
        if let Some(ttft) = obs.prefill.ttft_s
            && workers > 0
            && obs.prefill.queued <= workers
            && obs.decode.queued == 0
            && obs.decode.kv_use < PREFILL_CORRECTION_MAX_KV_USE
            && rho < PREFILL_CORRECTION_MAX_RHO
        {
            let predicted = pools.predicted_ttft(workers, obs.demand.rate);
            if predicted.is_finite() && predicted > 0.0 && ttft > 0.0 {
                self.corrections.prefill = smooth(self.corrections.prefill, ttft / predicted);
            }
        }
    }
}

fn smooth(old: f64, ratio: f64) -> f64 {
    let r = ratio.clamp(CORRECTION_RANGE.0, CORRECTION_RANGE.1);
    (1.0 - CORRECTION_ALPHA) * old + CORRECTION_ALPHA * r
}

fn sign(a: u32, b: u32) -> i8 {
    match a.cmp(&b) {
        std::cmp::Ordering::Greater => 1,
        std::cmp::Ordering::Less => -1,
        std::cmp::Ordering::Equal => 0,
    }
}
