//! A seeded discrete-event simulation of one deployment under a load trace,
//! with the rebalancer or a baseline policy moving workers between pools.
//!
//! Step times come from perfmodel (the functions the planner and the
//! engine's simulated backend use) and decisions from
//! [`crate::rebalance`], so a policy compared here is the policy the
//! operator runs. Arrivals are Poisson per phase; the same seed gives the
//! same arrivals to every policy and the same report on every run.
//!
//! Reports: goodput (requests meeting the SLO per GPU-hour of the whole
//! budget over the trace), SLO attainment, TTFT and TPOT percentiles, role
//! switches, GPU-seconds lost to switching, and per phase how long the
//! policy took to settle after the load shifted.

mod cluster;
pub mod policy;
mod rng;
pub mod trace;

use std::collections::BTreeMap;

use perfmodel::{Calibration, ModelProfile, Sku};
use serde::Serialize;

use crate::error::Result;
use crate::rebalance::{
    Action, CapacityModel, Corrections, Demand, Rebalancer, Settings, Shapes, SloTarget, Split,
};
use cluster::{Cluster, Kind, Setup};
pub use policy::{DYNAMO_INTERVAL_S, PolicyKind};
use rng::Rng;
pub use trace::{Phase, Trace};

/// Everything a run needs besides the trace and the policy.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub model: ModelProfile,
    pub sku: Sku,
    pub calibration: Calibration,
    pub shapes: Shapes,
    pub slo: SloTarget,
    /// The rebalancer's knobs (min workers apply to every policy).
    pub settings: Settings,
    pub seed: u64,
    /// Seconds after the trace ends that in-flight requests may still finish.
    pub tail_s: f64,
}

/// p50 and p99 of a latency, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

/// One move a policy made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoveRecord {
    pub at_s: f64,
    pub from: Split,
    pub to: Split,
    pub moves: u32,
    pub reason: String,
}

/// Figures of one phase (requests counted by arrival time).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseReport {
    pub name: String,
    pub start_s: f64,
    pub requests: u64,
    pub met_slo: u64,
    pub slo_attainment: f64,
    /// The split serving when the phase ended.
    pub split_at_end: Split,
    /// The best split for the phase's nominal load (the oracle's).
    pub best_split: Split,
    /// Seconds from the phase start to the policy's last move decided in
    /// the phase (0: it did not move).
    pub settle_s: f64,
    /// The same in the policy's decision intervals (none for static/oracle).
    pub intervals_to_settle: Option<u32>,
}

/// The outcome of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub policy: PolicyKind,
    pub trace: String,
    pub seed: u64,
    pub gpus: u32,
    pub duration_s: f64,
    pub requests: u64,
    pub completed: u64,
    pub met_slo: u64,
    /// Requests meeting the SLO per GPU-hour of the whole budget.
    pub goodput_per_gpu_hour: f64,
    pub slo_attainment: f64,
    pub ttft_s: Percentiles,
    pub tpot_s: Percentiles,
    /// Workers that changed role (drained and relaunched).
    pub role_switches: u32,
    pub moves: u32,
    pub gpu_seconds_switching: f64,
    pub start_split: Split,
    pub phases: Vec<PhaseReport>,
    pub move_log: Vec<MoveRecord>,
    /// Decisions by reason (rebalance only).
    pub decisions: BTreeMap<String, u32>,
    /// Every decision with its message (rebalance only).
    pub decision_log: Vec<DecisionRecord>,
}

/// One rebalancer decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionRecord {
    pub at_s: f64,
    pub split: Split,
    pub reason: String,
    pub message: String,
}

/// The demand a phase's nominal figures mean (80-100% draws: means at 90%).
pub fn phase_demand(p: &Phase) -> Demand {
    Demand {
        rate: p.rate,
        isl: 0.9 * f64::from(p.isl),
        osl: 0.9 * f64::from(p.osl),
    }
}

/// Runs every policy on the same trace and seed.
pub fn run_all(cfg: &SimConfig, trace: &Trace) -> Result<Vec<Report>> {
    PolicyKind::ALL
        .iter()
        .map(|p| run(cfg, trace, *p))
        .collect()
}

/// Simulates `trace` under `policy`.
pub fn run(cfg: &SimConfig, trace: &Trace, policy: PolicyKind) -> Result<Report> {
    trace.validate()?;
    let capacity = CapacityModel::new(
        cfg.model.clone(),
        cfg.sku,
        cfg.calibration,
        cfg.shapes,
        cfg.slo,
    )?;
    let min = cfg.settings.min_workers;
    let best: Vec<Split> = trace
        .phases
        .iter()
        .map(|p| {
            capacity.best_split(
                &capacity.pools(phase_demand(p), Corrections::default()),
                min,
                None,
            )
        })
        .collect();
    let start = best[0];
    let max_isl = trace.phases.iter().map(|p| p.isl).max().unwrap_or(1);
    let max_ctx = trace
        .phases
        .iter()
        .map(|p| p.isl + p.osl)
        .max()
        .unwrap_or(2);
    let setup = Setup::new(
        cfg.model.clone(),
        *capacity.hardware(),
        cfg.calibration,
        cfg.shapes,
        f64::from(max_isl),
        f64::from(max_ctx),
    );
    let mut cluster = Cluster::new(setup, start);
    let mut rng = Rng::new(cfg.seed);
    let starts = trace.starts();
    let end = trace.duration_s();
    let interval = match policy {
        PolicyKind::Rebalance => Some(cfg.settings.interval_s),
        PolicyKind::Dynamo => Some(DYNAMO_INTERVAL_S),
        PolicyKind::Static | PolicyKind::Oracle => None,
    };
    let mut rebalancer = Rebalancer::new(capacity.clone(), cfg.settings);
    let mut move_log = Vec::new();
    let mut decisions: BTreeMap<String, u32> = BTreeMap::new();
    let mut decision_log = Vec::new();

    if let Some(t) = next_arrival(trace, &starts, &mut rng, 0.0) {
        cluster.push(t, Kind::Arrival);
    }
    if let Some(i) = interval {
        cluster.push(i, Kind::Tick);
    }
    if policy == PolicyKind::Oracle {
        for (i, s) in starts.iter().enumerate().skip(1) {
            cluster.push(*s, Kind::PhaseStart(i));
        }
    }
    while let Some((t, kind)) = cluster.pop() {
        if t > end + cfg.tail_s {
            break;
        }
        cluster.now = t;
        match kind {
            Kind::Arrival => {
                let p = &trace.phases[trace.phase_at(t)];
                let (isl, osl) = (rng.length(p.isl), rng.length(p.osl));
                cluster.arrive(isl, osl);
                if let Some(next) = next_arrival(trace, &starts, &mut rng, t) {
                    cluster.push(next, Kind::Arrival);
                }
            }
            Kind::Tick => {
                let every = interval.unwrap_or(f64::INFINITY);
                let obs = cluster.observe(every);
                let current = obs.split;
                let target = match policy {
                    PolicyKind::Rebalance => {
                        let d = rebalancer.decide(&obs);
                        *decisions.entry(d.reason.as_str().to_string()).or_default() += 1;
                        decision_log.push(DecisionRecord {
                            at_s: t,
                            split: current,
                            reason: d.reason.as_str().to_string(),
                            message: d.message.clone(),
                        });
                        match d.action {
                            Action::Move(tr) => Some((tr.to, d.message)),
                            Action::Hold => None,
                        }
                    }
                    PolicyKind::Dynamo if !obs.switching => {
                        policy::dynamo_target(&capacity, &obs, min)
                            .filter(|s| *s != current)
                            .map(|s| {
                                (
                                    s,
                                    format!(
                                        "replicas for {:.2} req/s observed over {every:.0} s",
                                        obs.demand.rate
                                    ),
                                )
                            })
                    }
                    _ => None,
                };
                if let Some((to, reason)) = target {
                    let tr = cfg.shapes.transition(current, to);
                    cluster.apply(&tr, false);
                    move_log.push(MoveRecord {
                        at_s: t,
                        from: current,
                        to,
                        moves: tr.moves,
                        reason,
                    });
                }
                if t + every < end {
                    cluster.push(t + every, Kind::Tick);
                }
            }
            Kind::PhaseStart(i) => {
                let current = cluster.split();
                let to = best[i];
                if to != current {
                    let tr = cfg.shapes.transition(current, to);
                    cluster.apply(&tr, true);
                    move_log.push(MoveRecord {
                        at_s: t,
                        from: current,
                        to,
                        moves: tr.moves,
                        reason: format!("oracle: best split for phase {}", i + 1),
                    });
                }
            }
            other => cluster.handle(other),
        }
    }
    Ok(report(
        cfg,
        trace,
        policy,
        &cluster,
        start,
        &best,
        move_log,
        (decisions, decision_log),
        interval,
    ))
}

/// The next Poisson arrival after `t`, crossing phases (memorylessness lets
/// a draw restart at each phase boundary); `None` after the trace ends.
fn next_arrival(trace: &Trace, starts: &[f64], rng: &mut Rng, mut t: f64) -> Option<f64> {
    let end = trace.duration_s();
    while t < end {
        let i = trace.phase_at(t);
        let phase_end = starts[i] + trace.phases[i].duration_seconds;
        let rate = trace.phases[i].rate;
        if rate > 0.0 {
            let next = t + rng.exp(rate);
            if next < phase_end {
                return Some(next);
            }
        }
        t = phase_end;
    }
    None
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles { p50: 0.0, p99: 0.0 };
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &SimConfig,
    trace: &Trace,
    policy: PolicyKind,
    cluster: &Cluster,
    start: Split,
    best: &[Split],
    move_log: Vec<MoveRecord>,
    (decisions, decision_log): (BTreeMap<String, u32>, Vec<DecisionRecord>),
    interval: Option<f64>,
) -> Report {
    let overhead = cluster.overhead_s();
    let starts = trace.starts();
    let n = trace.phases.len();
    let mut per_phase = vec![(0u64, 0u64); n];
    let (mut ttft, mut tpot) = (Vec::new(), Vec::new());
    let (mut completed, mut met) = (0u64, 0u64);
    for r in &cluster.reqs {
        let i = trace.phase_at(r.arrival);
        per_phase[i].0 += 1;
        if r.done.is_nan() {
            continue;
        }
        completed += 1;
        let (a, b) = (r.ttft(overhead), r.tpot());
        ttft.push(a);
        tpot.push(b);
        if cfg.slo.met(a, b) {
            met += 1;
            per_phase[i].1 += 1;
        }
    }
    let duration = trace.duration_s();
    let gpus = cfg.shapes.gpu_budget;
    let requests = cluster.reqs.len() as u64;
    let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    let mut split = start;
    let phases = (0..n)
        .map(|i| {
            let (t0, t1) = (starts[i], starts[i] + trace.phases[i].duration_seconds);
            let in_phase: Vec<&MoveRecord> = move_log
                .iter()
                .filter(|m| m.at_s >= t0 && m.at_s < t1)
                .collect();
            if let Some(last) = in_phase.last() {
                split = last.to;
            }
            let settle_s = in_phase.last().map_or(0.0, |m| m.at_s - t0);
            PhaseReport {
                name: trace.phases[i].name.clone(),
                start_s: t0,
                requests: per_phase[i].0,
                met_slo: per_phase[i].1,
                slo_attainment: ratio(per_phase[i].1, per_phase[i].0),
                split_at_end: split,
                best_split: best[i],
                settle_s,
                intervals_to_settle: interval.map(|iv| (settle_s / iv).ceil() as u32),
            }
        })
        .collect();
    Report {
        policy,
        trace: trace.name.clone(),
        seed: cfg.seed,
        gpus,
        duration_s: duration,
        requests,
        completed,
        met_slo: met,
        goodput_per_gpu_hour: met as f64 / (f64::from(gpus) * duration / 3600.0),
        slo_attainment: ratio(met, requests),
        ttft_s: percentiles(ttft),
        tpot_s: percentiles(tpot),
        role_switches: cluster.role_switches,
        moves: cluster.moves,
        gpu_seconds_switching: cluster.lost_gpu_s,
        start_split: start,
        phases,
        move_log,
        decisions,
        decision_log,
    }
}

#[cfg(test)]
mod tests;
