//! The router over a scripted [`Generator`] test double, on a loopback
//! port: status codes, bodies, streams and client disconnects.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::generate::{
    FinishReason, GenerateError, GenerateEvent, GenerateFuture, GenerateRequest,
};
use crate::openai::tokenizer::SimTokenizer;
use crate::openai::{Limits, router};

/// Sets its flag when dropped: proves a generator stream was dropped.
#[derive(Debug)]
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What the test generator does with every request.
#[derive(Debug, Clone)]
enum Script {
    /// `n` tokens (ids 0, 1, ...), then `Finished`.
    Tokens(u32),
    /// A token every 5 ms until the stream is dropped, which sets the flag.
    Endless(Arc<AtomicBool>),
    /// Refuses at once.
    Refuse(GenerateError),
    /// Starts, then fails before the first token.
    FailFirst(GenerateError),
}

#[derive(Debug)]
struct Scripted {
    script: Script,
    ready: bool,
}

impl Generator for Scripted {
    fn generate(&self, request: GenerateRequest) -> GenerateFuture<'_> {
        let script = self.script.clone();
        Box::pin(async move {
            let prompt_tokens = request.prompt.len() as u32;
            match script {
                Script::Refuse(e) => Err(e),
                Script::FailFirst(e) => Ok(futures::stream::iter([Err(e)]).boxed()),
                Script::Tokens(n) => {
                    let n = n.min(request.max_tokens);
                    let tokens = (0..n).map(|i| Ok(GenerateEvent::Tokens(vec![i])));
                    let end = Ok(GenerateEvent::Finished {
                        reason: FinishReason::Length,
                        prompt_tokens,
                        completion_tokens: n,
                    });
                    Ok(futures::stream::iter(tokens.chain([end])).boxed())
                }
                Script::Endless(flag) => {
                    let flag = DropFlag(flag);
                    Ok(
                        futures::stream::unfold((flag, 0u32), |(flag, i)| async move {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Some((Ok(GenerateEvent::Tokens(vec![i])), (flag, i + 1)))
                        })
                        .boxed(),
                    )
                }
            }
        })
    }

    fn models(&self) -> Vec<ModelCard> {
        vec![ModelCard {
            id: "m".into(),
            owned_by: "test".into(),
        }]
    }

    fn ready(&self) -> bool {
        self.ready
    }
}

struct Server {
    addr: SocketAddr,
    metrics: OpenAiMetrics,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(script: Script, ready: bool) -> Server {
    let metrics = OpenAiMetrics::unregistered().expect("metrics");
    let limits = Limits {
        max_body_bytes: 4096,
        body_idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let app = router(
        Arc::new(Scripted { script, ready }),
        Arc::new(SimTokenizer::new(1000)),
        limits,
        metrics.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server {
        addr,
        metrics,
        task,
    }
}

/// (status, headers, body) of one request.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, HeaderMap, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let response = client.request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    (parts.status, parts.headers, text)
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (StatusCode, HeaderMap, Value) {
    let (status, headers, text) = call(addr, "POST", path, &body.to_string()).await;
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, json)
}

fn outcome(s: &Server, endpoint: &str, outcome: &str) -> u64 {
    s.metrics
        .requests
        .with_label_values(&[endpoint, outcome])
        .get()
}

#[tokio::test]
async fn whole_completion_and_chat_carry_text_and_usage() {
    let s = start(Script::Tokens(3), true).await;
    let (status, _, body) = post(
        s.addr,
        "/v1/completions",
        json!({"model": "m", "prompt": "the rack ", "max_tokens": 5}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    assert_eq!(body["choices"][0]["text"], "the of and ");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );
    let (status, _, body) = post(
        s.addr,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "the of and ");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(outcome(&s, "completions", "ok"), 1);
    assert_eq!(outcome(&s, "chat_completions", "ok"), 1);
}

#[tokio::test]
async fn streamed_chat_is_server_sent_events() {
    let s = start(Script::Tokens(2), true).await;
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": true,
        "stream_options": {"include_usage": true},
    });
    let (status, headers, text) =
        call(s.addr, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "the of ");
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 2);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("length")]);
}

#[tokio::test]
async fn malformed_bodies_get_openai_shaped_400_and_413() {
    let s = start(Script::Tokens(1), true).await;
    let (status, _, text) = call(s.addr, "POST", "/v1/completions", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_str(&text).expect("json error body");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"].get("param").is_some() && body["error"].get("code").is_some());
    let (status, _, body) = post(
        s.addr,
        "/v1/completions",
        json!({"model": "m", "prompt": "x", "max_tokens": "many"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _, body) = post(
        s.addr,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large");
    let (status, _, body) = post(
        s.addr,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(outcome(&s, "completions", "client_error"), 3);
}

#[tokio::test]
async fn generator_refusals_map_to_429_503_and_500() {
    let overloaded = GenerateError::Overloaded {
        reason: "queue full".into(),
        retry_after_s: 7,
    };
    let body = json!({"model": "m", "prompt": "x", "stream": true});
    let s = start(Script::Refuse(overloaded), true).await;
    let (status, headers, _) = post(s.addr, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    assert_eq!(outcome(&s, "completions", "overloaded"), 1);
    let s = start(
        Script::Refuse(GenerateError::Unavailable("no workers".into())),
        true,
    )
    .await;
    let (status, _, body_json) = post(s.addr, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body_json}");
    // A failure before the first token is still a status, streamed or not.
    let s = start(
        Script::FailFirst(GenerateError::Failed("prefill died".into())),
        true,
    )
    .await;
    let (status, _, err) = post(s.addr, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(err["error"]["message"], "prefill died");
    assert_eq!(outcome(&s, "completions", "server_error"), 1);
}

#[tokio::test]
async fn models_health_and_ready() {
    let s = start(Script::Tokens(1), false).await;
    let (status, _, text) = call(s.addr, "GET", "/v1/models", "").await;
    assert_eq!(status, StatusCode::OK);
    let list: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "m");
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["owned_by"], "test");
    assert!(list["data"][0]["created"].is_u64());
    assert_eq!(
        call(s.addr, "GET", "/v1/models/m", "").await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(s.addr, "GET", "/v1/models/x/y", "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(call(s.addr, "GET", "/health", "").await.0, StatusCode::OK);
    assert_eq!(
        call(s.addr, "GET", "/ready", "").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let s = start(Script::Tokens(1), true).await;
    assert_eq!(call(s.addr, "GET", "/ready", "").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408() {
    let s = start(Script::Tokens(1), true).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    // Headers promise 100 bytes; 10 come, then nothing.
    let request = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                   Content-Length: 100\r\n\r\n{\"model\": ";
    tcp.write_all(request.as_bytes()).await.expect("write");
    let started = tokio::time::Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&seen).contains("request_timeout") {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed without an answer: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(answer.is_ok(), "no 408 within 10 s: {text}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("\"type\":\"invalid_request_error\""),
        "{text}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(outcome(&s, "completions", "client_error"), 1);
}

#[tokio::test]
async fn a_client_that_goes_away_drops_the_generator_stream() {
    let dropped = Arc::new(AtomicBool::new(false));
    let s = start(Script::Endless(Arc::clone(&dropped)), true).await;
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 100, "stream": true}).to_string();
    let mut tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    assert!(!dropped.load(Ordering::SeqCst));
    drop(tcp);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !dropped.load(Ordering::SeqCst) || outcome(&s, "completions", "cancelled") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream never dropped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        s.metrics
            .in_flight
            .with_label_values(&["completions"])
            .get(),
        0
    );
    assert_eq!(outcome(&s, "completions", "ok"), 0);
}
