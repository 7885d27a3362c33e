//! [`AgentControl`] over the agents' gRPC `AgentService`.
//!
//! A worker runs one rank per node it is placed on (rank order = placement
//! order); rank 0's agent hosts the worker's endpoint. Agents are found
//! through an [`AgentDirectory`]: the etcd registry in a real deployment
//! (agents keep a lease-bound record with their address), a fixed map in
//! tests. Every call carries a deadline. Launch is idempotent on the agent
//! side (same generation: same rank), so `ensure` can run on every reconcile.
//! With the registry, a worker counts as Running only once its rank 0 has
//! registered its endpoints for the current generation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};

use crate::agent::{AgentControl, BoxFuture, WorkerLaunch};
use crate::crd::{Pool, WorkerState};

/// Finds the AgentService address of a node.
pub trait AgentDirectory: Send + Sync {
    /// `http://host:port` of the agent on `node`, if one is registered.
    fn address(&self, node: &str) -> BoxFuture<'_, Option<String>>;
    /// Every registered agent's address.
    fn all(&self) -> BoxFuture<'_, Vec<String>>;
    /// Whether the worker's engine registered its endpoints for this
    /// generation; `None` when the directory cannot tell (no registry), in
    /// which case running ranks count as a running worker.
    fn registered(&self, worker: &WorkerLaunch) -> BoxFuture<'_, Option<bool>> {
        let _ = worker;
        Box::pin(async { None })
    }
}

/// A fixed node -> address map (tests, static clusters).
#[derive(Debug, Clone, Default)]
pub struct StaticDirectory(pub BTreeMap<String, String>);

impl AgentDirectory for StaticDirectory {
    fn address(&self, node: &str) -> BoxFuture<'_, Option<String>> {
        let found = self.0.get(node).cloned();
        Box::pin(async move { found })
    }

    fn all(&self) -> BoxFuture<'_, Vec<String>> {
        let all = self.0.values().cloned().collect();
        Box::pin(async move { all })
    }
}

/// Agents as registered in etcd under `/rackscale/v1/agents/`.
#[derive(Debug, Clone)]
pub struct RegistryDirectory {
    pub registry: proto::registry::Registry,
    pub timeout: Duration,
}

impl AgentDirectory for RegistryDirectory {
    fn address(&self, node: &str) -> BoxFuture<'_, Option<String>> {
        let node = node.to_string();
        Box::pin(async move {
            let record = self
                .registry
                .get_agent(&node, self.timeout)
                .await
                .ok()
                .flatten()?;
            Some(normalise(&record.address))
        })
    }

    fn registered(&self, worker: &WorkerLaunch) -> BoxFuture<'_, Option<bool>> {
        let (namespace, deployment) = worker
            .deployment
            .split_once('/')
            .unwrap_or(("", &worker.deployment));
        let id = proto::types::WorkerId::new(namespace, deployment, worker.worker.clone());
        let generation = worker.generation;
        Box::pin(async move {
            let record = self
                .registry
                .get_worker(&id, self.timeout)
                .await
                .ok()
                .flatten();
            Some(record.is_some_and(|r| r.generation == generation))
        })
    }

    fn all(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            match self.registry.list_agents(self.timeout).await {
                Ok(listing) => listing
                    .records
                    .iter()
                    .map(|r| normalise(&r.address))
                    .collect(),
                Err(_) => Vec::new(),
            }
        })
    }
}

fn normalise(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// Drives agents over gRPC.
#[derive(Clone)]
pub struct GrpcAgents {
    directory: Arc<dyn AgentDirectory>,
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
    /// `timeout` bounds every call; `grace` is what stopped ranks get.
    pub fn new(directory: Arc<dyn AgentDirectory>, timeout: Duration, grace: Duration) -> Self {
        Self {
            directory,
            timeout,
            grace,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn client(&self, address: &str) -> Option<AgentServiceClient<Channel>> {
        let mut channels = self.channels.lock().await;
        if let Some(c) = channels.get(address) {
            return Some(AgentServiceClient::new(c.clone()));
        }
        let endpoint = Endpoint::from_shared(address.to_string())
            .ok()?
            .timeout(self.timeout)
            .connect_timeout(self.timeout);
        let channel = endpoint.connect().await.ok()?;
        channels.insert(address.to_string(), channel.clone());
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
            engine_args: Default::default(),
            generation: w.generation,
        }
    }

    /// Launches (idempotently) every rank of `w`; returns the worker's state.
    async fn ensure_worker(&self, w: &WorkerLaunch) -> WorkerState {
        let mut phases = Vec::new();
        let leader = match w.placement.first() {
            Some(first) => self
                .directory
                .address(&first.node)
                .await
                .unwrap_or_default(),
            None => return WorkerState::Failed,
        };
        for (rank, node) in w.placement.iter().enumerate() {
            let Some(address) = self.directory.address(&node.node).await else {
                tracing::warn!(node = %node.node, worker = %w.worker, "no agent registered for node");
                return WorkerState::Failed;
            };
            let Some(mut client) = self.client(&address).await else {
                return WorkerState::Launching;
            };
            let request = pb::LaunchRankRequest {
                spec: Some(Self::spec(w, rank, &node.gpus, &leader)),
            };
            match client.launch_rank(request).await {
                Ok(reply) => {
                    let phase = reply.into_inner().status.map_or(0, |s| s.phase);
                    phases.push(phase);
                }
                Err(status) => {
                    tracing::warn!(node = %node.node, worker = %w.worker, code = ?status.code(), message = %status.message(), "launch refused");
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) {
                        self.forget(&address).await;
                        return WorkerState::Launching;
                    }
                    return WorkerState::Failed;
                }
            }
        }
        let running = pb::RankPhase::Running as i32;
        let failed = [pb::RankPhase::Failed as i32, pb::RankPhase::Exited as i32];
        if phases.iter().all(|p| *p == running) {
            // Running processes are not yet a serving worker: with a
            // registry, wait until rank 0 registered this generation.
            match self.directory.registered(w).await {
                Some(false) => WorkerState::Launching,
                _ => WorkerState::Running,
            }
        } else if phases.iter().any(|p| failed.contains(p)) {
            WorkerState::Failed
        } else {
            WorkerState::Launching
        }
    }
}

impl AgentControl for GrpcAgents {
    fn ensure(&self, workers: &[WorkerLaunch]) -> BoxFuture<'_, Vec<WorkerState>> {
        let workers = workers.to_vec();
        Box::pin(async move {
            let mut states = Vec::with_capacity(workers.len());
            for w in &workers {
                states.push(self.ensure_worker(w).await);
            }
            states
        })
    }

    fn release(&self, deployment: &str) -> BoxFuture<'_, ()> {
        let deployment = deployment.to_string();
        Box::pin(async move {
            let (namespace, name) = deployment.split_once('/').unwrap_or(("", &deployment));
            for address in self.directory.all().await {
                let Some(mut client) = self.client(&address).await else {
                    continue;
                };
                let request = pb::ListRanksRequest {
                    namespace: namespace.to_string(),
                    deployment: name.to_string(),
                };
                let Ok(list) = client.list_ranks(request).await else {
                    continue;
                };
                for status in list.into_inner().ranks {
                    let Some(rank) = status.rank else { continue };
                    let grace = prost_types::Duration::try_from(self.grace).ok();
                    let stop = pb::StopRankRequest {
                        rank: Some(rank),
                        grace_period: grace,
                    };
                    if let Err(e) = client.stop_rank(stop).await {
                        tracing::warn!(agent = %address, error = %e, "stop failed");
                    }
                }
            }
        })
    }
}
