//! Rank-group formation, endpoint registration and load reports in the etcd
//! registry.
//!
//! Every rank of a worker writes its own [`RankRecord`] (node, GPUs,
//! endpoint, generation, world size) under a lease it keeps alive. Rank 0
//! watches the worker's rank prefix and forms the group: once every rank
//! `0..world_size` of its generation is present it publishes the
//! [`WorkerRecord`] with all their endpoints, which is what makes the worker
//! serving for the operator and the frontend; when a rank goes (its process
//! died and the agent deleted its key, or its lease lapsed) rank 0 withdraws
//! the record until the rank is back. While published, rank 0 also writes a
//! [`LoadReport`] every interval, read from its own `Status` so the report
//! is exactly what the service says.
//!
//! When a process stops it revokes its lease, so its keys go at once; when it
//! dies they go with the lease TTL (or sooner, when the agent deletes them). A
//! lost lease (etcd unreachable for a TTL) is re-granted and the keys re-put.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

use proto::pb::engine_service_client::EngineServiceClient;
use proto::records::{LoadReport, RankRecord, WorkerRecord, WorkerState};
use proto::registry::{self, Lease, Registry, WatchEvent};
use proto::types::{EngineLoad, Role, Shape};
use tokio::sync::mpsc;

/// What to register and how often.
#[derive(Debug, Clone)]
pub struct Registration {
    pub registry: Registry,
    /// This rank, as it registers itself.
    pub rank: RankRecord,
    /// The worker's role, published by rank 0.
    pub role: Role,
    /// The worker's parallel shape, published by rank 0.
    pub shape: Shape,
    /// Lease TTL: how long after a crash the keys disappear.
    pub ttl: Duration,
    /// Period of load reports.
    pub interval: Duration,
    /// Deadline of every registry and status call.
    pub timeout: Duration,
    /// How the rank dials its own `Status` (its port's transport).
    pub tls: proto::tls::ClientTls,
}

impl Registration {
    fn is_leader(&self) -> bool {
        self.rank.endpoint.rank == 0
    }

    /// The worker record once `members` hold every rank of this group.
    fn formed(&self, members: &BTreeMap<u32, RankRecord>) -> Option<WorkerRecord> {
        let world = self.rank.world_size;
        let ranks: Vec<_> = (0..world)
            .map(|r| members.get(&r).map(|m| m.endpoint.clone()))
            .collect::<Option<_>>()?;
        Some(WorkerRecord {
            id: self.rank.worker.clone(),
            role: self.role,
            shape: self.shape,
            ranks,
            state: WorkerState::Ready,
            generation: self.rank.generation,
        })
    }

    /// Whether `other` belongs to this group (same generation and world).
    fn same_group(&self, other: &RankRecord) -> bool {
        other.worker == self.rank.worker
            && other.generation == self.rank.generation
            && other.world_size == self.rank.world_size
    }
}

/// The engine's own load and whether it is draining, through its `Status`
/// RPC.
async fn own_load(
    endpoint: &str,
    timeout: Duration,
    tls: &proto::tls::ClientTls,
) -> Option<(EngineLoad, bool)> {
    let channel = tls.endpoint(endpoint).ok()?.timeout(timeout);
    let channel = tls.channel(&channel).await.ok()?;
    let status = EngineServiceClient::new(channel)
        .status(proto::pb::StatusRequest {})
        .await
        .ok()?
        .into_inner();
    let load = EngineLoad::try_from(status.load?).ok()?;
    Some((load, status.draining))
}

/// What the group watcher tells the leader.
enum Membership {
    /// Replace everything known (first listing, or after a compaction).
    All(Vec<RankRecord>),
    Joined(RankRecord),
    Left(u32),
}

/// Feeds the leader the worker's rank records; in its own task so that a
/// watch call is never cancelled half-way by the leader's `select!`.
fn watch_group(reg: &Registration) -> mpsc::Receiver<Membership> {
    let (tx, rx) = mpsc::channel(64);
    let registry = reg.registry.clone();
    let prefix = registry::ranks_prefix(&reg.rank.worker);
    let timeout = reg.timeout;
    let interval = reg.interval;
    tokio::spawn(async move {
        let mut watcher = loop {
            match registry.watch::<RankRecord>(&prefix, timeout).await {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the rank group yet");
                    tokio::time::sleep(interval).await;
                    if tx.is_closed() {
                        return;
                    }
                }
            }
        };
        loop {
            let change = match watcher.next().await {
                Ok(WatchEvent::Resync { records, .. }) => Membership::All(records),
                Ok(WatchEvent::Put { record, .. }) => Membership::Joined(record),
                Ok(WatchEvent::Delete { key, .. }) => {
                    let Some(rank) = key.rsplit('/').next().and_then(|r| r.parse().ok()) else {
                        continue;
                    };
                    Membership::Left(rank)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rank group watch interrupted");
                    tokio::time::sleep(interval).await;
                    continue;
                }
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Puts this rank's keys (and the worker's, when formed) under `lease`.
async fn put_all(reg: &Registration, lease: Lease, formed: Option<&WorkerRecord>) {
    if let Err(e) = reg.registry.put(lease, &reg.rank, reg.timeout).await {
        tracing::warn!(error = %e, "rank registration failed");
    }
    if let Some(record) = formed
        && let Err(e) = reg.registry.put_worker(lease, record, reg.timeout).await
    {
        tracing::warn!(error = %e, "worker registration failed");
    }
}

/// Registers the rank (and, on rank 0, forms and registers the worker and
/// reports its load) until `shutdown`, then revokes the lease so every key
/// goes at once.
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
        .put(lease, &reg.rank, reg.timeout)
        .await
        .map_err(registry_error)?;
    let worker = &reg.rank.worker;
    tracing::info!(worker = %worker, rank = reg.rank.endpoint.rank, "rank registered in etcd");

    let mut group = if reg.is_leader() {
        watch_group(&reg)
    } else {
        // Followers only keep their own key alive.
        mpsc::channel(1).1
    };
    let mut members: BTreeMap<u32, RankRecord> = BTreeMap::new();
    let mut published: Option<WorkerRecord> = None;
    // Set once the engine reports it drains; a drain is never undone.
    let mut draining = false;
    let worker_key = reg.rank.worker.clone();
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
                        put_all(&reg, lease, published.as_ref()).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no new lease yet");
                        tokio::time::sleep(reg.interval).await;
                    }
                }
            }
            Some(change) = group.recv() => {
                match change {
                    Membership::All(records) => {
                        members = records
                            .into_iter()
                            .filter(|r| reg.same_group(r))
                            .map(|r| (r.endpoint.rank, r))
                            .collect();
                    }
                    Membership::Joined(record) if reg.same_group(&record) => {
                        members.insert(record.endpoint.rank, record);
                    }
                    Membership::Joined(record) => {
                        members.remove(&record.endpoint.rank);
                    }
                    Membership::Left(rank) => {
                        members.remove(&rank);
                    }
                }
                let mut formed = reg.formed(&members);
                if let Some(record) = formed.as_mut().filter(|_| draining) {
                    record.state = WorkerState::Draining;
                }
                if formed == published {
                    continue;
                }
                match &formed {
                    Some(record) => {
                        match reg.registry.put_worker(lease, record, reg.timeout).await {
                            Ok(_) => tracing::info!(worker = %worker, ranks = record.ranks.len(), "rank group formed; worker registered"),
                            Err(e) => {
                                tracing::warn!(error = %e, "worker registration failed");
                                continue;
                            }
                        }
                    }
                    None => {
                        tracing::warn!(worker = %worker, present = members.len(), world = reg.rank.world_size, "rank group incomplete; worker withdrawn");
                        let keys = [
                            registry::worker_key(&worker_key.namespace, &worker_key.deployment, &worker_key.worker),
                            registry::load_key(&worker_key.namespace, &worker_key.deployment, &worker_key.worker),
                        ];
                        for key in keys {
                            if let Err(e) = reg.registry.delete(&key, reg.timeout).await {
                                tracing::warn!(error = %e, %key, "withdrawing the worker failed");
                            }
                        }
                    }
                }
                published = formed;
            }
            _ = tick.tick(), if published.is_some() => {
                if let Some((load, now_draining)) = own_load(&own_endpoint, reg.timeout, &reg.tls).await {
                    // A draining worker says so in its record, so frontends
                    // stop sending it work before it refuses any.
                    draining |= now_draining;
                    if let Some(record) = published.as_mut().filter(|r| draining && r.state == WorkerState::Ready) {
                        record.state = WorkerState::Draining;
                        match reg.registry.put_worker(lease, record, reg.timeout).await {
                            Ok(_) => tracing::info!(worker = %worker, "draining; worker record marked"),
                            Err(e) => tracing::warn!(error = %e, "marking the worker draining failed"),
                        }
                    }
                    let report = LoadReport { worker: worker.clone(), load, at: SystemTime::now() };
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
