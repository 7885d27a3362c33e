//! The values stored in the etcd registry, as validated domain types.
//!
//! Each record knows its own key ([`RegistryRecord::key`]) and how to encode
//! and decode itself. Decoding checks what protobuf cannot: required fields
//! are present, enums are known, rank indices are exactly `0..n`, and the
//! record's identity matches the key it was read from, so a reader never acts
//! on a value filed under the wrong name.

use std::time::SystemTime;

use prost::Message;

use crate::error::{Error, Result};
use crate::pb;
use crate::registry;
use crate::types::{EngineLoad, Gpu, Role, Shape, WorkerId, required};

/// A value with a fixed place in the registry.
pub trait RegistryRecord: Sized + Send + 'static {
    /// Protobuf message name, for errors.
    const MESSAGE: &'static str;

    /// The key this record lives at.
    fn key(&self) -> String;

    /// Encodes the record as its protobuf message.
    fn encode(&self) -> Vec<u8>;

    /// Decodes and validates the bytes of a protobuf message, without the key check.
    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeFailure>;

    /// Decodes the value stored at `key`, checking that it belongs there.
    fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let record = Self::decode_bytes(bytes).map_err(|failure| match failure {
            DecodeFailure::Wire(source) => Error::Decode {
                key: key.to_owned(),
                message: Self::MESSAGE,
                source,
            },
            DecodeFailure::Invalid(err) => Error::InvalidValue {
                key: key.to_owned(),
                source: Box::new(err),
            },
        })?;
        if record.key() != key {
            return Err(Error::InvalidValue {
                key: key.to_owned(),
                source: Box::new(Error::invalid(
                    Self::MESSAGE,
                    "id",
                    "identity does not match the key it is stored under",
                )),
            });
        }
        Ok(record)
    }
}

/// Why [`RegistryRecord::decode_bytes`] failed.
#[derive(Debug)]
pub enum DecodeFailure {
    /// The bytes are not the protobuf message.
    Wire(prost::DecodeError),
    /// The message decoded but breaks the contract.
    Invalid(Error),
}

impl From<Error> for DecodeFailure {
    fn from(err: Error) -> Self {
        Self::Invalid(err)
    }
}

fn timestamp(
    value: Option<prost_types::Timestamp>,
    message: &'static str,
    field: &'static str,
) -> Result<SystemTime> {
    let ts = value.ok_or_else(|| Error::missing(message, field))?;
    SystemTime::try_from(ts).map_err(|err| Error::invalid(message, field, err.to_string()))
}

/// A node agent's liveness record: its GPUs and where to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    /// Kubernetes node name.
    pub node: String,
    /// `AgentService` address.
    pub address: String,
    /// Every GPU with health.
    pub gpus: Vec<Gpu>,
    /// GPU SKU, e.g. `GB200`.
    pub sku: String,
    /// NVLink domain (`nvidia.com/gpu.clique`).
    pub clique: String,
    /// When the agent last wrote the record.
    pub heartbeat: SystemTime,
}

impl TryFrom<pb::AgentRecord> for AgentRecord {
    type Error = Error;

    fn try_from(wire: pb::AgentRecord) -> Result<Self> {
        const M: &str = "AgentRecord";
        let node = required(wire.node, M, "node")?;
        if node.contains('/') {
            return Err(Error::invalid(M, "node", "must not contain '/'"));
        }
        Ok(Self {
            node,
            address: required(wire.address, M, "address")?,
            gpus: wire
                .gpus
                .into_iter()
                .map(Gpu::try_from)
                .collect::<Result<_>>()?,
            sku: wire.sku,
            clique: wire.clique,
            heartbeat: timestamp(wire.heartbeat, M, "heartbeat")?,
        })
    }
}

impl From<AgentRecord> for pb::AgentRecord {
    fn from(record: AgentRecord) -> Self {
        Self {
            node: record.node,
            address: record.address,
            gpus: record.gpus.into_iter().map(Into::into).collect(),
            sku: record.sku,
            clique: record.clique,
            heartbeat: Some(record.heartbeat.into()),
        }
    }
}

impl RegistryRecord for AgentRecord {
    const MESSAGE: &'static str = "AgentRecord";

    fn key(&self) -> String {
        registry::agent_key(&self.node)
    }

    fn encode(&self) -> Vec<u8> {
        pb::AgentRecord::from(self.clone()).encode_to_vec()
    }

    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeFailure> {
        let wire = pb::AgentRecord::decode(bytes).map_err(DecodeFailure::Wire)?;
        Ok(wire.try_into()?)
    }
}

/// Lifecycle state of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Loading weights or forming the rank group.
    Starting,
    /// Serving.
    Ready,
    /// Finishing in-flight work, accepting none.
    Draining,
    /// Shutting down.
    Stopping,
    /// Failed.
    Failed,
}

impl WorkerState {
    fn from_wire(value: i32) -> Result<Self> {
        const M: &str = "WorkerRecord";
        match pb::WorkerState::try_from(value) {
            Ok(pb::WorkerState::Unspecified) => Err(Error::missing(M, "state")),
            Ok(pb::WorkerState::Starting) => Ok(Self::Starting),
            Ok(pb::WorkerState::Ready) => Ok(Self::Ready),
            Ok(pb::WorkerState::Draining) => Ok(Self::Draining),
            Ok(pb::WorkerState::Stopping) => Ok(Self::Stopping),
            Ok(pb::WorkerState::Failed) => Ok(Self::Failed),
            Err(_) => Err(Error::invalid(
                M,
                "state",
                format!("unknown enum value {value}"),
            )),
        }
    }
}

impl From<WorkerState> for i32 {
    fn from(state: WorkerState) -> Self {
        let wire = match state {
            WorkerState::Starting => pb::WorkerState::Starting,
            WorkerState::Ready => pb::WorkerState::Ready,
            WorkerState::Draining => pb::WorkerState::Draining,
            WorkerState::Stopping => pb::WorkerState::Stopping,
            WorkerState::Failed => pb::WorkerState::Failed,
        };
        wire as i32
    }
}

/// Where one rank of a worker runs and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEndpoint {
    /// Rank index within the worker.
    pub rank: u32,
    /// Node the rank runs on.
    pub node: String,
    /// GPU indices on that node.
    pub gpu_indices: Vec<u32>,
    /// `EngineService` address; required on rank 0, may be empty elsewhere.
    pub grpc_endpoint: String,
    /// KV-transfer endpoint; may be empty for ranks that hold no KV to serve.
    pub kv_endpoint: String,
}

impl TryFrom<pb::RankEndpoint> for RankEndpoint {
    type Error = Error;

    fn try_from(wire: pb::RankEndpoint) -> Result<Self> {
        const M: &str = "RankEndpoint";
        if wire.gpu_indices.is_empty() {
            return Err(Error::missing(M, "gpu_indices"));
        }
        Ok(Self {
            rank: wire.rank,
            node: required(wire.node, M, "node")?,
            gpu_indices: wire.gpu_indices,
            grpc_endpoint: wire.grpc_endpoint,
            kv_endpoint: wire.kv_endpoint,
        })
    }
}

impl From<RankEndpoint> for pb::RankEndpoint {
    fn from(rank: RankEndpoint) -> Self {
        Self {
            rank: rank.rank,
            node: rank.node,
            gpu_indices: rank.gpu_indices,
            grpc_endpoint: rank.grpc_endpoint,
            kv_endpoint: rank.kv_endpoint,
        }
    }
}

/// An engine worker as it registers itself: role, shape, ranks and endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    /// Identity.
    pub id: WorkerId,
    /// Current role.
    pub role: Role,
    /// Parallel shape.
    pub shape: Shape,
    /// Ranks sorted by index; indices are exactly `0..ranks.len()`.
    pub ranks: Vec<RankEndpoint>,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Launch generation.
    pub generation: u64,
}

impl WorkerRecord {
    /// The worker's `EngineService` address (rank 0's).
    pub fn grpc_endpoint(&self) -> Option<&str> {
        self.ranks.first().map(|r| r.grpc_endpoint.as_str())
    }

    /// The KV-transfer endpoint decode workers pull from (rank 0's).
    pub fn kv_endpoint(&self) -> Option<&str> {
        self.ranks
            .first()
            .map(|r| r.kv_endpoint.as_str())
            .filter(|e| !e.is_empty())
    }
}

impl TryFrom<pb::WorkerRecord> for WorkerRecord {
    type Error = Error;

    fn try_from(wire: pb::WorkerRecord) -> Result<Self> {
        const M: &str = "WorkerRecord";
        let mut ranks = wire
            .ranks
            .into_iter()
            .map(RankEndpoint::try_from)
            .collect::<Result<Vec<_>>>()?;
        if ranks.is_empty() {
            return Err(Error::missing(M, "ranks"));
        }
        ranks.sort_by_key(|r| r.rank);
        for (index, rank) in ranks.iter().enumerate() {
            if u32::try_from(index).ok() != Some(rank.rank) {
                return Err(Error::invalid(
                    M,
                    "ranks",
                    "rank indices must be exactly 0..n without gaps or repeats",
                ));
            }
        }
        if ranks[0].grpc_endpoint.is_empty() {
            return Err(Error::missing(M, "ranks[0].grpc_endpoint"));
        }
        Ok(Self {
            id: WorkerId::from_field(wire.id, M, "id")?,
            role: Role::from_wire(wire.role, M, "role")?,
            shape: Shape::from_field(wire.shape, M, "shape")?,
            ranks,
            state: WorkerState::from_wire(wire.state)?,
            generation: wire.generation,
        })
    }
}

impl From<WorkerRecord> for pb::WorkerRecord {
    fn from(record: WorkerRecord) -> Self {
        Self {
            id: Some(record.id.into()),
            role: record.role.into(),
            shape: Some(record.shape.into()),
            ranks: record.ranks.into_iter().map(Into::into).collect(),
            state: record.state.into(),
            generation: record.generation,
        }
    }
}

impl RegistryRecord for WorkerRecord {
    const MESSAGE: &'static str = "WorkerRecord";

    fn key(&self) -> String {
        registry::worker_key(&self.id.namespace, &self.id.deployment, &self.id.worker)
    }

    fn encode(&self) -> Vec<u8> {
        pb::WorkerRecord::from(self.clone()).encode_to_vec()
    }

    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeFailure> {
        let wire = pb::WorkerRecord::decode(bytes).map_err(DecodeFailure::Wire)?;
        Ok(wire.try_into()?)
    }
}

/// One rank of a worker as the rank itself registers it once it is up.
/// Rank 0 forms the worker from these (see the registry layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankRecord {
    /// The worker the rank belongs to.
    pub worker: WorkerId,
    /// Where the rank runs and how to reach it.
    pub endpoint: RankEndpoint,
    /// Launch generation; ranks of different generations never form a group.
    pub generation: u64,
    /// Ranks in the worker.
    pub world_size: u32,
}

impl TryFrom<pb::RankRecord> for RankRecord {
    type Error = Error;

    fn try_from(wire: pb::RankRecord) -> Result<Self> {
        const M: &str = "RankRecord";
        let endpoint: RankEndpoint = wire
            .endpoint
            .ok_or_else(|| Error::missing(M, "endpoint"))?
            .try_into()?;
        if wire.world_size == 0 || endpoint.rank >= wire.world_size {
            return Err(Error::invalid(
                M,
                "world_size",
                "must be above the rank index",
            ));
        }
        Ok(Self {
            worker: WorkerId::from_field(wire.worker, M, "worker")?,
            endpoint,
            generation: wire.generation,
            world_size: wire.world_size,
        })
    }
}

impl From<RankRecord> for pb::RankRecord {
    fn from(record: RankRecord) -> Self {
        Self {
            worker: Some(record.worker.into()),
            endpoint: Some(record.endpoint.into()),
            generation: record.generation,
            world_size: record.world_size,
        }
    }
}

impl RegistryRecord for RankRecord {
    const MESSAGE: &'static str = "RankRecord";

    fn key(&self) -> String {
        registry::rank_key(&self.worker, self.endpoint.rank)
    }

    fn encode(&self) -> Vec<u8> {
        pb::RankRecord::from(self.clone()).encode_to_vec()
    }

    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeFailure> {
        let wire = pb::RankRecord::decode(bytes).map_err(DecodeFailure::Wire)?;
        Ok(wire.try_into()?)
    }
}

/// A worker's periodic load report.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// The reporting worker.
    pub worker: WorkerId,
    /// The figures.
    pub load: EngineLoad,
    /// When they were taken.
    pub at: SystemTime,
}

impl TryFrom<pb::LoadReport> for LoadReport {
    type Error = Error;

    fn try_from(wire: pb::LoadReport) -> Result<Self> {
        const M: &str = "LoadReport";
        Ok(Self {
            worker: WorkerId::from_field(wire.worker, M, "worker")?,
            load: wire
                .load
                .ok_or_else(|| Error::missing(M, "load"))?
                .try_into()?,
            at: timestamp(wire.at, M, "at")?,
        })
    }
}

impl From<LoadReport> for pb::LoadReport {
    fn from(report: LoadReport) -> Self {
        Self {
            worker: Some(report.worker.into()),
            load: Some(report.load.into()),
            at: Some(report.at.into()),
        }
    }
}

impl RegistryRecord for LoadReport {
    const MESSAGE: &'static str = "LoadReport";

    fn key(&self) -> String {
        registry::load_key(
            &self.worker.namespace,
            &self.worker.deployment,
            &self.worker.worker,
        )
    }

    fn encode(&self) -> Vec<u8> {
        pb::LoadReport::from(self.clone()).encode_to_vec()
    }

    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeFailure> {
        let wire = pb::LoadReport::decode(bytes).map_err(DecodeFailure::Wire)?;
        Ok(wire.try_into()?)
    }
}

/// Builders of valid records for tests in this crate and its users
/// (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
pub mod fixtures {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::types::GpuHealth;

    /// An agent on `node` with four healthy simulated GB200 GPUs.
    pub fn agent(node: &str) -> AgentRecord {
        AgentRecord {
            node: node.to_owned(),
            address: format!("http://{node}:7100"),
            gpus: (0..4)
                .map(|index| Gpu {
                    index,
                    uuid: format!("GPU-{node}-{index}"),
                    product: "NVIDIA-GB200".to_owned(),
                    memory_mib: 189_471,
                    health: GpuHealth::Healthy,
                    reason: String::new(),
                })
                .collect(),
            sku: "GB200".to_owned(),
            clique: "cluster-a.1".to_owned(),
            heartbeat: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        }
    }

    /// A ready one-tray decode worker (EP=4) on `tray-0`.
    pub fn worker(namespace: &str, deployment: &str, worker: &str) -> WorkerRecord {
        WorkerRecord {
            id: WorkerId::new(namespace, deployment, worker),
            role: Role::Decode,
            shape: Shape { tp: 1, ep: 4 },
            ranks: (0..4)
                .map(|rank| RankEndpoint {
                    rank,
                    node: "tray-0".to_owned(),
                    gpu_indices: vec![rank],
                    grpc_endpoint: if rank == 0 {
                        "http://tray-0:7200".to_owned()
                    } else {
                        String::new()
                    },
                    kv_endpoint: format!("tray-0:{}", 7300 + rank),
                })
                .collect(),
            state: WorkerState::Ready,
            generation: 1,
        }
    }

    /// A load report of `id` with half the KV in use.
    pub fn load(id: &WorkerId) -> LoadReport {
        LoadReport {
            worker: id.clone(),
            load: EngineLoad {
                queue_depth: 3,
                running: 64,
                kv_blocks_used: 500,
                kv_blocks_total: 1000,
                ttft_seconds: 0.8,
                tpot_seconds: 0.037,
                prefill_tokens_per_second: 0.0,
                prefills_total: 0,
                prompt_tokens_total: 0,
                decodes_total: 1_200,
                requested_output_tokens_total: 1_228_800,
                kv_held: 0,
            },
            at: UNIX_EPOCH + Duration::from_millis(1_800_000_000_123),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_records_round_trip_and_check_their_rank() {
        let worker = WorkerId::new("llm", "dsv4", "decode-0");
        let mut record = RankRecord {
            worker: worker.clone(),
            endpoint: RankEndpoint {
                rank: 3,
                node: "tray-3".into(),
                gpu_indices: vec![0, 1, 2, 3],
                grpc_endpoint: "http://127.0.0.1:7000".into(),
                kv_endpoint: String::new(),
            },
            generation: 2,
            world_size: 4,
        };
        let key = record.key();
        assert_eq!(key, "/rackscale/v1/ranks/llm/dsv4/decode-0/3");
        assert_eq!(RankRecord::decode(&key, &record.encode()).unwrap(), record);
        record.world_size = 3;
        assert!(RankRecord::decode(&key, &record.encode()).is_err());
    }

    #[test]
    fn records_round_trip_through_bytes() {
        let agent = fixtures::agent("tray-3");
        assert_eq!(
            AgentRecord::decode(&agent.key(), &agent.encode()).ok(),
            Some(agent)
        );
        let worker = fixtures::worker("llm", "dsv4", "decode-0");
        let back = WorkerRecord::decode(&worker.key(), &worker.encode()).ok();
        assert_eq!(back.as_ref(), Some(&worker));
        assert_eq!(
            back.and_then(|w| w.kv_endpoint().map(str::to_owned))
                .as_deref(),
            Some("tray-0:7300")
        );
        let load = fixtures::load(&worker.id);
        assert_eq!(
            LoadReport::decode(&load.key(), &load.encode()).ok(),
            Some(load)
        );
    }

    #[test]
    fn garbage_bytes_are_a_decode_error_naming_the_key() {
        let err = WorkerRecord::decode("/rackscale/v1/workers/a/b/c", b"\xff\xff\xff not protobuf");
        let err = err.err();
        assert!(
            matches!(
                err,
                Some(Error::Decode {
                    message: "WorkerRecord",
                    ..
                })
            ),
            "{err:?}"
        );
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("/rackscale/v1/workers/a/b/c"), "{text}");
    }

    #[test]
    fn missing_required_fields_are_named() {
        let mut wire = pb::WorkerRecord::from(fixtures::worker("llm", "dsv4", "w"));
        wire.shape = None;
        let err =
            WorkerRecord::decode("/rackscale/v1/workers/llm/dsv4/w", &wire.encode_to_vec()).err();
        match err {
            Some(Error::InvalidValue { source, .. }) => {
                assert!(
                    matches!(*source, Error::MissingField { field: "shape", .. }),
                    "{source:?}"
                );
            }
            other => panic!("expected InvalidValue, got {other:?}"),
        }
        // An empty value decodes as an all-default message: every required field missing.
        assert!(AgentRecord::decode("/rackscale/v1/agents/x", b"").is_err());
    }

    #[test]
    fn rank_indices_must_be_dense() {
        let mut worker = fixtures::worker("llm", "dsv4", "w");
        worker.ranks[2].rank = 7;
        let wire = pb::WorkerRecord::from(worker);
        assert!(matches!(
            WorkerRecord::try_from(wire),
            Err(Error::InvalidField { field: "ranks", .. })
        ));
    }

    #[test]
    fn ranks_are_sorted_on_decode() {
        let worker = fixtures::worker("llm", "dsv4", "w");
        let mut wire = pb::WorkerRecord::from(worker.clone());
        wire.ranks.reverse();
        assert_eq!(WorkerRecord::try_from(wire).ok(), Some(worker));
    }

    #[test]
    fn a_record_under_the_wrong_key_is_rejected() {
        let worker = fixtures::worker("llm", "dsv4", "w");
        let err = WorkerRecord::decode("/rackscale/v1/workers/llm/dsv4/other", &worker.encode());
        assert!(matches!(err, Err(Error::InvalidValue { .. })));
    }
}
