//! A prefill server and a decode server in-process on port 0: KV really
//! crosses `PullKv`, decode streams `max_tokens` tokens at the modelled TPOT,
//! blocks are released, admission queues and refuses, and Drain waits.

use std::time::{Duration, Instant};

use engine::sim::SimBackend;
use engine::{EngineConfig, EngineMetrics, Role};
use perfmodel::{Calibration, ModelProfile, Parallelism, Sku};
use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const SCALE: f64 = 1000.0;

struct Worker {
    endpoint: String,
    metrics: EngineMetrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<engine::Result<()>>,
}

impl Worker {
    async fn start(role: Role, tweak: impl FnOnce(&mut EngineConfig)) -> anyhow::Result<Self> {
        let parallelism = if role == Role::Prefill {
            Parallelism::Tp(8)
        } else {
            Parallelism::Ep(8)
        };
        let model = ModelProfile::builtin("deepseek-v4-pro")?;
        let mut config = EngineConfig::new(role, model, Sku::Gb200, parallelism);
        config.time_scale = SCALE;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let metrics = EngineMetrics::register(&prometheus::Registry::new())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine::serve(
            config,
            listener,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            endpoint,
            metrics,
            stop: Some(stop),
            task,
        })
    }

    async fn client(&self) -> anyhow::Result<EngineServiceClient<Channel>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match EngineServiceClient::connect(self.endpoint.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    async fn status(&self) -> anyhow::Result<pb::EngineLoad> {
        let s = self.client().await?.status(pb::StatusRequest {}).await?;
        s.into_inner()
            .load
            .ok_or_else(|| anyhow::anyhow!("status without load"))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
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

fn model() -> ModelProfile {
    ModelProfile::builtin("deepseek-v4-pro").expect("model")
}

async fn prefill(w: &Worker, id: &str, prompt_len: u32) -> anyhow::Result<pb::KvHandle> {
    let reply = w
        .client()
        .await?
        .prefill(pb::PrefillRequest {
            request_id: id.into(),
            prompt: Some(pb::prefill_request::Prompt::PromptLength(prompt_len)),
            max_tokens: 0,
            sampling: None,
        })
        .await?;
    reply
        .into_inner()
        .kv
        .ok_or_else(|| anyhow::anyhow!("no handle"))
}

async fn decode(
    w: &Worker,
    id: &str,
    kv: pb::KvHandle,
    max_tokens: u32,
) -> Result<tonic::Streaming<pb::DecodeChunk>, tonic::Status> {
    let mut c = w
        .client()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(c.decode(pb::DecodeRequest {
        request_id: id.into(),
        kv: Some(kv),
        max_tokens,
        sampling: None,
    })
    .await?
    .into_inner())
}

async fn collect(mut s: tonic::Streaming<pb::DecodeChunk>) -> anyhow::Result<Vec<pb::DecodeChunk>> {
    let mut out = Vec::new();
    while let Some(c) = s.message().await? {
        out.push(c);
    }
    Ok(out)
}

async fn wait_until(
    w: &Worker,
    what: &str,
    cond: impl Fn(&pb::EngineLoad) -> bool,
) -> anyhow::Result<pb::EngineLoad> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let load = w.status().await?;
        if cond(&load) {
            return Ok(load);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {load:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn prefill_then_decode_moves_real_kv_and_streams_tokens() -> anyhow::Result<()> {
    let p = Worker::start(Role::Prefill, |_| {}).await?;
    let d = Worker::start(Role::Decode, |_| {}).await?;
    let prompt_len = 2000;
    let max_tokens = 32;

    let kv = prefill(&p, "r1", prompt_len).await?;
    let expected = model().attention.kv_bytes(f64::from(prompt_len)).ceil() as u64;
    assert_eq!(kv.bytes, expected);
    assert!(
        expected > 1 << 20,
        "KV should span several chunks: {expected}"
    );
    assert_eq!(kv.tokens, prompt_len);
    assert_eq!(kv.kv_endpoint, p.endpoint);

    let chunks = collect(decode(&d, "r1", kv.clone(), max_tokens).await?).await?;
    let tokens: Vec<u32> = chunks.iter().flat_map(|c| c.token_ids.clone()).collect();
    assert_eq!(tokens.len(), max_tokens as usize);
    assert_eq!(tokens[0], kv.first_token);
    let indices: Vec<u32> = chunks.iter().map(|c| c.index).collect();
    assert_eq!(indices, (0..max_tokens).collect::<Vec<_>>());
    assert_eq!(
        chunks.last().map(|c| c.finish_reason),
        Some(pb::FinishReason::Length as i32)
    );

    // The bytes really crossed the gRPC stream, once.
    assert_eq!(d.metrics.kv_received_bytes.get(), expected);
    assert_eq!(p.metrics.kv_sent_bytes.get(), expected);
    // The holder freed it after the pull.
    let again = decode(&d, "r1", kv, max_tokens).await;
    assert!(again.is_err(), "a second pull must fail");

    // Modelled TPOT is the perfmodel step time at batch 1.
    let load = wait_until(&d, "idle decode", |l| l.running == 0).await?;
    let sim = SimBackend::new(
        model(),
        Sku::Gb200,
        Parallelism::Ep(8),
        Calibration::fitted(),
        SCALE,
    );
    let step = sim.decode_step_seconds(&[prompt_len + max_tokens / 2]);
    assert!(
        (load.tpot_seconds - step).abs() / step < 0.02,
        "tpot {} vs step {step}",
        load.tpot_seconds
    );
    assert_eq!(load.kv_blocks_used, 0);
    assert!(load.kv_blocks_total > 0);

    let pl = p.status().await?;
    assert!(
        pl.ttft_seconds > 0.0 && pl.prefill_tokens_per_second > 0.0,
        "{pl:?}"
    );

    p.stop().await?;
    d.stop().await?;
    Ok(())
}

#[tokio::test]
async fn admission_queues_when_kv_blocks_are_exhausted() -> anyhow::Result<()> {
    let p = Worker::start(Role::Prefill, |_| {}).await?;
    // Room for exactly one 1000 + 400 token request (22 blocks of 64). At a
    // time scale of 10 a step takes about 2 ms of wall time, so `a`'s 400
    // steps outlast `b`'s arrival by far (the engine paces steps to their
    // modelled time exactly; timer rounding no longer stretches them).
    let d = Worker::start(Role::Decode, |c| {
        c.kv_blocks = Some(22);
        c.time_scale = 10.0;
    })
    .await?;
    let a = prefill(&p, "a", 1000).await?;
    let b = prefill(&p, "b", 1000).await?;
    let big = prefill(&p, "big", 1200).await?;

    let sa = decode(&d, "a", a, 400).await?;
    let sb = decode(&d, "b", b, 400).await?;
    let load = wait_until(&d, "one running, one queued", |l| {
        l.running == 1 && l.queue_depth == 1
    })
    .await?;
    assert_eq!(load.queue_depth, 1, "{load:?}");
    assert_eq!(load.kv_blocks_used, 22);

    let refused = decode(&d, "big", big, 400).await.err();
    assert_eq!(
        refused.map(|s| s.code()),
        Some(tonic::Code::ResourceExhausted)
    );
    // Refused before pulling: the prefill worker still holds its KV.
    assert_eq!(
        p.metrics.kv_sent_bytes.get(),
        d.metrics.kv_received_bytes.get()
    );

    let (ca, cb) = tokio::try_join!(collect(sa), collect(sb))?;
    assert_eq!(ca.iter().map(|c| c.token_ids.len()).sum::<usize>(), 400);
    assert_eq!(cb.iter().map(|c| c.token_ids.len()).sum::<usize>(), 400);
    let load = wait_until(&d, "empty", |l| l.running == 0 && l.queue_depth == 0).await?;
    assert_eq!(load.kv_blocks_used, 0);

    p.stop().await?;
    d.stop().await?;
    Ok(())
}

#[tokio::test]
async fn drain_waits_for_in_flight_decodes() -> anyhow::Result<()> {
    let both = Worker::start(Role::Both, |_| {}).await?;
    let kv = prefill(&both, "long", 500).await?;
    let mut stream = decode(&both, "long", kv, 200).await?;
    let first = stream.message().await?;
    assert!(first.is_some());

    let mut client = both.client().await?;
    let drain = tokio::spawn(async move {
        client
            .drain(pb::DrainRequest {
                timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
            })
            .await
    });
    let mut received = 1;
    while let Some(c) = stream.message().await? {
        received += c.token_ids.len();
        if received == 100 {
            assert!(
                !drain.is_finished(),
                "drain returned with a decode in flight"
            );
            // New work is refused while draining.
            let refused = both
                .client()
                .await?
                .prefill(pb::PrefillRequest {
                    request_id: "late".into(),
                    prompt: Some(pb::prefill_request::Prompt::PromptLength(10)),
                    max_tokens: 1,
                    sampling: None,
                })
                .await
                .err();
            assert_eq!(refused.map(|s| s.code()), Some(tonic::Code::Unavailable));
        }
    }
    assert_eq!(received, 200);
    let reply = drain.await??.into_inner();
    assert!(reply.drained);
    assert_eq!(reply.in_flight, 0);
    both.stop().await?;
    Ok(())
}

#[tokio::test]
async fn roles_refuse_calls_they_do_not_serve() -> anyhow::Result<()> {
    let p = Worker::start(Role::Prefill, |_| {}).await?;
    let kv = prefill(&p, "x", 100).await?;
    let refused = decode(&p, "x", kv, 4).await.err();
    assert_eq!(
        refused.map(|s| s.code()),
        Some(tonic::Code::FailedPrecondition)
    );
    p.stop().await?;
    Ok(())
}
