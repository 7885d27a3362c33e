//! Conversions between the agent's domain types and `proto::pb` messages.
//!
//! The only place generated types meet agent logic: requests are validated
//! into [`RankSpec`]/[`RankKey`] here, and statuses and events go back out.

use proto::pb;
use proto::types::{Role, Shape, WorkerId};

use crate::events::{Event, EventKind};
use crate::rank::{Backend, Model, Phase, RankKey, RankSpec, RankStatus};
use crate::{Error, Result};

fn invalid(err: impl std::fmt::Display) -> Error {
    Error::InvalidSpec(err.to_string())
}

impl TryFrom<pb::RankSpec> for RankSpec {
    type Error = Error;

    fn try_from(wire: pb::RankSpec) -> Result<Self> {
        const M: &str = "RankSpec";
        let worker = WorkerId::from_field(wire.worker, M, "worker").map_err(invalid)?;
        let role = Role::from_wire(wire.role, M, "role").map_err(invalid)?;
        let shape = Shape::from_field(wire.shape, M, "shape").map_err(invalid)?;
        if wire.world_size == 0 || wire.rank >= wire.world_size {
            return Err(Error::InvalidSpec(format!(
                "rank {} is outside world size {}",
                wire.rank, wire.world_size
            )));
        }
        if wire.gpu_indices.is_empty() {
            return Err(Error::InvalidSpec("gpu_indices is empty".into()));
        }
        let mut sorted = wire.gpu_indices.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != wire.gpu_indices.len() {
            return Err(Error::InvalidSpec("gpu_indices repeats a GPU".into()));
        }
        let backend = match pb::Backend::try_from(wire.backend) {
            Ok(pb::Backend::Sim) => Backend::Sim,
            Ok(pb::Backend::CpuReference) => Backend::CpuReference,
            _ => return Err(Error::InvalidSpec("backend is unset or unknown".into())),
        };
        let rendezvous = wire.rendezvous.unwrap_or_default();
        let model = wire.model.unwrap_or_default();
        Ok(Self {
            key: RankKey {
                worker,
                rank: wire.rank,
            },
            generation: wire.generation,
            role,
            shape,
            world_size: wire.world_size,
            gpus: wire.gpu_indices,
            leader_address: rendezvous.leader_address,
            peers: rendezvous.peer_addresses,
            registry_key: rendezvous.registry_key,
            model: Model {
                name: model.name,
                config_path: model.config_path,
                weights_path: model.weights_path,
                quantization: model.quantization,
            },
            backend,
            engine_args: wire.engine_args.into_iter().collect(),
        })
    }
}

/// Decodes a `RankRef` into a key and generation.
pub fn rank_ref(wire: Option<pb::RankRef>) -> Result<(RankKey, u64)> {
    let wire = wire.ok_or_else(|| Error::InvalidSpec("rank is missing".into()))?;
    let worker = WorkerId::from_field(wire.worker, "RankRef", "worker").map_err(invalid)?;
    Ok((
        RankKey {
            worker,
            rank: wire.rank,
        },
        wire.generation,
    ))
}

fn to_ref(key: &RankKey, generation: u64) -> pb::RankRef {
    pb::RankRef {
        worker: Some(key.worker.clone().into()),
        rank: key.rank,
        generation,
    }
}

impl From<Phase> for pb::RankPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Starting => Self::Starting,
            Phase::Running => Self::Running,
            Phase::Stopping => Self::Stopping,
            Phase::Exited => Self::Exited,
            Phase::Failed => Self::Failed,
        }
    }
}

impl From<RankStatus> for pb::RankStatus {
    fn from(status: RankStatus) -> Self {
        Self {
            rank: Some(to_ref(&status.key, status.generation)),
            role: status.role.into(),
            phase: pb::RankPhase::from(status.phase) as i32,
            pid: status.pid,
            gpu_indices: status.gpus,
            grpc_endpoint: String::new(),
            kv_endpoint: String::new(),
            started_at: status.started_at.map(Into::into),
            exit_code: status.exit_code,
            message: status.message,
            restarts: status.restarts,
            world_size: status.world_size,
        }
    }
}

impl From<Event> for pb::AgentEvent {
    fn from(event: Event) -> Self {
        use pb::agent_event::Event as E;
        let inner = match event.kind {
            EventKind::RankStarted(status) => E::RankStarted(pb::RankStarted {
                status: Some(status.into()),
            }),
            EventKind::RankExited {
                key,
                generation,
                exit_code,
                requested,
            } => E::RankExited(pb::RankExited {
                rank: Some(to_ref(&key, generation)),
                exit_code,
                requested,
            }),
            EventKind::RankFailed {
                key,
                generation,
                exit_code,
                reason,
            } => E::RankFailed(pb::RankFailed {
                rank: Some(to_ref(&key, generation)),
                exit_code,
                reason,
            }),
            EventKind::GpuHealth(change) => E::GpuHealth(pb::GpuHealthChanged {
                gpu: Some(change.gpu.into()),
                previous: change.previous.into(),
            }),
        };
        Self {
            sequence: event.sequence,
            at: Some(event.at.into()),
            event: Some(inner),
        }
    }
}
