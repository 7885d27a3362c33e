//! [`CpuBackend`]: the scheduler's [`Backend`] over the CPU model.
//!
//! Prefill chunks run through the model one prompt at a time (a chunk's
//! tokens as one batch); decode runs each sequence's one token on its own,
//! so a token never depends on which requests shared its step. Step times
//! are measured wall time. The KV bytes a prefill exports are the model's
//! BF16 cache for the prompt, `prompt_len * kv_bytes_per_token` long.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::model::{ExpertBatch, Experts, Model};
use super::tokenizer::ByteTokenizer;
use super::weights::{ExpertShard, Weights};
use super::{CpuError, CpuResult, ep};
use crate::backend::{Backend, DecodeSeq, KvCache, PrefillChunk};
use crate::config::CpuOptions;
use crate::error::{Error, Result};
use crate::openai::Tokenizer;

/// Every expert in this process.
#[derive(Debug)]
struct Local(Arc<Model>);

impl Experts for Local {
    fn run(&self, layer: usize, batches: Vec<ExpertBatch>) -> CpuResult<Vec<Vec<f32>>> {
        self.0.run_local(layer, batches)
    }
}

/// The CPU reference backend of one worker (its rank 0).
pub struct CpuBackend {
    model: Arc<Model>,
    experts: Box<dyn Experts + Send + Sync>,
    ep: usize,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("layers", &self.model.config().num_hidden_layers)
            .field("ep", &self.ep)
            .finish_non_exhaustive()
    }
}

impl CpuBackend {
    /// Loads the model from `options.model_dir`, holding rank 0's share of
    /// the experts when `options.ep_peers` names other ranks (dialled
    /// through `tls`).
    pub fn load(options: &CpuOptions, tls: &proto::tls::ClientTls) -> CpuResult<Self> {
        let ranks = options.ep_peers.len() + 1;
        let shard = ExpertShard { rank: 0, ranks };
        let weights = Weights::load(&options.model_dir, shard)?;
        let model = Arc::new(Model::new(&weights, shard)?);
        let experts: Box<dyn Experts + Send + Sync> = if ranks == 1 {
            Box::new(Local(Arc::clone(&model)))
        } else {
            Box::new(ep::Dispatcher::new(
                Arc::clone(&model),
                &options.ep_peers,
                tls,
            )?)
        };
        Ok(Self {
            model,
            experts,
            ep: ranks,
        })
    }

    /// The model this backend runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    fn kv_len(&self, prompt_len: u32) -> u64 {
        u64::from(prompt_len) * self.model.config().kv_bytes_per_token()
    }
}

impl Backend for CpuBackend {
    fn prefill(&self, chunks: &mut [PrefillChunk]) -> Result<f64> {
        let start = Instant::now();
        for c in chunks.iter_mut() {
            let Some(tokens) = &c.tokens else {
                return Err(Error::InvalidRequest(
                    "the cpu backend needs the prompt's token ids".into(),
                ));
            };
            let next = self
                .model
                .forward(tokens, &mut c.kv, self.experts.as_ref())?;
            if c.start + c.len >= c.prompt_len {
                c.first_token = Some(next);
            }
        }
        Ok(start.elapsed().as_secs_f64())
    }

    fn decode(&self, seqs: &mut [DecodeSeq]) -> Result<f64> {
        let start = Instant::now();
        for s in seqs.iter_mut() {
            s.output = self
                .model
                .forward(&[s.input], &mut s.kv, self.experts.as_ref())?;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    fn wall(&self, _seconds: f64) -> Duration {
        // The step already took its time computing.
        Duration::ZERO
    }

    fn blocking(&self) -> bool {
        true
    }

    fn needs_tokens(&self) -> bool {
        true
    }

    fn kv_bytes(&self, prompt_len: u32) -> u64 {
        self.kv_len(prompt_len)
    }

    fn export_kv(&self, _kv_id: &str, prompt_len: u32, kv: KvCache) -> Result<Vec<u8>> {
        if kv.bytes.len() as u64 != self.kv_len(prompt_len) {
            return Err(CpuError::Kv(format!(
                "cache of {} bytes for a {prompt_len}-token prompt",
                kv.bytes.len()
            ))
            .into());
        }
        Ok(kv.bytes)
    }

    fn import_kv(&self, _kv_id: &str, prompt_len: u32, data: Vec<u8>) -> Result<KvCache> {
        let want = self.kv_len(prompt_len);
        if data.len() as u64 != want {
            return Err(Error::KvCorrupt(format!(
                "{} KV bytes for {prompt_len} tokens; the model keeps {want}",
                data.len()
            )));
        }
        Ok(KvCache { bytes: data })
    }

    fn request_overhead(&self) -> Duration {
        Duration::ZERO
    }

    fn tokenizer(&self) -> Arc<dyn Tokenizer> {
        Arc::new(ByteTokenizer)
    }
}
