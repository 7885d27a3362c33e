//! The disaggregated router against real engine workers registered in a real
//! etcd: it follows the registry, retries a dead prefill worker elsewhere,
//! streams decode tokens, frees the decode slot when the client goes, and
//! ends the stream with an error when the decode worker dies mid-stream;
//! and, over a pool of role-both workers, forwards each request whole.

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http;
use engine::frontend::pool::Pool;
use engine::frontend::{Router, RouterConfig};
use engine::generate::{
    FinishReason, GenerateError, GenerateEvent, GenerateRequest, Generator, Sampling,
};
use engine::registration::{self, Registration};
use engine::{EngineConfig, EngineMetrics, Role};
use futures::StreamExt;
use harness::{Etcd, wait_until};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::records::{RankEndpoint, RankRecord};
use proto::registry::Registry;
use proto::types::{Shape, WorkerId};
use tokio::sync::oneshot;

const T: Duration = Duration::from_secs(5);
const MODEL: &str = "deepseek-ai/DeepSeek-V4-Pro";

struct Worker {
    endpoint: String,
    _server: tokio::task::JoinHandle<engine::Result<()>>,
    _stop: oneshot::Sender<()>,
    _registration: oneshot::Sender<()>,
}

/// An engine worker serving on loopback and registered as `name`.
async fn worker(registry: &Registry, name: &str, role: Role, time_scale: f64) -> Worker {
    let parallelism = match role {
        Role::Prefill => Parallelism::Tp(8),
        _ => Parallelism::Ep(8),
    };
    let model = ModelProfile::builtin("deepseek-v4-pro").unwrap();
    let mut config = EngineConfig::new(role, model, Sku::Gb200, parallelism);
    config.time_scale = time_scale;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(engine::serve(config, listener, metrics, async move {
        let _ = stopped.await;
    }));
    let registration = register(registry, name, role, &endpoint);
    Worker {
        endpoint,
        _server: server,
        _stop: stop,
        _registration: registration,
    }
}

/// Registers a one-rank worker at `endpoint` until the sender drops.
fn register(registry: &Registry, name: &str, role: Role, endpoint: &str) -> oneshot::Sender<()> {
    let reg = Registration {
        registry: registry.clone(),
        rank: RankRecord {
            worker: WorkerId::new("llm", "dsv4", name),
            endpoint: RankEndpoint {
                rank: 0,
                node: "tray-0".into(),
                gpu_indices: vec![0, 1, 2, 3],
                grpc_endpoint: endpoint.into(),
                kv_endpoint: endpoint.into(),
            },
            generation: 1,
            world_size: 1,
        },
        role: match role {
            Role::Prefill => proto::types::Role::Prefill,
            Role::Decode => proto::types::Role::Decode,
            Role::Both => proto::types::Role::Both,
        },
        shape: Shape { tp: 1, ep: 8 },
        ttl: Duration::from_secs(2),
        interval: Duration::from_millis(200),
        timeout: T,
        tls: proto::tls::ClientTls::plaintext(),
    };
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(registration::run(reg, endpoint.to_string(), async move {
        let _ = rx.await;
    }));
    tx
}

fn request(id: &str, prompt: usize, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        model: MODEL.into(),
        prompt: (0..prompt as u32).map(|i| 100 + i % 1000).collect(),
        max_tokens,
        sampling: Sampling::default(),
    }
}

async fn running(endpoint: &str) -> u32 {
    let mut c = EngineServiceClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    s.load.unwrap().running
}

#[tokio::test]
async fn router_follows_the_registry_retries_and_reports_lost_streams() {
    let etcd = Etcd::start().await.unwrap();
    let registry = Registry::new(etcd.client().await.unwrap());
    let pool = Pool::new(T, proto::tls::ClientTls::plaintext());
    pool.follow(registry.clone(), "llm", "dsv4");
    let mut config = RouterConfig::new(MODEL);
    config.token_timeout = Duration::from_secs(2);
    let router = Router::new(pool.clone(), config);
    assert!(!router.ready(), "no workers yet");

    // A registered prefill worker whose process is gone (nothing listens),
    // named to sort first, then the real workers.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let _dead = register(&registry, "prefill-a", Role::Prefill, &dead);
    let prefill = worker(&registry, "prefill-b", Role::Prefill, 1000.0).await;
    // The decode worker is a real process, so that it can really die.
    let dir = harness::workdir::Workdir::new("frontend").unwrap();
    let args: Vec<String> = [
        "--insecure-plaintext",
        "--role=decode",
        "--ep=8",
        "--sku=gb200",
        "--time-scale=20",
        "--listen=127.0.0.1:0",
        &format!("--etcd-endpoints={}", etcd.endpoint()),
        "--namespace=llm",
        "--deployment=dsv4",
        "--worker=decode-0",
        "--lease-ttl-seconds=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut decode = harness::process::ManagedProcess::spawn(
        "decode-0",
        std::path::Path::new(env!("CARGO_BIN_EXE_rackscale-engine")),
        &args,
        dir.path(),
    )
    .unwrap();
    wait_until("three workers in the pool", T, || {
        let pool = pool.clone();
        async move { Ok(pool.len() == 3) }
    })
    .await
    .unwrap();
    assert!(router.ready());
    let decode_endpoint = pool
        .snapshot()
        .0
        .iter()
        .find(|m| m.name() == "decode-0")
        .and_then(|m| m.record.grpc_endpoint().map(str::to_string))
        .unwrap();

    // The dead prefill worker is tried first, fails, and the request is
    // served by the live one: prefill -> KV pull -> decode stream.
    let stream = router.generate(request("r1", 1000, 8)).await.unwrap();
    let events: Vec<_> = stream.collect().await;
    let tokens: usize = events
        .iter()
        .map(|e| match e {
            Ok(GenerateEvent::Tokens(t)) => t.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(tokens, 8, "{events:?}");
    assert_eq!(
        events.last().unwrap().clone().unwrap(),
        GenerateEvent::Finished {
            reason: FinishReason::Length,
            prompt_tokens: 1000,
            completion_tokens: 8
        }
    );
    assert_eq!(router.in_flight(), 0);

    // Wrong model and empty prompts are refused before any worker is used.
    let err = router
        .generate(GenerateRequest {
            model: "other".into(),
            ..request("r2", 10, 1)
        })
        .await
        .err()
        .unwrap();
    assert!(matches!(err, GenerateError::UnknownModel(_)), "{err}");

    // A client that goes away frees its decode slot on the worker.
    let mut stream = router.generate(request("r3", 100, 10_000)).await.unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(GenerateEvent::Tokens(_)))
    ));
    assert_eq!(running(&decode_endpoint).await, 1);
    drop(stream);
    wait_until("decode slot freed", T, || {
        let endpoint = decode_endpoint.clone();
        async move { Ok(running(&endpoint).await == 0) }
    })
    .await
    .unwrap();

    // The decode worker dies mid-stream: the stream ends with an error
    // event within the token deadline, never hangs.
    let mut stream = router.generate(request("r4", 100, 10_000)).await.unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(GenerateEvent::Tokens(_)))
    ));
    decode.kill().unwrap();
    let died = Instant::now();
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(GenerateEvent::Tokens(_)))) => continue,
            other => break other,
        }
    };
    match outcome {
        Ok(Some(Err(GenerateError::Failed(msg)))) => {
            assert!(msg.contains("decode-0"), "{msg}")
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    assert!(died.elapsed() < Duration::from_secs(3));
    assert!(stream.next().await.is_none(), "nothing after the error");
    drop(prefill);
}

/// `${RACKSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackscale}/venv/bin/python`.
fn venv_python() -> std::path::PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    var("RACKSCALE_CACHE")
        .unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .or_else(|| var("HOME").map(|h| h.join(".cache")))
                .unwrap_or_else(|| ".cache".into())
                .join("rackscale")
        })
        .join("venv/bin/python")
}

/// The `rackscale-engine --role frontend` process in front of a prefill and
/// a decode worker, driven by the real `openai` Python SDK: every request
/// goes prefill -> KV transfer -> decode and comes back OpenAI-shaped.
#[tokio::test]
async fn the_openai_sdk_talks_to_the_disaggregated_frontend() {
    let python = venv_python();
    if !python.is_file() {
        eprintln!(
            "SKIPPED: no Python venv at {}; run `scripts/setup.sh python`",
            python.display()
        );
        return;
    }
    let etcd = Etcd::start().await.unwrap();
    let registry = Registry::new(etcd.client().await.unwrap());
    let _prefill = worker(&registry, "prefill-0", Role::Prefill, 1000.0).await;
    let _decode = worker(&registry, "decode-0", Role::Decode, 1000.0).await;
    let dir = harness::workdir::Workdir::new("frontend-sdk").unwrap();
    let port = harness::process::free_port().unwrap();
    let args: Vec<String> = [
        "--insecure-plaintext",
        "--role=frontend",
        "--model=deepseek-v4-pro",
        &format!("--listen=127.0.0.1:{port}"),
        &format!("--etcd-endpoints={}", etcd.endpoint()),
        "--namespace=llm",
        "--deployment=dsv4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let frontend = harness::process::ManagedProcess::spawn(
        "frontend",
        std::path::Path::new(env!("CARGO_BIN_EXE_rackscale-engine")),
        &args,
        dir.path(),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_until("frontend ready", Duration::from_secs(20), || {
        let url = format!("{base}/ready");
        async move {
            let ok = tokio::process::Command::new(venv_python())
                .args([
                    "-c",
                    &format!(
                        "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('{url}').status == 200 else 1)"
                    ),
                ])
                .output()
                .await?
                .status
                .success();
            Ok(ok)
        }
    })
    .await
    .unwrap();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args([
            "--base-url",
            &format!("{base}/v1"),
            "--model",
            "deepseek-v4-pro",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "SDK against the frontend failed ({}):\n{stdout}\n{}\nfrontend log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        frontend.log_tail(20)
    );
}

/// POSTs `body` as JSON to `url`; the response with its body unread.
async fn post(url: &str, body: &serde_json::Value) -> http::Response<Body> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    client.request(request).await.unwrap().map(Body::new)
}

/// The status and body text of `url`'s answer to `body`.
async fn post_text(url: &str, body: &serde_json::Value) -> (http::StatusCode, String) {
    let response = post(url, body).await;
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// A pool of role-both workers is not split into prefill and decode: the
/// frontend forwards each request whole to the least-loaded worker's own
/// OpenAI API and relays its answer unchanged, skips a registered worker
/// that is gone, spreads open streams over the workers, and frees a
/// worker's slot when the client goes away.
#[tokio::test]
async fn an_aggregated_pool_gets_whole_requests_forwarded() {
    let etcd = Etcd::start().await.unwrap();
    let registry = Registry::new(etcd.client().await.unwrap());
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // Named to sort first: the first request is refused by it, then moved.
    let _dead = register(&registry, "both-a", Role::Both, &dead);
    let b = worker(&registry, "both-b", Role::Both, 1000.0).await;
    let c = worker(&registry, "both-c", Role::Both, 1000.0).await;
    let pool = Pool::new(T, proto::tls::ClientTls::plaintext());
    pool.follow(registry.clone(), "llm", "dsv4");
    wait_until("three workers in the pool", T, || {
        let pool = pool.clone();
        async move { Ok(pool.len() == 3) }
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let model = ModelProfile::builtin("deepseek-v4-pro").unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let frontend = tokio::spawn(engine::frontend::serve(
        listener,
        Router::new(pool.clone(), RouterConfig::new(model.name.clone())),
        std::sync::Arc::new(engine::openai::SimTokenizer::new(model.vocab)),
        engine::openai::Limits::default(),
        prometheus::Registry::new(),
        async move {
            let _ = stopped.await;
        },
    ));

    // A whole answer, as the worker itself gives it (the seed fixes the
    // tokens), then a streamed one.
    let request = serde_json::json!({
        "model": model.name, "prompt": [101, 102, 103, 104], "max_tokens": 8, "seed": 7,
    });
    let (status, via) = post_text(&format!("{base}/v1/completions"), &request).await;
    assert_eq!(status, http::StatusCode::OK, "{via}");
    let (_, direct) = post_text(&format!("{}/v1/completions", b.endpoint), &request).await;
    let choices =
        |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap()["choices"].clone();
    assert_eq!(choices(&via), choices(&direct));
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let (status, text) = post_text(&format!("{base}/v1/completions"), &streamed).await;
    assert_eq!(status, http::StatusCode::OK, "{text}");
    assert!(
        text.starts_with("data: {") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );

    // Two long streams land on different workers; dropping them frees both.
    streamed["max_tokens"] = 5000.into();
    let mut open = Vec::new();
    for _ in 0..2 {
        let response = post(&format!("{base}/v1/completions"), &streamed).await;
        assert_eq!(response.status(), http::StatusCode::OK);
        open.push(response);
    }
    assert_eq!(running(&b.endpoint).await, 1);
    assert_eq!(running(&c.endpoint).await, 1);
    drop(open);
    wait_until("both slots freed", T, || {
        let (b, c) = (b.endpoint.clone(), c.endpoint.clone());
        async move { Ok(running(&b).await + running(&c).await == 0) }
    })
    .await
    .unwrap();

    // The frontend counts what it forwarded.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let metrics = client
        .get(format!("{base}/metrics").parse().unwrap())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        metrics.contains(
            r#"rackscale_frontend_requests_total{endpoint="completions",outcome="ok"} 2"#
        ),
        "{metrics}"
    );
    let _ = stop.send(());
    frontend.await.unwrap().unwrap();
}
