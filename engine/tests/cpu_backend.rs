//! The CPU reference backend through the engine's real data path: the same
//! prompts give the same greedy tokens on one aggregated worker (the OpenAI
//! API and its in-place generator), through the frontend's router (prefill
//! worker -> KV transfer -> decode worker), and with the decode worker's
//! routed experts sharded over EP = 1, 2 and 4 rank processes that find each
//! other through a real etcd, every link of that run (KV pull, expert
//! dispatch, the test's own calls) over mutual TLS; the KV bytes that cross
//! `PullKv` are exactly the model's KV accounting for the prompt.

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, StatusCode, header};
use engine::backend::Backend;
use engine::config::Budgets;
use engine::cpu::{ByteTokenizer, CpuBackend, ModelConfig};
use engine::frontend::pool::Pool;
use engine::frontend::{Router, RouterConfig};
use engine::generate::{GenerateEvent, GenerateRequest, Generator, Sampling};
use engine::openai::{Limits, LocalGenerator, Tokenizer};
use engine::scheduler::Scheduler;
use engine::{BackendConfig, CpuOptions, EngineConfig, EngineMetrics, EngineTls, Role};
use futures::StreamExt;
use harness::process::ManagedProcess;
use harness::{Etcd, wait_until};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::records::{RankEndpoint, WorkerRecord, WorkerState};
use proto::registry::Registry;
use proto::tls::ClientTls;
use proto::types::{Shape, WorkerId};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const SEED: u64 = 7;
const MAX_TOKENS: u32 = 12;
const MODEL: &str = "deepseek-v4-pro";
const WAIT: Duration = Duration::from_secs(30);

fn prompts() -> Vec<String> {
    vec![
        "The rack".into(),
        "Prefill computes the KV cache; decode pulls it and streams tokens.".into(),
        "Experts are sharded across ranks, ".repeat(8),
    ]
}

/// The model written once per test into its own directory.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    engine::cpu::write_model(dir.path(), SEED).unwrap();
    dir
}

fn cpu_config(role: Role, dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(
        role,
        ModelProfile::builtin(MODEL).unwrap(),
        Sku::Gb200,
        Parallelism::Tp(1),
    );
    c.backend = BackendConfig::Cpu(CpuOptions {
        model_dir: dir.to_path_buf(),
        ep_peers: Vec::new(),
    });
    c.max_context = 2048;
    c.isl = 1024;
    c
}

/// An in-process engine on loopback port 0.
struct Worker {
    endpoint: String,
    tls: ClientTls,
    metrics: EngineMetrics,
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<engine::Result<()>>,
}

impl Worker {
    async fn start(config: EngineConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!(
            "{}://{}",
            config.tls.scheme(),
            listener.local_addr().unwrap()
        );
        let tls = config.tls.client.clone();
        let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine::serve(
            config,
            listener,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let w = Self {
            endpoint,
            tls,
            metrics,
            _stop: stop,
            task,
        };
        w.client().await;
        w
    }

    async fn client(&self) -> EngineServiceClient<tonic::transport::Channel> {
        client(&self.endpoint, &self.tls).await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn client(endpoint: &str, tls: &ClientTls) -> EngineServiceClient<tonic::transport::Channel> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let endpoint_config = tls.endpoint(endpoint).unwrap();
    loop {
        match tls.channel(&endpoint_config).await {
            Ok(c) => return EngineServiceClient::new(c),
            Err(e) if tokio::time::Instant::now() > deadline => panic!("{endpoint}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn ids(text: &str) -> Vec<u32> {
    ByteTokenizer.encode(text)
}

fn record(name: &str, role: proto::types::Role, endpoint: &str) -> WorkerRecord {
    WorkerRecord {
        id: WorkerId::new("llm", "tiny", name),
        role,
        shape: Shape { tp: 1, ep: 1 },
        ranks: vec![RankEndpoint {
            rank: 0,
            node: "tray-0".into(),
            gpu_indices: vec![0],
            grpc_endpoint: endpoint.into(),
            kv_endpoint: endpoint.into(),
        }],
        state: WorkerState::Ready,
        generation: 1,
    }
}

fn request(id: &str, prompt: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        model: MODEL.into(),
        prompt: ids(prompt),
        max_tokens: MAX_TOKENS,
        sampling: Sampling::default(),
    }
}

/// The token ids of a generation stream (panics on an error event).
async fn tokens(generator: &dyn Generator, req: GenerateRequest) -> Vec<u32> {
    let stream = generator.generate(req).await.unwrap();
    let events: Vec<_> = stream.collect().await;
    events
        .into_iter()
        .flat_map(|e| match e.unwrap() {
            GenerateEvent::Tokens(t) => t,
            GenerateEvent::Finished { .. } => Vec::new(),
        })
        .collect()
}

/// Aggregated, in place: the worker's own generator over its scheduler.
async fn aggregated(dir: &Path) -> Vec<Vec<u32>> {
    let config = cpu_config(Role::Both, dir);
    let budgets: Budgets = config.validate().unwrap();
    let BackendConfig::Cpu(options) = &config.backend else {
        unreachable!()
    };
    let backend =
        Arc::new(CpuBackend::load(options, &ClientTls::plaintext()).unwrap()) as Arc<dyn Backend>;
    let scheduler = Scheduler::spawn(backend, budgets, EngineMetrics::unregistered().unwrap());
    let g = LocalGenerator::new(scheduler, budgets, MODEL, &Limits::for_context(2048));
    let mut out = Vec::new();
    for (i, p) in prompts().iter().enumerate() {
        out.push(tokens(&g, request(&format!("agg-{i}"), p)).await);
    }
    out
}

async fn post_completion(endpoint: &str, prompt: &str) -> Value {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS});
    let req = Request::post(format!("{endpoint}/v1/completions"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_and_disaggregated_workers_give_identical_tokens() {
    let dir = model_dir();
    let expected = aggregated(dir.path()).await;
    // Greedy decoding of different prompts goes different ways.
    assert_ne!(expected[0], expected[1]);
    assert!(expected.iter().all(|t| t.len() == MAX_TOKENS as usize));

    // The aggregated worker's OpenAI API says the same, as text.
    let both = Worker::start(cpu_config(Role::Both, dir.path())).await;
    for (p, want) in prompts().iter().zip(&expected) {
        let v = post_completion(&both.endpoint, p).await;
        assert_eq!(v["choices"][0]["text"], ByteTokenizer.decode(want), "{v}");
        assert_eq!(v["usage"]["completion_tokens"], MAX_TOKENS);
    }

    // Disaggregated through the frontend's router: prefill worker -> KV
    // transfer -> decode worker.
    let prefill = Worker::start(cpu_config(Role::Prefill, dir.path())).await;
    let decode = Worker::start(cpu_config(Role::Decode, dir.path())).await;
    let pool = Pool::new(Duration::from_secs(5), ClientTls::plaintext());
    pool.upsert(record(
        "prefill-0",
        proto::types::Role::Prefill,
        &prefill.endpoint,
    ));
    pool.upsert(record(
        "decode-0",
        proto::types::Role::Decode,
        &decode.endpoint,
    ));
    let router = Router::new(pool, RouterConfig::new(MODEL));
    let per_token = ModelConfig::small(SEED).kv_bytes_per_token();
    let mut moved = 0;
    for (i, (p, want)) in prompts().iter().zip(&expected).enumerate() {
        let got = tokens(&router, request(&format!("disagg-{i}"), p)).await;
        assert_eq!(&got, want, "prompt {i}");
        moved += ids(p).len() as u64 * per_token;
        // Exactly the model's KV for the prompt crossed PullKv, once.
        assert_eq!(decode.metrics.kv_received_bytes.get(), moved);
        assert_eq!(prefill.metrics.kv_sent_bytes.get(), moved);
    }

    // The handle itself states the model's accounting.
    let p = &prompts()[1];
    let kv = prefill
        .client()
        .await
        .prefill(pb::PrefillRequest {
            request_id: "acct".into(),
            prompt: Some(pb::prefill_request::Prompt::TokenIds(pb::TokenIds {
                ids: ids(p),
            })),
            max_tokens: 0,
            sampling: None,
        })
        .await
        .unwrap()
        .into_inner()
        .kv
        .unwrap();
    assert_eq!(kv.tokens as usize, p.len());
    assert_eq!(kv.bytes, p.len() as u64 * per_token);
    assert_eq!(kv.first_token, expected[1][0]);

    // A length-only prompt cannot be computed for real.
    let refused = prefill
        .client()
        .await
        .prefill(pb::PrefillRequest {
            request_id: "len".into(),
            prompt: Some(pb::prefill_request::Prompt::PromptLength(10)),
            max_tokens: 0,
            sampling: None,
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(refused, Some(tonic::Code::InvalidArgument));
}

/// A decode worker of `ranks` rank processes (rank 0 serves the worker;
/// ranks 1.. serve their experts), registered in `etcd`, with `tls` flags.
fn spawn_ranks(
    tls: &[String],
    etcd: &Etcd,
    model: &Path,
    logs: &Path,
    worker: &str,
    ranks: u32,
) -> Vec<ManagedProcess> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_rackscale-engine"));
    (0..ranks)
        .map(|rank| {
            let mut args: Vec<String> = tls.to_vec();
            args.extend([
                "--role=decode".into(),
                "--backend=cpu".into(),
                format!("--model-dir={}", model.display()),
                format!("--ep={ranks}"),
                format!("--rank={rank}"),
                format!("--world-size={ranks}"),
                "--max-context=2048".into(),
                "--isl=1024".into(),
                "--listen=127.0.0.1:0".into(),
                format!("--etcd-endpoints={}", etcd.endpoint()),
                "--namespace=llm".into(),
                "--deployment=tiny".into(),
                format!("--worker={worker}"),
                "--generation=1".into(),
                "--lease-ttl-seconds=2".into(),
            ]);
            ManagedProcess::spawn(&format!("{worker}-rank{rank}"), &bin, &args, logs).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_with_experts_over_1_2_and_4_rank_processes_gives_identical_tokens() {
    let dir = model_dir();
    let expected = aggregated(dir.path()).await;
    let etcd = Etcd::start().await.unwrap();
    let registry = Registry::connect(&[etcd.endpoint().to_string()], Duration::from_secs(5))
        .await
        .unwrap();
    let logs = harness::workdir::Workdir::new("cpu-ep").unwrap();
    // Every link of this run is mutual TLS under one CA.
    let pki = harness::pki::Pki::create(&logs.path().join("pki"), "cpu-ep CA").unwrap();
    let mut prefill_config = cpu_config(Role::Prefill, dir.path());
    prefill_config.tls = EngineTls::from_transport(&pki.transport("prefill").unwrap()).unwrap();
    let prefill = Worker::start(prefill_config).await;
    let rank_tls = pki.args("decode").unwrap();
    let test_tls = pki.transport("test").unwrap().client().unwrap();
    let per_token = ModelConfig::small(SEED).kv_bytes_per_token();
    for ranks in [1u32, 2, 4] {
        let worker = format!("decode-ep{ranks}");
        let mut procs = spawn_ranks(&rank_tls, &etcd, dir.path(), logs.path(), &worker, ranks);
        // Rank 0 publishes the worker once every rank has registered.
        let id = WorkerId::new("llm", "tiny", &worker);
        let reg = registry.clone();
        let formed = wait_until("the EP rank group to form", WAIT, || {
            let (reg, id) = (reg.clone(), id.clone());
            async move {
                let w = reg.get_worker(&id, Duration::from_secs(5)).await?;
                Ok(w.is_some_and(|w| w.ranks.len() == ranks as usize))
            }
        })
        .await;
        if let Err(e) = formed {
            let tails: Vec<String> = procs.iter().map(|p| p.log_tail(20)).collect();
            panic!("EP={ranks}: {e}\n{}", tails.join("\n---\n"));
        }
        let record = registry
            .get_worker(&id, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        let endpoint = record.grpc_endpoint().unwrap().to_string();
        assert!(endpoint.starts_with("https://"), "{endpoint}");
        let mut decode = client(&endpoint, &test_tls).await;
        for (i, (p, want)) in prompts().iter().zip(&expected).enumerate() {
            let request_id = format!("ep{ranks}-{i}");
            let kv = prefill
                .client()
                .await
                .prefill(pb::PrefillRequest {
                    request_id: request_id.clone(),
                    prompt: Some(pb::prefill_request::Prompt::TokenIds(pb::TokenIds {
                        ids: ids(p),
                    })),
                    max_tokens: 0,
                    sampling: None,
                })
                .await
                .unwrap()
                .into_inner()
                .kv
                .unwrap();
            assert_eq!(kv.bytes, p.len() as u64 * per_token);
            let mut stream = decode
                .decode(pb::DecodeRequest {
                    request_id,
                    kv: Some(kv),
                    max_tokens: MAX_TOKENS,
                    sampling: None,
                })
                .await
                .unwrap()
                .into_inner();
            let mut got = Vec::new();
            while let Some(chunk) = stream.message().await.unwrap() {
                got.extend(chunk.token_ids);
            }
            if &got != want {
                let tails: Vec<String> = procs.iter().map(|p| p.log_tail(20)).collect();
                panic!(
                    "EP={ranks}, prompt {i}: {got:?} != {want:?}\n{}",
                    tails.join("\n---\n")
                );
            }
        }
        for p in &mut procs {
            p.ensure_running().unwrap();
        }
    }
}
