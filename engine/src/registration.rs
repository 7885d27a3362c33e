//! Endpoint registration and load reports in the etcd registry.
//!
//! Rank 0 of a worker writes its `WorkerRecord` (role, shape, endpoints,
//! generation) under a lease it keeps alive, and a `LoadReport` every
//! interval, read from its own `Status` so the report is exactly what the
//! service says. When the process dies the lease lapses and both keys go,
//! which is how the frontend and the operator learn a worker is gone. A lost
//! lease (etcd unreachable for a TTL) is re-granted and the record re-put.

use std::future::Future;
use std::time::{Duration, SystemTime};

use proto::pb::engine_service_client::EngineServiceClient;
use proto::records::{LoadReport, WorkerRecord};
use proto::registry::Registry;
use proto::types::EngineLoad;

/// What to register and how often.
#[derive(Debug, Clone)]
pub struct Registration {
    pub registry: Registry,
    pub record: WorkerRecord,
    /// Lease TTL: how long after a crash the keys disappear.
    pub ttl: Duration,
    /// Period of load reports.
    pub interval: Duration,
    /// Deadline of every registry and status call.
    pub timeout: Duration,
}

/// The engine's own load, through its `Status` RPC.
async fn own_load(endpoint: &str, timeout: Duration) -> Option<EngineLoad> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .ok()?
        .timeout(timeout)
        .connect()
        .await
        .ok()?;
    let status = EngineServiceClient::new(channel)
        .status(proto::pb::StatusRequest {})
        .await
        .ok()?
        .into_inner();
    EngineLoad::try_from(status.load?).ok()
}

/// Registers the worker and reports load until `shutdown`, then revokes the
/// lease so the keys go at once.
pub async fn run(
    reg: Registration,
    own_endpoint: String,
    shutdown: impl Future<Output = ()>,
) -> crate::Result<()> {
    let registry_error = |e: proto::Error| crate::Error::Registry(e.to_string());
    let mut lease = reg
        .registry
        .grant_lease(reg.ttl, reg.timeout)
        .await
        .map_err(registry_error)?;
    let mut keep = reg.registry.keep_alive(lease);
    reg.registry
        .put_worker(lease, &reg.record, reg.timeout)
        .await
        .map_err(registry_error)?;
    tracing::info!(worker = %reg.record.id.worker, "registered in etcd");
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(reg.interval);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            loss = keep.lost() => {
                tracing::warn!(?loss, "registry lease lost; registering again");
                match reg.registry.grant_lease(reg.ttl, reg.timeout).await {
                    Ok(l) => {
                        lease = l;
                        keep = reg.registry.keep_alive(lease);
                        if let Err(e) = reg.registry.put_worker(lease, &reg.record, reg.timeout).await {
                            tracing::warn!(error = %e, "re-registration failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no new lease yet");
                        tokio::time::sleep(reg.interval).await;
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(load) = own_load(&own_endpoint, reg.timeout).await {
                    let report = LoadReport { worker: reg.record.id.clone(), load, at: SystemTime::now() };
                    if let Err(e) = reg.registry.put_load(lease, &report, reg.timeout).await {
                        tracing::warn!(error = %e, "load report failed");
                    }
                }
            }
        }
    }
    drop(keep);
    reg.registry
        .revoke(lease, reg.timeout)
        .await
        .map_err(registry_error)?;
    Ok(())
}
