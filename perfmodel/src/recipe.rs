//! Recipe evaluation: what a prefill pool plus a decode pool deliver at a
//! given concurrency, in InferenceX terms.
//!
//! The benchmark is a closed loop: `concurrency` clients each send the next
//! request when the previous one ends. In steady state a request spends
//! TTFT (fixed overhead + prefill queue + prefill + KV transfer) and then
//! OSL x TPOT decoding. The decode batch per worker `b` sets both TPOT and the
//! rate decode drains requests; Little's law ties it to the prefill side:
//! `concurrency = decode workers x b + rate x TTFT(rate)`. The prefill queue
//! is M/D/c (Erlang C with half the M/M/c wait), so as prefill saturates its
//! queue absorbs the clients decode cannot. When decode runs out of KV room,
//! the excess waits before decode and that wait counts in TTFT.
//!
//! ISL and OSL are drawn uniformly from 80-100% of nominal, so their means
//! (90%) drive throughput, and KV is sized for the nominal maximum.

use serde::Serialize;

use crate::calibration::Calibration;
use crate::hardware::Hardware;
use crate::memory::{self, MemoryFit};
use crate::model::ModelProfile;
use crate::shape::{Parallelism, WorkerShape};
use crate::steptime::StepModel;

/// Nominal input and output lengths of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Workload {
    pub isl: u32,
    pub osl: u32,
}

impl Workload {
    /// Mean of a length drawn uniformly from 80-100% of nominal.
    pub fn mean_isl(&self) -> f64 {
        0.9 * f64::from(self.isl)
    }

    pub fn mean_osl(&self) -> f64 {
        0.9 * f64::from(self.osl)
    }

    /// Longest sequence a decode worker must hold.
    pub fn max_context(&self) -> f64 {
        f64::from(self.isl) + f64::from(self.osl)
    }
}

/// A disaggregated recipe: two pools and the concurrency they serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Recipe {
    pub prefill_workers: u32,
    pub prefill: Parallelism,
    pub decode_workers: u32,
    pub decode: Parallelism,
    pub concurrency: u32,
}

impl Recipe {
    pub fn prefill_gpus(&self) -> u32 {
        self.prefill_workers * self.prefill.gpus()
    }

    pub fn decode_gpus(&self) -> u32 {
        self.decode_workers * self.decode.gpus()
    }

    pub fn gpus(&self) -> u32 {
        self.prefill_gpus() + self.decode_gpus()
    }
}

/// What limits a recipe's throughput at its concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bottleneck {
    /// Prefill is (nearly) saturated: requests queue for it.
    Prefill,
    /// Decode has no KV room for more requests.
    DecodeMemory,
    /// Neither pool is full: more clients would raise throughput.
    Concurrency,
}

/// Predicted figures, named as in the InferenceX CSV.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figures {
    pub tok_s_gpu: f64,
    pub tok_s_user: f64,
    pub tpot_ms: f64,
    pub ttft_ms: f64,
    pub usd_per_mtok: f64,
    /// Completed requests per second.
    pub request_rate: f64,
    /// Requests decoding on each decode worker.
    pub decode_batch_per_worker: f64,
    pub prefill_utilization: f64,
    pub bottleneck: Bottleneck,
}

/// The outcome of evaluating one recipe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub recipe: Recipe,
    pub gpus: u32,
    pub fits: bool,
    /// Why it does not fit, when it does not.
    pub reason: Option<String>,
    pub prefill_memory: MemoryFit,
    pub decode_memory: MemoryFit,
    pub figures: Option<Figures>,
}

/// A prefill worker shape with its per-worker rates precomputed.
#[derive(Debug, Clone)]
pub struct PrefillPool {
    pub memory: MemoryFit,
    step: StepModel,
    /// Prompt tokens per second one worker sustains at its token budget.
    pub tokens_per_s: f64,
    budget: f64,
    isl: f64,
    attn_flops: f64,
    kv_transfer_s: f64,
}

impl PrefillPool {
    /// Time to prefill one prompt when the worker also carries `extra` other
    /// tokens in the same passes.
    fn latency(&self, extra: f64) -> f64 {
        let passes = (self.isl / self.budget).ceil().max(1.0);
        let per_pass = (self.isl / passes + extra).min(self.budget);
        passes * self.step.prefill(per_pass, 1.0, self.attn_flops).total()
    }
}

/// A decode worker shape with its inputs precomputed.
#[derive(Debug, Clone)]
pub struct DecodePool {
    pub memory: MemoryFit,
    step: StepModel,
    kv_read: f64,
    attn_flops: f64,
}

impl DecodePool {
    /// Seconds per output token at `batch` requests per worker.
    pub fn tpot(&self, batch: f64) -> f64 {
        self.step
            .decode(batch.max(1.0), self.kv_read, self.attn_flops)
            .total()
    }
}

/// Evaluates recipes of one model on one SKU for one workload.
#[derive(Debug, Clone)]
pub struct Evaluator<'a> {
    pub model: &'a ModelProfile,
    pub hw: Hardware,
    pub workload: Workload,
    pub cal: Calibration,
}

impl<'a> Evaluator<'a> {
    pub fn new(
        model: &'a ModelProfile,
        hw: Hardware,
        workload: Workload,
        cal: Calibration,
    ) -> Self {
        Self {
            model,
            hw,
            workload,
            cal,
        }
    }

    pub fn prefill_pool(&self, tp: u32) -> PrefillPool {
        let shape = WorkerShape::prefill_tp(tp);
        let wl = &self.workload;
        let memory = memory::fit(
            self.model,
            &self.hw,
            shape,
            f64::from(wl.isl),
            wl.max_context(),
        );
        let step = StepModel::new(self.model, &self.hw, shape.parallelism, self.cal);
        let isl = wl.mean_isl();
        let attn_flops = self.model.attention.prefill_flops_per_token(isl);
        let budget = f64::from(memory.max_token_budget.max(memory::MIN_PREFILL_TOKENS));
        let tokens_per_s = budget / step.prefill(budget, budget / isl, attn_flops).total();
        let kv_transfer_s = self.model.attention.kv_bytes(isl)
            / (self.hw.nvlink_bandwidth * self.cal.link_efficiency);
        PrefillPool {
            memory,
            step,
            tokens_per_s,
            budget,
            isl,
            attn_flops,
            kv_transfer_s,
        }
    }

    pub fn decode_pool(&self, parallelism: Parallelism) -> DecodePool {
        let shape = WorkerShape {
            role: crate::shape::Role::Decode,
            parallelism,
        };
        let wl = &self.workload;
        let memory = memory::fit(
            self.model,
            &self.hw,
            shape,
            f64::from(wl.isl),
            wl.max_context(),
        );
        let step = StepModel::new(self.model, &self.hw, parallelism, self.cal);
        let ctx = wl.mean_isl() + wl.mean_osl() / 2.0;
        DecodePool {
            memory,
            step,
            kv_read: self.model.attention.kv_read_bytes(ctx),
            attn_flops: self.model.attention.flops_per_token(ctx),
        }
    }

    /// Evaluates one recipe from scratch.
    pub fn evaluate(&self, recipe: Recipe) -> Evaluation {
        let prefill = self.prefill_pool(recipe.prefill.gpus());
        let decode = self.decode_pool(recipe.decode);
        self.evaluate_pools(&prefill, &decode, recipe)
    }

    /// Evaluates one recipe with pools already built (the search reuses them).
    pub fn evaluate_pools(
        &self,
        prefill: &PrefillPool,
        decode: &DecodePool,
        recipe: Recipe,
    ) -> Evaluation {
        let mut reasons = Vec::new();
        for fit in [&prefill.memory, &decode.memory] {
            if let Some(r) = &fit.reason {
                reasons.push(r.clone());
            }
        }
        if recipe.prefill_workers == 0 || recipe.decode_workers == 0 || recipe.concurrency == 0 {
            reasons.push("a recipe needs at least one worker per pool and one client".into());
        }
        let fits = reasons.is_empty();
        let figures = fits.then(|| self.solve(prefill, decode, recipe));
        Evaluation {
            recipe,
            gpus: recipe.gpus(),
            fits,
            reason: (!fits).then(|| reasons.join("; ")),
            prefill_memory: prefill.memory.clone(),
            decode_memory: decode.memory.clone(),
            figures,
        }
    }

    fn solve(&self, prefill: &PrefillPool, decode: &DecodePool, recipe: Recipe) -> Figures {
        let wl = &self.workload;
        let (isl, osl) = (wl.mean_isl(), wl.mean_osl());
        let np = f64::from(recipe.prefill_workers);
        let nd = f64::from(recipe.decode_workers);
        let clients = f64::from(recipe.concurrency);
        let service = isl / prefill.tokens_per_s; // seconds of a worker per prompt
        let capacity = np / service; // prompts per second
        let fixed = self.cal.request_overhead_ms * 1e-3 + prefill.kv_transfer_s;
        let ttft = |rate: f64| -> f64 {
            let rho = rate / capacity;
            if rho >= 1.0 {
                return f64::INFINITY;
            }
            let wait = 0.5 * erlang_c(recipe.prefill_workers, rate * service) * service
                / (np * (1.0 - rho));
            let extra = rho * (prefill.budget - isl).max(0.0);
            fixed + wait + prefill.latency(extra)
        };
        let rate_at = |b: f64| nd * b / (osl * decode.tpot(b));
        let population = |b: f64| {
            let rate = rate_at(b);
            nd * b + rate * ttft(rate)
        };

        let b_max = f64::from(decode.memory.max_batch);
        let (b, extra_wait, memory_bound) = if population(b_max) <= clients {
            let rate = rate_at(b_max);
            (b_max, (clients - population(b_max)) / rate, true)
        } else {
            // Bisect to a millionth of a request per worker: far below what
            // any reported figure resolves, and 2-3x fewer steps than a fixed
            // 80 (each step costs an Erlang-C pass over the prefill workers).
            let (mut lo, mut hi) = (0.0, b_max);
            while hi - lo > 1e-6 * b_max.max(1.0) {
                let mid = 0.5 * (lo + hi);
                if population(mid) < clients {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            (0.5 * (lo + hi), 0.0, false)
        };
        let rate = rate_at(b);
        let tpot = decode.tpot(b);
        let ttft = ttft(rate) + extra_wait;
        let utilization = rate / capacity;
        let tok_s_gpu = rate * (isl + osl) / f64::from(recipe.gpus());
        Figures {
            tok_s_gpu,
            tok_s_user: 1.0 / tpot,
            tpot_ms: tpot * 1e3,
            ttft_ms: ttft * 1e3,
            usd_per_mtok: self.hw.tco_usd_per_gpu_hour * 1e6 / (3600.0 * tok_s_gpu),
            request_rate: rate,
            decode_batch_per_worker: b,
            prefill_utilization: utilization,
            bottleneck: if memory_bound {
                Bottleneck::DecodeMemory
            } else if utilization > 0.9 {
                Bottleneck::Prefill
            } else {
                Bottleneck::Concurrency
            },
        }
    }
}

/// Erlang C: probability that an arrival waits in an M/M/c queue with `c`
/// servers and offered load `a` (in servers). Stable recursion on Erlang B.
pub fn erlang_c(c: u32, a: f64) -> f64 {
    let c_f = f64::from(c);
    if a >= c_f {
        return 1.0;
    }
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (f64::from(k) + a * b);
    }
    let rho = a / c_f;
    b / (1.0 - rho * (1.0 - b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::Sku;

    #[test]
    fn erlang_c_limits() {
        assert!((erlang_c(1, 0.5) - 0.5).abs() < 1e-12);
        assert!(erlang_c(4, 0.1) < 1e-3);
        assert_eq!(erlang_c(2, 3.0), 1.0);
    }

    fn eval(sku: Sku, recipe: Recipe) -> Evaluation {
        let m = ModelProfile::builtin("deepseek-v4-pro").unwrap();
        let e = Evaluator::new(
            &m,
            sku.hardware(),
            Workload {
                isl: 8192,
                osl: 1024,
            },
            Calibration::fitted(),
        );
        e.evaluate(recipe)
    }

    fn recipe(pw: u32, ptp: u32, dw: u32, d: Parallelism, c: u32) -> Recipe {
        Recipe {
            prefill_workers: pw,
            prefill: Parallelism::Tp(ptp),
            decode_workers: dw,
            decode: d,
            concurrency: c,
        }
    }

    #[test]
    fn more_clients_trade_interactivity_for_throughput() {
        let lo = eval(Sku::Gb200, recipe(1, 8, 1, Parallelism::Ep(8), 64))
            .figures
            .unwrap();
        let hi = eval(Sku::Gb200, recipe(1, 8, 1, Parallelism::Ep(8), 1024))
            .figures
            .unwrap();
        assert!(hi.tok_s_gpu > lo.tok_s_gpu);
        assert!(hi.tok_s_user < lo.tok_s_user);
        assert!(hi.ttft_ms > lo.ttft_ms);
        assert_eq!(hi.bottleneck, Bottleneck::Prefill);
        // InferenceX cost definition.
        let want = 2.21e6 / (3600.0 * hi.tok_s_gpu);
        assert!((hi.usd_per_mtok - want).abs() < 1e-9);
    }

    #[test]
    fn a_shape_that_does_not_fit_says_why() {
        let e = eval(Sku::Gb200, recipe(1, 4, 1, Parallelism::Ep(8), 64));
        assert!(!e.fits && e.figures.is_none());
        assert!(e.reason.unwrap().contains("prefill TP4"));
    }

    #[test]
    fn littles_law_holds() {
        let f = eval(Sku::Gb300, recipe(2, 8, 1, Parallelism::Ep(8), 512))
            .figures
            .unwrap();
        let osl = 0.9 * 1024.0;
        let in_system = f.request_rate * (f.ttft_ms / 1e3 + osl * f.tpot_ms / 1e3);
        assert!((in_system - 512.0).abs() / 512.0 < 0.02, "{in_system}");
    }
}
