//! What probes, gateways and humans see on an engine's one port: the standard
//! gRPC health service (SERVING until the worker drains), gRPC reflection
//! (v1) listing exactly the served services, and `GET /metrics` whose vLLM
//! gauges follow the scheduler. Engines run in-process on `127.0.0.1:0`.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use engine::{EngineConfig, EngineMetrics, Role};
use harness::wait_for;
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use proto::pb::engine_service_client::EngineServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const WAIT: Duration = Duration::from_secs(10);
const ENGINE_SERVICE: &str = "rackscale.v1.EngineService";

/// One in-process engine on a loopback port 0, stopped (or aborted) at the end.
struct Worker {
    addr: std::net::SocketAddr,
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<engine::Result<()>>,
}

impl Worker {
    async fn start(tweak: impl FnOnce(&mut EngineConfig)) -> Result<Self> {
        let model = ModelProfile::builtin("deepseek-v4-pro")?;
        let mut config = EngineConfig::new(Role::Both, model, Sku::Gb200, Parallelism::Ep(8));
        config.time_scale = 1000.0;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let metrics = EngineMetrics::register(&prometheus::Registry::new())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine::serve(config, listener, metrics, async move {
            let _ = stopped.await;
        }));
        let endpoint = format!("http://{addr}");
        let channel = wait_for("the engine's gRPC port", WAIT, || {
            let endpoint = endpoint.clone();
            async move { Ok(Some(Channel::from_shared(endpoint)?.connect().await?)) }
        })
        .await?;
        Ok(Self {
            addr,
            channel,
            stop: Some(stop),
            task,
        })
    }

    fn engine(&self) -> EngineServiceClient<Channel> {
        EngineServiceClient::new(self.channel.clone())
    }

    async fn health(&self, service: &str) -> Result<ServingStatus> {
        let HealthCheckResponse { status } = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(status)?)
    }

    /// `GET path` over plain HTTP/1.1 on the gRPC port: (head, body).
    async fn get(&self, path: &str) -> Result<(String, String)> {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        let (head, body) = reply
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP header end in {reply:?}"))?;
        Ok((head.to_owned(), body.to_owned()))
    }

    /// `GET /metrics`; the body of a 200.
    async fn metrics(&self) -> Result<String> {
        let (head, body) = self.get("/metrics").await?;
        ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        ensure!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
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

/// The value of an unlabelled sample `name` in Prometheus text.
fn sample(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no sample {name} in:\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("sample {name}"))
}

/// The service names reflection lists.
async fn list_services(channel: Channel) -> Result<Vec<String>> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let reply = replies.message().await?.context("no reflection reply")?;
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => bail!("unexpected reflection reply {other:?}"),
    }
}

async fn prefill(w: &Worker, id: &str, prompt_len: u32) -> Result<pb::KvHandle> {
    w.engine()
        .prefill(pb::PrefillRequest {
            request_id: id.into(),
            prompt: Some(pb::prefill_request::Prompt::PromptLength(prompt_len)),
            max_tokens: 0,
            sampling: None,
        })
        .await?
        .into_inner()
        .kv
        .context("prefill without a KV handle")
}

async fn decode(
    w: &Worker,
    id: &str,
    kv: pb::KvHandle,
    max_tokens: u32,
) -> Result<tonic::Streaming<pb::DecodeChunk>> {
    Ok(w.engine()
        .decode(pb::DecodeRequest {
            request_id: id.into(),
            kv: Some(kv),
            max_tokens,
            sampling: None,
        })
        .await?
        .into_inner())
}

async fn drain(mut tokens: tonic::Streaming<pb::DecodeChunk>) -> Result<usize> {
    let mut n = 0;
    while let Some(chunk) = tokens.message().await? {
        n += chunk.token_ids.len();
    }
    Ok(n)
}

/// Waits until `/metrics` shows `want` for (waiting, running) and returns
/// the KV usage seen with them.
async fn wait_gauges(w: &Worker, want: (f64, f64)) -> Result<f64> {
    wait_for(
        format!("(waiting, running) = {want:?}"),
        WAIT,
        || async move {
            let text = w.metrics().await?;
            let seen = (
                sample(&text, "vllm:num_requests_waiting")?,
                sample(&text, "vllm:num_requests_running")?,
            );
            let usage = sample(&text, "vllm:kv_cache_usage_perc")?;
            Ok((seen == want).then_some(usage))
        },
    )
    .await
}

#[tokio::test]
async fn health_reflection_and_metrics_share_the_engine_port() -> Result<()> {
    let w = Worker::start(|_| {}).await?;

    assert_eq!(w.health(ENGINE_SERVICE).await?, ServingStatus::Serving);
    assert_eq!(w.health("").await?, ServingStatus::Serving);
    let unknown = w.health("rackscale.v1.AgentService").await.err();
    let code = unknown.and_then(|e| e.downcast::<tonic::Status>().ok().map(|s| s.code()));
    assert_eq!(code, Some(tonic::Code::NotFound));

    let mut services = list_services(w.channel.clone()).await?;
    services.sort();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            ENGINE_SERVICE,
        ]
    );

    let text = w.metrics().await?;
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ] {
        assert_eq!(sample(&text, name)?, 0.0, "{name} at rest");
    }
    // The data plane still works on the shared port.
    let status = w.engine().status(pb::StatusRequest {}).await?.into_inner();
    assert!(!status.draining);

    // Unrouted: UNIMPLEMENTED to gRPC, 404 to plain HTTP.
    let other = AgentServiceClient::new(w.channel.clone())
        .get_node(pb::GetNodeRequest {})
        .await
        .err();
    assert_eq!(other.map(|s| s.code()), Some(tonic::Code::Unimplemented));
    let (head, _) = w.get("/healthz").await?;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    w.stop().await
}

#[tokio::test]
async fn metrics_gauges_follow_the_scheduler() -> Result<()> {
    // A batch of one, so a second decode has to wait for the first; at a
    // time scale of 10 a step takes about 2 ms of wall time, so 500 steps
    // last long enough to be observed.
    let w = Worker::start(|c| {
        c.max_batch = Some(1);
        c.time_scale = 10.0;
    })
    .await?;
    let a = prefill(&w, "a", 200).await?;
    let b = prefill(&w, "b", 200).await?;

    let sa = decode(&w, "a", a, 500).await?;
    let sb = decode(&w, "b", b, 500).await?;
    let usage = wait_gauges(&w, (1.0, 1.0)).await?;
    assert!(usage > 0.0 && usage <= 1.0, "KV usage {usage}");

    let (na, nb) = tokio::try_join!(drain(sa), drain(sb))?;
    assert_eq!((na, nb), (500, 500));
    let usage = wait_gauges(&w, (0.0, 0.0)).await?;
    assert_eq!(usage, 0.0);

    w.stop().await
}

#[tokio::test]
async fn a_draining_engine_reports_not_serving() -> Result<()> {
    let w = Worker::start(|_| {}).await?;
    assert_eq!(w.health(ENGINE_SERVICE).await?, ServingStatus::Serving);

    let reply = w
        .engine()
        .drain(pb::DrainRequest { timeout: None })
        .await?
        .into_inner();
    assert!(reply.drained, "{reply:?}");

    let worker = &w;
    for service in [ENGINE_SERVICE, ""] {
        wait_for(format!("`{service}` NOT_SERVING"), WAIT, || async move {
            let status = worker.health(service).await?;
            Ok((status == ServingStatus::NotServing).then_some(()))
        })
        .await?;
    }
    // Metrics stay readable while draining.
    w.metrics().await?;

    w.stop().await
}
