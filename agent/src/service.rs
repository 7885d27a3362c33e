//! The `AgentService` gRPC server (plus the standard gRPC health service and
//! gRPC reflection, v1).
//!
//! A thin edge: requests are validated into domain types ([`crate::wire`]),
//! handed to the [`Node`]'s supervisor, and answers converted back. The server
//! takes a bound listener and a shutdown future so tests bind port 0.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use proto::pb;
use proto::pb::agent_service_server::{self, AgentService, AgentServiceServer};
use proto::tls::ServerTls;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tracing::instrument;

use crate::events::{Event, EventKind};
use crate::node::Node;
use crate::rank::{Phase, RankSpec};
use crate::wire;

/// Agent build version reported by `GetNode`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Grace period used when a `StopRank` request carries none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Serves `AgentService` for one [`Node`].
#[derive(Debug, Clone)]
pub struct AgentApi {
    node: Node,
    closing: watch::Receiver<bool>,
}

impl AgentApi {
    /// Wraps `node`; event streams end once `closing` turns true, so a
    /// graceful server shutdown is not held open by subscribers.
    pub fn new(node: Node, closing: watch::Receiver<bool>) -> Self {
        Self { node, closing }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AgentEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    #[instrument(skip_all, fields(rank))]
    async fn launch_rank(
        &self,
        request: Request<pb::LaunchRankRequest>,
    ) -> Result<Response<pb::LaunchRankResponse>, Status> {
        let wire = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let spec = RankSpec::try_from(wire)?;
        tracing::Span::current().record("rank", tracing::field::display(&spec.key));
        let status = self.node.supervisor().launch(spec)?;
        Ok(Response::new(pb::LaunchRankResponse {
            status: Some(status.into()),
        }))
    }

    #[instrument(skip_all)]
    async fn stop_rank(
        &self,
        request: Request<pb::StopRankRequest>,
    ) -> Result<Response<pb::StopRankResponse>, Status> {
        let request = request.into_inner();
        let (key, generation) = wire::rank_ref(request.rank)?;
        let grace = match request.grace_period {
            Some(d) => Duration::try_from(d)
                .map_err(|_| Status::invalid_argument("grace_period is negative"))?,
            None => DEFAULT_GRACE,
        };
        let status = self.node.supervisor().stop(&key, generation, grace).await?;
        Ok(Response::new(pb::StopRankResponse {
            status: Some(status.into()),
        }))
    }

    async fn list_ranks(
        &self,
        request: Request<pb::ListRanksRequest>,
    ) -> Result<Response<pb::ListRanksResponse>, Status> {
        let filter = request.into_inner();
        let ranks = self
            .node
            .supervisor()
            .list()
            .into_iter()
            .filter(|s| filter.namespace.is_empty() || s.key.worker.namespace == filter.namespace)
            .filter(|s| {
                filter.deployment.is_empty() || s.key.worker.deployment == filter.deployment
            })
            .map(Into::into)
            .collect();
        Ok(Response::new(pb::ListRanksResponse { ranks }))
    }

    type StreamEventsStream = EventStream;

    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        // Subscribe before taking the snapshot so nothing falls between them.
        let live = BroadcastStream::new(self.node.events().subscribe()).map(
            |item: Result<Event, BroadcastStreamRecvError>| match item {
                Ok(event) => Ok(pb::AgentEvent::from(event)),
                Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::data_loss(format!(
                    "subscriber lagged and lost {n} events"
                ))),
            },
        );
        let mut replay = Vec::new();
        if request.into_inner().replay_current {
            let at = SystemTime::now();
            let snapshot = |kind| {
                Ok(pb::AgentEvent::from(Event {
                    sequence: 0,
                    at,
                    kind,
                }))
            };
            for status in self.node.supervisor().list() {
                if status.phase == Phase::Running {
                    replay.push(snapshot(EventKind::RankStarted(status)));
                }
            }
            for gpu in self.node.gpus().snapshot() {
                let previous = gpu.health;
                replay.push(snapshot(EventKind::GpuHealth(crate::gpu::HealthChange {
                    gpu,
                    previous,
                })));
            }
        }
        let mut closing = self.closing.clone();
        let closed = async move {
            let _ = closing.wait_for(|c| *c).await;
        };
        Ok(Response::new(Box::pin(
            futures::stream::iter(replay).chain(live).take_until(closed),
        )))
    }

    async fn get_node(
        &self,
        _: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let identity = self.node.identity();
        Ok(Response::new(pb::NodeInfo {
            node: identity.node.clone(),
            sku: identity.sku.clone(),
            clique: identity.clique.clone(),
            gpus: self
                .node
                .gpus()
                .snapshot()
                .into_iter()
                .map(Into::into)
                .collect(),
            agent_version: AGENT_VERSION.to_owned(),
        }))
    }
}

/// Serves `AgentService`, `grpc.health.v1.Health` and reflection
/// (`grpc.reflection.v1.ServerReflection`) on `listener` until `shutdown`
/// completes; with `tls`, only to clients whose certificate its CA signed.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (closing_tx, closing) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<AgentApi>>()
        .await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_optional_service(reflection())
        .add_service(AgentServiceServer::new(AgentApi::new(node, closing)))
        .serve_with_incoming_shutdown(proto::tls::incoming(listener, tls), shutdown)
        .await
}

/// Reflection over exactly the services [`serve`] serves. It only helps
/// humans with `grpcurl`, so a (never expected) failure to build it from the
/// compiled-in descriptors is logged rather than fatal.
fn reflection() -> Option<ServerReflectionServer<impl ServerReflection>> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(agent_service_server::SERVICE_NAME)
        .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
        .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
        .build_v1()
        .inspect_err(|e| tracing::warn!(error = %e, "gRPC reflection disabled"))
        .ok()
}
