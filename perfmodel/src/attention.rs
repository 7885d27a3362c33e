//! Attention geometry: KV-cache bytes, KV bytes read per decode step, and
//! attention FLOPs, for the two attention families the catalog supports.
//!
//! DeepSeek-V4 keeps one 512-dim latent KV head per layer, compressed
//! token-wise: a layer with ratio 4 ("CSA") stores one entry per 4 tokens plus
//! indexer keys and attends to the indexer's top-k entries; a layer with ratio
//! 128 ("HCA") stores one entry per 128 tokens and attends to all of them; a
//! layer with ratio 0 has only the sliding window. Every layer also keeps the
//! last `window` raw tokens. DeepSeek-V3 (MLA) stores one 576-element latent
//! per token per layer and reads all of it.

use serde::Serialize;

/// Attention geometry of one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attention {
    /// DeepSeek-V4 compressed sparse / heavily compressed attention.
    Compressed {
        heads: u32,
        head_dim: u32,
        rope_dim: u32,
        /// Compression ratio of each layer (0: sliding window only).
        layer_ratios: Vec<u32>,
        window: u32,
        index_topk: u32,
        index_heads: u32,
        index_head_dim: u32,
    },
    /// DeepSeek-V3 multi-head latent attention.
    Mla {
        heads: u32,
        kv_lora_rank: u32,
        rope_dim: u32,
        layers: u32,
    },
}

/// Ratio of the layers that use the sparse indexer (CSA layers).
const INDEXED_RATIO: u32 = 4;

impl Attention {
    /// Bytes of one stored latent KV entry: non-RoPE dims in FP8 with an FP32
    /// scale per 128, RoPE dims in BF16 (V4); BF16 latent (V3).
    pub fn entry_bytes(&self) -> f64 {
        match self {
            Attention::Compressed {
                head_dim, rope_dim, ..
            } => {
                let nope = f64::from(head_dim - rope_dim);
                nope + 2.0 * f64::from(*rope_dim) + 4.0 * (nope / 128.0).ceil()
            }
            Attention::Mla {
                kv_lora_rank,
                rope_dim,
                ..
            } => 2.0 * f64::from(kv_lora_rank + rope_dim),
        }
    }

    /// Bytes of one indexer key (FP8 with an FP32 scale).
    fn index_key_bytes(&self) -> f64 {
        match self {
            Attention::Compressed { index_head_dim, .. } => f64::from(*index_head_dim) + 4.0,
            Attention::Mla { .. } => 0.0,
        }
    }

    /// KV-cache bytes one request holds at `ctx` tokens of context.
    pub fn kv_bytes(&self, ctx: f64) -> f64 {
        match self {
            Attention::Compressed {
                layer_ratios,
                window,
                ..
            } => {
                let entry = self.entry_bytes();
                let key = self.index_key_bytes();
                let win = ctx.min(f64::from(*window));
                layer_ratios
                    .iter()
                    .map(|&r| {
                        let compressed = if r == 0 {
                            0.0
                        } else {
                            (ctx / f64::from(r)).floor()
                        };
                        let per_entry = if r == INDEXED_RATIO {
                            entry + key
                        } else {
                            entry
                        };
                        compressed * per_entry + win * entry
                    })
                    .sum()
            }
            Attention::Mla { layers, .. } => ctx * self.entry_bytes() * f64::from(*layers),
        }
    }

    /// Asymptotic KV bytes per token of context (window excluded).
    pub fn kv_bytes_per_token(&self) -> f64 {
        let big = 1_048_576.0;
        (self.kv_bytes(2.0 * big) - self.kv_bytes(big)) / big
    }

    /// KV bytes one request reads in one decode step at `ctx` tokens.
    pub fn kv_read_bytes(&self, ctx: f64) -> f64 {
        match self {
            Attention::Compressed {
                layer_ratios,
                window,
                index_topk,
                ..
            } => {
                let entry = self.entry_bytes();
                let key = self.index_key_bytes();
                let win = ctx.min(f64::from(*window));
                layer_ratios
                    .iter()
                    .map(|&r| {
                        let compressed = if r == 0 {
                            0.0
                        } else {
                            (ctx / f64::from(r)).floor()
                        };
                        let attended = if r == INDEXED_RATIO {
                            compressed.min(f64::from(*index_topk)) * entry + compressed * key
                        } else {
                            compressed * entry
                        };
                        attended + win * entry
                    })
                    .sum()
            }
            Attention::Mla { .. } => self.kv_bytes(ctx),
        }
    }

    /// Attention FLOPs (scores, indexer and value mixing) for one query token
    /// that sees `ctx` tokens of context.
    pub fn flops_per_token(&self, ctx: f64) -> f64 {
        match self {
            Attention::Compressed {
                heads,
                head_dim,
                layer_ratios,
                window,
                index_topk,
                index_heads,
                index_head_dim,
                ..
            } => {
                // QK over head_dim and PV over the same latent: 4 FLOPs per dim.
                let per_entry = 4.0 * f64::from(*heads) * f64::from(*head_dim);
                let per_key = 2.0 * f64::from(*index_heads) * f64::from(*index_head_dim);
                let win = ctx.min(f64::from(*window));
                layer_ratios
                    .iter()
                    .map(|&r| {
                        let compressed = if r == 0 {
                            0.0
                        } else {
                            (ctx / f64::from(r)).floor()
                        };
                        let attended = if r == INDEXED_RATIO {
                            compressed.min(f64::from(*index_topk))
                        } else {
                            compressed
                        };
                        let index = if r == INDEXED_RATIO {
                            compressed * per_key
                        } else {
                            0.0
                        };
                        (attended + win) * per_entry + index
                    })
                    .sum()
            }
            Attention::Mla {
                heads,
                kv_lora_rank,
                rope_dim,
                layers,
            } => {
                // Absorbed MLA: scores over rank+rope, values over rank.
                let per_entry = 2.0 * f64::from(*heads) * f64::from(2 * kv_lora_rank + rope_dim);
                ctx * per_entry * f64::from(*layers)
            }
        }
    }

    /// Mean attention FLOPs per prompt token when prefilling `isl` tokens
    /// (each position sees the tokens before it).
    pub fn prefill_flops_per_token(&self, isl: f64) -> f64 {
        const SAMPLES: u32 = 32;
        let sum: f64 = (0..SAMPLES)
            .map(|i| self.flops_per_token(isl * (f64::from(i) + 0.5) / f64::from(SAMPLES)))
            .sum();
        sum / f64::from(SAMPLES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ratios: Vec<u32>) -> Attention {
        Attention::Compressed {
            heads: 128,
            head_dim: 512,
            rope_dim: 64,
            layer_ratios: ratios,
            window: 128,
            index_topk: 1024,
            index_heads: 64,
            index_head_dim: 128,
        }
    }

    #[test]
    fn compressed_kv_follows_ratios_and_window() {
        let a = v4(vec![4, 128, 0]);
        let e = a.entry_bytes();
        assert_eq!(e, 448.0 + 128.0 + 16.0);
        // 1024 tokens: 256 CSA entries (+ keys), 8 HCA entries, 128-token window in all three.
        let expect = 256.0 * (e + 132.0) + 8.0 * e + 3.0 * 128.0 * e;
        assert!((a.kv_bytes(1024.0) - expect).abs() < 1e-6);
        // Per-token cost ignores the constant window.
        let per_tok = (e + 132.0) / 4.0 + e / 128.0;
        assert!((a.kv_bytes_per_token() - per_tok).abs() / per_tok < 1e-3);
    }

    #[test]
    fn sparse_attention_caps_reads_at_topk() {
        let a = v4(vec![4]);
        let e = a.entry_bytes();
        let at = |ctx: f64| a.kv_read_bytes(ctx);
        // Below top-k * ratio every compressed entry is read.
        assert!((at(2048.0) - (512.0 * (e + 132.0) + 128.0 * e)).abs() < 1e-6);
        // Far beyond it only the indexer keys keep growing.
        let grow = at(65536.0 * 2.0) - at(65536.0);
        assert!((grow - 16384.0 * 132.0).abs() < 1e-6);
    }

    #[test]
    fn mla_reads_everything() {
        let a = Attention::Mla {
            heads: 128,
            kv_lora_rank: 512,
            rope_dim: 64,
            layers: 61,
        };
        assert_eq!(a.kv_bytes(1000.0), 1000.0 * 1152.0 * 61.0);
        assert_eq!(a.kv_read_bytes(1000.0), a.kv_bytes(1000.0));
        assert!(a.prefill_flops_per_token(8192.0) < a.flops_per_token(8192.0));
    }
}
