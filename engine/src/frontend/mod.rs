//! The disaggregated router behind the frontend's OpenAI API.
//!
//! For each request: pick a prefill worker (fewest outstanding prompt
//! tokens), run `Prefill` there (retrying on another worker when the call
//! fails or times out), pick a decode worker with KV room (least loaded),
//! and stream its `Decode`, which pulls the KV from the prefill worker's KV
//! endpoint. Workers come from the registry ([`pool`]); in a mixed pool,
//! workers of role both take either part. A pool of role-both workers only
//! is not split: [`serve`] forwards each request whole to one of them
//! ([`proxy`]). Past `max_in_flight` requests the frontend
//! answers 429 instead of queueing without bound. A decode worker that dies
//! or stalls mid-stream ends the stream with an error event within
//! `token_timeout`; dropping the stream (client gone) cancels the decode
//! RPC, which frees the worker's slot and KV.

pub mod pool;
pub mod pool_metrics;
pub mod proxy;
pub mod select;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use proto::pb;
use tonic::Code;

use crate::generate::{
    FinishReason, GenerateError, GenerateEvent, GenerateFuture, GenerateRequest, Generator,
    ModelCard,
};
use pool::{Outstanding, Pool};

/// How the router behaves under failure and load.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The model name clients use.
    pub model: String,
    /// Requests admitted at once; more get 429.
    pub max_in_flight: u32,
    /// Prefill attempts (on different workers) before giving up.
    pub prefill_attempts: usize,
    /// Deadline of one prefill call (includes queueing on the worker).
    pub prefill_timeout: Duration,
    /// Longest wait for the next token before the stream is declared lost.
    pub token_timeout: Duration,
}

impl RouterConfig {
    /// Defaults for `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            max_in_flight: 4096,
            prefill_attempts: 3,
            prefill_timeout: Duration::from_secs(60),
            token_timeout: Duration::from_secs(10),
        }
    }
}

/// The router: a [`Generator`] over the registry's workers.
#[derive(Debug, Clone)]
pub struct Router {
    pool: Pool,
    config: Arc<RouterConfig>,
    in_flight: Arc<AtomicU32>,
}

/// One admitted request; released on drop.
struct Admitted(Arc<AtomicU32>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn from_status(worker: &str, status: &tonic::Status) -> GenerateError {
    let msg = format!("worker {worker}: {}", status.message());
    match status.code() {
        Code::InvalidArgument => GenerateError::Invalid(status.message().to_string()),
        Code::ResourceExhausted => GenerateError::Overloaded {
            reason: msg,
            retry_after_s: 1,
        },
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            GenerateError::Unavailable(msg)
        }
        _ => GenerateError::Failed(msg),
    }
}

/// Whether another worker may succeed where this call failed.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::FailedPrecondition
    )
}

fn sampling(req: &GenerateRequest) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: req.sampling.temperature.unwrap_or(1.0),
        top_p: req.sampling.top_p.unwrap_or(1.0),
        top_k: 0,
        seed: req.sampling.seed,
        stop_token_ids: Vec::new(),
        ignore_eos: false,
    }
}

impl Router {
    /// A router over `pool` (fill it with [`Pool::follow`]).
    pub fn new(pool: Pool, config: RouterConfig) -> Self {
        Self {
            pool,
            config: Arc::new(config),
            in_flight: Arc::default(),
        }
    }

    /// The workers it routes to.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn admit(&self) -> Result<Admitted, GenerateError> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted(self.in_flight.clone());
        if now >= self.config.max_in_flight {
            return Err(GenerateError::Overloaded {
                reason: format!(
                    "{now} requests in flight (limit {})",
                    self.config.max_in_flight
                ),
                retry_after_s: 1,
            });
        }
        Ok(admitted)
    }

    /// Prefill on the best worker, retrying elsewhere; returns the handle.
    async fn prefill(&self, req: &GenerateRequest) -> Result<pb::KvHandle, GenerateError> {
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<GenerateError> = None;
        while tried.len() < self.config.prefill_attempts {
            let (members, candidates) = self.pool.snapshot();
            let Some(i) = select::pick_prefill(&candidates, &tried) else {
                break;
            };
            let member = members[i].clone();
            let _outstanding = member.prefilling(req.prompt.len() as u64);
            let mut client = member.client();
            let call = client.prefill(pb::PrefillRequest {
                request_id: req.request_id.clone(),
                prompt: Some(pb::prefill_request::Prompt::TokenIds(pb::TokenIds {
                    ids: req.prompt.clone(),
                })),
                max_tokens: req.max_tokens,
                sampling: Some(sampling(req)),
            });
            let error = match tokio::time::timeout(self.config.prefill_timeout, call).await {
                Ok(Ok(reply)) => match reply.into_inner().kv {
                    Some(kv) => return Ok(kv),
                    None => GenerateError::Failed(format!(
                        "worker {}: prefill returned no KV handle",
                        member.name()
                    )),
                },
                Ok(Err(status)) if !retryable(status.code()) => {
                    return Err(from_status(member.name(), &status));
                }
                Ok(Err(status)) => from_status(member.name(), &status),
                Err(_) => GenerateError::Unavailable(format!(
                    "worker {}: prefill took over {:?}",
                    member.name(),
                    self.config.prefill_timeout
                )),
            };
            tracing::warn!(request_id = %req.request_id, worker = %member.name(), error = %error, "prefill failed; trying another worker");
            member.failed();
            tried.push(member.name().to_string());
            last = Some(error);
        }
        Err(last.unwrap_or_else(|| {
            GenerateError::Unavailable("no prefill worker is registered".into())
        }))
    }

    async fn run(
        &self,
        req: GenerateRequest,
    ) -> Result<crate::generate::GenerateStream, GenerateError> {
        if req.model != self.config.model {
            return Err(GenerateError::UnknownModel(req.model));
        }
        if req.prompt.is_empty() || req.max_tokens == 0 {
            return Err(GenerateError::Invalid(
                "the prompt and max_tokens must not be empty".into(),
            ));
        }
        let admitted = self.admit()?;
        // The simulated backend derives its tokens from the request id, so
        // a seeded request uses an id made of the seed alone: equal seeds
        // give equal outputs, as OpenAI's `seed` promises.
        let mut req = req;
        if let Some(seed) = req.sampling.seed {
            req.request_id = format!("seed-{seed}");
        }
        let kv = self.prefill(&req).await?;
        let prompt_tokens = kv.tokens;

        // Decode: the first worker that accepts (a refusal before the pull
        // leaves the KV on the prefill worker for the next one to pull).
        let mut tried: Vec<String> = Vec::new();
        let (member, stream, guard) = loop {
            let (members, candidates) = self.pool.snapshot();
            let Some(i) = select::pick_decode(&candidates, &tried) else {
                return Err(GenerateError::Unavailable(
                    "no decode worker with KV room is registered".into(),
                ));
            };
            let member = members[i].clone();
            let guard = member.decoding();
            let mut client = member.client();
            let call = client.decode(pb::DecodeRequest {
                request_id: req.request_id.clone(),
                kv: Some(kv.clone()),
                max_tokens: req.max_tokens,
                sampling: Some(sampling(&req)),
            });
            match tokio::time::timeout(self.config.token_timeout, call).await {
                Ok(Ok(stream)) => break (member, stream.into_inner(), guard),
                Ok(Err(status))
                    if matches!(status.code(), Code::ResourceExhausted | Code::Unavailable)
                        && tried.len() + 1 < self.config.prefill_attempts =>
                {
                    tracing::warn!(request_id = %req.request_id, worker = %member.name(), error = %status.message(), "decode refused; trying another worker");
                    member.failed();
                    tried.push(member.name().to_string());
                }
                Ok(Err(status)) => return Err(from_status(member.name(), &status)),
                Err(_) => {
                    member.failed();
                    return Err(GenerateError::Unavailable(format!(
                        "worker {}: decode did not start within {:?}",
                        member.name(),
                        self.config.token_timeout
                    )));
                }
            }
        };
        let state = Decoding {
            stream,
            worker: member.name().to_string(),
            token_timeout: self.config.token_timeout,
            prompt_tokens,
            generated: 0,
            finish: None,
            done: false,
            _guards: (guard, admitted),
        };
        Ok(futures::stream::unfold(state, Decoding::next).boxed())
    }
}

/// An open decode stream and what it holds.
struct Decoding {
    stream: tonic::Streaming<pb::DecodeChunk>,
    worker: String,
    token_timeout: Duration,
    prompt_tokens: u32,
    generated: u32,
    /// Set once the last chunk arrived: `Finished` is the next item.
    finish: Option<FinishReason>,
    done: bool,
    _guards: (Outstanding, Admitted),
}

impl Decoding {
    fn lost(&self, why: impl std::fmt::Display) -> GenerateError {
        GenerateError::Failed(format!(
            "decode worker {} lost mid-stream: {why}",
            self.worker
        ))
    }

    async fn next(mut self) -> Option<(Result<GenerateEvent, GenerateError>, Self)> {
        if self.done {
            return None;
        }
        if let Some(reason) = self.finish.take() {
            self.done = true;
            let finished = GenerateEvent::Finished {
                reason,
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.generated,
            };
            return Some((Ok(finished), self));
        }
        let item = match tokio::time::timeout(self.token_timeout, self.stream.message()).await {
            Err(_) => Err(self.lost(format!("no token for {:?}", self.token_timeout))),
            Ok(Err(status)) => Err(self.lost(status.message())),
            Ok(Ok(None)) => Err(self.lost("the stream ended without a finish reason")),
            Ok(Ok(Some(chunk))) => {
                self.generated += chunk.token_ids.len() as u32;
                match pb::FinishReason::try_from(chunk.finish_reason) {
                    Ok(pb::FinishReason::Unspecified) => Ok(GenerateEvent::Tokens(chunk.token_ids)),
                    Ok(pb::FinishReason::Length) => {
                        self.finish = Some(FinishReason::Length);
                        Ok(GenerateEvent::Tokens(chunk.token_ids))
                    }
                    Ok(pb::FinishReason::Stop) => {
                        self.finish = Some(FinishReason::Stop);
                        Ok(GenerateEvent::Tokens(chunk.token_ids))
                    }
                    Ok(other) => Err(self.lost(format!(
                        "the worker ended the request ({})",
                        other.as_str_name()
                    ))),
                    Err(_) => {
                        Err(self.lost(format!("unknown finish reason {}", chunk.finish_reason)))
                    }
                }
            }
        };
        if item.is_err() {
            self.done = true;
        }
        Some((item, self))
    }
}

impl Generator for Router {
    fn generate(&self, request: GenerateRequest) -> GenerateFuture<'_> {
        Box::pin(self.run(request))
    }

    fn models(&self) -> Vec<ModelCard> {
        vec![ModelCard {
            id: self.config.model.clone(),
            owned_by: "rackscale".into(),
        }]
    }

    fn ready(&self) -> bool {
        let (_, candidates) = self.pool.snapshot();
        select::pick_prefill(&candidates, &[]).is_some()
            && select::pick_decode(&candidates, &[]).is_some()
    }
}

/// Serves the OpenAI API over `router` on `listener` (plus `GET /metrics`
/// with everything registered in `registry`) until `shutdown` resolves.
/// While every registered worker has role both, generation requests are
/// forwarded whole to one of them ([`proxy`]) instead of split.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tokenizer: Arc<dyn crate::openai::Tokenizer>,
    limits: crate::openai::Limits,
    registry: prometheus::Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::serve::ListenerExt;

    let metrics = crate::openai::OpenAiMetrics::register(&registry)?;
    let proxy = proxy::Proxy::new(router.clone(), metrics.clone(), limits.max_body_bytes);
    let api = crate::openai::router(Arc::new(router), tokenizer, limits, metrics).layer(
        axum::middleware::from_fn_with_state(proxy, proxy::pass_through),
    );
    let gather = move || {
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather());
        match text {
            Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move { gather() }),
        )
        .merge(api);
    // Token chunks are small: Nagle would hold them back and inflate TTFT.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
