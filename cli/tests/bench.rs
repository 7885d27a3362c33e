//! `rackscale bench` end to end: the real binary against an in-process
//! OpenAI-shaped server whose pacing is known (TTFT 20 ms, then one token
//! every 10 ms), so the measured figures can be checked against the truth;
//! and against servers that fail in the ways real ones do (429, an error
//! event mid-stream, a stream cut before `[DONE]`, nobody listening).
//!
//! The fake server binds port 0 and is aborted when its handle drops, so
//! every test cleans up even when it fails; the binary runs with
//! `kill_on_drop` and a deadline.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Json, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

const MODEL: &str = "fake-model";
const TTFT: Duration = Duration::from_millis(20);
const ITL: Duration = Duration::from_millis(10);

/// How the fake server behaves.
#[derive(Debug, Clone, Copy)]
struct Script {
    /// Send a usage chunk before `[DONE]`.
    usage: bool,
    /// Request n (from 0) gets: n % 4 == 0 a normal stream, 1 a 429,
    /// 2 an error event after two tokens, 3 a stream cut after two tokens.
    faults: bool,
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    /// Prompt length: token ids, or characters of the chat message.
    prompt_len: u64,
    max_tokens: u64,
    ignore_eos: bool,
    include_usage: bool,
}

#[derive(Debug, Clone)]
struct Fake {
    script: Script,
    count: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct FakeServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(script: Script) -> FakeServer {
    let fake = Fake {
        script,
        count: Arc::default(),
        seen: Arc::default(),
    };
    let seen = Arc::clone(&fake.seen);
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // As real servers do: without it, Nagle holds each token behind the
    // client's delayed ACK and the first token arrives ~20 ms late.
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    FakeServer { url, seen, task }
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]}))
}

async fn completions(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    let prompt_len = body["prompt"].as_array().map_or(0, Vec::len) as u64;
    serve(fake, body, prompt_len, false)
}

async fn chat(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    let prompt_len = body["messages"][0]["content"].as_str().map_or(0, str::len) as u64;
    serve(fake, body, prompt_len, true)
}

fn serve(fake: Fake, body: Value, prompt_len: u64, chat: bool) -> Response {
    let start = Instant::now();
    if body["model"] != MODEL {
        let error = json!({"error": {"message": "no such model", "code": 404}});
        return (StatusCode::NOT_FOUND, Json(error)).into_response();
    }
    let max_tokens = body["max_tokens"].as_u64().unwrap();
    fake.seen.lock().unwrap().push(Seen {
        prompt_len,
        max_tokens,
        ignore_eos: body["ignore_eos"] == true,
        include_usage: body["stream_options"]["include_usage"] == true,
    });
    let n = fake.count.fetch_add(1, Ordering::SeqCst);
    let mode = if fake.script.faults { n % 4 } else { 0 };
    if mode == 1 {
        let error =
            json!({"error": {"message": "rate limited", "type": "rate_limit", "code": 429}});
        return (StatusCode::TOO_MANY_REQUESTS, Json(error)).into_response();
    }
    let (tx, rx) = mpsc::channel::<Result<String, Infallible>>(8);
    let usage = fake.script.usage;
    tokio::spawn(async move {
        let event = |v: Value| Ok(format!("data: {v}\n\n"));
        if chat {
            let role = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
            let _ = tx.send(event(role)).await;
        }
        let tokens = if mode == 0 { max_tokens } else { 2 };
        for k in 0..tokens {
            tokio::time::sleep_until(start + TTFT + ITL * k as u32).await;
            let chunk = if chat {
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": null}]})
            } else {
                json!({"object": "text_completion", "choices": [{"index": 0, "text": " tok", "finish_reason": null}]})
            };
            if tx.send(event(chunk)).await.is_err() {
                return;
            }
        }
        match mode {
            2 => {
                let error = json!({"error": {"message": "engine crashed", "type": "server_error", "code": 500}});
                let _ = tx.send(event(error)).await;
            }
            3 => {} // cut: no [DONE]
            _ => {
                if usage {
                    let u = json!({"choices": [], "usage": {"prompt_tokens": prompt_len, "completion_tokens": max_tokens, "total_tokens": prompt_len + max_tokens}});
                    let _ = tx.send(event(u)).await;
                }
                let _ = tx.send(Ok("data: [DONE]\n\n".into())).await;
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap()
}

/// Runs `rackscale bench` with `args`; returns its stdout after checking it
/// exited cleanly.
async fn bench(args: &[&str]) -> String {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rackscale"))
        .arg("bench")
        .args(args)
        .env_remove("RACKSCALE_BENCH_URL")
        .env_remove("RACKSCALE_BENCH_MODEL")
        .env_remove("RACKSCALE_BENCH_API_KEY")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("rackscale bench did not finish within 60 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rackscale bench failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    eprintln!("{stdout}"); // shown when a test fails
    stdout
}

async fn bench_json(args: &[&str]) -> Value {
    let stdout = bench(args).await;
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn within(name: &str, v: &Value, lo: f64, hi: f64) {
    let x = f(v);
    assert!((lo..=hi).contains(&x), "{name} = {x}, expected {lo}..={hi}");
}

fn close(name: &str, a: f64, b: f64) {
    assert!(
        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        "{name}: {a} != {b}"
    );
}

/// Every documented top-level field of the JSON report.
const FIELDS: &[&str] = &[
    "config",
    "duration_s",
    "successful",
    "failed",
    "failures",
    "requests_without_usage",
    "input_tokens",
    "output_tokens",
    "gpus",
    "request_throughput_per_s",
    "total_tokens_per_s",
    "output_tokens_per_s",
    "total_tokens_per_s_per_gpu",
    "output_tokens_per_s_per_gpu",
    "tokens_per_s_per_user",
    "achieved_concurrency",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_match_the_servers_pacing() {
    let server = start(Script {
        usage: true,
        faults: false,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let table = bench(&[
        "--url",
        &server.url,
        "--model",
        MODEL,
        "--isl",
        "64",
        "--osl",
        "20",
        "--concurrency",
        "4",
        "--requests",
        "24",
        "--warmup",
        "4",
        "--gpus",
        "2",
        "--seed",
        "7",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for label in [
        "tok/s/GPU",
        "tok/s/user",
        "TTFT",
        "TPOT",
        "ITL",
        "e2e",
        "24 ok, 0 failed",
    ] {
        assert!(table.contains(label), "table lacks {label}:\n{table}");
    }

    for field in FIELDS {
        assert!(report.get(field).is_some(), "missing {field}: {report:#}");
    }
    for summary in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        for key in ["count", "mean", "p50", "p90", "p99", "max"] {
            assert!(report[summary][key].is_number(), "{summary}.{key}");
        }
    }
    let config = &report["config"];
    assert_eq!(config["model"], MODEL);
    assert_eq!(config["load"], "closed");
    assert_eq!(config["concurrency"], 4);
    assert_eq!(config["url"], format!("{}/v1/completions", server.url));

    // The server saw warmup then measured requests, each drawn by the
    // 80-100% rule and sent with ignore_eos and include_usage.
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 28);
    for s in &seen {
        assert!((52..=64).contains(&s.prompt_len), "{s:?}");
        assert!((16..=20).contains(&s.max_tokens), "{s:?}");
        assert!(s.ignore_eos && s.include_usage, "{s:?}");
    }
    // Warmup (the first four) is excluded from the figures.
    let measured = &seen[4..];
    assert_eq!(report["successful"], 24);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["failures"], json!([]));
    assert_eq!(report["requests_without_usage"], 0);
    let input: u64 = measured.iter().map(|s| s.prompt_len).sum();
    let output: u64 = measured.iter().map(|s| s.max_tokens).sum();
    assert_eq!(report["input_tokens"], input);
    assert_eq!(report["output_tokens"], output);

    // Pacing: TTFT 20 ms, 10 ms a token.
    within("ttft p50", &report["ttft_ms"]["p50"], 20.0, 45.0);
    within("ttft mean", &report["ttft_ms"]["mean"], 20.0, 60.0);
    within("tpot p50", &report["tpot_ms"]["p50"], 9.0, 13.0);
    within("itl p50", &report["itl_ms"]["p50"], 8.0, 14.0);
    within("e2e p50", &report["e2e_ms"]["p50"], 170.0, 300.0);
    within("tok/s/user", &report["tokens_per_s_per_user"], 76.0, 112.0);
    within(
        "achieved concurrency",
        &report["achieved_concurrency"],
        2.5,
        4.0 + 1e-6,
    );

    // The InferenceX formulas hold between the reported fields.
    let duration = f(&report["duration_s"]);
    close(
        "total tok/s/GPU",
        f(&report["total_tokens_per_s_per_gpu"]),
        (input + output) as f64 / duration / 2.0,
    );
    close(
        "output tok/s/GPU",
        f(&report["output_tokens_per_s_per_gpu"]),
        output as f64 / duration / 2.0,
    );
    close(
        "tok/s/user",
        f(&report["tokens_per_s_per_user"]),
        1000.0 / f(&report["tpot_ms"]["p50"]),
    );
    close(
        "req/s",
        f(&report["request_throughput_per_s"]),
        24.0 / duration,
    );
    // 24 requests of ~190 ms, 4 at a time: about 1.1 s.
    assert!((0.9..5.0).contains(&duration), "duration {duration}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_usage_counts_chunks_and_finds_the_model() {
    let server = start(Script {
        usage: false,
        faults: false,
    })
    .await;
    // No --model: the first entry of GET /v1/models is used (the server
    // answers 404 to any other name).
    let report = bench_json(&[
        "--url",
        &format!("{}/v1/", server.url),
        "--endpoint",
        "chat",
        "--isl",
        "50",
        "--osl",
        "10",
        "--concurrency",
        "3",
        "--requests",
        "9",
        "--json",
    ])
    .await;
    assert_eq!(report["config"]["model"], MODEL);
    assert_eq!(report["config"]["endpoint"], "chat");
    assert_eq!(report["successful"], 9);
    assert_eq!(report["requests_without_usage"], 9);
    let seen = server.seen.lock().unwrap().clone();
    // Text prompts of 4 characters a drawn token: 40..=50 tokens.
    assert!(
        seen.iter()
            .all(|s| s.prompt_len % 4 == 0 && (160..=200).contains(&s.prompt_len))
    );
    let input: u64 = seen.iter().map(|s| s.prompt_len / 4).sum();
    let output: u64 = seen.iter().map(|s| s.max_tokens).sum();
    assert_eq!(report["input_tokens"], input);
    assert_eq!(
        report["output_tokens"], output,
        "one token per content chunk"
    );
    within("ttft p50", &report["ttft_ms"]["p50"], 20.0, 45.0);
    within("tpot p50", &report["tpot_ms"]["p50"], 9.0, 13.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_with_reasons() {
    let server = start(Script {
        usage: true,
        faults: true,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let table = bench(&[
        "--url",
        &server.url,
        "--model",
        MODEL,
        "--isl",
        "32",
        "--osl",
        "8",
        "--concurrency",
        "2",
        "--requests",
        "8",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(report["successful"], 2);
    assert_eq!(report["failed"], 6);
    let failures: Vec<(String, u64, String)> = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["reason"].as_str().unwrap().to_owned(),
                f["count"].as_u64().unwrap(),
                f["example"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let reasons: Vec<(&str, u64)> = failures.iter().map(|(r, c, _)| (r.as_str(), *c)).collect();
    assert_eq!(
        reasons,
        vec![
            ("error_event", 2),
            ("http_429", 2),
            ("incomplete_stream", 2)
        ]
    );
    assert_eq!(failures[0].2, "engine crashed");
    assert!(failures[1].2.contains("rate limited"), "{failures:?}");
    // Only the successes feed the figures.
    assert_eq!(report["ttft_ms"]["count"], 2);
    for reason in ["http_429", "error_event", "incomplete_stream", "failed"] {
        assert!(table.contains(reason), "table lacks {reason}:\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_for_a_duration_respects_max_concurrency() {
    let server = start(Script {
        usage: true,
        faults: false,
    })
    .await;
    let report = bench_json(&[
        "--url",
        &server.url,
        "--model",
        MODEL,
        "--isl",
        "16",
        "--osl",
        "10",
        "--request-rate",
        "50",
        "--max-concurrency",
        "2",
        "--duration",
        "0.6",
        "--json",
    ])
    .await;
    assert_eq!(report["config"]["load"], "open");
    assert_eq!(report["config"]["duration_limit_s"], 0.6);
    assert_eq!(report["failed"], 0);
    // Each request takes ~110 ms and 2 fit at once: ~6 to 12 requests.
    let ok = report["successful"].as_u64().unwrap();
    assert!((3..=14).contains(&ok), "{ok} requests");
    within(
        "achieved concurrency",
        &report["achieved_concurrency"],
        0.5,
        2.0 + 1e-6,
    );
    within("window", &report["duration_s"], 0.5, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_listening_is_a_connect_failure() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let report = bench_json(&[
        "--url",
        &url,
        "--model",
        MODEL,
        "--concurrency",
        "1",
        "--requests",
        "3",
        "--json",
    ])
    .await;
    assert_eq!(report["successful"], 0);
    assert_eq!(report["failures"][0]["reason"], "connect");
    assert_eq!(report["failures"][0]["count"], 3);
    assert_eq!(report["tokens_per_s_per_user"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_keeps_every_client_busy_through_the_window() {
    let server = start(Script {
        usage: true,
        faults: false,
    })
    .await;
    let args = |steady: bool| {
        let mut a = vec![
            "--url",
            &server.url,
            "--model",
            MODEL,
            "--isl",
            "64",
            "--osl",
            "20",
            "--concurrency",
            "4",
            "--requests",
            "24",
            "--warmup",
            "8",
            "--json",
        ];
        if steady {
            a.push("--steady");
        }
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let steady = args(true);
    let report = bench_json(&steady.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(report["config"]["window"], "steady");
    assert_eq!(report["successful"], 24);
    assert_eq!(report["failed"], 0);
    // Completions between two completion instants with four clients always
    // busy: the window holds four requests in flight throughout (Little's
    // law), where a first-send-to-last-end window of 24 requests from 4
    // clients shows the ramp and drain.
    within(
        "steady achieved concurrency",
        &report["achieved_concurrency"],
        3.4,
        4.6,
    );
    let rate = f(&report["request_throughput_per_s"]);
    let e2e = f(&report["e2e_ms"]["mean"]) * 1e-3;
    assert!(
        (rate * e2e - 4.0).abs() < 0.6,
        "rate {rate}/s x e2e {e2e} s should be the 4 clients"
    );
    // The server saw every warmup and measured request, plus the ones cut
    // off at the end (at most one per client).
    let seen = server.seen.lock().unwrap().len();
    assert!((32..=36).contains(&seen), "server saw {seen} requests");

    // Refused where it has no meaning.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rackscale"))
        .args(["bench", "--url", &server.url, "--model", MODEL])
        .args(["--request-rate", "5", "--requests", "4", "--steady"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--steady"), "{stderr}");
}
