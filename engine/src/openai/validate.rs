//! Turns a parsed OpenAI request into a [`GenerateRequest`] or the 400/404
//! that names what is wrong, and renders chat messages into one prompt.
//!
//! Supported: one prompt (a string, token ids, or a one-element array of
//! either) or one conversation; `max_tokens` (chat: `max_completion_tokens`
//! first), `temperature` in [0, 2], `top_p` in (0, 1], `seed`, `stream`,
//! `stream_options.include_usage`. Refused with 400 rather than silently
//! ignored, because the answer would not be what was asked: `n`/`best_of`
//! other than 1, `echo`, `logprobs`, `suffix`, non-empty `stop`.
//!
//! Chat template (ChatML; every message, then the assistant's turn):
//!
//! ```text
//! <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
//! ```
//!
//! Roles are `system`, `developer`, `user`, `assistant` and `tool`; content
//! is a string or an array of `{"type": "text", "text": ...}` parts (joined
//! with newlines), or null for `assistant` and `tool` messages.

use serde_json::Value;

use super::Limits;
use super::error::ApiError;
use super::tokenizer::Tokenizer;
use super::types::{ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions};
use crate::generate::{GenerateRequest, ModelCard, Sampling};

/// A request ready for the generator, and how to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub request: GenerateRequest,
    /// Answer with server-sent events.
    pub stream: bool,
    /// Streamed: end with a usage chunk.
    pub include_usage: bool,
}

/// What requests are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Checker<'a> {
    pub limits: &'a Limits,
    pub tokenizer: &'a dyn Tokenizer,
    pub models: &'a [ModelCard],
}

/// Parameters both endpoints share, checked.
struct Common {
    model: String,
    max_tokens: Option<i64>,
    max_tokens_param: &'static str,
    sampling: Sampling,
    stream: bool,
    include_usage: bool,
}

impl Checker<'_> {
    /// Checks a `/v1/completions` body.
    pub fn completion(
        &self,
        req: CompletionRequest,
        request_id: String,
    ) -> Result<Validated, ApiError> {
        let model = required_model(req.model)?;
        let prompt = req
            .prompt
            .ok_or_else(|| ApiError::invalid("prompt", "you must provide a prompt parameter"))?;
        check_choices(req.n, "n")?;
        check_choices(req.best_of, "best_of")?;
        if req.echo == Some(true) {
            return Err(unsupported("echo"));
        }
        if req.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported("logprobs"));
        }
        if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported("suffix"));
        }
        check_stop(req.stop.as_ref())?;
        let (stream, include_usage) = stream_mode(req.stream, req.stream_options)?;
        let sampling = sampling(req.temperature, req.top_p, req.seed)?;
        self.known_model(&model)?;
        let ids = self.prompt_ids(&prompt)?;
        let common = Common {
            model,
            max_tokens: req.max_tokens,
            max_tokens_param: "max_tokens",
            sampling,
            stream,
            include_usage,
        };
        let default = self.limits.default_completion_max_tokens;
        self.finish(common, ids, "prompt", default, request_id)
    }

    /// Checks a `/v1/chat/completions` body.
    pub fn chat(
        &self,
        req: ChatCompletionRequest,
        request_id: String,
    ) -> Result<Validated, ApiError> {
        let model = required_model(req.model)?;
        let messages = req.messages.ok_or_else(|| {
            ApiError::invalid("messages", "you must provide a messages parameter")
        })?;
        check_choices(req.n, "n")?;
        if req.logprobs == Some(true) {
            return Err(unsupported("logprobs"));
        }
        if req.top_logprobs.is_some_and(|n| n > 0) {
            return Err(unsupported("top_logprobs"));
        }
        check_stop(req.stop.as_ref())?;
        let (stream, include_usage) = stream_mode(req.stream, req.stream_options)?;
        let sampling = sampling(req.temperature, req.top_p, req.seed)?;
        let (max_tokens, max_tokens_param) = match req.max_completion_tokens {
            Some(n) => (Some(n), "max_completion_tokens"),
            None => (req.max_tokens, "max_tokens"),
        };
        let prompt = render_chat(&messages)?;
        self.known_model(&model)?;
        let ids = self.tokenizer.encode(&prompt);
        let common = Common {
            model,
            max_tokens,
            max_tokens_param,
            sampling,
            stream,
            include_usage,
        };
        let default = self.limits.default_chat_max_tokens;
        self.finish(common, ids, "messages", default, request_id)
    }

    /// 404 unless the model is served.
    fn known_model(&self, model: &str) -> Result<(), ApiError> {
        if self.models.iter().any(|m| m.id == model) {
            Ok(())
        } else {
            Err(ApiError::unknown_model(model))
        }
    }

    /// Token ids of a completions `prompt`.
    fn prompt_ids(&self, prompt: &Value) -> Result<Vec<u32>, ApiError> {
        const SHAPE: &str = "prompt must be a string, an array of token ids, or a one-element \
                             array of either";
        match prompt {
            Value::String(s) => Ok(self.tokenizer.encode(s)),
            Value::Array(items) if items.iter().all(Value::is_number) => self.token_ids(items),
            Value::Array(items) if items.len() == 1 => match &items[0] {
                Value::String(s) => Ok(self.tokenizer.encode(s)),
                Value::Array(ids) if ids.iter().all(Value::is_number) => self.token_ids(ids),
                _ => Err(ApiError::invalid("prompt", SHAPE)),
            },
            Value::Array(items) if items.len() > 1 => Err(ApiError::invalid(
                "prompt",
                "batched prompts are not supported; send one prompt per request",
            )),
            _ => Err(ApiError::invalid("prompt", SHAPE)),
        }
    }

    fn token_ids(&self, items: &[Value]) -> Result<Vec<u32>, ApiError> {
        let vocab = self.tokenizer.vocab_size();
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .filter(|&id| id < vocab)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "prompt",
                            format!("token id {v} is not in the vocabulary (0..{vocab})"),
                        )
                    })
            })
            .collect()
    }

    /// Checks the prompt length and `max_tokens` against the limits.
    fn finish(
        &self,
        c: Common,
        prompt: Vec<u32>,
        prompt_param: &'static str,
        default_max_tokens: u32,
        request_id: String,
    ) -> Result<Validated, ApiError> {
        let limits = self.limits;
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                prompt_param,
                "the prompt must contain at least one token",
            ));
        }
        let prompt_len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        if prompt_len > limits.max_prompt_tokens {
            return Err(ApiError::context_length(
                prompt_param,
                format!(
                    "This model's maximum prompt length is {} tokens; your prompt has \
                     {prompt_len} tokens.",
                    limits.max_prompt_tokens
                ),
            ));
        }
        let room = limits.max_context_tokens.saturating_sub(prompt_len);
        let max_tokens = match c.max_tokens {
            None => default_max_tokens.min(limits.max_tokens).min(room).max(1),
            Some(n) if n < 1 => {
                return Err(ApiError::invalid(
                    c.max_tokens_param,
                    format!("{} must be at least 1, got {n}", c.max_tokens_param),
                ));
            }
            Some(n) if n > i64::from(limits.max_tokens) => {
                return Err(ApiError::invalid(
                    c.max_tokens_param,
                    format!(
                        "{} is too large: {n}; at most {} tokens are generated per request",
                        c.max_tokens_param, limits.max_tokens
                    ),
                ));
            }
            Some(n) => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                if n > room {
                    return Err(ApiError::context_length(
                        c.max_tokens_param,
                        format!(
                            "This model's maximum context length is {} tokens. However, you \
                             requested {} tokens ({prompt_len} in the prompt, {n} in the \
                             completion).",
                            limits.max_context_tokens,
                            u64::from(prompt_len) + u64::from(n)
                        ),
                    ));
                }
                n
            }
        };
        Ok(Validated {
            request: GenerateRequest {
                request_id,
                model: c.model,
                prompt,
                max_tokens,
                sampling: c.sampling,
            },
            stream: c.stream,
            include_usage: c.include_usage,
        })
    }
}

fn required_model(model: Option<String>) -> Result<String, ApiError> {
    match model {
        Some(m) if !m.is_empty() => Ok(m),
        _ => Err(ApiError::invalid(
            "model",
            "you must provide a model parameter",
        )),
    }
}

fn unsupported(param: &'static str) -> ApiError {
    ApiError::invalid(param, format!("`{param}` is not supported by this server"))
}

fn check_choices(n: Option<i64>, param: &'static str) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::invalid(
            param,
            format!("{param} must be 1 (one choice per request is supported), got {n}"),
        )),
    }
}

fn sampling(
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
) -> Result<Sampling, ApiError> {
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {t}"),
        ));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be greater than 0 and at most 1, got {p}"),
        ));
    }
    Ok(Sampling {
        temperature: temperature.map(|t| t as f32),
        top_p: top_p.map(|p| p as f32),
        // OpenAI seeds are signed; the bits are what matter.
        seed: seed.map(|s| s as u64),
    })
}

/// 400 for stop sequences (an empty string or list is no stop sequence).
fn check_stop(stop: Option<&Value>) -> Result<(), ApiError> {
    let given = match stop {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    if given {
        Err(unsupported("stop"))
    } else {
        Ok(())
    }
}

/// (stream, include_usage); `stream_options` only with `stream`, as OpenAI.
fn stream_mode(
    stream: Option<bool>,
    options: Option<StreamOptions>,
) -> Result<(bool, bool), ApiError> {
    let stream = stream.unwrap_or(false);
    match options {
        None => Ok((stream, false)),
        Some(_) if !stream => Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        )),
        Some(o) => Ok((true, o.include_usage.unwrap_or(false))),
    }
}

/// Roles a chat message may have.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The prompt of a conversation, in the module's chat template.
pub fn render_chat(messages: &[ChatMessage]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut prompt = String::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.role.as_deref().unwrap_or_default();
        if !ROLES.contains(&role) {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "messages[{i}].role must be one of {}, got `{role}`",
                    ROLES.join(", ")
                ),
            ));
        }
        let content = message_text(i, role, m.content.as_ref())?;
        prompt.push_str("<|im_start|>");
        prompt.push_str(role);
        prompt.push('\n');
        prompt.push_str(&content);
        prompt.push_str("<|im_end|>\n");
    }
    prompt.push_str("<|im_start|>assistant\n");
    Ok(prompt)
}

fn message_text(i: usize, role: &str, content: Option<&Value>) -> Result<String, ApiError> {
    let bad = |what: String| ApiError::invalid("messages", format!("messages[{i}].content {what}"));
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if matches!(role, "assistant" | "tool") => Ok(String::new()),
        None | Some(Value::Null) => Err(bad("is required".into())),
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .enumerate()
                .map(|(j, part)| {
                    let kind = part.get("type").and_then(Value::as_str);
                    match (kind, part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(text)) => Ok(text),
                        (Some("text"), None) => Err(bad(format!("[{j}].text must be a string"))),
                        (kind, _) => Err(bad(format!(
                            "[{j}] has type {}; only text parts are supported",
                            kind.unwrap_or("(none)")
                        ))),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join("\n"))
        }
        Some(_) => Err(bad("must be a string or an array of text parts".into())),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::openai::tokenizer::SimTokenizer;

    fn limits() -> Limits {
        Limits {
            max_tokens: 100,
            max_prompt_tokens: 50,
            max_context_tokens: 120,
            ..Limits::default()
        }
    }

    fn check<T: serde::de::DeserializeOwned>(
        body: serde_json::Value,
        run: impl Fn(&Checker<'_>, T) -> Result<Validated, ApiError>,
    ) -> Result<Validated, ApiError> {
        let limits = limits();
        let tokenizer = SimTokenizer::new(1000);
        let models = [ModelCard {
            id: "m".into(),
            owned_by: "rackscale".into(),
        }];
        let checker = Checker {
            limits: &limits,
            tokenizer: &tokenizer,
            models: &models,
        };
        run(
            &checker,
            serde_json::from_value(body).expect("request shape"),
        )
    }

    fn completion(body: serde_json::Value) -> Result<Validated, ApiError> {
        check(body, |c, r| c.completion(r, "id".into()))
    }

    fn chat(body: serde_json::Value) -> Result<Validated, ApiError> {
        check(body, |c, r| c.chat(r, "id".into()))
    }

    /// (status, param, code) of a refusal.
    fn refusal(
        r: Result<Validated, ApiError>,
    ) -> (u16, Option<&'static str>, Option<&'static str>) {
        let e = r.expect_err("refused");
        (e.status.as_u16(), e.param, e.code)
    }

    #[test]
    fn a_completion_gets_defaults_and_token_ids() {
        let v = completion(json!({"model": "m", "prompt": "the rack "})).expect("valid");
        assert_eq!(v.request.prompt, vec![0, 68]);
        assert_eq!(v.request.max_tokens, 16);
        assert!(!v.stream && !v.include_usage);
        let v = completion(json!({
            "model": "m", "prompt": [[5, 6, 7]], "max_tokens": 3, "temperature": 0,
            "top_p": 1, "seed": -1, "stream": true, "stream_options": {"include_usage": true},
            "n": 1, "stop": null, "user": "ignored",
        }))
        .expect("valid");
        assert_eq!(v.request.prompt, vec![5, 6, 7]);
        assert_eq!(v.request.max_tokens, 3);
        assert_eq!(v.request.sampling.seed, Some(u64::MAX));
        assert!(v.stream && v.include_usage);
    }

    #[test]
    fn missing_and_malformed_parameters_are_named() {
        assert_eq!(
            refusal(completion(json!({"prompt": "x"}))),
            (400, Some("model"), None)
        );
        assert_eq!(
            refusal(completion(json!({"model": "m"}))),
            (400, Some("prompt"), None)
        );
        assert_eq!(
            refusal(chat(json!({"model": "m"}))),
            (400, Some("messages"), None)
        );
        let bad_prompts = [
            json!(""),
            json!([]),
            json!({"a": 1}),
            json!([1, "x"]),
            json!([1000]),
        ];
        for p in bad_prompts {
            let r = completion(json!({"model": "m", "prompt": p}));
            assert_eq!(refusal(r).1, Some("prompt"), "{p}");
        }
        let r = completion(json!({"model": "m", "prompt": ["a", "b"]}));
        assert_eq!(refusal(r), (400, Some("prompt"), None));
    }

    #[test]
    fn unknown_model_is_404() {
        let r = completion(json!({"model": "other", "prompt": "x"}));
        assert_eq!(refusal(r), (404, Some("model"), Some("model_not_found")));
    }

    #[test]
    fn limits_and_ranges_are_enforced() {
        let cases = [
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": -5}), "max_tokens"),
            (json!({"max_tokens": 101}), "max_tokens"),
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.01}), "top_p"),
            (json!({"n": 2}), "n"),
            (json!({"best_of": 3}), "best_of"),
            (json!({"echo": true}), "echo"),
            (json!({"logprobs": 2}), "logprobs"),
            (json!({"stop": ["\n"]}), "stop"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ];
        for (extra, param) in cases {
            let mut body = json!({"model": "m", "prompt": "x"});
            for (k, v) in extra.as_object().expect("object") {
                body[k] = v.clone();
            }
            assert_eq!(
                refusal(completion(body)),
                (400, Some(param), None),
                "{extra}"
            );
        }
        let long = "word ".repeat(60);
        let r = completion(json!({"model": "m", "prompt": long}));
        assert_eq!(
            refusal(r),
            (400, Some("prompt"), Some("context_length_exceeded"))
        );
        // 40 prompt tokens + 90 > 120 context.
        let prompt: Vec<u32> = (0..40).collect();
        let r = completion(json!({"model": "m", "prompt": prompt, "max_tokens": 90}));
        assert_eq!(
            refusal(r),
            (400, Some("max_tokens"), Some("context_length_exceeded"))
        );
    }

    #[test]
    fn chat_renders_the_template_and_prefers_max_completion_tokens() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null},
            ],
            "max_tokens": 9, "max_completion_tokens": 7,
        });
        let v = chat(body.clone()).expect("valid");
        assert_eq!(v.request.max_tokens, 7);
        let messages: Vec<ChatMessage> =
            serde_json::from_value(body["messages"].clone()).expect("messages");
        assert_eq!(
            render_chat(&messages).expect("renders"),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n\
             <|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
        );
        let tokenizer = SimTokenizer::new(1000);
        assert_eq!(
            v.request.prompt,
            tokenizer.encode(&render_chat(&messages).expect("renders"))
        );
        // The chat default is capped by the remaining context (120 - prompt).
        let v = chat(json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}))
            .expect("valid");
        assert_eq!(
            v.request.max_tokens,
            100.min(120 - v.request.prompt.len() as u32)
        );
    }

    #[test]
    fn chat_messages_are_checked() {
        let bad = [
            json!([]),
            json!([{"role": "robot", "content": "x"}]),
            json!([{"content": "x"}]),
            json!([{"role": "user"}]),
            json!([{"role": "user", "content": 5}]),
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ];
        for messages in bad {
            let r = chat(json!({"model": "m", "messages": messages}));
            assert_eq!(refusal(r), (400, Some("messages"), None), "{messages}");
        }
        let r = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}),
        );
        assert_eq!(refusal(r), (400, Some("max_completion_tokens"), None));
        let r = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true}),
        );
        assert_eq!(refusal(r), (400, Some("logprobs"), None));
    }
}
