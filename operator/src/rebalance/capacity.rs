//! What each pool can serve under the SLO for a given demand, from the same
//! perfmodel functions the planner uses, scaled by how much slower (or
//! faster) the pools ran than predicted.
//!
//! Prefill: `n` workers form an M/D/n queue of prompts (perfmodel's Erlang C
//! with half the M/M/n wait); its capacity is the largest arrival rate whose
//! predicted TTFT stays within the SLO, and never above
//! [`PREFILL_MAX_UTILIZATION`] of its raw rate. Decode: each worker runs the
//! largest batch whose TPOT meets the SLO and that fits in HBM at the
//! workload's context; its capacity is that batch's completion rate, derated
//! to [`DECODE_MAX_UTILIZATION`] so Poisson bursts do not push TPOT over.

use perfmodel::memory::MIN_PREFILL_TOKENS;
use perfmodel::recipe::{DecodePool, erlang_c};
use perfmodel::{Calibration, Evaluator, Hardware, ModelProfile, Sku, WorkerShape};
use serde::Serialize;

use super::{Demand, Shapes, SloTarget, Split};
use crate::error::{Error, Result};

/// Highest prefill utilization planned for, even when TTFT would allow more.
pub const PREFILL_MAX_UTILIZATION: f64 = 0.9;
/// Fraction of a decode worker's SLO-limited rate planned for.
pub const DECODE_MAX_UTILIZATION: f64 = 0.9;
/// Served rates within this fraction of the best count as equal when a
/// split is chosen (headroom and fewer moves break the tie).
const SERVED_TIE: f64 = 1e-3;

/// Observed-over-predicted latency factors (1 = the model is exact).
/// `prefill` scales predicted TTFT, `decode` scales predicted TPOT. Prefill
/// throughput itself is not scaled: TTFT is mostly fixed overhead and
/// queueing, so its ratio says little about tokens per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Corrections {
    pub prefill: f64,
    pub decode: f64,
}

impl Default for Corrections {
    fn default() -> Self {
        Self {
            prefill: 1.0,
            decode: 1.0,
        }
    }
}

/// The perf model of one deployment: model, SKU, shapes and SLO.
#[derive(Debug, Clone)]
pub struct CapacityModel {
    model: ModelProfile,
    hw: Hardware,
    cal: Calibration,
    pub shapes: Shapes,
    pub slo: SloTarget,
}

impl CapacityModel {
    /// Checks both shapes against the model and the NVLink domain.
    pub fn new(
        model: ModelProfile,
        sku: Sku,
        cal: Calibration,
        shapes: Shapes,
        slo: SloTarget,
    ) -> Result<Self> {
        let hw = sku.hardware();
        WorkerShape::prefill_tp(shapes.prefill_tp).validate(&model, &hw)?;
        WorkerShape {
            role: perfmodel::Role::Decode,
            parallelism: shapes.decode,
        }
        .validate(&model, &hw)?;
        if shapes.prefill_gpus() + shapes.decode_gpus() > shapes.gpu_budget {
            return Err(Error::Invalid(format!(
                "a GPU budget of {} cannot hold one prefill TP{} and one decode {} worker",
                shapes.gpu_budget, shapes.prefill_tp, shapes.decode
            )));
        }
        if slo.max_tpot_s.is_nan() || slo.max_tpot_s <= 0.0 {
            return Err(Error::Invalid("the SLO needs a positive TPOT bound".into()));
        }
        Ok(Self {
            model,
            hw,
            cal,
            shapes,
            slo,
        })
    }

    pub fn model(&self) -> &ModelProfile {
        &self.model
    }

    pub fn hardware(&self) -> &Hardware {
        &self.hw
    }

    pub fn calibration(&self) -> Calibration {
        self.cal
    }

    /// The pools' figures for `demand`, scaled by `corrections`.
    pub fn pools(&self, demand: Demand, corrections: Corrections) -> Pools {
        let workload = demand.workload();
        let eval = Evaluator::new(&self.model, self.hw, workload, self.cal);
        let prefill = eval.prefill_pool(self.shapes.prefill_tp);
        let decode = eval.decode_pool(self.shapes.decode);
        let isl = demand.isl.max(1.0);
        let osl = demand.osl.max(1.0);
        let budget = f64::from(prefill.memory.max_token_budget.max(MIN_PREFILL_TOKENS));
        let base_service = if prefill.memory.fits && prefill.tokens_per_s > 0.0 {
            isl / prefill.tokens_per_s
        } else {
            f64::INFINITY
        };
        let transfer = self.model.attention.kv_bytes(isl)
            / (self.hw.nvlink_bandwidth * self.cal.link_efficiency);
        let fixed_ttft_s = self.cal.request_overhead_ms * 1e-3 + transfer;

        let slow = corrections.decode.max(1e-3);
        let max_batch = if decode.memory.fits {
            f64::from(decode.memory.max_batch)
        } else {
            0.0
        };
        let (decode_batch, decode_tpot_s) =
            slo_batch(&decode, max_batch, slow, self.slo.max_tpot_s);
        let decode_worker_rate = if decode_batch >= 1.0 {
            DECODE_MAX_UTILIZATION * decode_batch / (osl * decode_tpot_s)
        } else {
            0.0
        };
        let reload = perfmodel::memory::start_seconds;
        Pools {
            demand,
            slo: self.slo,
            corrections,
            prefill_service_s: base_service,
            prefill_budget_tokens: budget,
            prefill_tokens_per_s: prefill.tokens_per_s,
            fixed_ttft_s,
            decode_batch,
            decode_tpot_s,
            decode_worker_rate,
            decode_max_batch: max_batch,
            prefill_drain_s: budget / prefill.tokens_per_s.max(1.0) + transfer,
            decode_drain_s: osl / 0.9 * decode_tpot_s.max(decode.tpot(1.0) * slow),
            prefill_reload_s: reload(prefill.memory.breakdown.weights),
            decode_reload_s: reload(decode.memory.breakdown.weights),
            decode,
        }
    }

    /// The split to run for `pools`: the one that serves the most of the
    /// demand; among near-equals the one with most headroom in its tighter
    /// pool, then the one fewest moves from `current`.
    pub fn best_split(&self, pools: &Pools, min_workers: u32, current: Option<Split>) -> Split {
        let splits = self.shapes.splits(min_workers);
        let served: Vec<f64> = splits.iter().map(|s| pools.served(*s)).collect();
        let top = served.iter().copied().fold(0.0, f64::max);
        let moves = |s: Split| current.map_or(0, |c| self.shapes.transition(c, s).moves);
        let mut best: Option<(Split, f64, u32)> = None;
        for (s, v) in splits.iter().zip(&served) {
            if *v < top * (1.0 - SERVED_TIE) {
                continue;
            }
            let headroom = pools.headroom(*s);
            let m = moves(*s);
            let better = match best {
                None => true,
                Some((_, h, bm)) => {
                    headroom > h * (1.0 + 1e-9) || (headroom >= h * (1.0 - 1e-9) && m < bm)
                }
            };
            if better {
                best = Some((*s, headroom, m));
            }
        }
        best.map(|b| b.0).unwrap_or(Split {
            prefill: min_workers.max(1),
            decode: min_workers.max(1),
        })
    }
}

/// Largest batch per decode worker (up to `max_batch`) whose TPOT, scaled by
/// `slow`, meets `max_tpot`, and that TPOT; `(0, tpot(1))` when none does.
fn slo_batch(decode: &DecodePool, max_batch: f64, slow: f64, max_tpot: f64) -> (f64, f64) {
    let tpot = |b: f64| decode.tpot(b) * slow;
    if max_batch < 1.0 || tpot(1.0) > max_tpot {
        return (0.0, tpot(1.0));
    }
    if tpot(max_batch) <= max_tpot {
        return (max_batch, tpot(max_batch));
    }
    let (mut lo, mut hi) = (1.0, max_batch);
    while hi - lo > 0.5 {
        let mid = 0.5 * (lo + hi);
        if tpot(mid) <= max_tpot {
            lo = mid
        } else {
            hi = mid
        }
    }
    let b = lo.floor().max(1.0);
    (b, tpot(b))
}

/// One workload's pool figures (rates in requests per second).
#[derive(Debug, Clone)]
pub struct Pools {
    pub demand: Demand,
    pub slo: SloTarget,
    pub corrections: Corrections,
    /// Prefill worker-seconds per prompt as perfmodel predicts it.
    pub prefill_service_s: f64,
    pub prefill_budget_tokens: f64,
    pub prefill_tokens_per_s: f64,
    /// TTFT no queueing removes: request overhead plus KV transfer.
    pub fixed_ttft_s: f64,
    /// Requests per decode worker at the SLO (0: the SLO is out of reach).
    pub decode_batch: f64,
    /// Corrected TPOT at that batch.
    pub decode_tpot_s: f64,
    /// Requests per second one decode worker completes at the SLO, derated.
    pub decode_worker_rate: f64,
    /// Requests one decode worker holds in HBM at the workload's context.
    pub decode_max_batch: f64,
    /// Seconds to drain a worker: one prefill batch, or the longest decode.
    pub prefill_drain_s: f64,
    pub decode_drain_s: f64,
    /// Seconds from drained to serving in the role: weights plus start-up.
    pub prefill_reload_s: f64,
    pub decode_reload_s: f64,
    decode: DecodePool,
}

impl Pools {
    /// Requests per second `workers` prefill workers admit with their
    /// predicted TTFT, scaled by the TTFT correction, within the SLO; never
    /// more than [`PREFILL_MAX_UTILIZATION`] of their rate.
    pub fn prefill_capacity(&self, workers: u32) -> f64 {
        let s = self.prefill_service_s;
        if workers == 0 || !s.is_finite() || s <= 0.0 {
            return 0.0;
        }
        let cap = PREFILL_MAX_UTILIZATION * f64::from(workers) / s;
        let Some(budget) = self.slo.max_ttft_s else {
            return cap;
        };
        let factor = self.corrections.prefill.max(1e-3);
        let ttft = |rate: f64| self.predicted_ttft(workers, rate) * factor;
        if ttft(0.0) > budget {
            return 0.0;
        }
        if ttft(cap) <= budget {
            return cap;
        }
        let (mut lo, mut hi) = (0.0, cap);
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if ttft(mid) <= budget {
                lo = mid
            } else {
                hi = mid
            }
        }
        lo
    }

    /// Uncorrected predicted TTFT at `rate` on `workers` prefill workers:
    /// fixed part, M/D/n wait, and the prompt's own pass (which shares its
    /// batch with other prompts in proportion to utilization).
    pub fn predicted_ttft(&self, workers: u32, rate: f64) -> f64 {
        let s = self.prefill_service_s;
        if workers == 0 || !s.is_finite() {
            return f64::INFINITY;
        }
        let n = f64::from(workers);
        let rho = rate * s / n;
        if rho >= 1.0 {
            return f64::INFINITY;
        }
        let wait = 0.5 * erlang_c(workers, rate * s) * s / (n * (1.0 - rho));
        let isl = self.demand.isl.max(1.0);
        let extra = rho * (self.prefill_budget_tokens - isl).max(0.0);
        let pass = s * (isl + extra) / isl;
        self.fixed_ttft_s + wait + pass
    }

    /// Uncorrected predicted TPOT at `batch` requests per decode worker.
    pub fn predicted_tpot(&self, batch: f64) -> f64 {
        self.decode.tpot(batch)
    }

    pub fn decode_capacity(&self, workers: u32) -> f64 {
        f64::from(workers) * self.decode_worker_rate
    }

    /// Requests per second a split serves within the SLO.
    pub fn served(&self, s: Split) -> f64 {
        self.demand
            .rate
            .max(0.0)
            .min(self.prefill_capacity(s.prefill))
            .min(self.decode_capacity(s.decode))
    }

    /// Capacity of the tighter pool.
    pub fn headroom(&self, s: Split) -> f64 {
        self.prefill_capacity(s.prefill)
            .min(self.decode_capacity(s.decode))
    }
}
