//! The policies compared in the simulator: the rebalancer, and three
//! baselines built on the same capacity model.
//!
//! - `static`: the best split for the first phase, kept all along.
//! - `oracle`: at each phase start, the best split for that phase, switched
//!   instantly at no cost (drained workers finish their work on no budget).
//! - `dynamo`: a throughput planner in the style of NVIDIA Dynamo's SLA
//!   planner: every 180 s, replicas = ceil(observed arrival rate /
//!   per-replica capacity at the SLO) for each pool from perfmodel, scaled
//!   down to the GPU budget when over it; no hysteresis, no window, no cost
//!   check, every change applied at once (with the same drain and reload).
//! - `rebalance`: [`crate::rebalance::Rebalancer`] every interval.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::rebalance::capacity::PREFILL_MAX_UTILIZATION;
use crate::rebalance::{CapacityModel, Corrections, Observation, Split};

/// Adjustment interval of the Dynamo-style planner (Dynamo's SLA planner
/// default).
pub const DYNAMO_INTERVAL_S: f64 = 180.0;

/// Which policy drives the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Rebalance,
    Static,
    Oracle,
    Dynamo,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::Rebalance,
        PolicyKind::Static,
        PolicyKind::Oracle,
        PolicyKind::Dynamo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Rebalance => "rebalance",
            PolicyKind::Static => "static",
            PolicyKind::Oracle => "oracle",
            PolicyKind::Dynamo => "dynamo",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown policy `{s}`: use rebalance, static, oracle or dynamo"))
    }
}

/// The Dynamo-style planner's target for what it observed over its interval.
pub fn dynamo_target(model: &CapacityModel, obs: &Observation, min_workers: u32) -> Option<Split> {
    let d = obs.demand;
    if !(d.rate > 0.0 && d.isl > 0.0 && d.osl > 0.0) {
        return None;
    }
    let pools = model.pools(d, Corrections::default());
    let shapes = model.shapes;
    let per_prefill = PREFILL_MAX_UTILIZATION / pools.prefill_service_s;
    let replicas = |per: f64, max: u32| {
        if per > 0.0 && per.is_finite() {
            ((d.rate / per).ceil() as u32).clamp(min_workers, max.max(min_workers))
        } else {
            max.max(min_workers)
        }
    };
    let mut p = replicas(
        per_prefill,
        shapes.gpu_budget / shapes.prefill_gpus().max(1),
    );
    let mut q = replicas(
        pools.decode_worker_rate,
        shapes.gpu_budget / shapes.decode_gpus().max(1),
    );
    let over = shapes.gpus(Split {
        prefill: p,
        decode: q,
    });
    if over > shapes.gpu_budget {
        let f = f64::from(shapes.gpu_budget) / f64::from(over);
        p = ((f64::from(p) * f).floor() as u32).max(min_workers);
        q = ((f64::from(q) * f).floor() as u32).max(min_workers);
        while shapes.gpus(Split {
            prefill: p,
            decode: q,
        }) > shapes.gpu_budget
        {
            let (pg, qg) = (p * shapes.prefill_gpus(), q * shapes.decode_gpus());
            if pg >= qg && p > min_workers {
                p -= 1;
            } else if q > min_workers {
                q -= 1;
            } else {
                break;
            }
        }
    }
    Some(Split {
        prefill: p,
        decode: q,
    })
}
