//! A network cut between a prefill and a decode worker. The prefill
//! worker advertises its KV endpoint through a TCP proxy the test controls
//! (the frontend still reaches it directly), so cutting the proxy cuts
//! exactly the KV path. A cut that stalls the bytes (no reset, the harder
//! case) must end the request with a clear error within the router's token
//! deadline, leave nothing held on the decode worker, and the next request
//! after the link heals must succeed.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use engine::frontend::pool::Pool;
use engine::frontend::{Router, RouterConfig};
use engine::generate::{GenerateError, GenerateEvent, GenerateRequest, Generator, Sampling};
use engine::registration::{self, Registration};
use engine::{EngineConfig, EngineMetrics, Role};
use futures::StreamExt;
use harness::{Etcd, wait_until};
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::records::{RankEndpoint, RankRecord};
use proto::registry::Registry;
use proto::types::{Shape, WorkerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

const T: Duration = Duration::from_secs(5);
const MODEL: &str = "deepseek-ai/DeepSeek-V4-Pro";
/// The router's deadline between tokens (the first token waits on the pull).
const TOKEN_DEADLINE: Duration = Duration::from_secs(2);

/// A TCP proxy whose link can be stalled: while stalled, bytes already read
/// are held and nothing more is read, so both ends see a silent network
/// (no reset), as with a cable pulled between switches.
struct Proxy {
    addr: std::net::SocketAddr,
    stalled: watch::Sender<bool>,
    forwarded: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stalled, _) = watch::channel(false);
        let forwarded = Arc::new(AtomicU64::new(0));
        let (tx, counter) = (stalled.clone(), Arc::clone(&forwarded));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, tx.subscribe(), Arc::clone(&counter)));
                tokio::spawn(pipe(sr, cw, tx.subscribe(), Arc::clone(&counter)));
            }
        });
        Proxy {
            addr,
            stalled,
            forwarded,
        }
    }

    fn cut(&self, cut: bool) {
        self.stalled.send_replace(cut);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
    forwarded: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        // Hold the bytes while the link is cut.
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }
}

struct Worker {
    endpoint: String,
    _server: tokio::task::JoinHandle<engine::Result<()>>,
    _stop: oneshot::Sender<()>,
    _registration: oneshot::Sender<()>,
}

/// An in-process worker registered as `name`; `kv_via` is the address its
/// KV handles name instead of its own.
async fn worker(
    registry: &Registry,
    name: &str,
    role: Role,
    kv_via: Option<&Proxy>,
    upstream: Option<TcpListener>,
) -> Worker {
    let parallelism = match role {
        Role::Prefill => Parallelism::Tp(8),
        _ => Parallelism::Ep(8),
    };
    let model = ModelProfile::builtin("deepseek-v4-pro").unwrap();
    let mut config = EngineConfig::new(role, model, Sku::Gb200, parallelism);
    config.time_scale = 1000.0;
    let listener = match upstream {
        Some(l) => l,
        None => TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let kv_endpoint = kv_via.map_or_else(|| endpoint.clone(), |p| format!("http://{}", p.addr));
    config.advertise = Some(kv_endpoint.clone());
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(engine::serve(config, listener, metrics, async move {
        let _ = stopped.await;
    }));
    let reg = Registration {
        registry: registry.clone(),
        rank: RankRecord {
            worker: WorkerId::new("llm", "dsv4", name),
            endpoint: RankEndpoint {
                rank: 0,
                node: "tray-0".into(),
                gpu_indices: vec![0, 1, 2, 3],
                grpc_endpoint: endpoint.clone(),
                kv_endpoint,
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
    let (registration, rx) = oneshot::channel::<()>();
    tokio::spawn(registration::run(reg, endpoint.clone(), async move {
        let _ = rx.await;
    }));
    Worker {
        endpoint,
        _server: server,
        _stop: stop,
        _registration: registration,
    }
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

/// Tokens of a finished stream, or its error.
async fn run(router: &Router, id: &str) -> Result<usize, GenerateError> {
    let mut stream = router.generate(request(id, 4000, 8)).await?;
    let mut tokens = 0;
    while let Some(event) = stream.next().await {
        match event? {
            GenerateEvent::Tokens(t) => tokens += t.len(),
            GenerateEvent::Finished { .. } => {}
        }
    }
    Ok(tokens)
}

async fn load(endpoint: &str) -> pb::EngineLoad {
    let mut c = EngineServiceClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    s.load.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_kv_link_ends_the_request_clearly_and_heals() {
    let etcd = Etcd::start().await.unwrap();
    let registry = Registry::new(etcd.client().await.unwrap());
    let pool = Pool::new(T, proto::tls::ClientTls::plaintext());
    pool.follow(registry.clone(), "llm", "dsv4");
    let mut config = RouterConfig::new(MODEL);
    config.token_timeout = TOKEN_DEADLINE;
    let router = Router::new(pool.clone(), config);

    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(upstream.local_addr().unwrap()).await;
    let _prefill = worker(
        &registry,
        "prefill-0",
        Role::Prefill,
        Some(&proxy),
        Some(upstream),
    )
    .await;
    let decode = worker(&registry, "decode-0", Role::Decode, None, None).await;
    wait_until("both workers in the pool", T, || {
        let pool = pool.clone();
        async move { Ok(pool.len() == 2) }
    })
    .await
    .unwrap();

    // The link works: the KV crosses the proxy.
    assert_eq!(run(&router, "r1").await.unwrap(), 8);
    let crossed = proxy.forwarded.load(Ordering::Relaxed);
    assert!(
        crossed > 20 << 20,
        "4000 tokens of KV crossed the proxy: {crossed} bytes"
    );

    // Cut: the prefill succeeds (direct), the pull stalls, and the router
    // ends the request with an error naming the decode worker within its
    // deadline, instead of hanging.
    proxy.cut(true);
    let cut = Instant::now();
    let err = run(&router, "r2").await.unwrap_err();
    let took = cut.elapsed();
    // The pull is part of starting the decode: the router gives up on the
    // decode worker (a 503 to an HTTP client), naming it.
    assert!(
        matches!(&err, GenerateError::Unavailable(m) | GenerateError::Failed(m) if m.contains("decode-0")),
        "{err}"
    );
    assert!(
        took < TOKEN_DEADLINE + Duration::from_secs(3),
        "the error came after {took:?}"
    );
    assert_eq!(router.in_flight(), 0);
    // Nothing stays held on the decode worker: the abandoned pull is
    // cancelled with its call.
    wait_until("decode worker idle", T, || {
        let endpoint = decode.endpoint.clone();
        async move {
            let l = load(&endpoint).await;
            Ok(l.running == 0 && l.queue_depth == 0 && l.kv_blocks_used == 0)
        }
    })
    .await
    .unwrap();

    // Healed: the next request goes through.
    proxy.cut(false);
    assert_eq!(run(&router, "r3").await.unwrap(), 8);
}
