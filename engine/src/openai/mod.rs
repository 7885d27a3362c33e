//! The OpenAI-compatible HTTP surface every [`Generator`] sits behind, and
//! the aggregated-mode generator of one engine worker ([`local`]).
//!
//! [`router`] serves:
//!
//! - `POST /v1/completions` and `POST /v1/chat/completions`, whole or as
//!   server-sent events (`"stream": true`), see [`sse`];
//! - `GET /v1/models` and `GET /v1/models/{model}`;
//! - `GET /health` (200 while the process serves) and `GET /ready` (200 when
//!   the generator is ready, else 503).
//!
//! A request is parsed and checked ([`validate`]; errors are OpenAI-shaped,
//! see [`error`]), tokenised ([`tokenizer`]) and handed to the generator.
//! The HTTP status is decided by the generator's first event: an error
//! before the first token is a 4xx/5xx response, after it an error frame in
//! the stream. Dropping the response (the client went away) drops the
//! generator's stream, which cancels the generation. Metrics: [`metrics`].
//!
//! - [`types`]: the wire shapes.
//! - [`http`]: the axum handlers.

pub mod error;
pub mod http;
pub mod local;
pub mod metrics;
pub mod sse;
pub mod tokenizer;
pub mod types;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tower_http::timeout::RequestBodyTimeoutLayer;

pub use error::{ApiError, Outcome};
pub use local::LocalGenerator;
pub use metrics::OpenAiMetrics;
pub use tokenizer::{SimTokenizer, Tokenizer};

use crate::generate::Generator;

/// Default [`Limits::body_idle_timeout`]: a client that sends nothing of its
/// body for this long gets 408.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request may ask for; beyond it, 400 (413 for the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest `max_tokens` / `max_completion_tokens`.
    pub max_tokens: u32,
    /// Longest prompt, in tokens (chat: after the template).
    pub max_prompt_tokens: u32,
    /// Prompt plus output tokens at most (the model's context).
    pub max_context_tokens: u32,
    /// `max_tokens` of a completion that names none (OpenAI's default, 16),
    /// capped by the room left in the context.
    pub default_completion_max_tokens: u32,
    /// `max_tokens` of a chat completion that names none, capped likewise.
    pub default_chat_max_tokens: u32,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Requests a local worker queues before answering 429
    /// ([`LocalGenerator`]).
    pub max_queue: u32,
    /// `Retry-After` seconds of a 429 from a local worker.
    pub retry_after_s: u32,
    /// Longest a client may leave its request body unsent (between two
    /// chunks) before the request is answered 408: a stalled or slow-drip
    /// client does not hold a connection and its buffer for ever.
    pub body_idle_timeout: Duration,
}

impl Default for Limits {
    /// Sized for the engine's defaults: 8k prompts in a 9k context.
    fn default() -> Self {
        Self::for_context(9216)
    }
}

impl Limits {
    /// Limits for a worker whose KV budget is sized for `max_context`
    /// tokens per request: prompts up to `max_context - 1`, outputs up to
    /// what is left.
    pub fn for_context(max_context: u32) -> Self {
        let max_context = max_context.max(2);
        Self {
            max_tokens: max_context - 1,
            max_prompt_tokens: max_context - 1,
            max_context_tokens: max_context,
            default_completion_max_tokens: 16,
            default_chat_max_tokens: 1024,
            max_body_bytes: 8 << 20,
            max_queue: 1024,
            retry_after_s: 1,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
        }
    }
}

/// The OpenAI API over `generator`: prompts are tokenised with
/// `tokenizer`, checked against `limits`, and counted in `metrics`. No
/// fallback is set, so the router merges into a bigger one (the engine's).
pub fn router(
    generator: Arc<dyn Generator>,
    tokenizer: Arc<dyn Tokenizer>,
    limits: Limits,
    metrics: OpenAiMetrics,
) -> Router {
    let max_body = limits.max_body_bytes;
    let body_idle_timeout = limits.body_idle_timeout;
    let state = Arc::new(http::Api::new(generator, tokenizer, limits, metrics));
    Router::new()
        .route("/v1/completions", post(http::completions))
        .route("/v1/chat/completions", post(http::chat_completions))
        .route("/v1/models", get(http::models))
        .route("/v1/models/{*model}", get(http::model))
        .route("/health", get(http::health))
        .route("/ready", get(http::ready))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(RequestBodyTimeoutLayer::new(body_idle_timeout))
        .with_state(state)
}
