//! The `EngineService` gRPC edge: converts wire types to scheduler commands,
//! holds prefilled KV for pulling, pulls KV before decoding, and drains.
//!
//! Invariants: proto types stop here; every Prefill/Decode call counts as in
//! flight until its reply (or its token stream) ends, which is what Drain
//! waits for.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::pb::engine_service_server::{EngineService, EngineServiceServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::config::{Budgets, EngineConfig, Role};
use crate::error::{Error, Result};
use crate::kv::KvStore;
use crate::metrics::EngineMetrics;
use crate::scheduler::{DecodeJob, Finish, Scheduler};
use crate::sim::{self, SimBackend};

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
    sim: Arc<SimBackend>,
    scheduler: Scheduler,
    budgets: Budgets,
    kv: Arc<KvStore>,
    metrics: EngineMetrics,
    endpoint: String,
    draining: AtomicBool,
    in_flight: InFlight,
}

impl Engine {
    /// Validates `config` and starts the scheduler; `endpoint` is what
    /// handles advertise for `PullKv`.
    pub fn new(config: EngineConfig, endpoint: String, metrics: EngineMetrics) -> Result<Self> {
        let budgets = config.validate()?;
        let sim = Arc::new(SimBackend::new(
            config.model.clone(),
            config.sku,
            config.parallelism,
            config.calibration,
            config.time_scale,
        ));
        let scheduler = Scheduler::spawn(Arc::clone(&sim), budgets, metrics.clone());
        Ok(Self {
            kv: Arc::new(KvStore::new(config.kv_ttl)),
            config,
            sim,
            scheduler,
            budgets,
            metrics,
            endpoint,
            draining: AtomicBool::new(false),
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
        if self.draining.load(Ordering::SeqCst) {
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
        let prompt_len = match req.prompt {
            Some(pb::prefill_request::Prompt::TokenIds(t)) => t.ids.len() as u32,
            Some(pb::prefill_request::Prompt::PromptLength(n)) => n,
            None => 0,
        };
        if prompt_len == 0 {
            return Err(Error::InvalidRequest("empty prompt".into()));
        }
        let done = self
            .scheduler
            .prefill(req.request_id.clone(), prompt_len)
            .await?;
        let bytes = self.sim.kv_bytes(prompt_len);
        let id = self.kv.next_id(&req.request_id);
        let fill_id = id.clone();
        let data = tokio::task::spawn_blocking(move || sim::fill_kv(&fill_id, bytes))
            .await
            .map_err(|e| Error::Config(format!("KV fill task failed: {e}")))?;
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

    /// Pulls the KV named by `handle` and checks its size and checksum.
    async fn pull(&self, handle: &pb::KvHandle) -> Result<u64> {
        let mut client = EngineServiceClient::connect(handle.kv_endpoint.clone())
            .await
            .map_err(|e| Error::KvTransfer(format!("connect {}: {e}", handle.kv_endpoint)))?
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut stream = client
            .pull_kv(pb::PullKvRequest {
                kv_id: handle.id.clone(),
                max_chunk_bytes: self.config.kv_chunk_bytes,
            })
            .await
            .map_err(|s| Error::KvTransfer(s.message().to_string()))?
            .into_inner();
        let mut data = Vec::with_capacity(handle.bytes as usize);
        let mut last = false;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| Error::KvTransfer(s.message().to_string()))?
        {
            if chunk.offset != data.len() as u64 || last {
                return Err(Error::KvCorrupt(format!(
                    "chunk at offset {} after {} bytes",
                    chunk.offset,
                    data.len()
                )));
            }
            self.metrics
                .kv_received_bytes
                .inc_by(chunk.data.len() as u64);
            data.extend_from_slice(&chunk.data);
            last = chunk.last;
        }
        let got = data.len() as u64;
        if !last || got != handle.bytes {
            return Err(Error::KvCorrupt(format!(
                "received {got} of {} bytes",
                handle.bytes
            )));
        }
        let id = handle.id.clone();
        let ok = tokio::task::spawn_blocking(move || {
            sim::checksum(&data) == sim::expected_checksum(&id, got)
        })
        .await
        .map_err(|e| Error::KvTransfer(format!("checksum task failed: {e}")))?;
        if !ok {
            return Err(Error::KvCorrupt("checksum mismatch".into()));
        }
        Ok(got)
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
        let bytes = self.pull(&handle).await?;
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
        self.draining.store(true, Ordering::SeqCst);
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
        Ok(pb::DrainResponse {
            drained: drained || in_flight == 0,
            in_flight,
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
            draining: self.draining.load(Ordering::SeqCst),
            load: Some(pb::EngineLoad {
                queue_depth: load.queue_depth,
                running: load.running,
                kv_blocks_used: load.kv_blocks_used,
                kv_blocks_total: load.kv_blocks_total,
                ttft_seconds: load.ttft_seconds,
                tpot_seconds: load.tpot_seconds,
                prefill_tokens_per_second: load.prefill_tokens_per_second,
            }),
            generation: self.config.generation,
        })
    }
}

type KvChunkStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::KvChunk, Status>>>;

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

    type PullKvStream = KvChunkStream;

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
        let mut chunks: Vec<_> = data
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                Ok(pb::KvChunk {
                    offset: (i * chunk) as u64,
                    data: c.to_vec(),
                    last: (i * chunk + c.len()) == len,
                })
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(Ok(pb::KvChunk {
                offset: 0,
                data: Vec::new(),
                last: true,
            }));
        }
        self.metrics.kv_sent_bytes.inc_by(len as u64);
        Ok(Response::new(tokio_stream::iter(chunks)))
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

/// Serves `EngineService` for `config` on `listener` until `shutdown`
/// resolves. Metrics go into `metrics` (see [`EngineMetrics::register`]).
pub async fn serve(
    config: EngineConfig,
    listener: TcpListener,
    metrics: EngineMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let endpoint = match &config.advertise {
        Some(a) => a.clone(),
        None => format!("http://{}", listener.local_addr()?),
    };
    let engine = Arc::new(Engine::new(config, endpoint, metrics)?);
    let kv = Arc::clone(&engine.kv);
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(KV_SWEEP);
        loop {
            tick.tick().await;
            kv.purge_expired();
        }
    });
    let service = EngineServiceServer::from_arc(engine)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    sweeper.abort();
    Ok(served?)
}
