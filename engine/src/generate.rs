//! The seam between the OpenAI-compatible HTTP surface and whatever produces
//! tokens: a local engine worker in aggregated mode, or the frontend's
//! disaggregated router (prefill worker -> KV transfer -> decode worker).
//!
//! The HTTP layer validates and tokenises a request into a
//! [`GenerateRequest`], asks a [`Generator`] for a stream of
//! [`GenerateEvent`]s and shapes them as OpenAI responses. Dropping the
//! stream cancels the request: the generator must then free what it holds
//! (queue slot, prefill, KV blocks), which is how a client disconnect reaches
//! the engines.

use std::future::Future;
use std::pin::Pin;

use futures::stream::BoxStream;

/// Sampling parameters as the OpenAI API gives them (already validated).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
}

/// One generation to run.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Unique id (also the OpenAI response id suffix).
    pub request_id: String,
    /// The model the client named (checked against [`Generator::models`]).
    pub model: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Output tokens to generate at most, counting the first.
    pub max_tokens: u32,
    pub sampling: Sampling,
}

/// Why generation ended (OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Reached `max_tokens`.
    Length,
    /// Produced a stop token.
    Stop,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
        }
    }
}

/// One event of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// New output tokens, in order.
    Tokens(Vec<u32>),
    /// The last event of a successful stream.
    Finished {
        reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
}

/// Why a generation could not start or broke off. Each maps to an HTTP
/// status and an OpenAI error type in the HTTP layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    /// The request cannot be served as asked (400).
    #[error("{0}")]
    Invalid(String),
    /// No such model here (404).
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    /// Queues are past their limit (429 with `Retry-After` seconds).
    #[error("overloaded: {reason}")]
    Overloaded { reason: String, retry_after_s: u32 },
    /// No worker can take it now: none registered, draining (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A worker failed while serving it (500 before the first token; an
    /// error event in the stream after).
    #[error("{0}")]
    Failed(String),
}

/// A model the generator serves, for `/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    /// The id clients send as `model`.
    pub id: String,
    /// Who serves it (`rackscale`).
    pub owned_by: String,
}

pub type GenerateStream = BoxStream<'static, Result<GenerateEvent, GenerateError>>;
pub type GenerateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<GenerateStream, GenerateError>> + Send + 'a>>;

/// Produces tokens for validated requests.
pub trait Generator: Send + Sync + 'static {
    /// Starts `request`; the stream ends with `Finished` or an error.
    fn generate(&self, request: GenerateRequest) -> GenerateFuture<'_>;
    /// The models served.
    fn models(&self) -> Vec<ModelCard>;
    /// Whether requests can be served now (for `/ready`).
    fn ready(&self) -> bool;
}
