//! The small model's weights: generated from a seed, written as one
//! safetensors file beside `config.json`, and read back.
//!
//! Layout of `model.safetensors` (DeepSeek-V3 / ModelOpt tensor names):
//! every tensor is BF16 except the routed experts'
//! `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj`, stored NVFP4 as
//! `.weight` (U8, `[out, in/2]`, two E2M1 codes a byte), `.weight_scale`
//! (F8_E4M3, `[out, in/16]`) and `.weight_scale_2` (F32, `[]`); see
//! [`super::nvfp4`].
//!
//! Invariants: generation is a pure function of the config (its seed
//! included), so two writers produce byte-identical files; the loader
//! checks every tensor's presence, dtype and shape against the config and
//! names the file and tensor when one is wrong.

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::config::{CONFIG_FILE, ModelConfig};
use super::nvfp4::{GROUP, Nvfp4};
use super::{CpuError, CpuResult};

/// The weights file's name in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// splitmix64: small, seedable, identical everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

/// One stored tensor, as the file holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// BF16 values, row-major.
    Bf16 { shape: Vec<usize>, data: Vec<bf16> },
    /// An NVFP4 matrix (a routed expert's projection).
    Nvfp4(Nvfp4),
}

impl Stored {
    /// The tensor's values in f32, row-major, and its shape.
    pub fn to_f32(&self) -> (Vec<f32>, Vec<usize>) {
        match self {
            Self::Bf16 { shape, data } => {
                (data.iter().map(|v| v.to_f32()).collect(), shape.clone())
            }
            Self::Nvfp4(q) => (q.dequantize(), vec![q.rows, q.cols]),
        }
    }
}

/// Which routed experts to hold: an EP rank holds only its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShard {
    /// This rank's index among `ranks`.
    pub rank: usize,
    /// EP ranks the experts are spread over.
    pub ranks: usize,
}

impl ExpertShard {
    /// Every expert in one place.
    pub const ALL: Self = Self { rank: 0, ranks: 1 };

    /// The rank owning `expert`: experts are dealt out in contiguous runs
    /// (with 8 experts over 4 ranks, rank 1 owns experts 2 and 3).
    pub fn owner(experts: usize, ranks: usize, expert: usize) -> usize {
        let per = experts.div_ceil(ranks.max(1));
        expert / per.max(1)
    }

    /// Whether this shard holds `expert` of `experts`.
    pub fn holds(&self, experts: usize, expert: usize) -> bool {
        Self::owner(experts, self.ranks, expert) == self.rank
    }
}

/// Names of the model's tensors, one place so writer and loader agree.
pub mod names {
    /// The token embedding.
    pub const EMBED: &str = "model.embed_tokens.weight";
    /// The final norm.
    pub const NORM: &str = "model.norm.weight";
    /// The output projection.
    pub const LM_HEAD: &str = "lm_head.weight";

    /// `model.layers.{layer}.{rest}`.
    pub fn layer(layer: usize, rest: &str) -> String {
        format!("model.layers.{layer}.{rest}")
    }

    /// The prefix of a routed expert's projection (`gate_proj`, `up_proj`,
    /// `down_proj`), without `.weight`.
    pub fn expert(layer: usize, expert: usize, proj: &str) -> String {
        format!("model.layers.{layer}.mlp.experts.{expert}.{proj}")
    }
}

/// The three projections of an expert.
pub const PROJS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// BF16 tensors of a layer (name after `model.layers.{l}.`, shape).
fn layer_dense(c: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
    let h = c.hidden_size;
    let heads = c.num_attention_heads;
    let shared = c.moe_intermediate_size * c.n_shared_experts;
    let mut out = vec![
        ("input_layernorm.weight", vec![h]),
        ("self_attn.q_proj.weight", vec![heads * c.qk_head_dim(), h]),
        ("self_attn.kv_a_proj_with_mqa.weight", vec![c.kv_width(), h]),
        ("self_attn.kv_a_layernorm.weight", vec![c.kv_lora_rank]),
        (
            "self_attn.kv_b_proj.weight",
            vec![heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank],
        ),
        ("self_attn.o_proj.weight", vec![h, heads * c.v_head_dim]),
        ("post_attention_layernorm.weight", vec![h]),
        ("mlp.gate.weight", vec![c.n_routed_experts, h]),
    ];
    if shared > 0 {
        out.extend([
            ("mlp.shared_experts.gate_proj.weight", vec![shared, h]),
            ("mlp.shared_experts.up_proj.weight", vec![shared, h]),
            ("mlp.shared_experts.down_proj.weight", vec![h, shared]),
        ]);
    }
    out
}

/// Shape `[out, in]` of an expert projection.
fn expert_shape(c: &ModelConfig, proj: &str) -> (usize, usize) {
    if proj == "down_proj" {
        (c.hidden_size, c.moe_intermediate_size)
    } else {
        (c.moe_intermediate_size, c.hidden_size)
    }
}

/// The model's tensors by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, Stored>,
}

impl Weights {
    /// Generates every tensor from `config.rackscale_seed`: norms near 1,
    /// embeddings standard normal, projections normal with variance
    /// 1/fan-in (so activations keep their scale through the layers).
    pub fn generate(config: &ModelConfig) -> CpuResult<Self> {
        config.validate().map_err(|why| CpuError::Malformed {
            what: "model config".into(),
            why,
        })?;
        let mut rng = Rng::new(config.rackscale_seed);
        let mut tensors = BTreeMap::new();
        let mut dense = |rng: &mut Rng, name: String, shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 {
                (0..n)
                    .map(|_| bf16::from_f32(1.0 + 0.1 * rng.normal()))
                    .collect()
            } else {
                let std = if name == names::EMBED {
                    1.0
                } else {
                    1.0 / (shape[1] as f32).sqrt()
                };
                (0..n).map(|_| bf16::from_f32(std * rng.normal())).collect()
            };
            tensors.insert(name, Stored::Bf16 { shape, data });
        };
        let (v, h) = (config.vocab_size, config.hidden_size);
        dense(&mut rng, names::EMBED.into(), vec![v, h]);
        for l in 0..config.num_hidden_layers {
            for (rest, shape) in layer_dense(config) {
                dense(&mut rng, names::layer(l, rest), shape);
            }
        }
        dense(&mut rng, names::NORM.into(), vec![h]);
        dense(&mut rng, names::LM_HEAD.into(), vec![v, h]);
        for l in 0..config.num_hidden_layers {
            for e in 0..config.n_routed_experts {
                for proj in PROJS {
                    let (rows, cols) = expert_shape(config, proj);
                    let std = 1.0 / (cols as f32).sqrt();
                    let values: Vec<f32> = (0..rows * cols).map(|_| std * rng.normal()).collect();
                    let q = Nvfp4::quantize(&values, rows, cols).map_err(|why| {
                        CpuError::Malformed {
                            what: names::expert(l, e, proj),
                            why,
                        }
                    })?;
                    tensors.insert(names::expert(l, e, proj), Stored::Nvfp4(q));
                }
            }
        }
        Ok(Self {
            config: config.clone(),
            tensors,
        })
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (creating `dir`).
    pub fn save(&self, dir: &Path) -> CpuResult<()> {
        std::fs::create_dir_all(dir).map_err(|e| CpuError::io(dir, e))?;
        let config_path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&self.config).map_err(|e| CpuError::Malformed {
            what: config_path.display().to_string(),
            why: e.to_string(),
        })?;
        std::fs::write(&config_path, text + "\n").map_err(|e| CpuError::io(&config_path, e))?;

        // Own every byte buffer first; the views borrow them.
        let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, t) in &self.tensors {
            match t {
                Stored::Bf16 { shape, data } => buffers.push((
                    name.clone(),
                    Dtype::BF16,
                    shape.clone(),
                    data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )),
                Stored::Nvfp4(q) => {
                    buffers.push((
                        format!("{name}.weight"),
                        Dtype::U8,
                        vec![q.rows, q.cols / 2],
                        q.packed.clone(),
                    ));
                    buffers.push((
                        format!("{name}.weight_scale"),
                        Dtype::F8_E4M3,
                        vec![q.rows, q.cols / GROUP],
                        q.scales.clone(),
                    ));
                    buffers.push((
                        format!("{name}.weight_scale_2"),
                        Dtype::F32,
                        vec![],
                        q.tensor_scale.to_le_bytes().to_vec(),
                    ));
                }
            }
        }
        let path = dir.join(WEIGHTS_FILE);
        let malformed = |why: String| CpuError::Malformed {
            what: path.display().to_string(),
            why,
        };
        let views = buffers
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| malformed(format!("{name}: {e}")))
            })
            .collect::<CpuResult<Vec<_>>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::tensor::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| malformed(e.to_string()))
    }

    /// Reads `dir`'s config and weights, keeping the routed experts of
    /// `shard` only; every tensor is checked against the config.
    pub fn load(dir: &Path, shard: ExpertShard) -> CpuResult<Self> {
        let config = ModelConfig::load(dir)?;
        let path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| CpuError::io(&path, e))?;
        let file = path.display().to_string();
        let st = SafeTensors::deserialize(&bytes).map_err(|e| CpuError::Malformed {
            what: file.clone(),
            why: e.to_string(),
        })?;
        let reader = Reader {
            st: &st,
            file: &file,
        };
        let mut tensors = BTreeMap::new();
        let (v, h) = (config.vocab_size, config.hidden_size);
        let mut wanted: Vec<(String, Vec<usize>)> = vec![
            (names::EMBED.into(), vec![v, h]),
            (names::NORM.into(), vec![h]),
            (names::LM_HEAD.into(), vec![v, h]),
        ];
        for l in 0..config.num_hidden_layers {
            for (rest, shape) in layer_dense(&config) {
                wanted.push((names::layer(l, rest), shape));
            }
        }
        for (name, shape) in wanted {
            let data = reader.bf16(&name, &shape)?;
            tensors.insert(name, Stored::Bf16 { shape, data });
        }
        for l in 0..config.num_hidden_layers {
            for e in
                (0..config.n_routed_experts).filter(|&e| shard.holds(config.n_routed_experts, e))
            {
                for proj in PROJS {
                    let name = names::expert(l, e, proj);
                    let (rows, cols) = expert_shape(&config, proj);
                    tensors.insert(
                        name.clone(),
                        Stored::Nvfp4(reader.nvfp4(&name, rows, cols)?),
                    );
                }
            }
        }
        Ok(Self { config, tensors })
    }

    /// The tensor `name`, or an error naming it.
    pub fn get(&self, name: &str) -> CpuResult<&Stored> {
        self.tensors.get(name).ok_or_else(|| CpuError::Missing {
            file: WEIGHTS_FILE.into(),
            tensor: name.into(),
        })
    }
}

/// Typed, checked access to one safetensors file.
struct Reader<'a> {
    st: &'a SafeTensors<'a>,
    file: &'a str,
}

impl Reader<'_> {
    fn view(&self, name: &str, dtype: Dtype, shape: &[usize]) -> CpuResult<&[u8]> {
        let view = self.st.tensor(name).map_err(|_| CpuError::Missing {
            file: self.file.into(),
            tensor: name.into(),
        })?;
        if view.dtype() != dtype || view.shape() != shape {
            return Err(CpuError::Malformed {
                what: format!("{}: tensor {name}", self.file),
                why: format!(
                    "expected {dtype:?} {shape:?}, found {:?} {:?}",
                    view.dtype(),
                    view.shape()
                ),
            });
        }
        Ok(view.data())
    }

    fn bf16(&self, name: &str, shape: &[usize]) -> CpuResult<Vec<bf16>> {
        let data = self.view(name, Dtype::BF16, shape)?;
        Ok(data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
            .collect())
    }

    fn nvfp4(&self, name: &str, rows: usize, cols: usize) -> CpuResult<Nvfp4> {
        let packed = self
            .view(&format!("{name}.weight"), Dtype::U8, &[rows, cols / 2])?
            .to_vec();
        let scales = self
            .view(
                &format!("{name}.weight_scale"),
                Dtype::F8_E4M3,
                &[rows, cols / GROUP],
            )?
            .to_vec();
        let s2 = self.view(&format!("{name}.weight_scale_2"), Dtype::F32, &[])?;
        let tensor_scale = f32::from_le_bytes([s2[0], s2[1], s2[2], s2[3]]);
        let q = Nvfp4 {
            rows,
            cols,
            packed,
            scales,
            tensor_scale,
        };
        q.check().map_err(|why| CpuError::Malformed {
            what: format!("{}: tensor {name}", self.file),
            why,
        })?;
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn writes_and_reads_back_the_same_tensors() {
        let config = ModelConfig::small(7);
        let w = Weights::generate(&config).expect("generate");
        let d = dir();
        w.save(d.path()).expect("save");
        let back = Weights::load(d.path(), ExpertShard::ALL).expect("load");
        assert_eq!(back, w);
        // Deterministic from the seed, different across seeds.
        assert_eq!(Weights::generate(&config).expect("again"), w);
        assert_ne!(Weights::generate(&ModelConfig::small(8)).expect("other"), w);
        // The routed experts really are NVFP4 in the file.
        let bytes = std::fs::read(d.path().join(WEIGHTS_FILE)).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("parse");
        let name = format!("{}.weight_scale", names::expert(0, 3, "up_proj"));
        assert_eq!(st.tensor(&name).expect("scale").dtype(), Dtype::F8_E4M3);
        assert_eq!(st.tensor(names::EMBED).expect("embed").dtype(), Dtype::BF16);
    }

    #[test]
    fn a_shard_loads_only_its_experts() {
        let config = ModelConfig::small(7);
        let d = dir();
        Weights::generate(&config)
            .expect("generate")
            .save(d.path())
            .expect("save");
        let shard = Weights::load(d.path(), ExpertShard { rank: 1, ranks: 4 }).expect("load");
        let held: Vec<usize> = (0..8)
            .filter(|&e| {
                shard
                    .tensors
                    .contains_key(&names::expert(0, e, "gate_proj"))
            })
            .collect();
        assert_eq!(held, vec![2, 3]);
        assert!(shard.get(&names::expert(0, 0, "gate_proj")).is_err());
    }

    #[test]
    fn missing_or_malformed_files_name_what_is_wrong() {
        let d = dir();
        let err = Weights::load(d.path(), ExpertShard::ALL)
            .expect_err("no config")
            .to_string();
        assert!(err.contains("config.json"), "{err}");

        let config = ModelConfig::small(7);
        let mut w = Weights::generate(&config).expect("generate");
        w.save(d.path()).expect("save");
        std::fs::write(d.path().join(CONFIG_FILE), "{\"hidden_size\": 64").expect("write");
        let err = Weights::load(d.path(), ExpertShard::ALL)
            .expect_err("bad json")
            .to_string();
        assert!(err.contains("config.json"), "{err}");

        // A tensor missing from the file.
        let victim = names::layer(2, "self_attn.o_proj.weight");
        w.tensors.remove(&victim);
        w.save(d.path()).expect("save");
        let err = Weights::load(d.path(), ExpertShard::ALL)
            .expect_err("missing")
            .to_string();
        assert!(err.contains(&victim) && err.contains(WEIGHTS_FILE), "{err}");

        // A tensor of the wrong shape.
        let mut w = Weights::generate(&config).expect("generate");
        w.tensors.insert(
            names::NORM.into(),
            Stored::Bf16 {
                shape: vec![3],
                data: vec![bf16::ONE; 3],
            },
        );
        w.save(d.path()).expect("save");
        let err = Weights::load(d.path(), ExpertShard::ALL)
            .expect_err("shape")
            .to_string();
        assert!(err.contains(names::NORM) && err.contains("[64]"), "{err}");

        // A truncated weights file.
        Weights::generate(&config)
            .expect("generate")
            .save(d.path())
            .expect("save");
        let path = d.path().join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        let err = Weights::load(d.path(), ExpertShard::ALL)
            .expect_err("truncated")
            .to_string();
        assert!(err.contains(WEIGHTS_FILE), "{err}");
    }
}
