//! The seam between the scheduler and what computes its steps: the
//! simulated backend ([`crate::sim::SimBackend`]: modelled step times,
//! synthetic tokens and KV) and the CPU reference backend
//! ([`crate::cpu::CpuBackend`]: a real model, real KV).
//!
//! The scheduler owns each request's [`KvCache`] and hands it to the
//! backend with every step; the server turns a finished prefill's cache
//! into the bytes `PullKv` serves ([`Backend::export_kv`]) and pulled bytes
//! back into a cache ([`Backend::import_kv`]), so the same scheduler, KV
//! transfer and frontend carry either backend.
//!
//! Invariants: a step's seconds are what the scheduler's clock advances by
//! (modelled for the sim, measured for the CPU); `export_kv` of a prompt of
//! `n` tokens is exactly [`Backend::kv_bytes`]`(n)` long.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::openai::Tokenizer;

/// A request's KV cache as the backend keeps it (empty for the sim, whose
/// KV bytes are synthesised on export).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvCache {
    /// The cache's bytes, in the backend's layout.
    pub bytes: Vec<u8>,
}

/// A prompt as a prefill call gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The token ids.
    Tokens(Vec<u32>),
    /// Only a length (enough for the simulated backend).
    Length(u32),
}

impl Prompt {
    /// Tokens in the prompt.
    pub fn len(&self) -> u32 {
        match self {
            Self::Tokens(t) => u32::try_from(t.len()).unwrap_or(u32::MAX),
            Self::Length(n) => *n,
        }
    }

    /// Whether the prompt has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One prompt's share of a prefill step.
#[derive(Debug)]
pub struct PrefillChunk {
    pub request_id: String,
    /// The chunk's token ids; `None` for a length-only prompt.
    pub tokens: Option<Vec<u32>>,
    /// Prompt tokens before this chunk (already in `kv`).
    pub start: u32,
    /// Tokens in this chunk.
    pub len: u32,
    /// The whole prompt's length.
    pub prompt_len: u32,
    /// The request's cache, extended by the step.
    pub kv: KvCache,
    /// Set by the step when the chunk ends the prompt: the first token.
    pub first_token: Option<u32>,
}

/// One running request's share of a decode step.
#[derive(Debug)]
pub struct DecodeSeq {
    pub request_id: String,
    /// Output position of the token this step produces (1 is the first
    /// decode token; 0 came from the prefill).
    pub index: u32,
    /// Tokens in context once this step's input is added.
    pub context: u32,
    /// The previous output token, this step's input.
    pub input: u32,
    /// The request's cache, extended by the step.
    pub kv: KvCache,
    /// Set by the step: the token at `index`.
    pub output: u32,
}

/// Computes scheduler steps.
pub trait Backend: Send + Sync + Debug + 'static {
    /// Runs one prefill step; returns its seconds.
    fn prefill(&self, chunks: &mut [PrefillChunk]) -> Result<f64>;
    /// Runs one decode step (one token for every sequence); returns its seconds.
    fn decode(&self, seqs: &mut [DecodeSeq]) -> Result<f64>;
    /// Wall time to pace a step of `seconds` to (zero when the step's own
    /// computation already took its time).
    fn wall(&self, seconds: f64) -> Duration;
    /// Whether steps compute for long enough to need a blocking thread.
    fn blocking(&self) -> bool;
    /// Whether prompts must carry token ids (not just a length).
    fn needs_tokens(&self) -> bool;
    /// KV bytes of a prompt of `prompt_len` tokens.
    fn kv_bytes(&self, prompt_len: u32) -> u64;
    /// The bytes `PullKv` serves for a finished prefill's cache.
    fn export_kv(&self, kv_id: &str, prompt_len: u32, kv: KvCache) -> Result<Vec<u8>>;
    /// The cache a decode continues from, out of pulled bytes (checked).
    fn import_kv(&self, kv_id: &str, prompt_len: u32, data: Vec<u8>) -> Result<KvCache>;
    /// Per-request latency outside model steps, in wall time.
    fn request_overhead(&self) -> Duration;
    /// The tokenizer the OpenAI surface uses for this backend's model.
    fn tokenizer(&self) -> Arc<dyn Tokenizer>;
}
