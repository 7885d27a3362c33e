//! The CPU reference backend: a small DeepSeek-style MoE computed for real
//! (candle's CPU tensors) through the same scheduler, KV transfer and
//! frontend as the simulated backend.
//!
//! - [`config`]: the HF-style `config.json` of the model's shape.
//! - [`nvfp4`]: the routed experts' 4-bit format, quantise and dequantise.
//! - [`weights`]: seeded generation, the safetensors writer and loader.
//! - [`model`]: latent attention with a BF16 KV cache, MoE with top-k
//!   routed experts plus a shared expert, RMSNorm, RoPE; greedy tokens.
//! - [`tokenizer`]: byte-level text <-> ids.
//! - [`ep`]: expert parallelism: experts sharded over rank processes,
//!   dispatch and combine per MoE layer over TCP.
//! - [`backend`]: the [`crate::backend::Backend`] implementation.
//!
//! Invariant: a token depends only on the prompt, the weights and how the
//! prompt was cut into prefill chunks, never on which process computed an
//! expert or which other requests shared a step, so layouts (aggregated,
//! disaggregated, any EP width) produce bit-identical greedy tokens.

pub mod backend;
pub mod config;
pub mod ep;
pub mod model;
pub mod nvfp4;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use backend::CpuBackend;
pub use config::ModelConfig;
pub use model::{KvCache, Model};
pub use tokenizer::ByteTokenizer;
pub use weights::{ExpertShard, Weights};

/// What can go wrong loading or running the CPU model.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A tensor the config calls for is not in the file.
    #[error("{file}: tensor {tensor} is missing")]
    Missing { file: String, tensor: String },
    /// A file or tensor is not what the config says.
    #[error("{what}: {why}")]
    Malformed { what: String, why: String },
    /// The tensor library failed (a shape bug).
    #[error("tensor math: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A KV cache does not fit the model (wrong size or length).
    #[error("KV cache: {0}")]
    Kv(String),
    /// An expert-parallel peer rank failed or is unreachable.
    #[error("expert rank {rank}: {why}")]
    Peer { rank: usize, why: String },
}

impl CpuError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Writes the small model generated from `seed` (config and weights) into
/// `dir`.
pub fn write_model(dir: &Path, seed: u64) -> CpuResult<()> {
    Weights::generate(&ModelConfig::small(seed))?.save(dir)
}

/// The directory of the model generated from `seed` under the system's
/// temporary directory, written there first if missing. Ranks starting at
/// once each write a private copy and rename it into place, so a reader
/// never sees half a model.
pub fn generated_model_dir(seed: u64) -> CpuResult<PathBuf> {
    let dir = std::env::temp_dir().join(format!("rackscale-cpu-model-seed{seed}"));
    if dir.join(config::CONFIG_FILE).exists() && dir.join(weights::WEIGHTS_FILE).exists() {
        return Ok(dir);
    }
    let staging = dir.with_extension(format!("staging-{}", std::process::id()));
    write_model(&staging, seed)?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another rank won the race; its copy is the same model.
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(dir)
}

/// Result with [`CpuError`].
pub type CpuResult<T> = std::result::Result<T, CpuError>;
