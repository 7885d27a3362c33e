//! [`AgentControl`] over the agents' gRPC `AgentService`.
//!
//! A worker runs one rank per node it is placed on (rank order = placement
//! order); rank 0's agent hosts the worker's endpoint. Every channel goes
//! through the operator's [`ClientTls`] (mutual TLS unless it runs
//! `--insecure-plaintext`). Agents are found through an [`AgentDirectory`]: the etcd registry in a real deployment
//! (agents keep a lease-bound record with their address), a fixed map in
//! tests. Every call carries a deadline.
//!
//! `ensure` runs on every reconcile of a deployment and converges it in two
//! steps: first every rank of the deployment that runs where it should not
//! (another node, other GPUs, another generation, a worker that no longer
//! exists) is stopped, on every agent; then every wanted rank is launched,
//! all at once (launch is idempotent on the agent: same generation and GPUs
//! return the running rank). Stopping before launching is what keeps a
//! moved worker from ever holding two sets of GPUs. With the registry, a
//! worker counts as Running only once its rank 0 has registered the formed
//! group for the current generation, on the nodes it was placed on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use futures::stream::BoxStream;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use proto::records::{AgentRecord, WorkerRecord};
use proto::registry::WatchEvent;
use proto::tls::ClientTls;
use tokio::sync::{Mutex, mpsc};
use tonic::transport::Channel;

use crate::agent::{AgentControl, BoxFuture, WorkerLaunch, WorkerReport};
use crate::crd::{Pool, WorkerState};

/// Finds the agents: node name -> `AgentService` address.
pub trait AgentDirectory: Send + Sync {
    /// Every registered agent, node -> `http://host:port`.
    fn all(&self) -> BoxFuture<'_, BTreeMap<String, String>>;
    /// Whether the worker's rank group registered its endpoints for this
    /// generation on the nodes it is placed on; `None` when the directory
    /// cannot tell (no registry), in which case running ranks count as a
    /// running worker.
    fn registered(&self, worker: &WorkerLaunch) -> BoxFuture<'_, Option<bool>> {
        let _ = worker;
        Box::pin(async { None })
    }
    /// Nodes with a live agent; `None` when the directory cannot tell.
    fn live_nodes(&self) -> BoxFuture<'_, Option<BTreeSet<String>>> {
        Box::pin(async { None })
    }
    /// Yields whenever agents or workers change; `None` when it cannot watch.
    fn changes(&self) -> Option<BoxStream<'static, ()>> {
        None
    }
}

/// A fixed node -> address map (tests, static clusters).
#[derive(Debug, Clone, Default)]
pub struct StaticDirectory(pub BTreeMap<String, String>);

impl AgentDirectory for StaticDirectory {
    fn all(&self) -> BoxFuture<'_, BTreeMap<String, String>> {
        let all = self.0.clone();
        Box::pin(async move { all })
    }
}

/// Agents as registered in etcd under `/rackscale/v1/agents/`.
#[derive(Debug, Clone)]
pub struct RegistryDirectory {
    pub registry: proto::registry::Registry,
    pub timeout: Duration,
    /// GPU health from the agents' records, kept by [`Self::changes`].
    pub health: ReportedHealth,
}

/// GPU health as the agents report it in their registry records (NVML, or
/// the fault-injection hook of simulated GPUs): node -> GPU indices not
/// reported Healthy. The watch behind [`RegistryDirectory::changes`]
/// updates it before it triggers a pass, so the pass a report causes
/// already sees that report. Kubernetes mode joins it with the node
/// annotations; standalone mode reads the same records directly.
#[derive(Debug, Clone, Default)]
pub struct ReportedHealth(Arc<std::sync::RwLock<BTreeMap<String, BTreeSet<u32>>>>);

impl ReportedHealth {
    fn sick(r: &AgentRecord) -> BTreeSet<u32> {
        r.gpus
            .iter()
            .filter(|g| g.health != proto::types::GpuHealth::Healthy)
            .map(|g| g.index)
            .collect()
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, BTreeSet<u32>>)) {
        // A writer that panicked left a whole map; keep using it.
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        change(&mut map);
    }

    /// One agent's record, as put.
    pub fn record(&self, r: &AgentRecord) {
        let sick = Self::sick(r);
        self.update(|m| {
            if sick.is_empty() {
                m.remove(&r.node);
            } else {
                m.insert(r.node.clone(), sick);
            }
        });
    }

    /// An agent whose record is gone (its liveness is judged elsewhere).
    pub fn forget(&self, node: &str) {
        self.update(|m| {
            m.remove(node);
        });
    }

    /// Every agent's record, from a fresh listing.
    pub fn replace(&self, records: &[AgentRecord]) {
        let fresh: BTreeMap<String, BTreeSet<u32>> = records
            .iter()
            .map(|r| (r.node.clone(), Self::sick(r)))
            .filter(|(_, sick)| !sick.is_empty())
            .collect();
        self.update(|m| *m = fresh);
    }
}

impl crate::inventory::GpuHealth for ReportedHealth {
    fn unhealthy(&self, node: &str) -> BTreeSet<u32> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.get(node).cloned().unwrap_or_default()
    }
}

impl RegistryDirectory {
    pub fn new(registry: proto::registry::Registry, timeout: Duration) -> Self {
        Self {
            registry,
            timeout,
            health: ReportedHealth::default(),
        }
    }

    async fn listing(&self) -> Option<Vec<AgentRecord>> {
        match self.registry.list_agents(self.timeout).await {
            Ok(listing) => Some(listing.records),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list agents in the registry");
                None
            }
        }
    }
}

/// What of an agent record matters to placement (not its heartbeat).
fn agent_signature(r: &AgentRecord) -> String {
    let gpus: Vec<String> = r
        .gpus
        .iter()
        .map(|g| format!("{}:{:?}", g.index, g.health))
        .collect();
    format!("{}|{}|{}|{}", r.address, r.sku, r.clique, gpus.join(","))
}

/// Watches one prefix in its own task; `relevant` says which events matter.
fn forward<R, F>(
    registry: proto::registry::Registry,
    prefix: String,
    timeout: Duration,
    tx: mpsc::Sender<()>,
    mut relevant: F,
) where
    R: proto::records::RegistryRecord + Send + 'static,
    F: FnMut(&WatchEvent<R>) -> bool + Send + 'static,
{
    tokio::spawn(async move {
        let mut watcher = loop {
            match registry.watch::<R>(&prefix, timeout).await {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!(error = %e, %prefix, "cannot watch the registry yet");
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        loop {
            match watcher.next().await {
                Ok(event) => {
                    if relevant(&event) {
                        // A full channel already holds a pending trigger.
                        if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, %prefix, "registry watch interrupted; resuming");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
}

impl AgentDirectory for RegistryDirectory {
    fn all(&self) -> BoxFuture<'_, BTreeMap<String, String>> {
        Box::pin(async move {
            self.listing()
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.node.clone(), normalise(&r.address)))
                .collect()
        })
    }

    fn registered(&self, worker: &WorkerLaunch) -> BoxFuture<'_, Option<bool>> {
        let (namespace, deployment) = worker
            .deployment
            .split_once('/')
            .unwrap_or(("", &worker.deployment));
        let id = proto::types::WorkerId::new(namespace, deployment, worker.worker.clone());
        let generation = worker.generation;
        let nodes: Vec<String> = worker.placement.iter().map(|n| n.node.clone()).collect();
        Box::pin(async move {
            let record: Option<WorkerRecord> = self
                .registry
                .get_worker(&id, self.timeout)
                .await
                .ok()
                .flatten();
            Some(record.is_some_and(|r| {
                r.generation == generation
                    && r.ranks
                        .iter()
                        .map(|r| r.node.as_str())
                        .eq(nodes.iter().map(String::as_str))
            }))
        })
    }

    fn live_nodes(&self) -> BoxFuture<'_, Option<BTreeSet<String>>> {
        Box::pin(async move {
            let listing = self.listing().await?;
            Some(listing.into_iter().map(|r| r.node).collect())
        })
    }

    fn changes(&self) -> Option<BoxStream<'static, ()>> {
        let (tx, rx) = mpsc::channel(1);
        let mut known: HashMap<String, String> = HashMap::new();
        let health = self.health.clone();
        forward::<AgentRecord, _>(
            self.registry.clone(),
            proto::registry::agents_prefix(),
            self.timeout,
            tx.clone(),
            move |event| match event {
                WatchEvent::Resync { records, .. } => {
                    health.replace(records);
                    let fresh: HashMap<String, String> = records
                        .iter()
                        .map(|r| (r.node.clone(), agent_signature(r)))
                        .collect();
                    let changed = fresh != known;
                    known = fresh;
                    changed
                }
                WatchEvent::Put { record, .. } => {
                    health.record(record);
                    let signature = agent_signature(record);
                    known.insert(record.node.clone(), signature.clone()) != Some(signature)
                }
                WatchEvent::Delete { key, .. } => proto::registry::parse_agent_key(key)
                    .is_some_and(|node| {
                        health.forget(node);
                        known.remove(node).is_some()
                    }),
            },
        );
        forward::<WorkerRecord, _>(
            self.registry.clone(),
            format!("{}workers/", proto::registry::PREFIX),
            self.timeout,
            tx,
            |event| !matches!(event, WatchEvent::Resync { .. }),
        );
        Some(
            futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await?;
                Some(((), rx))
            })
            .boxed(),
        )
    }
}

fn normalise(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// One rank as the operator wants it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Wanted {
    node: String,
    worker: String,
    rank: u32,
    generation: u64,
    gpus: Vec<u32>,
    world_size: u32,
}

/// Drives agents over gRPC.
#[derive(Clone)]
pub struct GrpcAgents {
    directory: Arc<dyn AgentDirectory>,
    tls: ClientTls,
    timeout: Duration,
    grace: Duration,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl std::fmt::Debug for GrpcAgents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAgents")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl GrpcAgents {
    /// Agents from `directory`, dialled through `tls`; `timeout` bounds
    /// every call; `grace` is what stopped ranks get.
    pub fn new(
        directory: Arc<dyn AgentDirectory>,
        tls: ClientTls,
        timeout: Duration,
        grace: Duration,
    ) -> Self {
        Self {
            directory,
            tls,
            timeout,
            grace,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn client(&self, address: &str) -> Option<AgentServiceClient<Channel>> {
        if let Some(c) = self.channels.lock().await.get(address) {
            return Some(AgentServiceClient::new(c.clone()));
        }
        let endpoint = self
            .tls
            .endpoint(address)
            .inspect_err(|e| tracing::warn!(error = %e, %address, "unusable agent address"))
            .ok()?
            .timeout(self.timeout)
            .connect_timeout(self.timeout);
        let channel = self
            .tls
            .channel(&endpoint)
            .await
            .inspect_err(|e| tracing::debug!(error = %e, %address, "agent unreachable"))
            .ok()?;
        self.channels
            .lock()
            .await
            .insert(address.to_string(), channel.clone());
        Some(AgentServiceClient::new(channel))
    }

    async fn forget(&self, address: &str) {
        self.channels.lock().await.remove(address);
    }

    fn spec(w: &WorkerLaunch, rank: usize, gpus: &[u32], leader: &str) -> pb::RankSpec {
        let (namespace, deployment) = w.deployment.split_once('/').unwrap_or(("", &w.deployment));
        pb::RankSpec {
            worker: Some(pb::WorkerId {
                namespace: namespace.to_string(),
                deployment: deployment.to_string(),
                worker: w.worker.clone(),
            }),
            role: match w.role {
                Pool::Prefill => pb::Role::Prefill as i32,
                Pool::Decode => pb::Role::Decode as i32,
            },
            shape: Some(pb::Shape { tp: w.tp, ep: w.ep }),
            rank: rank as u32,
            world_size: w.placement.len() as u32,
            gpu_indices: gpus.to_vec(),
            rendezvous: Some(pb::Rendezvous {
                leader_address: leader.to_string(),
                peer_addresses: Vec::new(),
                registry_key: proto::registry::worker_key(namespace, deployment, &w.worker),
            }),
            model: Some(pb::ModelProfile {
                name: w.model.clone(),
                config_path: String::new(),
                weights_path: String::new(),
                quantization: String::new(),
            }),
            backend: if w.backend == "cpu" {
                pb::Backend::CpuReference as i32
            } else {
                pb::Backend::Sim as i32
            },
            engine_args: w
                .engine_args
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            generation: w.generation,
        }
    }

    /// Stops every rank of `deployment` on every agent that `keep` rejects;
    /// returns how many were stopped.
    async fn sweep(
        &self,
        agents: &BTreeMap<String, String>,
        deployment: &str,
        keep: impl Fn(&Wanted) -> bool + Sync,
    ) -> usize {
        let (namespace, name) = deployment.split_once('/').unwrap_or(("", deployment));
        let listings = join_all(agents.iter().map(|(node, address)| async move {
            let mut client = self.client(address).await?;
            let request = pb::ListRanksRequest {
                namespace: namespace.to_string(),
                deployment: name.to_string(),
            };
            match client.list_ranks(request).await {
                Ok(list) => Some((node, address, client, list.into_inner().ranks)),
                Err(status) => {
                    tracing::warn!(agent = %node, code = ?status.code(), "cannot list ranks");
                    None
                }
            }
        }))
        .await;
        let exited = pb::RankPhase::Exited as i32;
        let stops = listings.into_iter().flatten().flat_map(|(node, address, client, ranks)| {
            ranks
                .into_iter()
                .filter(|s| s.phase != exited)
                .filter_map(|s| {
                    let rank = s.rank?;
                    let wanted = Wanted {
                        node: node.clone(),
                        worker: rank.worker.as_ref()?.worker.clone(),
                        rank: rank.rank,
                        generation: rank.generation,
                        gpus: s.gpu_indices.clone(),
                        world_size: s.world_size,
                    };
                    (!keep(&wanted)).then_some((rank, wanted))
                })
                .map(|(rank, wanted)| {
                    let mut client = client.clone();
                    let grace = prost_types::Duration::try_from(self.grace).ok();
                    async move {
                        tracing::info!(agent = %address, worker = %wanted.worker, rank = wanted.rank, generation = wanted.generation, "stopping a rank that is no longer wanted there");
                        let stop = pb::StopRankRequest {
                            rank: Some(rank),
                            grace_period: grace,
                        };
                        if let Err(e) = client.stop_rank(stop).await {
                            tracing::warn!(agent = %address, error = %e, "stop failed");
                        }
                    }
                })
                .collect::<Vec<_>>()
        });
        let stops: Vec<_> = stops.collect();
        let n = stops.len();
        join_all(stops).await;
        n
    }

    /// Launches (idempotently) every rank of `w`; reports the worker's state.
    async fn ensure_worker(
        &self,
        w: &WorkerLaunch,
        agents: &BTreeMap<String, String>,
    ) -> WorkerReport {
        let Some(first) = w.placement.first() else {
            return WorkerReport::with(WorkerState::Failed, "placed on no node");
        };
        let leader = agents.get(&first.node).cloned().unwrap_or_default();
        let launches = w.placement.iter().enumerate().map(|(rank, node)| {
            let leader = leader.clone();
            async move {
                let Some(address) = agents.get(&node.node) else {
                    return Err(WorkerReport::with(
                        WorkerState::Failed,
                        format!("no agent registered for node {}", node.node),
                    ));
                };
                let Some(mut client) = self.client(address).await else {
                    return Err(WorkerReport::with(
                        WorkerState::Launching,
                        format!("agent on {} unreachable", node.node),
                    ));
                };
                let request = pb::LaunchRankRequest {
                    spec: Some(Self::spec(w, rank, &node.gpus, &leader)),
                };
                match client.launch_rank(request).await {
                    Ok(reply) => Ok((node.node.clone(), reply.into_inner().status)),
                    Err(status) => {
                        tracing::warn!(node = %node.node, worker = %w.worker, code = ?status.code(), message = %status.message(), "launch refused");
                        let transient = matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        );
                        if transient {
                            self.forget(address).await;
                        }
                        Err(WorkerReport::with(
                            if transient {
                                WorkerState::Launching
                            } else {
                                WorkerState::Failed
                            },
                            format!("launch on {} refused: {}", node.node, status.message()),
                        ))
                    }
                }
            }
        });
        let mut statuses = Vec::with_capacity(w.placement.len());
        let mut pending: Option<WorkerReport> = None;
        for result in join_all(launches).await {
            match result {
                Ok(status) => statuses.push(status),
                // A failure outranks "still launching".
                Err(report) => {
                    if pending
                        .as_ref()
                        .is_none_or(|p| p.state != WorkerState::Failed)
                    {
                        pending = Some(report);
                    }
                }
            }
        }
        if let Some(report) = pending {
            return report;
        }
        let running = pb::RankPhase::Running as i32;
        let failed = [pb::RankPhase::Failed as i32, pb::RankPhase::Exited as i32];
        if let Some((node, s)) = statuses.iter().find_map(|(node, s)| {
            s.as_ref()
                .filter(|s| failed.contains(&s.phase))
                .map(|s| (node, s))
        }) {
            let rank = s.rank.as_ref().map_or(0, |r| r.rank);
            return WorkerReport::with(
                WorkerState::Failed,
                format!(
                    "rank {rank} on {node}: {} ({} restarts)",
                    if s.message.is_empty() {
                        "failed"
                    } else {
                        &s.message
                    },
                    s.restarts
                ),
            );
        }
        if statuses
            .iter()
            .all(|(_, s)| s.as_ref().is_some_and(|s| s.phase == running))
        {
            // Running processes are not yet a serving worker: with a
            // registry, wait until rank 0 registered the formed group.
            return match self.directory.registered(w).await {
                Some(false) => WorkerReport::with(
                    WorkerState::Launching,
                    "ranks running; waiting for the rank group to register",
                ),
                _ => WorkerReport::new(WorkerState::Running),
            };
        }
        WorkerReport::new(WorkerState::Launching)
    }
}

impl AgentControl for GrpcAgents {
    fn ensure(&self, workers: &[WorkerLaunch]) -> BoxFuture<'_, Vec<WorkerReport>> {
        let workers = workers.to_vec();
        Box::pin(async move {
            let agents = self.directory.all().await;
            if let Some(deployment) = workers.first().map(|w| w.deployment.clone()) {
                let wanted: HashSet<Wanted> = workers
                    .iter()
                    .flat_map(|w| {
                        w.placement.iter().enumerate().map(|(rank, n)| Wanted {
                            node: n.node.clone(),
                            worker: w.worker.clone(),
                            rank: rank as u32,
                            generation: w.generation,
                            gpus: n.gpus.clone(),
                            world_size: w.placement.len() as u32,
                        })
                    })
                    .collect();
                let stopped = self
                    .sweep(&agents, &deployment, |r| wanted.contains(r))
                    .await;
                if stopped > 0 {
                    tracing::info!(%deployment, stopped, "stopped ranks that were moved or replaced");
                }
            }
            join_all(workers.iter().map(|w| self.ensure_worker(w, &agents))).await
        })
    }

    fn release(&self, deployment: &str) -> BoxFuture<'_, ()> {
        let deployment = deployment.to_string();
        Box::pin(async move {
            let agents = self.directory.all().await;
            self.sweep(&agents, &deployment, |_| false).await;
        })
    }

    fn live_nodes(&self) -> BoxFuture<'_, Option<BTreeSet<String>>> {
        self.directory.live_nodes()
    }

    fn changes(&self) -> Option<BoxStream<'static, ()>> {
        self.directory.changes()
    }
}

#[cfg(test)]
mod tests {
    use proto::records::fixtures;

    use super::*;
    use crate::inventory::GpuHealth as _;

    fn with_sick(node: &str, sick: &[u32]) -> AgentRecord {
        let mut r = fixtures::agent(node);
        for g in &mut r.gpus {
            if sick.contains(&g.index) {
                g.health = proto::types::GpuHealth::Unhealthy;
            }
        }
        r
    }

    #[test]
    fn reported_health_follows_puts_deletes_and_listings() {
        let h = ReportedHealth::default();
        h.record(&with_sick("a", &[1, 3]));
        h.record(&with_sick("b", &[]));
        assert_eq!(h.unhealthy("a"), BTreeSet::from([1, 3]));
        assert!(h.unhealthy("b").is_empty());
        assert!(h.unhealthy("unknown").is_empty());

        // Recovered GPUs are usable again; a gone agent leaves nothing behind.
        h.record(&with_sick("a", &[3]));
        assert_eq!(h.unhealthy("a"), BTreeSet::from([3]));
        h.forget("a");
        assert!(h.unhealthy("a").is_empty());

        // A fresh listing replaces everything known before.
        h.record(&with_sick("c", &[0]));
        h.replace(&[with_sick("b", &[2])]);
        assert!(h.unhealthy("c").is_empty());
        assert_eq!(h.unhealthy("b"), BTreeSet::from([2]));
    }
}
