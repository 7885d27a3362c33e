//! The rebalancer's decision core: given what the pools report, which split
//! of the GPU budget between prefill and decode workers to run, and whether
//! moving workers there is worth it now.
//!
//! Pure: no kube, etcd or gRPC types, no clock (the caller passes the time
//! of each observation). The live operator and `rackscale simulate` call the
//! same [`Rebalancer::decide`], so what the simulator reports is what the
//! operator would do.
//!
//! - [`capacity`]: what a pool of N workers serves under the SLO for a given
//!   demand, from perfmodel, corrected by observed against predicted latency.
//! - [`decide`]: the stateful policy (stabilization window, hysteresis, cap
//!   on moves, minimum workers, switch cost against gain), one reason string
//!   per decision.
//! - [`live`]: what the live operator does around it: load reports into
//!   observations, which workers drain, how their GPUs are cut into workers
//!   of the other role (`crate::rebalancing` runs it against engines).
//!
//! Invariants: every split it proposes fits the GPU budget and keeps at least
//! `min_workers` workers in each pool; a worker moves whole (its GPUs become
//! workers of the other role and shape; GPUs left over stay idle).

pub mod capacity;
pub mod decide;
pub mod live;

#[cfg(test)]
mod tests;

use std::fmt;

use perfmodel::Parallelism;
use perfmodel::search::Slo;
use serde::Serialize;

pub use capacity::{CapacityModel, Corrections, Pools};
pub use decide::{Action, Decision, Observation, PoolLoad, Reason, Rebalancer, Settings};

/// Weight-load bandwidth and engine start-up cost of a relaunch, shared with
/// the simulated engine (which waits them out before it registers).
pub use perfmodel::memory::{ENGINE_START_S, WEIGHT_LOAD_BYTES_PER_S};

/// The two worker shapes of a deployment and its GPU budget. Shapes stay
/// fixed; the rebalancer changes only how many workers of each run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shapes {
    /// Tensor-parallel width of a prefill worker.
    pub prefill_tp: u32,
    /// How a decode worker splits the model.
    pub decode: Parallelism,
    /// Most GPUs the deployment may use.
    pub gpu_budget: u32,
}

impl Shapes {
    pub fn prefill_gpus(&self) -> u32 {
        self.prefill_tp
    }

    pub fn decode_gpus(&self) -> u32 {
        self.decode.gpus()
    }

    /// GPUs a split occupies.
    pub fn gpus(&self, s: Split) -> u32 {
        s.prefill * self.prefill_gpus() + s.decode * self.decode_gpus()
    }

    /// Every split within the budget with at least `min_workers` per pool
    /// that leaves too few idle GPUs for another worker of either shape
    /// (a split that could add a worker is never better than one that does).
    pub fn splits(&self, min_workers: u32) -> Vec<Split> {
        let (p, d) = (self.prefill_gpus().max(1), self.decode_gpus().max(1));
        let min = min_workers.max(1);
        let mut out = Vec::new();
        let mut decode = min;
        while decode * d + min * p <= self.gpu_budget {
            let prefill = (self.gpu_budget - decode * d) / p;
            let idle = self.gpu_budget - decode * d - prefill * p;
            if idle < d {
                out.push(Split { prefill, decode });
            }
            decode += 1;
        }
        out
    }

    /// Workers each side drains and launches to go from `from` to `to`.
    pub fn transition(&self, from: Split, to: Split) -> Transition {
        let drain_prefill = from.prefill.saturating_sub(to.prefill);
        let drain_decode = from.decode.saturating_sub(to.decode);
        let launch_prefill = to.prefill.saturating_sub(from.prefill);
        let launch_decode = to.decode.saturating_sub(from.decode);
        let drained = drain_prefill * self.prefill_gpus() + drain_decode * self.decode_gpus();
        let launched = launch_prefill * self.prefill_gpus() + launch_decode * self.decode_gpus();
        let unit = self.prefill_gpus().max(self.decode_gpus()).max(1);
        Transition {
            from,
            to,
            drain_prefill,
            drain_decode,
            launch_prefill,
            launch_decode,
            moves: drained.max(launched).div_ceil(unit),
        }
    }
}

/// How many workers each pool runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Split {
    pub prefill: u32,
    pub decode: u32,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}P:{}D", self.prefill, self.decode)
    }
}

/// The workers that change role between two splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub from: Split,
    pub to: Split,
    pub drain_prefill: u32,
    pub drain_decode: u32,
    pub launch_prefill: u32,
    pub launch_decode: u32,
    /// Moves counted in units of the wider worker's GPUs: one DEP16 decode
    /// worker becoming four TP4 prefill workers is one move.
    pub moves: u32,
}

/// The SLO in the rebalancer's units (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SloTarget {
    pub max_tpot_s: f64,
    pub max_ttft_s: Option<f64>,
}

impl SloTarget {
    /// From the planner's SLO; `None` without a per-token bound.
    pub fn from_slo(slo: &Slo) -> Option<Self> {
        let by_user = slo.min_tok_s_user.filter(|v| *v > 0.0).map(|v| 1.0 / v);
        let by_tpot = slo.max_tpot_ms.filter(|v| *v > 0.0).map(|v| v / 1e3);
        let max_tpot_s = match (by_user, by_tpot) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(Self {
            max_tpot_s,
            max_ttft_s: slo.max_ttft_ms.filter(|v| *v > 0.0).map(|v| v / 1e3),
        })
    }

    /// Whether one request's latencies meet the SLO.
    pub fn met(&self, ttft_s: f64, tpot_s: f64) -> bool {
        tpot_s <= self.max_tpot_s && self.max_ttft_s.is_none_or(|m| ttft_s <= m)
    }
}

/// Observed demand: arrivals per second and mean lengths of what arrived.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Demand {
    pub rate: f64,
    /// Mean prompt length in tokens.
    pub isl: f64,
    /// Mean requested output length in tokens.
    pub osl: f64,
}

impl Demand {
    /// The nominal workload whose 80-100% draws have these means.
    pub fn workload(&self) -> perfmodel::Workload {
        let nominal = |mean: f64| (mean / 0.9).round().clamp(1.0, f64::from(u32::MAX)) as u32;
        perfmodel::Workload {
            isl: nominal(self.isl),
            osl: nominal(self.osl),
        }
    }
}
