//! The `EngineService` gRPC edge: converts wire types to scheduler commands,
//! holds prefilled KV for pulling, pulls KV before decoding, and drains.
//! [`serve`] puts it on one port next to the gRPC health and reflection
//! services, `GET /metrics` and the OpenAI API ([`crate::openai`]; a worker
//! of role `both` answers it in place, other roles with 503).
//!
//! Invariants: proto types stop here; every Prefill/Decode call counts as in
//! flight until its reply (or its token stream) ends, which is what Drain
//! waits for; health reports SERVING until the worker drains or shuts down,
//! then NOT_SERVING.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use proto::pb;
use proto::pb::engine_service_server::{self, EngineService, EngineServiceServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

use crate::backend::{Backend, Prompt};
use crate::config::{BackendConfig, Budgets, EngineConfig, Role};
use crate::error::{Error, Result};
use crate::generate::GenerateError;
use crate::kv::KvStore;
use crate::metrics::EngineMetrics;
use crate::openai::local::{Admission, AdmissionGuard};
use crate::openai::{self, Limits, LocalGenerator, OpenAiMetrics};
use crate::scheduler::{DecodeJob, Finish, Scheduler};
use crate::sim::SimBackend;

/// Largest gRPC message accepted (KV chunks are at most a few MiB).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// How often unpulled, expired KV is freed.
const KV_SWEEP: Duration = Duration::from_secs(1);

/// Counts in-flight calls; [`InFlightGuard`] decrements on drop.
#[derive(Debug, Clone)]
struct InFlight(Arc<watch::Sender<u32>>);

#[derive(Debug)]
struct InFlightGuard(Arc<watch::Sender<u32>>);

impl InFlight {
    fn enter(&self) -> InFlightGuard {
        self.0.send_modify(|n| *n += 1);
        InFlightGuard(Arc::clone(&self.0))
    }
    fn count(&self) -> u32 {
        *self.0.borrow()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// One worker's `EngineService`.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    backend: Arc<dyn Backend>,
    scheduler: Scheduler,
    budgets: Budgets,
    kv: Arc<KvStore>,
    metrics: EngineMetrics,
    endpoint: String,
    /// Turns true once on Drain or shutdown; never back.
    draining: watch::Sender<bool>,
    in_flight: InFlight,
}

impl Engine {
    /// Validates `config` and starts the scheduler; `endpoint` is what
    /// handles advertise for `PullKv`.
    pub fn new(config: EngineConfig, endpoint: String, metrics: EngineMetrics) -> Result<Self> {
        let budgets = config.validate()?;
        let backend: Arc<dyn Backend> = match &config.backend {
            BackendConfig::Sim => Arc::new(SimBackend::new(
                config.model.clone(),
                config.sku,
                config.parallelism,
                config.calibration,
                config.time_scale,
            )),
            BackendConfig::Cpu(options) => {
                Arc::new(crate::cpu::CpuBackend::load(options, &config.tls.client)?)
            }
        };
        let scheduler = Scheduler::spawn(Arc::clone(&backend), budgets, metrics.clone());
        Ok(Self {
            kv: Arc::new(KvStore::new(config.kv_ttl)),
            config,
            backend,
            scheduler,
            budgets,
            metrics,
            endpoint,
            draining: watch::channel(false).0,
            in_flight: InFlight(Arc::new(watch::channel(0).0)),
        })
    }

    fn admit(&self, call: &'static str, allowed: bool) -> Result<InFlightGuard> {
        if !allowed {
            return Err(Error::WrongRole {
                role: self.config.role.as_str(),
                call,
            });
        }
        if *self.draining.borrow() {
            return Err(Error::Draining);
        }
        Ok(self.in_flight.enter())
    }

    fn worker_id(&self) -> pb::WorkerId {
        let w = &self.config.worker;
        pb::WorkerId {
            namespace: w.namespace.clone(),
            deployment: w.deployment.clone(),
            worker: w.worker.clone(),
        }
    }

    async fn do_prefill(&self, req: pb::PrefillRequest) -> Result<pb::KvHandle> {
        let _guard = self.admit("Prefill", self.config.role.prefills())?;
        let prompt = match req.prompt {
            Some(pb::prefill_request::Prompt::TokenIds(t)) => Prompt::Tokens(t.ids),
            Some(pb::prefill_request::Prompt::PromptLength(n)) => Prompt::Length(n),
            None => Prompt::Length(0),
        };
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("empty prompt".into()));
        }
        let prompt_len = prompt.len();
        let done = self
            .scheduler
            .prefill(req.request_id.clone(), prompt)
            .await?;
        // The fixed per-request latency outside model steps (routing,
        // tokenising, KV handshake, first-token path) that perfmodel's
        // calibration carries: modelled here too, off the GPU (the scheduler
        // is free meanwhile), so measured TTFT and the decode batch match
        // what perfmodel predicts for the same recipe. Zero for the CPU
        // backend, whose every step is real.
        let overhead = self.backend.request_overhead();
        if !overhead.is_zero() {
            tokio::time::sleep(overhead).await;
        }
        let bytes = self.backend.kv_bytes(prompt_len);
        let id = self.kv.next_id(&req.request_id);
        let (backend, export_id, cache) = (Arc::clone(&self.backend), id.clone(), done.kv);
        let data =
            tokio::task::spawn_blocking(move || backend.export_kv(&export_id, prompt_len, cache))
                .await
                .map_err(|e| Error::Config(format!("KV export task failed: {e}")))??;
        if data.len() as u64 != bytes {
            return Err(Error::KvCorrupt(format!(
                "exported {} KV bytes for {prompt_len} tokens; the model accounts {bytes}",
                data.len()
            )));
        }
        let expires = self.kv.insert(id.clone(), data);
        tracing::debug!(request_id = %req.request_id, kv_id = %id, bytes, ttft = done.ttft_seconds, "prefilled");
        Ok(pb::KvHandle {
            id,
            prefill_worker: Some(self.worker_id()),
            kv_endpoint: self.endpoint.clone(),
            bytes,
            tokens: prompt_len,
            first_token: done.first_token,
            expires_at: Some(prost_types::Timestamp::from(expires)),
        })
    }

    /// Pulls the KV named by `handle`, checks its size, and has the
    /// backend turn it into the cache the decode continues from.
    async fn pull(&self, handle: &pb::KvHandle) -> Result<(u64, crate::backend::KvCache)> {
        let data = crate::kv::receive(
            handle,
            self.config.kv_chunk_bytes,
            &self.metrics.kv_received_bytes,
            &self.config.tls.client,
        )
        .await?;
        let expected = self.backend.kv_bytes(handle.tokens);
        if data.len() as u64 != expected {
            return Err(Error::KvCorrupt(format!(
                "{} KV bytes for {} tokens; the model accounts {expected}",
                data.len(),
                handle.tokens
            )));
        }
        let bytes = data.len() as u64;
        let (backend, id, tokens) = (Arc::clone(&self.backend), handle.id.clone(), handle.tokens);
        let kv = tokio::task::spawn_blocking(move || backend.import_kv(&id, tokens, data))
            .await
            .map_err(|e| Error::KvTransfer(format!("KV import task failed: {e}")))??;
        Ok((bytes, kv))
    }

    async fn do_decode(
        &self,
        req: pb::DecodeRequest,
    ) -> Result<ReceiverStream<Result<pb::DecodeChunk, Status>>> {
        let guard = self.admit("Decode", self.config.role.decodes())?;
        let handle = req
            .kv
            .ok_or_else(|| Error::InvalidRequest("missing KV handle".into()))?;
        if req.max_tokens == 0 {
            return Err(Error::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        // Refuse what can never fit before pulling: a pull frees the KV on
        // the holder, so a refusal after it would lose the prefill.
        let need = u64::from(handle.tokens.saturating_add(req.max_tokens))
            .div_ceil(u64::from(self.budgets.block_tokens));
        if need > self.budgets.kv_blocks {
            return Err(Error::Capacity(format!(
                "needs {need} KV blocks; the worker has {}",
                self.budgets.kv_blocks
            )));
        }
        let (bytes, kv) = self.pull(&handle).await?;
        tracing::debug!(request_id = %req.request_id, kv_id = %handle.id, bytes, "KV pulled");
        let first = pb::DecodeChunk {
            token_ids: vec![handle.first_token],
            index: 0,
            finish_reason: if req.max_tokens == 1 {
                pb::FinishReason::Length as i32
            } else {
                pb::FinishReason::Unspecified as i32
            },
        };
        let events = if req.max_tokens > 1 {
            Some(
                self.scheduler
                    .decode(DecodeJob {
                        request_id: req.request_id.clone(),
                        prompt_len: handle.tokens,
                        max_tokens: req.max_tokens,
                        first_token: handle.first_token,
                        kv,
                    })
                    .await?,
            )
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _guard = guard;
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let Some(mut events) = events else { return };
            while let Some(e) = events.recv().await {
                let chunk = pb::DecodeChunk {
                    token_ids: e.token.into_iter().collect(),
                    index: e.index,
                    finish_reason: match e.finish {
                        None => pb::FinishReason::Unspecified,
                        Some(Finish::Length) => pb::FinishReason::Length,
                        Some(Finish::Cancelled) => pb::FinishReason::Cancelled,
                    } as i32,
                };
                // A gone client drops `events`, which cancels the request.
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    async fn do_drain(&self, req: pb::DrainRequest) -> Result<pb::DrainResponse> {
        self.draining.send_replace(true);
        let timeout = req
            .timeout
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or_default();
        let mut rx = self.in_flight.0.subscribe();
        let drained = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok());
        let in_flight = self.in_flight.count();
        if !drained && !timeout.is_zero() {
            self.scheduler.cancel_all().await?;
        }
        self.kv.purge_expired();
        Ok(pb::DrainResponse {
            drained: drained || in_flight == 0,
            in_flight,
            kv_held: self.kv.held().0 as u32,
        })
    }

    async fn do_status(&self) -> Result<pb::EngineStatus> {
        let load = self.scheduler.load().await?;
        self.kv.purge_expired();
        Ok(pb::EngineStatus {
            worker: Some(self.worker_id()),
            role: match self.config.role {
                Role::Prefill => pb::Role::Prefill,
                Role::Decode => pb::Role::Decode,
                Role::Both => pb::Role::Both,
            } as i32,
            draining: *self.draining.borrow(),
            load: Some(pb::EngineLoad {
                queue_depth: load.queue_depth,
                running: load.running,
                kv_blocks_used: load.kv_blocks_used,
                kv_blocks_total: load.kv_blocks_total,
                ttft_seconds: load.ttft_seconds,
                tpot_seconds: load.tpot_seconds,
                prefill_tokens_per_second: load.prefill_tokens_per_second,
                prefills_total: load.totals.prefills,
                prompt_tokens_total: load.totals.prompt_tokens,
                decodes_total: load.totals.decodes,
                requested_output_tokens_total: load.totals.requested_output_tokens,
                kv_held: self.kv.held().0 as u32,
            }),
            generation: self.config.generation,
        })
    }
}

#[tonic::async_trait]
impl EngineService for Engine {
    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let kv = self.do_prefill(request.into_inner()).await?;
        Ok(Response::new(pb::PrefillResponse { kv: Some(kv) }))
    }

    type DecodeStream = ReceiverStream<Result<pb::DecodeChunk, Status>>;

    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        Ok(Response::new(self.do_decode(request.into_inner()).await?))
    }

    type PullKvStream = crate::kv::KvChunks;

    #[tracing::instrument(skip_all, fields(kv_id = %request.get_ref().kv_id))]
    async fn pull_kv(
        &self,
        request: Request<pb::PullKvRequest>,
    ) -> Result<Response<Self::PullKvStream>, Status> {
        let req = request.into_inner();
        if !self.config.role.prefills() {
            return Err(Error::WrongRole {
                role: self.config.role.as_str(),
                call: "PullKv",
            }
            .into());
        }
        let data = self
            .kv
            .get(&req.kv_id)
            .ok_or_else(|| Error::UnknownKv(req.kv_id.clone()))?;
        // The holder frees the KV once the stream is handed over; a puller
        // that fails mid-stream asks the prefill worker again.
        self.kv.remove(&req.kv_id);
        let chunk = match req.max_chunk_bytes {
            0 => self.config.kv_chunk_bytes,
            n => n.min(self.config.kv_chunk_bytes),
        } as usize;
        let len = data.len();
        self.metrics.kv_sent_bytes.inc_by(len as u64);
        Ok(Response::new(crate::kv::KvChunks::new(data, chunk)))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(self.do_drain(request.into_inner()).await?))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        Ok(Response::new(self.do_status().await?))
    }
}

/// OpenAI requests on this worker: role `both` only (disaggregated pools
/// are reached through the frontend), none once draining; the guard counts
/// the request in flight, so Drain waits for it.
impl Admission for Engine {
    fn admit(&self) -> Result<AdmissionGuard, GenerateError> {
        match self.admit("the OpenAI API", self.config.role == Role::Both) {
            Ok(guard) => Ok(Box::new(guard)),
            Err(e) => Err(GenerateError::Unavailable(e.to_string())),
        }
    }

    fn ready(&self) -> bool {
        self.config.role == Role::Both && !*self.draining.borrow()
    }
}

/// The OpenAI API over this worker in aggregated mode, its metrics in the
/// registry `/metrics` renders.
fn openai_api(engine: &Arc<Engine>, metrics: &EngineMetrics) -> Result<axum::Router> {
    let config = &engine.config;
    let limits = Limits {
        max_queue: u32::try_from(config.max_waiting).unwrap_or(u32::MAX),
        ..Limits::for_context(config.max_context)
    };
    let generator = LocalGenerator::new(
        engine.scheduler.clone(),
        engine.budgets,
        config.model.name.clone(),
        &limits,
    )
    .with_admission(Arc::clone(engine) as Arc<dyn Admission>);
    let tokenizer = engine.backend.tokenizer();
    let api_metrics = OpenAiMetrics::register(metrics.registry())?;
    Ok(openai::router(
        Arc::new(generator),
        tokenizer,
        limits,
        api_metrics,
    ))
}

/// Serves, on `listener` until `shutdown` resolves: `EngineService` for
/// `config`; the gRPC health service (`grpc.health.v1.Health`, SERVING for
/// `rackscale.v1.EngineService` and for the server as a whole until the
/// worker drains or shuts down); gRPC reflection (v1); and `GET /metrics`,
/// the registry `metrics` was registered into (see
/// [`EngineMetrics::register`]) in the Prometheus text format; and the
/// OpenAI API ([`openai::router`] over a [`LocalGenerator`]). gRPC (h2)
/// and HTTP/1.1 share the port; with `config.tls.server` every connection
/// is mutual TLS (ALPN `h2` or `http/1.1`), plaintext (h2c) otherwise.
pub async fn serve(
    config: EngineConfig,
    listener: TcpListener,
    metrics: EngineMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let endpoint = match &config.advertise {
        Some(a) => a.clone(),
        None => format!("{}://{}", config.tls.scheme(), listener.local_addr()?),
    };
    let incoming = Connections(proto::tls::incoming(listener, config.tls.server.clone()));
    let engine = Arc::new(Engine::new(config, endpoint, metrics.clone())?);
    let kv = Arc::clone(&engine.kv);
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(KV_SWEEP);
        loop {
            tick.tick().await;
            kv.purge_expired();
        }
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EngineServiceServer<Engine>>().await;
    let reporter = tokio::spawn(report_draining(engine.draining.subscribe(), health));
    let service = EngineServiceServer::from_arc(Arc::clone(&engine))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let grpc = Routes::new(service)
        .add_service(health_service)
        .add_service(reflection()?)
        .into_axum_router();
    let api = openai_api(&engine, &metrics)?;
    let http = axum::Router::new()
        .route("/metrics", axum::routing::get(render_metrics))
        .with_state(metrics)
        .merge(api);
    // Refuse new calls as soon as shutdown starts; health follows.
    let shutdown = async move {
        shutdown.await;
        engine.draining.send_replace(true);
    };
    // `incoming` sets TCP_NODELAY: decode streams small messages.
    let served = axum::serve(incoming, grpc.merge(http).fallback(unknown_path))
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    reporter.abort();
    Ok(served?)
}

/// The port's connections (plaintext, or mutual TLS with the handshake
/// done) as axum's listener.
struct Connections(proto::tls::Incoming);

impl axum::serve::Listener for Connections {
    type Io = proto::tls::ServerIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.next_connection().await {
                Some(io) => match io.peer_addr() {
                    Ok(addr) => return (io, addr),
                    Err(e) => tracing::debug!(error = %e, "connection gone before serving"),
                },
                // The accept task ends only with the listener; never serve again.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0
            .local_addr()
            .ok_or_else(|| std::io::Error::other("listener address unknown"))
    }
}

/// Reports NOT_SERVING, for `EngineService` and the server as a whole, once
/// `draining` turns true.
async fn report_draining(mut draining: watch::Receiver<bool>, health: HealthReporter) {
    if draining.wait_for(|d| *d).await.is_ok() {
        health
            .set_not_serving::<EngineServiceServer<Engine>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
}

/// Reflection (v1) over exactly the services [`serve`] serves.
fn reflection() -> Result<ServerReflectionServer<impl ServerReflection>> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(engine_service_server::SERVICE_NAME)
        .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
        .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
        .build_v1()
        .map_err(|e| Error::Config(format!("gRPC reflection descriptors: {e}")))
}

/// Anything unrouted: UNIMPLEMENTED to gRPC callers, 404 to plain HTTP ones
/// (tonic's own fallback answers HTTP 200 with a gRPC status to both).
async fn unknown_path(request: axum::extract::Request) -> HttpResponse {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        Status::unimplemented(format!("no method {}", request.uri().path())).into_http()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

/// `GET /metrics`.
async fn render_metrics(State(metrics): State<EngineMetrics>) -> HttpResponse {
    match metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
