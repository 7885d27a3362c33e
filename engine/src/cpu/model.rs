//! The small DeepSeek-style model's forward pass on candle's CPU tensors.
//!
//! Per layer: RMSNorm, multi-head latent attention (queries per head; keys
//! and values expanded from one cached latent per token plus one shared
//! rotary key), residual, RMSNorm, MoE (softmax router, top-k routed experts
//! with renormalised weights, plus the shared expert), residual. Then the
//! final norm and the output projection; tokens are greedy (argmax, lowest
//! id on a tie).
//!
//! The KV cache ([`KvCache`]) is BF16, token-major: for token `t`, layer
//! `l`, the `kv_lora_rank` normalised latent values then the
//! `qk_rope_head_dim` rotated key values. Attention always reads the cache
//! back (its own new entries included), so a step sees exactly the values
//! a decode worker sees after importing the cache's bytes.
//!
//! Routed experts run through an [`Experts`] implementation, which may be
//! this process ([`Model::run_local`]) or other ranks ([`super::ep`]). The
//! combine sums each token's expert outputs in its top-k order after the
//! shared expert, in plain f32, wherever they were computed: the result is
//! bit-identical across EP layouts.

use std::collections::BTreeMap;

use candle_core::{D, Device, Tensor};
use half::bf16;

pub use crate::backend::KvCache;

use super::config::ModelConfig;
use super::weights::{ExpertShard, PROJS, Weights, names};
use super::{CpuError, CpuResult};

/// The tokens routed to one expert in one MoE layer, and their hidden rows.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBatch {
    pub expert: usize,
    /// `rows x hidden` values, row-major.
    pub input: Vec<f32>,
    pub rows: usize,
}

/// Computes routed experts wherever they live.
pub trait Experts {
    /// The outputs (`rows x hidden` each) of `batches` in `layer`, in order.
    fn run(&self, layer: usize, batches: Vec<ExpertBatch>) -> CpuResult<Vec<Vec<f32>>>;
}

/// A SwiGLU feed-forward block, weights transposed to `[in, out]`.
#[derive(Debug)]
struct Ffn {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

impl Ffn {
    fn forward(&self, x: &Tensor) -> CpuResult<Tensor> {
        let g = x.matmul(&self.gate)?.silu()?;
        let u = x.matmul(&self.up)?;
        Ok((g * u)?.matmul(&self.down)?)
    }
}

#[derive(Debug)]
struct Layer {
    input_norm: Tensor,
    q_proj: Tensor,
    kv_a: Tensor,
    kv_norm: Tensor,
    kv_b: Tensor,
    o_proj: Tensor,
    post_norm: Tensor,
    router: Tensor,
    shared: Option<Ffn>,
    experts: BTreeMap<usize, Ffn>,
}

/// The loaded model.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    shard: ExpertShard,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// A weight as an f32 tensor of its stored shape.
fn tensor(w: &Weights, name: &str, device: &Device) -> CpuResult<Tensor> {
    let (data, shape) = w.get(name)?.to_f32();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// A `[out, in]` projection transposed to `[in, out]` for `x @ w`.
fn linear(w: &Weights, name: &str, device: &Device) -> CpuResult<Tensor> {
    Ok(tensor(w, name, device)?.t()?.contiguous()?)
}

impl Model {
    /// Builds the model from loaded weights (holding the experts of `shard`).
    pub fn new(weights: &Weights, shard: ExpertShard) -> CpuResult<Self> {
        let device = Device::Cpu;
        let c = &weights.config;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let n = |rest: &str| names::layer(l, rest);
            let shared = if c.n_shared_experts > 0 {
                Some(Ffn {
                    gate: linear(weights, &n("mlp.shared_experts.gate_proj.weight"), &device)?,
                    up: linear(weights, &n("mlp.shared_experts.up_proj.weight"), &device)?,
                    down: linear(weights, &n("mlp.shared_experts.down_proj.weight"), &device)?,
                })
            } else {
                None
            };
            let mut experts = BTreeMap::new();
            for e in (0..c.n_routed_experts).filter(|&e| shard.holds(c.n_routed_experts, e)) {
                let [gate, up, down] = PROJS.map(|p| names::expert(l, e, p));
                experts.insert(
                    e,
                    Ffn {
                        gate: linear(weights, &gate, &device)?,
                        up: linear(weights, &up, &device)?,
                        down: linear(weights, &down, &device)?,
                    },
                );
            }
            layers.push(Layer {
                input_norm: tensor(weights, &n("input_layernorm.weight"), &device)?,
                q_proj: linear(weights, &n("self_attn.q_proj.weight"), &device)?,
                kv_a: linear(weights, &n("self_attn.kv_a_proj_with_mqa.weight"), &device)?,
                kv_norm: tensor(weights, &n("self_attn.kv_a_layernorm.weight"), &device)?,
                kv_b: linear(weights, &n("self_attn.kv_b_proj.weight"), &device)?,
                o_proj: linear(weights, &n("self_attn.o_proj.weight"), &device)?,
                post_norm: tensor(weights, &n("post_attention_layernorm.weight"), &device)?,
                router: linear(weights, &n("mlp.gate.weight"), &device)?,
                shared,
                experts,
            });
        }
        Ok(Self {
            config: c.clone(),
            shard,
            embed: tensor(weights, names::EMBED, &device)?,
            norm: tensor(weights, names::NORM, &device)?,
            lm_head: linear(weights, names::LM_HEAD, &device)?,
            layers,
            device,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Which experts this process holds.
    pub fn shard(&self) -> ExpertShard {
        self.shard
    }

    /// Tokens a cache of `bytes` holds, or why it cannot be this model's.
    pub fn cached_tokens(&self, cache: &KvCache) -> CpuResult<usize> {
        let per = self.config.kv_bytes_per_token() as usize;
        if !cache.bytes.len().is_multiple_of(per) {
            return Err(CpuError::Kv(format!(
                "{} bytes is not a whole number of {per}-byte tokens",
                cache.bytes.len()
            )));
        }
        Ok(cache.bytes.len() / per)
    }

    /// Runs `tokens` at positions `cache length ..` through the model,
    /// appending their KV to `cache`; returns the greedy next token after
    /// the last one. `experts` computes the routed experts.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        experts: &dyn Experts,
    ) -> CpuResult<u32> {
        let c = &self.config;
        let start = self.cached_tokens(cache)?;
        let t = tokens.len();
        if t == 0 {
            return Err(CpuError::Kv("no tokens to run".into()));
        }
        if start + t > c.max_position_embeddings {
            return Err(CpuError::Kv(format!(
                "{} positions exceed max_position_embeddings {}",
                start + t,
                c.max_position_embeddings
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(CpuError::Kv(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        // Make room for the new tokens' entries (filled layer by layer).
        cache
            .bytes
            .resize((start + t) * c.kv_bytes_per_token() as usize, 0);
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let (cos, sin) = self.rope_tables(start, t)?;
        let mask = self.mask(start, t)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let attn = self.attention(l, layer, &h, cache, start, (&cos, &sin), &mask)?;
            x = (x + attn)?;
            let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            let moe = self.moe(l, layer, &h, experts)?;
            x = (x + moe)?;
        }
        let last = x.narrow(0, t - 1, 1)?;
        let logits = rms_norm(&last, &self.norm, c.rms_norm_eps)?.matmul(&self.lm_head)?;
        let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        Ok(argmax(&logits))
    }

    /// cos and sin of positions `start..start + t`, `[t, 1, rope/2]`.
    fn rope_tables(&self, start: usize, t: usize) -> CpuResult<(Tensor, Tensor)> {
        let c = &self.config;
        let half = c.qk_rope_head_dim / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for i in 0..half {
                let freq = c
                    .rope_theta
                    .powf(-((2 * i) as f64) / c.qk_rope_head_dim as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, 1, half), &self.device)?,
            Tensor::from_vec(sin, (t, 1, half), &self.device)?,
        ))
    }

    /// Additive causal mask `[t, start + t]`: query `i` sees keys `..= start + i`.
    fn mask(&self, start: usize, t: usize) -> CpuResult<Tensor> {
        let s = start + t;
        let data: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if j <= start + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Ok(Tensor::from_vec(data, (t, s), &self.device)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        h: &Tensor,
        cache: &mut KvCache,
        start: usize,
        rope: (&Tensor, &Tensor),
        mask: &Tensor,
    ) -> CpuResult<Tensor> {
        let c = &self.config;
        let t = h.dim(0)?;
        let heads = c.num_attention_heads;
        let (nope, rd, vd, lora) = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let q = h.matmul(&layer.q_proj)?.reshape((t, heads, nope + rd))?;
        let q = Tensor::cat(
            &[
                q.narrow(2, 0, nope)?,
                apply_rope(&q.narrow(2, nope, rd)?, rope)?,
            ],
            2,
        )?;

        // This step's cache entries: the normalised latent and the rotated key.
        let kv_a = h.matmul(&layer.kv_a)?;
        let latent = rms_norm(&kv_a.narrow(1, 0, lora)?, &layer.kv_norm, c.rms_norm_eps)?;
        let k_rot =
            apply_rope(&kv_a.narrow(1, lora, rd)?.reshape((t, 1, rd))?, rope)?.reshape((t, rd))?;
        let entries: Vec<Vec<f32>> = Tensor::cat(&[latent, k_rot], 1)?.to_vec2()?;
        self.write_cache(cache, l, start, &entries);

        // Every cached token of this layer, read back from BF16.
        let s = start + t;
        let all = Tensor::from_vec(self.read_cache(cache, l, s), (s, lora + rd), &self.device)?;
        let kv = all
            .narrow(1, 0, lora)?
            .matmul(&layer.kv_b)?
            .reshape((s, heads, nope + vd))?;
        let k_rot = all
            .narrow(1, lora, rd)?
            .reshape((s, 1, rd))?
            .broadcast_as((s, heads, rd))?;
        let k = Tensor::cat(&[kv.narrow(2, 0, nope)?, k_rot], 2)?;
        let v = kv.narrow(2, nope, vd)?;

        let q = q.transpose(0, 1)?.contiguous()?; // [heads, t, qk]
        let k = k.transpose(0, 1)?.contiguous()?; // [heads, s, qk]
        let v = v.transpose(0, 1)?.contiguous()?; // [heads, s, v]
        let scale = 1.0 / ((nope + rd) as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, heads * vd))?;
        Ok(out.matmul(&layer.o_proj)?)
    }

    fn write_cache(&self, cache: &mut KvCache, layer: usize, start: usize, entries: &[Vec<f32>]) {
        let c = &self.config;
        let w = c.kv_width();
        for (i, row) in entries.iter().enumerate() {
            let at = ((start + i) * c.num_hidden_layers + layer) * w * 2;
            for (j, v) in row.iter().enumerate() {
                let b = bf16::from_f32(*v).to_le_bytes();
                cache.bytes[at + 2 * j] = b[0];
                cache.bytes[at + 2 * j + 1] = b[1];
            }
        }
    }

    fn read_cache(&self, cache: &KvCache, layer: usize, tokens: usize) -> Vec<f32> {
        let c = &self.config;
        let w = c.kv_width();
        let mut out = Vec::with_capacity(tokens * w);
        for t in 0..tokens {
            let at = (t * c.num_hidden_layers + layer) * w * 2;
            out.extend(
                cache.bytes[at..at + 2 * w]
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            );
        }
        out
    }

    fn moe(&self, l: usize, layer: &Layer, h: &Tensor, experts: &dyn Experts) -> CpuResult<Tensor> {
        let c = &self.config;
        let (t, hidden) = h.dims2()?;
        let probs: Vec<Vec<f32>> = softmax_last(&h.matmul(&layer.router)?)?.to_vec2()?;
        let routes: Vec<Vec<(usize, f32)>> = probs
            .iter()
            .map(|p| top_k(p, c.num_experts_per_tok))
            .collect();
        // Dispatch: per expert, its tokens in ascending order.
        let rows: Vec<f32> = h.flatten_all()?.to_vec1()?;
        let mut by_expert: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (tok, route) in routes.iter().enumerate() {
            for &(e, _) in route {
                by_expert.entry(e).or_default().push(tok);
            }
        }
        let batches: Vec<ExpertBatch> = by_expert
            .iter()
            .map(|(&expert, toks)| ExpertBatch {
                expert,
                input: toks
                    .iter()
                    .flat_map(|&tok| rows[tok * hidden..(tok + 1) * hidden].iter().copied())
                    .collect(),
                rows: toks.len(),
            })
            .collect();
        let outputs = experts.run(l, batches)?;
        if outputs.len() != by_expert.len() {
            return Err(CpuError::Kv(format!(
                "{} expert outputs for {} batches",
                outputs.len(),
                by_expert.len()
            )));
        }
        // Combine: shared expert first, then each token's experts in its
        // top-k order, in f32.
        let mut out: Vec<f32> = match &layer.shared {
            Some(ffn) => ffn.forward(h)?.flatten_all()?.to_vec1()?,
            None => vec![0.0; t * hidden],
        };
        let mut at: BTreeMap<usize, (&Vec<f32>, &Vec<usize>)> = BTreeMap::new();
        for ((e, toks), o) in by_expert.iter().zip(&outputs) {
            if o.len() != toks.len() * hidden {
                return Err(CpuError::Kv(format!(
                    "expert {e} returned {} values",
                    o.len()
                )));
            }
            at.insert(*e, (o, toks));
        }
        for (tok, route) in routes.iter().enumerate() {
            for &(e, weight) in route {
                let Some((o, toks)) = at.get(&e) else {
                    continue;
                };
                let Ok(i) = toks.binary_search(&tok) else {
                    continue;
                };
                let src = &o[i * hidden..(i + 1) * hidden];
                for (dst, v) in out[tok * hidden..(tok + 1) * hidden].iter_mut().zip(src) {
                    *dst += weight * v;
                }
            }
        }
        Ok(Tensor::from_vec(out, (t, hidden), &self.device)?)
    }

    /// Runs `batches` on the experts this process holds.
    pub fn run_local(&self, layer: usize, batches: Vec<ExpertBatch>) -> CpuResult<Vec<Vec<f32>>> {
        let hidden = self.config.hidden_size;
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| CpuError::Kv(format!("no layer {layer}")))?;
        batches
            .into_iter()
            .map(|b| {
                let ffn = l.experts.get(&b.expert).ok_or_else(|| CpuError::Peer {
                    rank: self.shard.rank,
                    why: format!("does not hold expert {}", b.expert),
                })?;
                if b.input.len() != b.rows * hidden {
                    return Err(CpuError::Kv(format!(
                        "expert {} batch of {} values for {} rows",
                        b.expert,
                        b.input.len(),
                        b.rows
                    )));
                }
                let x = Tensor::from_vec(b.input, (b.rows, hidden), &self.device)?;
                Ok(ffn.forward(&x)?.flatten_all()?.to_vec1()?)
            })
            .collect()
    }
}

impl Experts for Model {
    fn run(&self, layer: usize, batches: Vec<ExpertBatch>) -> CpuResult<Vec<Vec<f32>>> {
        self.run_local(layer, batches)
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> CpuResult<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?.broadcast_mul(weight)?)
}

fn softmax_last(x: &Tensor) -> CpuResult<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotates `x` (`[t, n, rope]`, halves paired) by the positions' angles.
fn apply_rope(x: &Tensor, (cos, sin): (&Tensor, &Tensor)) -> CpuResult<Tensor> {
    let half = x.dim(2)? / 2;
    let (a, b) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
    let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
    let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
    Ok(Tensor::cat(&[ra, rb], 2)?)
}

/// The `k` highest-probability experts (lowest index on a tie) with their
/// probabilities renormalised to sum to 1, in descending order.
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    idx.truncate(k);
    let sum: f32 = idx.iter().map(|&i| probs[i]).sum();
    idx.into_iter()
        .map(|i| (i, if sum > 0.0 { probs[i] / sum } else { 0.0 }))
        .collect()
}

/// The index of the largest value (lowest on a tie).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if v.total_cmp(&values[best]).is_gt() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::weights::Weights;

    fn model() -> Model {
        let w = Weights::generate(&ModelConfig::small(7)).expect("weights");
        Model::new(&w, ExpertShard::ALL).expect("model")
    }

    fn greedy(m: &Model, prompt: &[u32], chunks: &[usize], n: usize) -> (Vec<u32>, KvCache) {
        let mut cache = KvCache::default();
        let mut at = 0;
        let mut next = 0;
        for &c in chunks {
            next = m
                .forward(&prompt[at..at + c], &mut cache, m)
                .expect("prefill");
            at += c;
        }
        assert_eq!(at, prompt.len());
        let mut out = vec![next];
        for _ in 1..n {
            next = m.forward(&[next], &mut cache, m).expect("decode");
            out.push(next);
        }
        (out, cache)
    }

    #[test]
    fn generates_deterministic_prompt_dependent_tokens() {
        let m = model();
        let a: Vec<u32> = b"The rack serves tokens."
            .iter()
            .map(|&b| u32::from(b))
            .collect();
        let b: Vec<u32> = b"Experts route bytes!"
            .iter()
            .map(|&b| u32::from(b))
            .collect();
        let (ta, cache) = greedy(&m, &a, &[a.len()], 12);
        let (ta2, _) = greedy(&m, &a, &[a.len()], 12);
        let (tb, _) = greedy(&m, &b, &[b.len()], 12);
        assert_eq!(ta, ta2);
        assert_ne!(ta, tb, "different prompts should continue differently");
        // The cache holds the prompt and every decoded input (all but the last token).
        let per = m.config().kv_bytes_per_token() as usize;
        assert_eq!(cache.bytes.len(), (a.len() + 11) * per);
        let distinct: std::collections::BTreeSet<u32> = ta.iter().chain(&tb).copied().collect();
        assert!(distinct.len() > 2, "degenerate output {ta:?} {tb:?}");
    }

    #[test]
    fn a_cache_carried_as_bytes_continues_identically() {
        let m = model();
        let p: Vec<u32> = (0..40).map(|i| (i * 37 % 256) as u32).collect();
        let mut cache = KvCache::default();
        let first = m.forward(&p, &mut cache, &m).expect("prefill");
        let moved = KvCache {
            bytes: cache.bytes.clone(),
        };
        let mut a = cache;
        let mut b = moved;
        let (mut ta, mut tb) = (first, first);
        for _ in 0..8 {
            ta = m.forward(&[ta], &mut a, &m).expect("a");
            tb = m.forward(&[tb], &mut b, &m).expect("b");
            assert_eq!(ta, tb);
        }
        // A corrupted cache changes what follows: the cache really matters.
        let mut c = KvCache::default();
        let _ = m.forward(&p, &mut c, &m).expect("prefill");
        for byte in c.bytes.iter_mut().step_by(3) {
            *byte ^= 0x40;
        }
        let mut tc = first;
        let mut diverged = false;
        let mut td = first;
        let mut d = KvCache::default();
        let _ = m.forward(&p, &mut d, &m).expect("prefill");
        for _ in 0..8 {
            tc = m.forward(&[tc], &mut c, &m).expect("c");
            td = m.forward(&[td], &mut d, &m).expect("d");
            diverged |= tc != td;
        }
        assert!(diverged, "a corrupted KV cache made no difference");
    }

    #[test]
    fn chunked_prefill_continues_like_a_whole_prompt() {
        let m = model();
        let p: Vec<u32> = b"Chunked prefill: the scheduler may cut a prompt across steps."
            .iter()
            .map(|&b| u32::from(b))
            .collect();
        let (whole, kv_whole) = greedy(&m, &p, &[p.len()], 10);
        let (chunked, kv_chunked) = greedy(&m, &p, &[7, 20, p.len() - 27], 10);
        assert_eq!(whole, chunked);
        // Not guaranteed by construction (a chunk's attention sums over a
        // different number of keys), but the BF16 cache absorbs the last-bit
        // differences on candle's CPU kernels: the bytes agree too.
        assert_eq!(kv_whole, kv_chunked);
    }

    #[test]
    fn refuses_a_cache_of_the_wrong_size_and_foreign_tokens() {
        let m = model();
        let mut bad = KvCache { bytes: vec![0; 7] };
        assert!(matches!(
            m.forward(&[1], &mut bad, &m),
            Err(CpuError::Kv(_))
        ));
        assert!(m.forward(&[300], &mut KvCache::default(), &m).is_err());
    }

    #[test]
    fn top_k_breaks_ties_by_index_and_renormalises() {
        let r = top_k(&[0.1, 0.3, 0.3, 0.2, 0.1], 2);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((r[0].1 - 0.5).abs() < 1e-6);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
