//! The small model's Hugging Face style `config.json`: DeepSeek-V3 field
//! names for the shape (latent attention, routed + shared experts) plus the
//! quantisation recipe and the seed its weights were generated from.
//!
//! Invariant: a [`ModelConfig`] that passed [`ModelConfig::validate`] has
//! shapes every weight and the KV cache can be built from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::nvfp4::GROUP;
use super::{CpuError, CpuResult};

/// The config file's name in a model directory.
pub const CONFIG_FILE: &str = "config.json";

/// How the routed experts are quantised (ModelOpt's spelling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// `modelopt`.
    pub quant_method: String,
    /// `NVFP4`.
    pub quant_algo: String,
    /// Elements per FP8 scale (16).
    pub group_size: usize,
    /// Tensor-name patterns the recipe covers (the routed experts).
    pub targets: Vec<String>,
}

/// The model's shape, as `config.json` spells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    /// Byte-level: 256.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Latent attention keeps one KV head: the compressed latent.
    pub num_key_value_heads: usize,
    /// Width of the compressed KV latent (cached per token and layer).
    pub kv_lora_rank: usize,
    /// Per-head query/key width without position.
    pub qk_nope_head_dim: usize,
    /// Width of the rotary part of queries and of the shared rotary key
    /// (cached per token and layer).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub moe_intermediate_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Dtype of everything but the routed experts.
    pub torch_dtype: String,
    pub quantization_config: QuantizationConfig,
    /// Seed the weights were generated from.
    pub rackscale_seed: u64,
}

impl ModelConfig {
    /// The small reference model: 4 layers, hidden 64, 4 heads over a
    /// 32-wide latent, 8 routed experts (2 per token) plus 1 shared.
    pub fn small(seed: u64) -> Self {
        Self {
            architectures: vec!["DeepseekV3ForCausalLM".into()],
            model_type: "deepseek_v3".into(),
            vocab_size: 256,
            hidden_size: 64,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            kv_lora_rank: 32,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            n_routed_experts: 8,
            num_experts_per_tok: 2,
            n_shared_experts: 1,
            moe_intermediate_size: 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 16_384,
            torch_dtype: "bfloat16".into(),
            quantization_config: QuantizationConfig {
                quant_method: "modelopt".into(),
                quant_algo: "NVFP4".into(),
                group_size: GROUP,
                targets: vec!["model.layers.*.mlp.experts.*".into()],
            },
            rackscale_seed: seed,
        }
    }

    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> CpuResult<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| CpuError::io(&path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| CpuError::Malformed {
            what: path.display().to_string(),
            why: e.to_string(),
        })?;
        config.validate().map_err(|why| CpuError::Malformed {
            what: path.display().to_string(),
            why,
        })?;
        Ok(config)
    }

    /// Checks that the shapes fit together.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.num_key_value_heads != 1 {
            return Err(format!(
                "latent attention caches one KV head; num_key_value_heads is {}",
                self.num_key_value_heads
            ));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err("qk_rope_head_dim must be even (rotary pairs)".into());
        }
        if self.num_experts_per_tok > self.n_routed_experts {
            return Err(format!(
                "num_experts_per_tok {} exceeds n_routed_experts {}",
                self.num_experts_per_tok, self.n_routed_experts
            ));
        }
        let q = &self.quantization_config;
        if q.quant_algo != "NVFP4" || q.group_size != GROUP {
            return Err(format!(
                "routed experts must be NVFP4 with group size {GROUP}; got {} / {}",
                q.quant_algo, q.group_size
            ));
        }
        if !self.hidden_size.is_multiple_of(GROUP)
            || !self.moe_intermediate_size.is_multiple_of(GROUP)
        {
            return Err(format!(
                "hidden_size and moe_intermediate_size must be multiples of {GROUP} for NVFP4 groups"
            ));
        }
        if self.vocab_size != 256 {
            return Err(format!(
                "the byte-level tokenizer needs vocab_size 256; got {}",
                self.vocab_size
            ));
        }
        Ok(())
    }

    /// KV-cache values one token keeps per layer: the latent plus the
    /// rotary key.
    pub fn kv_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// KV-cache bytes per token across all layers (BF16).
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.num_hidden_layers * self.kv_width() * 2) as u64
    }

    /// Query/key width per head.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}
