//! Model profiles parsed from Hugging Face `config.json` files.
//!
//! A profile says how many parameters each class of weights has, in which
//! precision they are stored, how much KV one request holds and reads, and
//! how many FLOPs a token costs. Supported architectures: DeepSeek-V4
//! (`DeepseekV4ForCausalLM`) and DeepSeek-V3 (`DeepseekV3ForCausalLM`).
//! The multi-token-prediction layer is not counted: recipes here run without
//! speculative decoding, so serving engines do not load it.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::attention::Attention;
use crate::precision::Precision;
use crate::{Error, Result};

/// Parameters and storage precision of one class of weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WeightClass {
    pub params: f64,
    pub precision: Precision,
}

impl WeightClass {
    pub fn bytes(&self) -> f64 {
        self.params * self.precision.bytes_per_param()
    }
}

/// Parameter counts by class. `routed_experts` is the total over all experts
/// and layers; attention includes the LoRA projections, the indexer and the
/// compressors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Weights {
    pub routed_experts: WeightClass,
    pub shared_experts: WeightClass,
    pub dense_mlp: WeightClass,
    pub attention: WeightClass,
    pub embeddings: WeightClass,
    pub head: WeightClass,
}

impl Weights {
    /// Weights every rank of a data-parallel-attention worker keeps whole.
    pub fn non_expert_bytes(&self) -> f64 {
        self.shared_experts.bytes()
            + self.dense_mlp.bytes()
            + self.attention.bytes()
            + self.embeddings.bytes()
            + self.head.bytes()
    }

    pub fn total_bytes(&self) -> f64 {
        self.non_expert_bytes() + self.routed_experts.bytes()
    }

    pub fn total_params(&self) -> f64 {
        [
            self.routed_experts,
            self.shared_experts,
            self.dense_mlp,
            self.attention,
            self.embeddings,
            self.head,
        ]
        .iter()
        .map(|c| c.params)
        .sum()
    }
}

/// Everything the performance model needs to know about one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelProfile {
    pub name: String,
    pub architecture: String,
    pub layers: u32,
    pub moe_layers: u32,
    pub hidden: u32,
    pub vocab: u32,
    /// Residual streams per token (hyper-connections); 1 for plain residuals.
    pub residual_streams: u32,
    pub routed_experts: u32,
    pub experts_per_token: u32,
    pub shared_experts: u32,
    pub moe_intermediate: u32,
    /// Parameters of one routed expert in one layer.
    pub expert_params: f64,
    pub weights: Weights,
    pub attention: Attention,
}

/// Names of the profiles shipped with the crate.
pub const BUILTIN_MODELS: [&str; 3] = ["deepseek-v4-pro", "deepseek-v4-flash", "deepseek-v3"];

impl ModelProfile {
    /// A profile shipped with the crate (configs copied from Hugging Face).
    pub fn builtin(name: &str) -> Result<Self> {
        let (config, quant) = match name.trim().to_ascii_lowercase().as_str() {
            "deepseek-v4-pro" | "deepseek-ai/deepseek-v4-pro" => (
                include_str!("../models/deepseek-v4-pro.config.json"),
                Some(include_str!(
                    "../models/deepseek-v4-pro-nvfp4.hf_quant_config.json"
                )),
            ),
            "deepseek-v4-flash" | "deepseek-ai/deepseek-v4-flash" => (
                include_str!("../models/deepseek-v4-flash.config.json"),
                None,
            ),
            "deepseek-v3" | "deepseek-ai/deepseek-v3" => {
                (include_str!("../models/deepseek-v3.config.json"), None)
            }
            _ => {
                return Err(Error::UnknownModel {
                    given: name.to_string(),
                    known: BUILTIN_MODELS.join(", "),
                });
            }
        };
        Self::from_json(name, config, quant)
    }

    /// A profile from a `config.json` and an optional `hf_quant_config.json`.
    pub fn from_files(name: &str, config: &Path, quant: Option<&Path>) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let config = read(config)?;
        let quant = quant.map(read).transpose()?;
        Self::from_json(name, &config, quant.as_deref())
    }

    /// A profile from the text of a `config.json` (and quant config).
    pub fn from_json(name: &str, config: &str, quant: Option<&str>) -> Result<Self> {
        let cfg: Value = serde_json::from_str(config)
            .map_err(|e| Error::InvalidConfig(format!("config.json is not JSON: {e}")))?;
        let quant: Option<Value> = quant
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| Error::InvalidConfig(format!("hf_quant_config.json is not JSON: {e}")))?;
        let arch = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::InvalidConfig("config.json has no `architectures`".into()))?;
        let c = Cfg(&cfg);
        match arch {
            "DeepseekV4ForCausalLM" => deepseek_v4(name, arch, &c, quant.as_ref()),
            "DeepseekV3ForCausalLM" => deepseek_v3(name, arch, &c, quant.as_ref()),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// Parameters active for one token (all non-expert weights plus the
    /// routed experts it is sent to).
    pub fn active_params_per_token(&self) -> f64 {
        let w = &self.weights;
        w.shared_experts.params
            + w.dense_mlp.params
            + w.attention.params
            + w.head.params
            + f64::from(self.experts_per_token) * self.expert_params * f64::from(self.moe_layers)
    }

    /// Bytes of one routed expert summed over every MoE layer.
    pub fn expert_bytes_all_layers(&self) -> f64 {
        self.expert_params
            * f64::from(self.moe_layers)
            * self.weights.routed_experts.precision.bytes_per_param()
    }

    /// GEMM FLOPs per token by precision, excluding the LM head (which runs
    /// once per sequence in prefill and once per token in decode).
    pub fn gemm_flops_per_token(&self) -> Vec<(Precision, f64)> {
        let w = &self.weights;
        let routed = 2.0
            * f64::from(self.experts_per_token)
            * self.expert_params
            * f64::from(self.moe_layers);
        vec![
            (w.routed_experts.precision, routed),
            (w.shared_experts.precision, 2.0 * w.shared_experts.params),
            (w.dense_mlp.precision, 2.0 * w.dense_mlp.params),
            (w.attention.precision, 2.0 * w.attention.params),
        ]
    }

    /// FLOPs of the LM head for one token.
    pub fn head_flops(&self) -> f64 {
        2.0 * self.weights.head.params
    }

    /// Bytes of activations one in-flight token keeps alive during a forward
    /// pass, per GPU of a group that splits heads and experts `split` ways:
    /// the residual streams (kept in FP32 by hyper-connection mixing), the
    /// query heads, the MoE up-projections of its routed experts, and room
    /// for the dispatched copies.
    pub fn activation_bytes_per_token(&self, split: u32) -> f64 {
        let split = f64::from(split.max(1));
        let hidden = f64::from(self.hidden);
        let residual = 4.0 * f64::from(self.residual_streams) * hidden * 2.0;
        let queries = match &self.attention {
            Attention::Compressed {
                heads, head_dim, ..
            } => f64::from(heads * head_dim) * 2.0,
            Attention::Mla {
                heads,
                kv_lora_rank,
                rope_dim,
                ..
            } => f64::from(heads * (kv_lora_rank + rope_dim)) * 2.0,
        } / split;
        let k = f64::from(self.experts_per_token);
        let moe = k * (2.0 * f64::from(self.moe_intermediate) * 2.0 / split + 3.0 * hidden);
        residual + queries + moe
    }
}

/// Field access with errors that name the missing field.
struct Cfg<'a>(&'a Value);

impl Cfg<'_> {
    fn u32(&self, key: &str) -> Result<u32> {
        self.0
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                Error::InvalidConfig(format!("config.json: `{key}` missing or not a count"))
            })
    }

    fn u32_or(&self, key: &str, default: u32) -> Result<u32> {
        if self.0.get(key).is_none() {
            Ok(default)
        } else {
            self.u32(key)
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }
}

/// Precision of the routed experts: NVFP4 when the config or the modelopt
/// quant config says so, FP8 blocks otherwise.
fn routed_precision(cfg: &Cfg<'_>, quant: Option<&Value>) -> Precision {
    let quant_nvfp4 = quant
        .and_then(|q| q.get("quantization"))
        .and_then(|q| q.get("quantized_layers"))
        .and_then(Value::as_object)
        .is_some_and(|layers| {
            layers.iter().any(|(name, v)| {
                name.contains("experts")
                    && v.get("quant_algo").and_then(Value::as_str) == Some("NVFP4")
            })
        });
    if quant_nvfp4 || cfg.str("expert_dtype") == Some("fp4") {
        Precision::Nvfp4
    } else {
        Precision::Fp8
    }
}

/// Precision of non-expert linear layers: FP8 blocks when the checkpoint's
/// own quantization config says fp8, BF16 otherwise.
fn base_precision(cfg: &Cfg<'_>) -> Precision {
    let fp8 = cfg
        .0
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
        == Some("fp8");
    if fp8 { Precision::Fp8 } else { Precision::Bf16 }
}

fn deepseek_v4(name: &str, arch: &str, c: &Cfg<'_>, quant: Option<&Value>) -> Result<ModelProfile> {
    let layers = c.u32("num_hidden_layers")?;
    let hidden = f64::from(c.u32("hidden_size")?);
    let heads = c.u32("num_attention_heads")?;
    let head_dim = c.u32("head_dim")?;
    let q_lora = f64::from(c.u32("q_lora_rank")?);
    let o_lora = f64::from(c.u32("o_lora_rank")?);
    let o_groups = f64::from(c.u32_or("o_groups", 1)?);
    let index_heads = c.u32("index_n_heads")?;
    let index_head_dim = c.u32("index_head_dim")?;
    let moe_inter = c.u32("moe_intermediate_size")?;
    let experts = c.u32("n_routed_experts")?;
    let shared = c.u32_or("n_shared_experts", 0)?;
    let vocab = c.u32("vocab_size")?;
    let hc = c.u32_or("hc_mult", 1)?;
    let ratios: Vec<u32> =
        c.0.get("compress_ratios")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::InvalidConfig("config.json: `compress_ratios` missing".into()))?
            .iter()
            .take(layers as usize)
            .map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                Error::InvalidConfig("config.json: `compress_ratios` must be counts".into())
            })?;
    if ratios.len() != layers as usize {
        return Err(Error::InvalidConfig(format!(
            "config.json: `compress_ratios` has {} entries for {layers} layers",
            ratios.len()
        )));
    }

    let qkv_dim = f64::from(heads * head_dim);
    let (ih, ihd) = (f64::from(index_heads), f64::from(index_head_dim));
    let per_layer_attn = |ratio: u32| {
        let core = hidden * q_lora + q_lora * qkv_dim + hidden * f64::from(head_dim);
        // Grouped low-rank output: each group's heads project to the LoRA
        // rank, then the concatenated group outputs project to the hidden size.
        let out = qkv_dim * o_lora + o_groups * o_lora * hidden;
        // Compressor: KV and gating projections for the compressed entries.
        let compressor = if ratio > 0 {
            2.0 * hidden * f64::from(head_dim)
        } else {
            0.0
        };
        // Indexer on CSA layers: its queries, keys, head weights and compressor.
        let indexer = if ratio == 4 {
            q_lora * ih * ihd + hidden * (3.0 * ihd + ih)
        } else {
            0.0
        };
        // Hyper-connection mixing around the two sublayers.
        let mixing = 2.0 * f64::from(hc) * hidden * f64::from(hc * (2 + hc));
        core + out + compressor + indexer + mixing
    };
    let attention: f64 = ratios.iter().map(|&r| per_layer_attn(r)).sum();
    let expert_params = 3.0 * hidden * f64::from(moe_inter);
    let base = base_precision(c);
    let weights = Weights {
        routed_experts: WeightClass {
            params: expert_params * f64::from(experts) * f64::from(layers),
            precision: routed_precision(c, quant),
        },
        shared_experts: WeightClass {
            params: expert_params * f64::from(shared) * f64::from(layers),
            precision: base,
        },
        dense_mlp: WeightClass {
            params: 0.0,
            precision: base,
        },
        attention: WeightClass {
            params: attention,
            precision: base,
        },
        embeddings: WeightClass {
            params: hidden * f64::from(vocab),
            precision: Precision::Bf16,
        },
        head: WeightClass {
            params: hidden * f64::from(vocab),
            precision: Precision::Bf16,
        },
    };
    Ok(ModelProfile {
        name: name.to_string(),
        architecture: arch.to_string(),
        layers,
        moe_layers: layers,
        hidden: c.u32("hidden_size")?,
        vocab,
        residual_streams: hc,
        routed_experts: experts,
        experts_per_token: c.u32("num_experts_per_tok")?,
        shared_experts: shared,
        moe_intermediate: moe_inter,
        expert_params,
        weights,
        attention: Attention::Compressed {
            heads,
            head_dim,
            rope_dim: c.u32("qk_rope_head_dim")?,
            layer_ratios: ratios,
            window: c.u32("sliding_window")?,
            index_topk: c.u32("index_topk")?,
            index_heads,
            index_head_dim,
        },
    })
}

fn deepseek_v3(name: &str, arch: &str, c: &Cfg<'_>, quant: Option<&Value>) -> Result<ModelProfile> {
    let layers = c.u32("num_hidden_layers")?;
    let dense_layers = c.u32_or("first_k_dense_replace", 0)?.min(layers);
    let hidden = f64::from(c.u32("hidden_size")?);
    let heads = c.u32("num_attention_heads")?;
    let q_lora = f64::from(c.u32("q_lora_rank")?);
    let kv_lora = c.u32("kv_lora_rank")?;
    let rope = c.u32("qk_rope_head_dim")?;
    let nope = f64::from(c.u32("qk_nope_head_dim")?);
    let v_dim = f64::from(c.u32("v_head_dim")?);
    let moe_inter = c.u32("moe_intermediate_size")?;
    let inter = f64::from(c.u32("intermediate_size")?);
    let experts = c.u32("n_routed_experts")?;
    let shared = c.u32_or("n_shared_experts", 0)?;
    let vocab = c.u32("vocab_size")?;
    let h = f64::from(heads);
    let per_layer_attn = hidden * q_lora
        + q_lora * h * (nope + f64::from(rope))
        + hidden * f64::from(kv_lora + rope)
        + f64::from(kv_lora) * h * (nope + v_dim)
        + h * v_dim * hidden;
    let moe_layers = layers - dense_layers;
    let expert_params = 3.0 * hidden * f64::from(moe_inter);
    let base = base_precision(c);
    let weights = Weights {
        routed_experts: WeightClass {
            params: expert_params * f64::from(experts) * f64::from(moe_layers),
            precision: routed_precision(c, quant),
        },
        shared_experts: WeightClass {
            params: expert_params * f64::from(shared) * f64::from(moe_layers),
            precision: base,
        },
        dense_mlp: WeightClass {
            params: 3.0 * hidden * inter * f64::from(dense_layers),
            precision: base,
        },
        attention: WeightClass {
            params: per_layer_attn * f64::from(layers),
            precision: base,
        },
        embeddings: WeightClass {
            params: hidden * f64::from(vocab),
            precision: Precision::Bf16,
        },
        head: WeightClass {
            params: hidden * f64::from(vocab),
            precision: Precision::Bf16,
        },
    };
    Ok(ModelProfile {
        name: name.to_string(),
        architecture: arch.to_string(),
        layers,
        moe_layers,
        hidden: c.u32("hidden_size")?,
        vocab,
        residual_streams: 1,
        routed_experts: experts,
        experts_per_token: c.u32("num_experts_per_tok")?,
        shared_experts: shared,
        moe_intermediate: moe_inter,
        expert_params,
        weights,
        attention: Attention::Mla {
            heads,
            kv_lora_rank: kv_lora,
            rope_dim: rope,
            layers,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_pro_matches_its_published_size() {
        let m = ModelProfile::builtin("deepseek-v4-pro").unwrap();
        let total = m.weights.total_params();
        // DeepSeek-V4-Pro: about 1.6T parameters, about 49B active per token.
        assert!((1.5e12..1.7e12).contains(&total), "total {total:e}");
        let active = m.active_params_per_token();
        assert!((4.4e10..5.4e10).contains(&active), "active {active:e}");
        assert_eq!(m.weights.routed_experts.precision, Precision::Nvfp4);
        // Around 0.9 TB of weights: experts in NVFP4, the rest in FP8/BF16.
        let bytes = m.weights.total_bytes();
        assert!((8.0e11..9.6e11).contains(&bytes), "bytes {bytes:e}");
        // KV: roughly 5-10 KB per token.
        let kv = m.attention.kv_bytes_per_token();
        assert!((5e3..10e3).contains(&kv), "kv/token {kv}");
    }

    #[test]
    fn flash_and_v3_parse() {
        let flash = ModelProfile::builtin("deepseek-v4-flash").unwrap();
        assert!(flash.weights.total_params() < 3.5e11);
        let v3 = ModelProfile::builtin("deepseek-v3").unwrap();
        // DeepSeek-V3: 671B total (without MTP: ~660B), 37B active.
        let total = v3.weights.total_params();
        assert!((6.4e11..6.9e11).contains(&total), "v3 total {total:e}");
        let active = v3.active_params_per_token();
        assert!((3.4e10..4.0e10).contains(&active), "v3 active {active:e}");
        assert_eq!(v3.weights.routed_experts.precision, Precision::Fp8);
        assert_eq!(v3.moe_layers, 58);
        // MLA in BF16: 576 elements x 2 bytes x 61 layers per token.
        assert_eq!(v3.attention.kv_bytes_per_token().round(), 1152.0 * 61.0);
    }

    #[test]
    fn unknown_architecture_and_bad_config_are_clear() {
        let err = ModelProfile::from_json("x", r#"{"architectures":["LlamaForCausalLM"]}"#, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("LlamaForCausalLM"), "{err}");
        let err = ModelProfile::from_json(
            "x",
            r#"{"architectures":["DeepseekV4ForCausalLM"],"hidden_size":7168}"#,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_hidden_layers"), "{err}");
        assert!(
            ModelProfile::builtin("gpt-5")
                .unwrap_err()
                .to_string()
                .contains("deepseek-v4-pro")
        );
        assert!(ModelProfile::from_json("x", "not json", None).is_err());
    }
}
