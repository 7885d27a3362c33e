//! The seam between the live rebalancer and the engines it moves.
//!
//! The rebalancer reads each worker's load reports and drains the workers
//! it moves; an [`EngineControl`] does both. [`GrpcEngines`] reads the
//! reports from the etcd registry (`load/{namespace}/{deployment}/`) and
//! calls `EngineService.Drain` on the worker's rank 0, found through its
//! worker record. Tests use in-process fakes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::registry::Registry;
use proto::tls::ClientTls;
use proto::types::WorkerId;

use crate::agent::BoxFuture;
use crate::rebalance::live::LoadSample;

/// Where one worker's drain stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainState {
    /// Nothing in flight and no KV waiting to be pulled: it can stop.
    Drained,
    /// Still finishing work.
    Busy { in_flight: u32, kv_held: u32 },
    /// Not registered (it stopped, or never formed): nothing to wait for.
    Gone,
    /// Could not be asked (a transient failure; ask again).
    Unreachable(String),
}

/// Reads engines' load and drains them.
pub trait EngineControl: Send + Sync {
    /// The latest load report of every worker of `deployment`
    /// (`namespace/name`), by worker name.
    fn loads(
        &self,
        deployment: &str,
    ) -> BoxFuture<'_, Result<BTreeMap<String, LoadSample>, String>>;
    /// Asks `worker` to drain: it takes no new work from now on. With
    /// `cancel_after`, in-flight work still running after that long is
    /// cancelled (each request ends with a clear error).
    fn drain(
        &self,
        deployment: &str,
        worker: &str,
        cancel_after: Option<Duration>,
    ) -> BoxFuture<'_, DrainState>;
}

/// [`EngineControl`] over the registry and `EngineService`.
#[derive(Debug, Clone)]
pub struct GrpcEngines {
    pub registry: Registry,
    /// The operator's transport to engines (mutual TLS, or plaintext for
    /// local runs).
    pub tls: ClientTls,
    /// Deadline of each registry read and of each Drain call (on top of its
    /// cancel delay).
    pub timeout: Duration,
}

fn seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The operator's view of one report.
pub fn sample(at: SystemTime, load: &proto::types::EngineLoad) -> LoadSample {
    LoadSample {
        at_s: seconds(at),
        queued: load.queue_depth,
        running: load.running,
        kv_used: load.kv_blocks_used,
        kv_total: load.kv_blocks_total,
        ttft_s: load.ttft_seconds,
        tpot_s: load.tpot_seconds,
        prefills: load.prefills_total,
        prompt_tokens: load.prompt_tokens_total,
        decodes: load.decodes_total,
        requested_output_tokens: load.requested_output_tokens_total,
    }
}

fn split_key(deployment: &str) -> (&str, &str) {
    deployment.split_once('/').unwrap_or(("", deployment))
}

impl GrpcEngines {
    async fn drain_worker(
        &self,
        deployment: &str,
        worker: &str,
        cancel_after: Option<Duration>,
    ) -> DrainState {
        let (namespace, name) = split_key(deployment);
        let id = WorkerId::new(namespace, name, worker);
        let record = match self.registry.get_worker(&id, self.timeout).await {
            Ok(Some(r)) => r,
            Ok(None) => return DrainState::Gone,
            Err(e) => return DrainState::Unreachable(format!("registry: {e}")),
        };
        let Some(endpoint) = record.grpc_endpoint() else {
            return DrainState::Gone;
        };
        let wait = cancel_after.unwrap_or_default();
        let channel = match self.tls.endpoint(endpoint) {
            Ok(e) => {
                let e = e.connect_timeout(self.timeout).timeout(self.timeout + wait);
                match self.tls.channel(&e).await {
                    Ok(c) => c,
                    Err(e) => return DrainState::Unreachable(format!("{endpoint}: {e}")),
                }
            }
            Err(e) => return DrainState::Unreachable(format!("{endpoint}: {e}")),
        };
        let request = pb::DrainRequest {
            timeout: prost_types::Duration::try_from(wait).ok(),
        };
        match EngineServiceClient::new(channel).drain(request).await {
            Ok(reply) => {
                let r = reply.into_inner();
                if r.in_flight == 0 && r.kv_held == 0 {
                    DrainState::Drained
                } else {
                    DrainState::Busy {
                        in_flight: r.in_flight,
                        kv_held: r.kv_held,
                    }
                }
            }
            Err(status) => DrainState::Unreachable(format!("{endpoint}: {}", status.message())),
        }
    }
}

impl EngineControl for GrpcEngines {
    fn loads(
        &self,
        deployment: &str,
    ) -> BoxFuture<'_, Result<BTreeMap<String, LoadSample>, String>> {
        let (namespace, name) = split_key(deployment);
        let (namespace, name) = (namespace.to_string(), name.to_string());
        Box::pin(async move {
            let listing = self
                .registry
                .list_loads(&namespace, &name, self.timeout)
                .await
                .map_err(|e| e.to_string())?;
            Ok(listing
                .records
                .into_iter()
                .map(|r| (r.worker.worker.clone(), sample(r.at, &r.load)))
                .collect())
        })
    }

    fn drain(
        &self,
        deployment: &str,
        worker: &str,
        cancel_after: Option<Duration>,
    ) -> BoxFuture<'_, DrainState> {
        let (deployment, worker) = (deployment.to_string(), worker.to_string());
        Box::pin(async move { self.drain_worker(&deployment, &worker, cancel_after).await })
    }
}
