//! Answers from a generator stream: server-sent events shaped as OpenAI's
//! ([`Shaper`], [`sse_body`]) and whole responses ([`collect`]).
//!
//! A stream is `data: {chunk}\n\n` frames, then `data: [DONE]\n\n`:
//! chat starts with a chunk whose delta is `{"role": "assistant",
//! "content": ""}`; each content chunk carries the text of the tokens that
//! arrived together; `finish_reason` rides on the last content chunk when
//! the end arrives with it, else on a chunk of its own with an empty delta
//! (`{}`; completions: `""`), as OpenAI sends it; with
//! `stream_options.include_usage` every chunk has `"usage": null` and a last
//! one has no choices and the usage. An error after the first token is a
//! `data: {"error": {...}}` frame before `[DONE]` (what the `openai` SDK
//! raises as `APIError`).
//!
//! Invariant: dropping the body (the client went away) drops the generator
//! stream, which cancels the generation, and the [`RequestTimer`] counts
//! the request as cancelled.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use serde::Serialize;

use super::error::{ApiError, Outcome};
use super::metrics::RequestTimer;
use super::tokenizer::{IncrementalDecoder, Tokenizer};
use super::types::{ChatCompletionChunk, ChunkChoice, Completion, CompletionChoice, Delta, Usage};
use crate::generate::{FinishReason, GenerateError, GenerateEvent, GenerateStream};

/// The frame that ends every stream.
pub const DONE: &str = "data: [DONE]\n\n";
/// Events taken together when they are ready at once.
const BATCH: usize = 64;

/// Which endpoint's chunk objects to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `text_completion` chunks.
    Completion,
    /// `chat.completion.chunk` chunks.
    Chat,
}

/// Writes the frames of one streamed response.
#[derive(Debug, Clone)]
pub struct Shaper {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    role_sent: bool,
}

fn frame(value: &impl Serialize) -> String {
    match serde_json::to_string(value) {
        Ok(json) => format!("data: {json}\n\n"),
        Err(e) => format!("data: {{\"error\": {{\"message\": \"{e}\"}}}}\n\n"),
    }
}

impl Shaper {
    /// Frames for response `id` (`cmpl-…`/`chatcmpl-…`) of `model`.
    pub fn new(kind: Kind, id: String, created: u64, model: String, include_usage: bool) -> Self {
        Self {
            kind,
            id,
            created,
            model,
            include_usage,
            role_sent: false,
        }
    }

    /// (id, created, model), for a whole response.
    pub fn into_parts(self) -> (String, u64, String) {
        (self.id, self.created, self.model)
    }

    /// `"usage": null` on choice chunks when usage is asked for, else absent.
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    fn chat_chunk(&self, delta: Delta, finish: Option<FinishReason>) -> String {
        frame(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish.map(|f| f.as_str().to_owned()),
            }],
            usage: self.usage_field(),
        })
    }

    /// The frames for `text` (possibly empty) and, on the last, `finish`.
    /// The first call of a chat stream also writes the role chunk.
    pub fn content(&mut self, text: String, finish: Option<FinishReason>) -> String {
        let mut out = String::new();
        if self.kind == Kind::Chat && !self.role_sent {
            self.role_sent = true;
            let role = Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            };
            out.push_str(&self.chat_chunk(role, None));
        }
        if text.is_empty() && finish.is_none() {
            return out;
        }
        match self.kind {
            Kind::Completion => out.push_str(&frame(&Completion {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason: finish.map(|f| f.as_str().to_owned()),
                }],
                usage: self.usage_field(),
            })),
            Kind::Chat => {
                let delta = Delta {
                    role: None,
                    content: (!text.is_empty()).then_some(text),
                };
                out.push_str(&self.chat_chunk(delta, finish));
            }
        }
        out
    }

    /// The usage frame (empty unless usage was asked for).
    pub fn usage(&self, usage: Usage) -> String {
        if !self.include_usage {
            return String::new();
        }
        match self.kind {
            Kind::Completion => frame(&Completion {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Kind::Chat => frame(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }

    /// The frame of an error mid-stream.
    pub fn error(&self, e: &ApiError) -> String {
        frame(&e.body())
    }
}

/// A streamed response in progress.
struct Streaming {
    shaper: Shaper,
    tokenizer: Arc<dyn Tokenizer>,
    decoder: IncrementalDecoder,
    /// Taken when the response ends.
    timer: Option<RequestTimer>,
    events: futures::stream::ReadyChunks<GenerateStream>,
}

impl Streaming {
    /// The frames for the events that arrived together; ends the response
    /// (takes the timer) at `Finished` or an error.
    fn batch(&mut self, batch: Vec<Result<GenerateEvent, GenerateError>>) -> String {
        let mut text = String::new();
        let mut tokens = 0;
        for event in batch {
            match event {
                Ok(GenerateEvent::Tokens(ids)) => {
                    tokens += ids.len();
                    text.push_str(&self.decoder.push(self.tokenizer.as_ref(), &ids));
                }
                Ok(GenerateEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    text.push_str(&self.decoder.flush(self.tokenizer.as_ref()));
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    let mut out = self.shaper.content(text, Some(reason));
                    out.push_str(&self.shaper.usage(usage));
                    out.push_str(DONE);
                    self.end(
                        tokens,
                        Outcome::Ok,
                        Some((prompt_tokens, completion_tokens)),
                    );
                    return out;
                }
                Err(e) => return self.fail(text, tokens, e.into()),
            }
        }
        if let Some(timer) = &mut self.timer {
            timer.tokens(tokens);
        }
        self.shaper.content(text, None)
    }

    /// Ends with `e` after whatever `text` was decoded.
    fn fail(&mut self, text: String, tokens: usize, e: ApiError) -> String {
        tracing::debug!(status = e.status.as_u16(), error = %e.message, "stream ended by an error");
        let mut out = self.shaper.content(text, None);
        out.push_str(&self.shaper.error(&e));
        out.push_str(DONE);
        self.end(tokens, e.outcome(), None);
        out
    }

    fn end(&mut self, tokens: usize, outcome: Outcome, usage: Option<(u32, u32)>) {
        if let Some(mut timer) = self.timer.take() {
            timer.tokens(tokens);
            timer.end(outcome, usage);
        }
    }

    /// The next non-empty frames, or `None` once the response ended.
    async fn next(&mut self) -> Option<String> {
        while self.timer.is_some() {
            let out = match self.events.next().await {
                Some(batch) => self.batch(batch),
                None => self.fail(
                    String::new(),
                    0,
                    ApiError::internal("the generation ended without finishing"),
                ),
            };
            if !out.is_empty() {
                return Some(out);
            }
        }
        None
    }
}

/// The SSE body of `events` (whose first event already arrived and is put
/// back in front by the caller).
pub fn sse_body(
    shaper: Shaper,
    tokenizer: Arc<dyn Tokenizer>,
    timer: RequestTimer,
    events: GenerateStream,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let state = Streaming {
        shaper,
        tokenizer,
        decoder: IncrementalDecoder::default(),
        timer: Some(timer),
        events: events.ready_chunks(BATCH),
    };
    futures::stream::unfold(state, |mut s| async move {
        let out = s.next().await?;
        Some((Ok(Bytes::from(out)), s))
    })
}

/// A whole generation: its text, why it ended, its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    pub text: String,
    pub finish: FinishReason,
    pub usage: Usage,
}

/// Runs `events` to the end (recording token times on `timer`).
pub async fn collect(
    tokenizer: &dyn Tokenizer,
    timer: &mut RequestTimer,
    mut events: BoxStream<'static, Result<GenerateEvent, GenerateError>>,
) -> Result<Collected, ApiError> {
    let mut decoder = IncrementalDecoder::default();
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event? {
            GenerateEvent::Tokens(ids) => {
                timer.tokens(ids.len());
                text.push_str(&decoder.push(tokenizer, &ids));
            }
            GenerateEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                text.push_str(&decoder.flush(tokenizer));
                return Ok(Collected {
                    text,
                    finish: reason,
                    usage: Usage::new(prompt_tokens, completion_tokens),
                });
            }
        }
    }
    Err(ApiError::internal("the generation ended without finishing"))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::openai::metrics::{Endpoint, OpenAiMetrics};
    use crate::openai::tokenizer::SimTokenizer;

    /// The JSON of every `data:` frame; `[DONE]` as a string.
    fn frames(body: &str) -> Vec<Value> {
        assert!(body.ends_with(DONE), "{body}");
        body.split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| {
                let data = f.strip_prefix("data: ").expect("data frame");
                serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.into()))
            })
            .collect()
    }

    async fn run(
        kind: Kind,
        include_usage: bool,
        events: Vec<Result<GenerateEvent, GenerateError>>,
    ) -> (Vec<Value>, OpenAiMetrics) {
        let metrics = OpenAiMetrics::unregistered().expect("metrics");
        let timer = metrics.start(Endpoint::Completions);
        let shaper = Shaper::new(kind, "id-1".into(), 7, "m".into(), include_usage);
        let tokenizer: Arc<dyn Tokenizer> = Arc::new(SimTokenizer::new(1000));
        // One event at a time, as a generator that yields between tokens.
        let events = futures::stream::iter(events)
            .then(|e| async {
                tokio::task::yield_now().await;
                e
            })
            .boxed();
        let body: Vec<_> = sse_body(shaper, tokenizer, timer, events).collect().await;
        let text: String = body
            .into_iter()
            .map(|b| String::from_utf8(b.expect("infallible").to_vec()).expect("utf-8"))
            .collect();
        (frames(&text), metrics)
    }

    fn finished(completion_tokens: u32) -> Result<GenerateEvent, GenerateError> {
        Ok(GenerateEvent::Finished {
            reason: FinishReason::Length,
            prompt_tokens: 5,
            completion_tokens,
        })
    }

    #[tokio::test]
    async fn chat_stream_is_shaped_like_openai() {
        let events = vec![
            Ok(GenerateEvent::Tokens(vec![0])),
            Ok(GenerateEvent::Tokens(vec![1, 2])),
            finished(3),
        ];
        let (frames, metrics) = run(Kind::Chat, true, events).await;
        let chunk = |delta: Value, finish: Value| {
            json!({
                "id": "id-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                "usage": null,
            })
        };
        assert_eq!(
            frames[0],
            chunk(json!({"role": "assistant", "content": ""}), json!(null))
        );
        assert_eq!(frames[1], chunk(json!({"content": "the "}), json!(null)));
        assert_eq!(frames[2], chunk(json!({"content": "of and "}), json!(null)));
        // The end arrived on its own: finish_reason on an empty delta.
        assert_eq!(frames[3], chunk(json!({}), json!("length")));
        assert_eq!(
            frames[4],
            json!({
                "id": "id-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            })
        );
        assert_eq!(frames[5], json!("[DONE]"));
        assert_eq!(frames.len(), 6);
        let ok = metrics.requests.with_label_values(&["completions", "ok"]);
        assert_eq!(ok.get(), 1);
    }

    #[tokio::test]
    async fn completion_stream_without_usage_has_no_usage_field() {
        let events = vec![Ok(GenerateEvent::Tokens(vec![3])), finished(1)];
        let (frames, _) = run(Kind::Completion, false, events).await;
        let chunk = |text: &str, finish: Value| {
            json!({
                "id": "id-1", "object": "text_completion", "created": 7, "model": "m",
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            })
        };
        assert_eq!(
            frames,
            vec![
                chunk("to ", json!(null)),
                chunk("", json!("length")),
                json!("[DONE]")
            ]
        );
    }

    #[tokio::test]
    async fn finish_arriving_with_the_last_tokens_rides_on_their_chunk() {
        let metrics = OpenAiMetrics::unregistered().expect("metrics");
        let shaper = Shaper::new(Kind::Completion, "c".into(), 1, "m".into(), false);
        let events =
            futures::stream::iter(vec![Ok(GenerateEvent::Tokens(vec![0, 1])), finished(2)]);
        let tokenizer: Arc<dyn Tokenizer> = Arc::new(SimTokenizer::new(1000));
        let body: Vec<_> = sse_body(
            shaper,
            tokenizer,
            metrics.start(Endpoint::Completions),
            events.boxed(),
        )
        .collect()
        .await;
        let text: String = body
            .into_iter()
            .map(|b| String::from_utf8(b.expect("infallible").to_vec()).expect("utf-8"))
            .collect();
        let frames = frames(&text);
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[0]["choices"][0]["text"], "the of ");
        assert_eq!(frames[0]["choices"][0]["finish_reason"], "length");
    }

    #[tokio::test]
    async fn an_error_mid_stream_is_an_error_frame_then_done() {
        let events = vec![
            Ok(GenerateEvent::Tokens(vec![0])),
            Err(GenerateError::Unavailable("worker draining".into())),
        ];
        let (frames, metrics) = run(Kind::Chat, false, events).await;
        assert_eq!(frames[1]["choices"][0]["delta"]["content"], "the ");
        assert_eq!(frames[2]["error"]["type"], "server_error");
        assert_eq!(
            frames[2]["error"]["message"],
            "unavailable: worker draining"
        );
        assert_eq!(frames[3], json!("[DONE]"));
        let c = metrics
            .requests
            .with_label_values(&["completions", "unavailable"]);
        assert_eq!(c.get(), 1);
    }

    #[tokio::test]
    async fn a_stream_that_stops_short_is_a_server_error() {
        let (frames, metrics) = run(
            Kind::Completion,
            false,
            vec![Ok(GenerateEvent::Tokens(vec![0]))],
        )
        .await;
        assert_eq!(frames[1]["error"]["type"], "server_error");
        let c = metrics
            .requests
            .with_label_values(&["completions", "server_error"]);
        assert_eq!(c.get(), 1);
    }

    #[tokio::test]
    async fn collect_returns_text_finish_and_usage() {
        let metrics = OpenAiMetrics::unregistered().expect("metrics");
        let mut timer = metrics.start(Endpoint::ChatCompletions);
        let events = futures::stream::iter(vec![
            Ok(GenerateEvent::Tokens(vec![0])),
            Ok(GenerateEvent::Tokens(vec![1])),
            finished(2),
        ]);
        let got = collect(&SimTokenizer::new(1000), &mut timer, events.boxed())
            .await
            .expect("collected");
        assert_eq!(
            got,
            Collected {
                text: "the of ".into(),
                finish: FinishReason::Length,
                usage: Usage::new(5, 2),
            }
        );
        let failing = futures::stream::iter(vec![Err(GenerateError::Failed("boom".into()))]);
        let e = collect(&SimTokenizer::new(1000), &mut timer, failing.boxed())
            .await
            .expect_err("failed");
        assert_eq!(e.status.as_u16(), 500);
    }
}
