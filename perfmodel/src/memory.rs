//! Memory fit: what one GPU of a worker holds, and the largest batch or
//! prefill token budget that fits in usable HBM.
//!
//! Per GPU: weights (split by the shape) + KV for the worker's batch at full
//! context + activations for the tokens of one forward pass + a fixed runtime
//! reserve (CUDA graphs, communication buffers, allocator slack). The answer
//! names the term that limits it, so a planner can say why a shape is
//! rejected.

use serde::Serialize;

use crate::hardware::Hardware;
use crate::model::ModelProfile;
use crate::shape::{Parallelism, Role, WorkerShape};

/// Per-GPU runtime reserve: CUDA context and graphs, NCCL / all-to-all
/// buffers, allocator fragmentation.
pub const RUNTIME_RESERVE_BYTES: f64 = 8e9;
/// Largest prefill token budget the planner considers (a forward pass of
/// more tokens no longer improves GEMM efficiency).
pub const MAX_PREFILL_TOKENS: u32 = 32_768;
/// Smallest prefill token budget worth running.
pub const MIN_PREFILL_TOKENS: u32 = 2_048;
/// Completed prefills whose KV waits for its decode worker to pull it, per
/// prefill batch in flight.
pub const TRANSFER_STAGING_BATCHES: f64 = 2.0;
/// Largest decode batch per rank the planner considers (scheduler limit).
pub const MAX_DECODE_BATCH_PER_RANK: u32 = 1024;
/// Bytes per second one GPU reads its weight shard at when an engine starts
/// (or is relaunched in the other role): a GB200/GB300 tray's local NVMe
/// RAID and Grace page cache deliver about 40 GB/s, shared by its 4 GPUs.
pub const WEIGHT_LOAD_BYTES_PER_S: f64 = 10e9;
/// Seconds an engine needs on top of loading weights before it serves:
/// process start, NCCL / all-to-all group set-up, CUDA graph capture, warm-up.
pub const ENGINE_START_S: f64 = 30.0;

/// Seconds from launching an engine whose GPUs each hold `weights_per_gpu`
/// bytes of weights to its serving: what a role switch leaves a worker's
/// GPUs unavailable for.
pub fn start_seconds(weights_per_gpu: f64) -> f64 {
    weights_per_gpu.max(0.0) / WEIGHT_LOAD_BYTES_PER_S + ENGINE_START_S
}

/// The term of the breakdown that limits a fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Weights,
    KvCache,
    Activations,
    SchedulerCap,
}

/// Per-GPU bytes of one worker at its chosen batch or token budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Breakdown {
    pub weights: f64,
    pub kv_cache: f64,
    pub activations: f64,
    pub reserve: f64,
}

impl Breakdown {
    pub fn total(&self) -> f64 {
        self.weights + self.kv_cache + self.activations + self.reserve
    }
}

/// The outcome of fitting one worker shape in HBM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryFit {
    pub shape: WorkerShape,
    pub fits: bool,
    /// Usable HBM per GPU.
    pub capacity: f64,
    /// Per-GPU use at `max_batch` (decode) or `max_token_budget` (prefill);
    /// for a shape that does not fit, at the smallest useful batch.
    pub breakdown: Breakdown,
    /// Requests a decode worker can hold at full context (all ranks together).
    pub max_batch: u32,
    /// Tokens per prefill forward pass.
    pub max_token_budget: u32,
    pub limiting: Limit,
    /// Why it does not fit, in words, when it does not.
    pub reason: Option<String>,
}

/// Fits `shape` for requests of up to `max_context` tokens (ISL + OSL) whose
/// prompts are `isl` tokens long.
pub fn fit(
    model: &ModelProfile,
    hw: &Hardware,
    shape: WorkerShape,
    isl: f64,
    max_context: f64,
) -> MemoryFit {
    let n = f64::from(shape.gpus());
    let w = &model.weights;
    let weights = match shape.parallelism {
        Parallelism::Tp(_) => w.total_bytes() / n,
        Parallelism::Ep(_) => w.non_expert_bytes() + w.routed_experts.bytes() / n,
    };
    let capacity = hw.usable_hbm_bytes;
    let free = capacity - weights - RUNTIME_RESERVE_BYTES;
    match shape.role {
        Role::Decode => fit_decode(model, shape, weights, free, capacity, max_context),
        Role::Prefill => fit_prefill(model, shape, weights, free, capacity, isl),
    }
}

fn fit_decode(
    model: &ModelProfile,
    shape: WorkerShape,
    weights: f64,
    free: f64,
    capacity: f64,
    max_context: f64,
) -> MemoryFit {
    let n = shape.gpus();
    let kv_req = model.attention.kv_bytes(max_context);
    // EP ranks each hold their own requests' KV; TP ranks all hold every
    // request's latent KV (one KV head cannot be split across ranks).
    let (ranks_holding, split) = match shape.parallelism {
        Parallelism::Ep(e) => (f64::from(e), 1),
        Parallelism::Tp(t) => (1.0, t),
    };
    let act_per_req = model.activation_bytes_per_token(split) / ranks_holding;
    let per_req = kv_req / ranks_holding + act_per_req;
    let by_memory = if free > 0.0 {
        (free / per_req).floor()
    } else {
        0.0
    };
    let cap = f64::from(MAX_DECODE_BATCH_PER_RANK) * ranks_holding;
    let max_batch = by_memory.min(cap).max(0.0);
    let min_useful = ranks_holding; // one request per rank
    let fits = max_batch >= min_useful;
    let shown = if fits { max_batch } else { min_useful };
    let breakdown = Breakdown {
        weights,
        kv_cache: shown * kv_req / ranks_holding,
        activations: shown * act_per_req,
        reserve: RUNTIME_RESERVE_BYTES,
    };
    let limiting = if weights + RUNTIME_RESERVE_BYTES > capacity {
        Limit::Weights
    } else if by_memory > cap {
        Limit::SchedulerCap
    } else {
        Limit::KvCache
    };
    let reason = (!fits).then(|| {
        format!(
            "{shape}: per GPU {:.0} GB weights + {:.1} GB KV for one request per rank at {:.0} tokens + {:.0} GB reserve exceeds {:.0} GB usable HBM",
            weights / 1e9,
            breakdown.kv_cache / 1e9,
            max_context,
            RUNTIME_RESERVE_BYTES / 1e9,
            capacity / 1e9
        )
    });
    MemoryFit {
        shape,
        fits,
        capacity,
        breakdown,
        max_batch: max_batch as u32,
        max_token_budget: n,
        limiting,
        reason,
    }
}

fn fit_prefill(
    model: &ModelProfile,
    shape: WorkerShape,
    weights: f64,
    free: f64,
    capacity: f64,
    isl: f64,
) -> MemoryFit {
    let n = shape.gpus();
    let kv_per_token = model.attention.kv_bytes(isl) / isl.max(1.0);
    // KV of the batch being computed plus completed prompts awaiting pickup,
    // replicated on every TP rank.
    let kv_tokens = 1.0 + TRANSFER_STAGING_BATCHES;
    let per_token = model.activation_bytes_per_token(n) + kv_tokens * kv_per_token;
    let by_memory = if free > 0.0 {
        (free / per_token).floor()
    } else {
        0.0
    };
    let budget = by_memory.min(f64::from(MAX_PREFILL_TOKENS));
    let fits = budget >= f64::from(MIN_PREFILL_TOKENS);
    let shown = if fits {
        budget
    } else {
        f64::from(MIN_PREFILL_TOKENS)
    };
    let breakdown = Breakdown {
        weights,
        kv_cache: shown * kv_tokens * kv_per_token,
        activations: shown * model.activation_bytes_per_token(n),
        reserve: RUNTIME_RESERVE_BYTES,
    };
    let limiting = if weights + RUNTIME_RESERVE_BYTES > capacity {
        Limit::Weights
    } else if by_memory >= f64::from(MAX_PREFILL_TOKENS) {
        Limit::SchedulerCap
    } else {
        Limit::Activations
    };
    let reason = (!fits).then(|| {
        format!(
            "{shape}: per GPU {:.0} GB weights + {:.1} GB activations and KV for a {} token batch + {:.0} GB reserve exceeds {:.0} GB usable HBM",
            weights / 1e9,
            (breakdown.kv_cache + breakdown.activations) / 1e9,
            MIN_PREFILL_TOKENS,
            RUNTIME_RESERVE_BYTES / 1e9,
            capacity / 1e9
        )
    });
    MemoryFit {
        shape,
        fits,
        capacity,
        breakdown,
        max_batch: (budget / isl.max(1.0)).floor() as u32,
        max_token_budget: budget as u32,
        limiting,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::Sku;

    fn pro() -> ModelProfile {
        ModelProfile::builtin("deepseek-v4-pro").unwrap()
    }

    #[test]
    fn hbm_decides_which_prefill_shapes_fit() {
        let m = pro();
        let (gb200, gb300) = (Sku::Gb200.hardware(), Sku::Gb300.hardware());
        let tp4_200 = fit(&m, &gb200, WorkerShape::prefill_tp(4), 8192.0, 9216.0);
        assert!(!tp4_200.fits);
        assert_eq!(tp4_200.limiting, Limit::Weights);
        assert!(tp4_200.reason.as_deref().unwrap().contains("weights"));
        let tp4_300 = fit(&m, &gb300, WorkerShape::prefill_tp(4), 8192.0, 9216.0);
        assert!(tp4_300.fits, "{tp4_300:?}");
        assert!(fit(&m, &gb200, WorkerShape::prefill_tp(8), 8192.0, 9216.0).fits);
        assert!(tp4_300.breakdown.total() <= tp4_300.capacity);
    }

    #[test]
    fn wider_ep_leaves_more_room_for_kv() {
        let m = pro();
        let hw = Sku::Gb200.hardware();
        let b8 = fit(&m, &hw, WorkerShape::decode_ep(8), 8192.0, 9216.0);
        let b16 = fit(&m, &hw, WorkerShape::decode_ep(16), 8192.0, 9216.0);
        assert!(b8.fits && b16.fits);
        assert!(
            b16.max_batch > 2 * b8.max_batch,
            "{} vs {}",
            b16.max_batch,
            b8.max_batch
        );
        assert!(b8.breakdown.total() <= b8.capacity);
        // EP4 keeps 96 experts per GPU: too big for GB200's HBM.
        let b4 = fit(&m, &hw, WorkerShape::decode_ep(4), 8192.0, 9216.0);
        assert!(!b4.fits && b4.limiting == Limit::Weights);
    }
}
