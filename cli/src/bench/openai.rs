//! The OpenAI streaming protocol as the benchmark sees it: request bodies
//! for `/v1/completions` and `/v1/chat/completions`, and the timing record
//! of one streamed response, built event by event.
//!
//! Pure: timestamps come in as offsets from the moment the request was sent,
//! so the rules (what counts as the first token, when a stream has failed)
//! are tested without a network. Invariant: a [`StreamRecorder`] yields a
//! success only for a stream that carried content and ended with `[DONE]`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::sse::Event;
use super::stats::{Failure, FailureKind, Success};
use super::workload::{Prompt, RequestSpec};

/// Which OpenAI route the benchmark drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `/v1/completions`, prompt as token ids (exact input length).
    Completions,
    /// `/v1/chat/completions`, prompt as text of about 4 characters a token.
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// The JSON body of one streamed request. `ignore_eos` is a vLLM / SGLang /
/// TensorRT-LLM extension that makes the server produce exactly `max_tokens`;
/// servers that do not know it ignore it.
pub fn request_body(model: &str, spec: &RequestSpec) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": spec.output_len,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    match &spec.prompt {
        Prompt::Tokens(ids) => body["prompt"] = json!(ids),
        Prompt::Text(text) => body["messages"] = json!([{"role": "user", "content": text}]),
    }
    body
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<Value>,
    object: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    text: Option<String>,
    delta: Option<Delta>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Choice {
    /// Whether this choice carries generated text (reasoning text counts:
    /// it is output the user waits for).
    fn has_content(&self) -> bool {
        let nonempty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
        nonempty(&self.text)
            || self.delta.as_ref().is_some_and(|d| {
                nonempty(&d.content) || nonempty(&d.reasoning_content) || nonempty(&d.reasoning)
            })
    }
}

/// Builds the timing record of one response from its events.
#[derive(Debug)]
pub struct StreamRecorder {
    /// Input length sent; used when the server reports no usage.
    prompt_tokens_sent: u64,
    first: Option<Duration>,
    last: Option<Duration>,
    itl: Vec<Duration>,
    content_chunks: u64,
    usage: Option<Usage>,
    done: Option<Duration>,
}

impl StreamRecorder {
    pub fn new(prompt_tokens_sent: u64) -> Self {
        Self {
            prompt_tokens_sent,
            first: None,
            last: None,
            itl: Vec::new(),
            content_chunks: 0,
            usage: None,
            done: None,
        }
    }

    /// Whether `[DONE]` has arrived; nothing after it matters.
    pub fn is_done(&self) -> bool {
        self.done.is_some()
    }

    /// One event, received `at` after the request was sent. An error event
    /// or a chunk that is not JSON fails the request.
    pub fn on_event(&mut self, event: &Event, at: Duration) -> Result<(), Failure> {
        if self.done.is_some() {
            return Ok(());
        }
        let data = event.data.trim();
        if data == "[DONE]" {
            self.done = Some(at);
            return Ok(());
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| Failure {
            kind: FailureKind::InvalidChunk,
            message: format!("{e}: {}", truncate(data)),
        })?;
        if event.event.as_deref() == Some("error")
            || chunk.error.is_some()
            || chunk.object.as_deref() == Some("error")
        {
            let message = chunk
                .error
                .as_ref()
                .and_then(|e| e.get("message").and_then(Value::as_str).map(str::to_owned))
                .or(chunk.message)
                .unwrap_or_else(|| truncate(data));
            return Err(Failure {
                kind: FailureKind::ErrorEvent,
                message,
            });
        }
        if chunk.choices.iter().any(Choice::has_content) {
            if let Some(last) = self.last {
                self.itl.push(at.saturating_sub(last));
            }
            self.first.get_or_insert(at);
            self.last = Some(at);
            self.content_chunks += 1;
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        Ok(())
    }

    /// The stream ended. e2e runs to `[DONE]`; output tokens come from the
    /// usage chunk, else one per content chunk.
    pub fn finish(self) -> Result<Success, Failure> {
        let Some(done) = self.done else {
            return Err(Failure {
                kind: FailureKind::Incomplete,
                message: format!(
                    "stream ended without [DONE] after {} content chunks",
                    self.content_chunks
                ),
            });
        };
        let Some(first) = self.first else {
            return Err(Failure {
                kind: FailureKind::EmptyOutput,
                message: "stream finished without any content".into(),
            });
        };
        Ok(Success {
            ttft_s: first.as_secs_f64(),
            e2e_s: done.as_secs_f64(),
            itl_s: self.itl.iter().map(Duration::as_secs_f64).collect(),
            input_tokens: self
                .usage
                .map_or(self.prompt_tokens_sent, |u| u.prompt_tokens),
            output_tokens: self
                .usage
                .map_or(self.content_chunks, |u| u.completion_tokens),
            usage_reported: self.usage.is_some(),
        })
    }
}

/// At most 200 characters of a server's words, for failure examples.
pub fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: &str) -> Event {
        Event {
            event: None,
            data: data.into(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn text(t: &str) -> String {
        json!({"choices": [{"index": 0, "text": t}]}).to_string()
    }

    #[test]
    fn completions_stream_with_usage() {
        let mut r = StreamRecorder::new(100);
        r.on_event(&ev(&text("a")), ms(20)).unwrap();
        r.on_event(&ev(&text("")), ms(25)).unwrap(); // no content: ignored
        r.on_event(&ev(&text("b")), ms(30)).unwrap();
        r.on_event(&ev(&text("c")), ms(45)).unwrap();
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 98, "completion_tokens": 3, "total_tokens": 101}});
        r.on_event(&ev(&usage.to_string()), ms(46)).unwrap();
        r.on_event(&ev("[DONE]"), ms(47)).unwrap();
        assert!(r.is_done());
        let s = r.finish().unwrap();
        assert_eq!(s.ttft_s, 0.020);
        assert_eq!(s.e2e_s, 0.047);
        assert_eq!(s.itl_s, vec![0.010, 0.015]);
        assert_eq!((s.input_tokens, s.output_tokens), (98, 3));
        assert!(s.usage_reported);
    }

    #[test]
    fn chat_deltas_without_usage_are_counted() {
        let mut r = StreamRecorder::new(64);
        let role = json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]});
        r.on_event(&ev(&role.to_string()), ms(5)).unwrap();
        for (i, at) in [10, 20, 30].into_iter().enumerate() {
            let key = if i == 0 {
                "reasoning_content"
            } else {
                "content"
            };
            let c =
                json!({"choices": [{"delta": {key: "x"}, "finish_reason": null}], "usage": null});
            r.on_event(&ev(&c.to_string()), ms(at)).unwrap();
        }
        r.on_event(&ev("[DONE]"), ms(31)).unwrap();
        let s = r.finish().unwrap();
        assert_eq!(s.ttft_s, 0.010);
        assert_eq!((s.input_tokens, s.output_tokens), (64, 3));
        assert!(!s.usage_reported);
    }

    #[test]
    fn error_events_fail_the_request() {
        let mut r = StreamRecorder::new(1);
        r.on_event(&ev(&text("a")), ms(1)).unwrap();
        let e = json!({"error": {"message": "KV cache exhausted", "type": "server_error"}});
        let f = r.on_event(&ev(&e.to_string()), ms(2)).unwrap_err();
        assert_eq!(f.kind, FailureKind::ErrorEvent);
        assert_eq!(f.message, "KV cache exhausted");

        let vllm = json!({"object": "error", "message": "bad", "code": 400});
        let f = StreamRecorder::new(1)
            .on_event(&ev(&vllm.to_string()), ms(1))
            .unwrap_err();
        assert_eq!(
            (f.kind, f.message.as_str()),
            (FailureKind::ErrorEvent, "bad")
        );

        let typed = Event {
            event: Some("error".into()),
            data: "{}".into(),
        };
        let f = StreamRecorder::new(1).on_event(&typed, ms(1)).unwrap_err();
        assert_eq!(f.kind, FailureKind::ErrorEvent);
    }

    #[test]
    fn streams_without_done_or_content_fail() {
        let mut r = StreamRecorder::new(1);
        r.on_event(&ev(&text("a")), ms(1)).unwrap();
        assert_eq!(r.finish().unwrap_err().kind, FailureKind::Incomplete);

        let mut r = StreamRecorder::new(1);
        r.on_event(&ev("[DONE]"), ms(1)).unwrap();
        assert_eq!(r.finish().unwrap_err().kind, FailureKind::EmptyOutput);

        let f = StreamRecorder::new(1)
            .on_event(&ev("not json"), ms(1))
            .unwrap_err();
        assert_eq!(f.kind, FailureKind::InvalidChunk);
    }

    #[test]
    fn bodies() {
        let spec = RequestSpec {
            index: 0,
            input_len: 3,
            output_len: 7,
            prompt: Prompt::Tokens(vec![101, 102, 103]),
        };
        let b = request_body("m", &spec);
        assert_eq!(b["prompt"], json!([101, 102, 103]));
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        let spec = RequestSpec {
            prompt: Prompt::Text("hi there".into()),
            ..spec
        };
        let b = request_body("m", &spec);
        assert_eq!(b["messages"][0]["content"], "hi there");
        assert!(b.get("prompt").is_none());
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let long = "é".repeat(300);
        let t = truncate(&long);
        assert_eq!(t.chars().count(), 201);
        assert_eq!(truncate("short"), "short");
    }
}
