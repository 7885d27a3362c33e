//! The OpenAI API of an engine worker over plain HTTP: an in-process engine
//! (`engine::serve` on `127.0.0.1:0`, role `both`, time scale 1000) answers
//! completions and chat completions whole and streamed, refuses what it
//! must with OpenAI-shaped errors, frees a running slot when a streaming
//! client goes away, and satisfies the real `openai` Python SDK.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use axum::body::Bytes;
use axum::http::{HeaderMap, Request, StatusCode, header};
use engine::openai::{SimTokenizer, Tokenizer};
use engine::{EngineConfig, EngineMetrics, Role};
use harness::wait::{wait_for, wait_until};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use perfmodel::{ModelProfile, Parallelism, Sku};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(20);
const MODEL: &str = "deepseek-v4-pro";

/// One in-process engine on a loopback port 0, stopped (or aborted) at the end.
struct Worker {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<engine::Result<()>>,
}

impl Worker {
    async fn start(role: Role, tweak: impl FnOnce(&mut EngineConfig)) -> Result<Self> {
        let model = ModelProfile::builtin(MODEL)?;
        let parallelism = match role {
            Role::Prefill => Parallelism::Tp(8),
            _ => Parallelism::Ep(8),
        };
        let mut config = EngineConfig::new(role, model, Sku::Gb200, parallelism);
        config.time_scale = 1000.0;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let metrics = EngineMetrics::register(&prometheus::Registry::new())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine::serve(config, listener, metrics, async move {
            let _ = stopped.await;
        }));
        let worker = Self {
            addr,
            stop: Some(stop),
            task,
        };
        wait_until("the engine's /health", WAIT, || async {
            Ok(worker.get("/health").await?.0 == StatusCode::OK)
        })
        .await?;
        Ok(worker)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: String,
    ) -> Result<(StatusCode, HeaderMap, String)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = Request::builder()
            .method(method)
            .uri(self.url(path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = client.request(request).await?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok((
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec())?,
        ))
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, String)> {
        let (status, _, body) = self.call("GET", path, String::new()).await?;
        Ok((status, body))
    }

    /// POSTs `body`; the status, headers and JSON reply.
    async fn post(&self, path: &str, body: Value) -> Result<(StatusCode, HeaderMap, Value)> {
        let (status, headers, text) = self.call("POST", path, body.to_string()).await?;
        let json = serde_json::from_str(&text).with_context(|| format!("{status}: {text}"))?;
        Ok((status, headers, json))
    }

    /// POSTs a streaming `body`; the chunks' JSON (the body must end with
    /// `[DONE]`).
    async fn stream(&self, path: &str, body: Value) -> Result<Vec<Value>> {
        let (status, headers, text) = self.call("POST", path, body.to_string()).await?;
        ensure!(status == StatusCode::OK, "{status}: {text}");
        ensure!(
            headers[header::CONTENT_TYPE] == "text/event-stream",
            "{headers:?}"
        );
        ensure!(text.ends_with("data: [DONE]\n\n"), "{text}");
        text.split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| {
                f.strip_prefix("data: ")
                    .with_context(|| format!("frame {f:?}"))
            })
            .filter(|d| !matches!(d, Ok("[DONE]")))
            .map(|d| Ok(serde_json::from_str(d?)?))
            .collect()
    }

    async fn metrics(&self) -> Result<String> {
        let (status, body) = self.get("/metrics").await?;
        ensure!(status == StatusCode::OK, "{status}");
        Ok(body)
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of sample `name` (with its labels, if any) in Prometheus text.
fn sample(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no sample {name} in:\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("sample {name}"))
}

fn tokenizer() -> Result<SimTokenizer> {
    Ok(SimTokenizer::new(ModelProfile::builtin(MODEL)?.vocab))
}

fn word_count(text: &str) -> usize {
    text.split(' ').filter(|w| !w.is_empty()).count()
}

#[tokio::test]
async fn completions_and_chat_whole() -> Result<()> {
    let w = Worker::start(Role::Both, |_| {}).await?;
    let prompt = "The rack holds seventy-two GPUs.";
    let (status, _, c) = w
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 12}),
        )
        .await?;
    ensure!(status == StatusCode::OK, "{c}");
    assert_eq!(c["object"], "text_completion");
    let text = c["choices"][0]["text"].as_str().context("text")?;
    assert_eq!(word_count(text), 12, "{text}");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    let prompt_tokens = tokenizer()?.encode(prompt).len();
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12})
    );
    // The default is OpenAI's 16 tokens.
    let (_, _, c) = w
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": [5, 6, 7]}),
        )
        .await?;
    assert_eq!(c["usage"]["completion_tokens"], 16, "{c}");
    assert_eq!(c["usage"]["prompt_tokens"], 3, "{c}");

    let (status, _, r) = w
        .post(
            "/v1/chat/completions",
            json!({
                "model": MODEL,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
                "max_completion_tokens": 4,
            }),
        )
        .await?;
    ensure!(status == StatusCode::OK, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let content = r["choices"][0]["message"]["content"]
        .as_str()
        .context("content")?;
    assert_eq!(word_count(content), 4, "{content}");
    assert_eq!(r["usage"]["completion_tokens"], 4);

    let (status, body) = w.get("/v1/models").await?;
    ensure!(status == StatusCode::OK, "{body}");
    let models: Value = serde_json::from_str(&body)?;
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["owned_by"], "rackscale");
    assert_eq!(w.get("/ready").await?.0, StatusCode::OK);

    let metrics = w.metrics().await?;
    let ok = r#"rackscale_frontend_requests_total{endpoint="completions",outcome="ok"}"#;
    assert_eq!(sample(&metrics, ok)?, 2.0);
    let ttft =
        r#"rackscale_frontend_time_to_first_token_seconds_count{endpoint="chat_completions"}"#;
    assert_eq!(sample(&metrics, ttft)?, 1.0);
    w.stop().await
}

#[tokio::test]
async fn completions_and_chat_streamed() -> Result<()> {
    let w = Worker::start(Role::Both, |_| {}).await?;
    let chunks = w
        .stream(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Stream me", "max_tokens": 10, "stream": true}),
        )
        .await?;
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "text_completion" && c.get("usage").is_none())
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(word_count(&text), 10, "{text}");
    let last = chunks.last().context("no chunks")?;
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    let chunks = w
        .stream(
            "/v1/chat/completions",
            json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "max_tokens": 6,
                "stream": true,
                "stream_options": {"include_usage": true},
            }),
        )
        .await?;
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(word_count(&content), 6, "{content}");
    let (usage_chunk, rest) = chunks.split_last().context("no chunks")?;
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 6);
    assert!(rest.iter().all(|c| c["usage"].is_null()));
    let finishes: Vec<&Value> = rest
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("length")]);
    w.stop().await
}

#[tokio::test]
async fn refusals_are_openai_errors() -> Result<()> {
    let w = Worker::start(Role::Both, |_| {}).await?;
    let (status, _, text) = w
        .call("POST", "/v1/completions", "{\"model\":".into())
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_str(&text)?;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let cases = [
        (json!({"prompt": "x"}), StatusCode::BAD_REQUEST, "model"),
        (json!({"model": MODEL}), StatusCode::BAD_REQUEST, "prompt"),
        (
            json!({"model": MODEL, "prompt": "x", "max_tokens": 0}),
            StatusCode::BAD_REQUEST,
            "max_tokens",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "n": 3}),
            StatusCode::BAD_REQUEST,
            "n",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "temperature": 3}),
            StatusCode::BAD_REQUEST,
            "temperature",
        ),
        (
            json!({"model": "gpt-4", "prompt": "x"}),
            StatusCode::NOT_FOUND,
            "model",
        ),
        (
            json!({"model": MODEL, "prompt": vec![1u32; 10_000]}),
            StatusCode::BAD_REQUEST,
            "prompt",
        ),
    ];
    for (body, want, param) in cases {
        let (status, _, reply) = w.post("/v1/completions", body.clone()).await?;
        assert_eq!(status, want, "{body}: {reply}");
        assert_eq!(reply["error"]["param"], param, "{body}: {reply}");
    }
    let metrics = w.metrics().await?;
    let refused =
        r#"rackscale_frontend_requests_total{endpoint="completions",outcome="client_error"}"#;
    assert_eq!(sample(&metrics, refused)?, 8.0);
    w.stop().await?;

    // A worker that may queue nothing answers 429 with Retry-After.
    let w = Worker::start(Role::Both, |c| c.max_waiting = 0).await?;
    let (status, headers, reply) = w
        .post("/v1/completions", json!({"model": MODEL, "prompt": "x"}))
        .await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{reply}");
    assert!(headers.contains_key(header::RETRY_AFTER), "{headers:?}");
    w.stop().await?;

    // Disaggregated roles leave the OpenAI API to the frontend.
    let w = Worker::start(Role::Prefill, |_| {}).await?;
    let (status, _, reply) = w
        .post("/v1/completions", json!({"model": MODEL, "prompt": "x"}))
        .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(w.get("/ready").await?.0, StatusCode::SERVICE_UNAVAILABLE);
    w.stop().await
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_running_slot() -> Result<()> {
    let w = Worker::start(Role::Both, |_| {}).await?;
    let body =
        json!({"model": MODEL, "prompt": "x", "max_tokens": 8000, "stream": true}).to_string();
    let mut tcp = tokio::net::TcpStream::connect(w.addr).await?;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            bail!("closed early: {}", String::from_utf8_lossy(&seen));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let running = |want: f64| {
        let w = &w;
        move || async move { Ok(sample(&w.metrics().await?, "vllm:num_requests_running")? == want) }
    };
    wait_until("the request running", WAIT, running(1.0)).await?;
    drop(tcp);
    wait_until("the running slot freed", WAIT, running(0.0)).await?;
    let cancelled =
        r#"rackscale_frontend_requests_total{endpoint="completions",outcome="cancelled"}"#;
    wait_for("the request counted as cancelled", WAIT, || async {
        Ok((sample(&w.metrics().await?, cancelled)? == 1.0).then_some(()))
    })
    .await?;
    let in_flight = r#"rackscale_frontend_requests_in_flight{endpoint="completions"}"#;
    assert_eq!(sample(&w.metrics().await?, in_flight)?, 0.0);
    w.stop().await
}

/// `${RACKSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackscale}/venv/bin/python`,
/// as `scripts/setup.sh python` makes it.
fn venv_python() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache = var("RACKSCALE_CACHE").unwrap_or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("rackscale")
    });
    cache.join("venv").join("bin").join("python")
}

#[tokio::test]
async fn openai_python_sdk() -> Result<()> {
    let python = venv_python();
    if !python.is_file() {
        eprintln!(
            "SKIPPED openai_python_sdk: no Python venv at {}; run `scripts/setup.sh python`",
            python.display()
        );
        return Ok(());
    }
    let w = Worker::start(Role::Both, |_| {}).await?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--base-url", &w.url("/v1"), "--model", MODEL])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .context("the SDK script timed out")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    w.stop().await
}
