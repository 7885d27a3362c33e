//! Step-time model: how long one forward pass of a worker takes.
//!
//! A step costs a fixed latency per layer, plus the time to stream the bytes
//! it reads from HBM (weights it touches, KV it attends to), plus its GEMM
//! and attention FLOPs at the precision's rate, plus the bytes it moves over
//! the worker's links (all-to-all around every MoE layer for EP, all-reduce
//! twice per layer for TP), plus a host cost per token. Terms add up rather
//! than overlap: the efficiencies absorb what overlap there is.

use serde::Serialize;

use crate::calibration::Calibration;
use crate::hardware::Hardware;
use crate::model::ModelProfile;
use crate::precision::Precision;
use crate::shape::Parallelism;

/// One step's time and where it goes, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTime {
    pub fixed: f64,
    pub memory: f64,
    pub compute: f64,
    pub communication: f64,
    pub host: f64,
}

impl StepTime {
    pub fn total(&self) -> f64 {
        self.fixed + self.memory + self.compute + self.communication + self.host
    }
}

/// Precomputed per-(model, hardware, shape) quantities so that a step costs
/// a few multiplications; the planner evaluates millions of them.
#[derive(Debug, Clone, PartialEq)]
pub struct StepModel {
    parallelism: Parallelism,
    cal: Calibration,
    layers: f64,
    routed_experts: f64,
    experts_per_token: f64,
    hbm_bw: f64,
    /// Per rank: non-expert weight bytes read every step.
    dense_bytes: f64,
    /// Per rank: bytes of one routed expert over all MoE layers.
    expert_bytes: f64,
    /// Per rank: routed experts it holds (per layer).
    local_experts: f64,
    /// Seconds of GEMM per token on one rank at peak (whole model / split).
    gemm_seconds_per_token: f64,
    head_seconds_per_token: f64,
    attention_rate: f64,
    /// Link bytes per token per step on one rank.
    link_bytes_per_token: f64,
    link_bw: f64,
}

impl StepModel {
    pub fn new(
        model: &ModelProfile,
        hw: &Hardware,
        parallelism: Parallelism,
        cal: Calibration,
    ) -> Self {
        let n = f64::from(parallelism.gpus());
        let w = &model.weights;
        let read_dense = w.non_expert_bytes() - w.embeddings.bytes();
        let hidden = f64::from(model.hidden);
        let k = f64::from(model.experts_per_token);
        let gemm: f64 = model
            .gemm_flops_per_token()
            .iter()
            .map(|(p, flops)| flops / p.flops(hw))
            .sum();
        let head = model.head_flops() / w.head.precision.flops(hw);
        let (dense_bytes, local_experts, split, link_bytes) = match parallelism {
            Parallelism::Tp(t) => {
                // Two all-reduces of the BF16 hidden state per layer; a ring
                // moves 2(t-1)/t of the buffer through each rank.
                let ring = 2.0 * (n - 1.0) / n;
                let bytes = 2.0 * f64::from(model.layers) * hidden * 2.0 * ring;
                (
                    read_dense / n,
                    f64::from(model.routed_experts),
                    f64::from(t),
                    bytes,
                )
            }
            Parallelism::Ep(e) => {
                // Dispatch in FP8 and combine in BF16 for each routed copy
                // that leaves the rank.
                let remote = (n - 1.0) / n;
                let bytes = f64::from(model.moe_layers) * k * hidden * 3.0 * remote;
                (
                    read_dense,
                    f64::from(model.routed_experts) / f64::from(e),
                    1.0,
                    bytes,
                )
            }
        };
        let expert_bytes = model.expert_bytes_all_layers()
            / match parallelism {
                Parallelism::Tp(t) => f64::from(t),
                Parallelism::Ep(_) => 1.0,
            };
        Self {
            parallelism,
            cal,
            layers: f64::from(model.layers),
            routed_experts: f64::from(model.routed_experts),
            experts_per_token: k,
            hbm_bw: hw.hbm_bandwidth,
            dense_bytes,
            expert_bytes,
            local_experts,
            gemm_seconds_per_token: gemm / split,
            head_seconds_per_token: head / split,
            attention_rate: Precision::Fp8.flops(hw),
            link_bytes_per_token: if n > 1.0 { link_bytes } else { 0.0 },
            link_bw: hw.group_link_bandwidth(parallelism.gpus()),
        }
    }

    /// Routed experts a rank reads when `activations` token-expert pairs
    /// spread uniformly over all experts.
    fn touched_experts(&self, activations: f64) -> f64 {
        let miss = (1.0 - 1.0 / self.routed_experts).powf(activations);
        self.local_experts * (1.0 - miss)
    }

    /// One decode step for `batch` requests in the worker (all ranks), each
    /// reading `kv_read` KV bytes and spending `attn_flops` attention FLOPs.
    pub fn decode(&self, batch: f64, kv_read: f64, attn_flops: f64) -> StepTime {
        let n = f64::from(self.parallelism.gpus());
        // Tokens whose attention, host work and link traffic one rank handles.
        let (attn_tokens, gemm_tokens) = match self.parallelism {
            Parallelism::Tp(_) => (batch, batch),
            Parallelism::Ep(_) => {
                let per_rank = (batch / n).max(batch.min(1.0));
                (per_rank, per_rank)
            }
        };
        let touched = self.touched_experts(batch * self.experts_per_token);
        let bytes = self.dense_bytes + touched * self.expert_bytes + attn_tokens * kv_read;
        let c = &self.cal;
        let compute = (gemm_tokens * (self.gemm_seconds_per_token + self.head_seconds_per_token)
            + attn_tokens * attn_flops / self.attention_rate)
            / c.decode_mfu;
        StepTime {
            fixed: self.layers * c.layer_latency_us * 1e-6,
            memory: bytes / (self.hbm_bw * c.hbm_efficiency),
            compute,
            communication: gemm_tokens * self.link_bytes_per_token
                / (self.link_bw * c.link_efficiency),
            host: attn_tokens * c.token_overhead_us * 1e-6,
        }
    }

    /// One prefill forward pass over `tokens` prompt tokens belonging to
    /// `sequences` prompts, with `attn_flops_per_token` attention FLOPs each.
    pub fn prefill(&self, tokens: f64, sequences: f64, attn_flops_per_token: f64) -> StepTime {
        let touched = self.touched_experts(tokens * self.experts_per_token);
        let bytes = self.dense_bytes + touched * self.expert_bytes;
        let c = &self.cal;
        let split = match self.parallelism {
            Parallelism::Tp(t) => f64::from(t),
            Parallelism::Ep(_) => 1.0,
        };
        let compute = (tokens * self.gemm_seconds_per_token
            + sequences * self.head_seconds_per_token
            + tokens * attn_flops_per_token / split / self.attention_rate)
            / c.prefill_mfu;
        StepTime {
            fixed: self.layers * c.layer_latency_us * 1e-6,
            memory: bytes / (self.hbm_bw * c.hbm_efficiency),
            compute,
            communication: tokens * self.link_bytes_per_token / (self.link_bw * c.link_efficiency),
            host: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::Sku;

    fn step(sku: Sku, p: Parallelism) -> StepModel {
        let m = ModelProfile::builtin("deepseek-v4-pro").unwrap();
        StepModel::new(&m, &sku.hardware(), p, Calibration::prior())
    }

    #[test]
    fn decode_is_memory_bound_and_grows_with_batch() {
        let s = step(Sku::Gb200, Parallelism::Ep(8));
        let small = s.decode(8.0, 3e7, 1e10);
        let big = s.decode(2048.0, 3e7, 1e10);
        assert!(big.total() > small.total());
        assert!(small.memory > small.compute, "{small:?}");
        // A large batch touches every local expert: weights read saturate.
        let (a, b) = (s.decode(2048.0, 0.0, 0.0), s.decode(8192.0, 0.0, 0.0));
        assert!((b.memory - a.memory).abs() / a.memory < 0.01);
    }

    #[test]
    fn wider_ep_reads_fewer_expert_bytes_per_rank() {
        let e8 = step(Sku::Gb300, Parallelism::Ep(8)).decode(1024.0, 3e7, 1e10);
        let e16 = step(Sku::Gb300, Parallelism::Ep(16)).decode(1024.0, 3e7, 1e10);
        assert!(e16.memory < e8.memory);
    }

    #[test]
    fn prefill_throughput_rises_with_batch_and_gb300_fp4_helps() {
        let s = step(Sku::Gb200, Parallelism::Tp(8));
        let rate = |t: f64| t / s.prefill(t, 1.0, 1e9).total();
        assert!(rate(16384.0) > rate(2048.0));
        let s3 = step(Sku::Gb300, Parallelism::Tp(8));
        assert!(s3.prefill(16384.0, 2.0, 1e9).total() < s.prefill(16384.0, 2.0, 1e9).total());
    }
}
