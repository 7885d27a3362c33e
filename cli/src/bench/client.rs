//! The HTTP edge of the benchmark: one `reqwest` client, the model lookup,
//! and one streamed request turned into a [`Record`].
//!
//! Everything protocol-shaped is delegated to [`super::sse`] and
//! [`super::openai`]; this file only moves bytes, reads the clock as each
//! piece arrives and sorts transport errors into [`FailureKind`]s.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use tokio::time::Instant;

use super::Config;
use super::openai::{self, Endpoint, StreamRecorder, truncate};
use super::sse::SseParser;
use super::stats::{Failure, FailureKind, Record, Success};
use super::workload::{Prompt, RequestSpec};

/// Where requests go and how they are sent.
#[derive(Debug)]
pub struct Target {
    http: reqwest::Client,
    /// Base URL without a trailing `/` or `/v1`.
    base: String,
    endpoint: Endpoint,
    api_key: Option<String>,
    timeout: Duration,
    model: String,
}

#[derive(Debug, Deserialize)]
struct Models {
    data: Vec<ModelEntry>,
}

#[derive(Debug, Deserialize)]
struct ModelEntry {
    id: String,
}

impl Target {
    /// Builds the client; asks the server for its first model when the
    /// config names none.
    pub async fn connect(config: &Config) -> Result<Self> {
        // reqwest is built without a bundled crypto provider; use ring, which
        // the workspace already links. Err means one is installed: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        let base = config.base_url.clone();
        let model = match &config.model {
            Some(model) => model.clone(),
            None => first_model(&http, &base, config.api_key.as_deref()).await?,
        };
        Ok(Self {
            http,
            base,
            endpoint: config.endpoint,
            api_key: config.api_key.clone(),
            timeout: config.timeout,
            model,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn url(&self) -> String {
        format!("{}{}", self.base, self.endpoint.path())
    }

    /// Sends one request and times its stream; never fails, a failure is an
    /// outcome. `epoch` is the start of the benchmark.
    pub async fn send(&self, spec: &RequestSpec, epoch: Instant) -> Record {
        let body = openai::request_body(&self.model, spec);
        let sent_tokens = match &spec.prompt {
            Prompt::Tokens(ids) => ids.len() as u64,
            Prompt::Text(_) => u64::from(spec.input_len),
        };
        let start = Instant::now();
        let outcome = match tokio::time::timeout(
            self.timeout,
            self.stream(&body, sent_tokens, start),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure {
                kind: FailureKind::Timeout,
                message: format!("no complete answer within {:?}", self.timeout),
            }),
        };
        let duration_s = match &outcome {
            Ok(success) => success.e2e_s,
            Err(_) => start.elapsed().as_secs_f64(),
        };
        Record {
            start_s: start.duration_since(epoch).as_secs_f64(),
            duration_s,
            outcome,
        }
    }

    async fn stream(
        &self,
        body: &serde_json::Value,
        sent_tokens: u64,
        start: Instant,
    ) -> Result<Success, Failure> {
        let bytes = serde_json::to_vec(body).map_err(|e| Failure {
            kind: FailureKind::Transport,
            message: e.to_string(),
        })?;
        let mut request = self
            .http
            .post(self.url())
            .header(CONTENT_TYPE, "application/json")
            .body(bytes);
        if let Some(key) = &self.api_key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(Failure {
                kind: FailureKind::Http(status.as_u16()),
                message: truncate(&format!("{status}: {}", text.trim())),
            });
        }
        let mut parser = SseParser::default();
        let mut recorder = StreamRecorder::new(sent_tokens);
        let mut events = Vec::new();
        while !recorder.is_done() {
            let Some(piece) = response.chunk().await.map_err(transport)? else {
                break;
            };
            let at = start.elapsed();
            parser.push(&piece, &mut events);
            for event in events.drain(..) {
                recorder.on_event(&event, at)?;
            }
        }
        if !recorder.is_done()
            && let Some(event) = parser.finish()
        {
            recorder.on_event(&event, start.elapsed())?;
        }
        recorder.finish()
    }
}

/// The first model `GET /v1/models` lists.
async fn first_model(http: &reqwest::Client, base: &str, api_key: Option<&str>) -> Result<String> {
    let url = format!("{base}/v1/models");
    let mut request = http.get(&url).timeout(Duration::from_secs(30));
    if let Some(key) = api_key {
        request = request.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !status.is_success() {
        return Err(anyhow!(
            "GET {url}: {status}: {}",
            truncate(&String::from_utf8_lossy(&body))
        ));
    }
    let models: Models =
        serde_json::from_slice(&body).with_context(|| format!("GET {url}: not a model list"))?;
    models
        .data
        .into_iter()
        .next()
        .map(|m| m.id)
        .ok_or_else(|| anyhow!("GET {url} lists no model; pass --model"))
}

/// Sorts a reqwest error into a failure kind, keeping its causes' words.
fn transport(e: reqwest::Error) -> Failure {
    let kind = if e.is_timeout() {
        FailureKind::Timeout
    } else if e.is_connect() {
        FailureKind::Connect
    } else {
        FailureKind::Transport
    };
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Failure {
        kind,
        message: truncate(&message),
    }
}
