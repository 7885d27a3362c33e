//! The axum handlers of [`super::router`]: read the body (413 past the
//! limit, 400 for malformed JSON, in OpenAI's error shape rather than
//! axum's plain-text rejections), validate, call the generator, answer
//! whole or streamed, and time every request with a [`RequestTimer`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::Limits;
use super::error::ApiError;
use super::metrics::{Endpoint, OpenAiMetrics, RequestTimer};
use super::sse::{self, Kind, Shaper};
use super::tokenizer::Tokenizer;
use super::types::{
    AssistantMessage, ChatChoice, ChatCompletion, Completion, CompletionChoice, Model, ModelList,
};
use super::validate::{Checker, Validated};
use crate::generate::{GenerateStream, Generator, ModelCard};

/// What every handler shares.
pub struct Api {
    generator: Arc<dyn Generator>,
    tokenizer: Arc<dyn Tokenizer>,
    limits: Limits,
    metrics: OpenAiMetrics,
    /// `created` of `/v1/models` entries: when this surface started.
    started: u64,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("tokenizer", &self.tokenizer)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh request id: 16 hex digits, distinct within the process and, with
/// overwhelming odds, across processes (start time and pid are mixed in).
fn new_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (u64::from(std::process::id()) << 40)
    });
    // splitmix64's finaliser is a bijection: distinct counters, distinct ids.
    let mut z = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31))
}

/// Whether reading the body failed because the client stopped sending it
/// (the body idle timeout of [`super::router`]).
fn timed_out(rejection: &BytesRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Parses a JSON body, mapping rejections to OpenAI errors.
fn parse<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limits: &Limits,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limits.max_body_bytes)
        } else if timed_out(&r) {
            ApiError::body_timeout(limits.body_idle_timeout)
        } else {
            ApiError::bad_body(format!("could not read the request body: {r}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_body(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })
}

/// Answers `e` and counts the request as refused.
fn refuse(timer: RequestTimer, e: ApiError) -> Response {
    tracing::debug!(status = e.status.as_u16(), error = %e.message, "request refused");
    timer.end(e.outcome(), None);
    e.into_response()
}

impl Api {
    pub fn new(
        generator: Arc<dyn Generator>,
        tokenizer: Arc<dyn Tokenizer>,
        limits: Limits,
        metrics: OpenAiMetrics,
    ) -> Self {
        Self {
            generator,
            tokenizer,
            limits,
            metrics,
            started: unix_now(),
        }
    }

    fn validate(
        &self,
        endpoint: Endpoint,
        body: Result<Bytes, BytesRejection>,
        request_id: String,
    ) -> Result<Validated, ApiError> {
        let models = self.generator.models();
        let checker = Checker {
            limits: &self.limits,
            tokenizer: self.tokenizer.as_ref(),
            models: &models,
        };
        match endpoint {
            Endpoint::Completions => checker.completion(parse(body, &self.limits)?, request_id),
            Endpoint::ChatCompletions => checker.chat(parse(body, &self.limits)?, request_id),
        }
    }

    /// Everything between a body and its response.
    async fn answer(&self, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Response {
        let timer = self.metrics.start(endpoint);
        let request_id = new_request_id();
        let v = match self.validate(endpoint, body, request_id.clone()) {
            Ok(v) => v,
            Err(e) => return refuse(timer, e),
        };
        let (kind, prefix) = match endpoint {
            Endpoint::Completions => (Kind::Completion, "cmpl"),
            Endpoint::ChatCompletions => (Kind::Chat, "chatcmpl"),
        };
        let id = format!("{prefix}-{request_id}");
        let model = v.request.model.clone();
        tracing::debug!(
            id,
            prompt_tokens = v.request.prompt.len(),
            max_tokens = v.request.max_tokens,
            stream = v.stream,
            "generating"
        );
        let events = match self.generator.generate(v.request).await {
            Ok(events) => events,
            Err(e) => return refuse(timer, e.into()),
        };
        let shaper = Shaper::new(kind, id, unix_now(), model, v.include_usage);
        if v.stream {
            self.streamed(shaper, timer, events).await
        } else {
            self.whole(kind, shaper, timer, events).await
        }
    }

    /// Waits for the first event (so an early failure is still a status),
    /// then streams.
    async fn streamed(
        &self,
        shaper: Shaper,
        timer: RequestTimer,
        mut events: GenerateStream,
    ) -> Response {
        let first = match events.next().await {
            Some(Ok(first)) => first,
            Some(Err(e)) => return refuse(timer, e.into()),
            None => {
                let e = ApiError::internal("the generation ended before its first token");
                return refuse(timer, e);
            }
        };
        let events = futures::stream::once(async { Ok(first) })
            .chain(events)
            .boxed();
        let body = sse::sse_body(shaper, Arc::clone(&self.tokenizer), timer, events);
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(body),
        )
            .into_response()
    }

    async fn whole(
        &self,
        kind: Kind,
        shaper: Shaper,
        mut timer: RequestTimer,
        events: GenerateStream,
    ) -> Response {
        let done = match sse::collect(self.tokenizer.as_ref(), &mut timer, events).await {
            Ok(done) => done,
            Err(e) => return refuse(timer, e),
        };
        let usage = done.usage;
        let finish_reason = Some(done.finish.as_str().to_owned());
        let (id, created, model) = shaper.into_parts();
        let response = match kind {
            Kind::Completion => Json(Completion {
                id,
                object: "text_completion".into(),
                created,
                model,
                choices: vec![CompletionChoice {
                    index: 0,
                    text: done.text,
                    logprobs: None,
                    finish_reason,
                }],
                usage: Some(Some(usage)),
            })
            .into_response(),
            Kind::Chat => Json(ChatCompletion {
                id,
                object: "chat.completion".into(),
                created,
                model,
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: done.text,
                        refusal: None,
                    },
                    logprobs: None,
                    finish_reason,
                }],
                usage,
            })
            .into_response(),
        };
        timer.end(
            super::Outcome::Ok,
            Some((usage.prompt_tokens, usage.completion_tokens)),
        );
        response
    }

    fn model_entry(&self, card: ModelCard) -> Model {
        Model {
            id: card.id,
            object: "model".into(),
            created: self.started,
            owned_by: card.owned_by,
        }
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(api): State<Arc<Api>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    api.answer(Endpoint::Completions, body).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(api): State<Arc<Api>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    api.answer(Endpoint::ChatCompletions, body).await
}

/// `GET /v1/models`.
pub async fn models(State(api): State<Arc<Api>>) -> Json<ModelList> {
    let data = api
        .generator
        .models()
        .into_iter()
        .map(|card| api.model_entry(card))
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// `GET /v1/models/{model}` (ids may contain `/`).
pub async fn model(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.generator.models().into_iter().find(|m| m.id == id) {
        Some(card) => Json(api.model_entry(card)).into_response(),
        None => ApiError::unknown_model(&id).into_response(),
    }
}

/// `GET /health`: the process serves.
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// `GET /ready`: the generator can serve requests now.
pub async fn ready(State(api): State<Arc<Api>>) -> Response {
    if api.generator.ready() {
        StatusCode::OK.into_response()
    } else {
        ApiError::unavailable("not ready to serve requests").into_response()
    }
}

#[cfg(test)]
mod tests;
