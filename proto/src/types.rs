//! Small domain types shared by every contract: worker identity, role,
//! parallel shape, GPUs and engine load.
//!
//! Each converts from its generated twin in [`crate::pb`] with `TryFrom`,
//! which rejects what the wire allows but the contract does not (an
//! unspecified enum, an empty name, a zero TP width), and back with `From`,
//! which cannot fail. Logic outside this crate uses these, not `pb` types.

use std::fmt;

use crate::error::{Error, Result};
use crate::pb;

/// Decodes a proto3 enum field (carried as `i32`), rejecting unknown values.
fn enum_field<E: TryFrom<i32>>(
    value: i32,
    message: &'static str,
    field: &'static str,
) -> Result<E> {
    E::try_from(value)
        .map_err(|_| Error::invalid(message, field, format!("unknown enum value {value}")))
}

/// Requires a string field to be non-empty.
pub(crate) fn required(
    value: String,
    message: &'static str,
    field: &'static str,
) -> Result<String> {
    if value.is_empty() {
        Err(Error::missing(message, field))
    } else {
        Ok(value)
    }
}

/// What a worker does with requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Computes KV caches of prompts.
    Prefill,
    /// Pulls KV caches and generates tokens.
    Decode,
    /// Both on the same ranks (aggregated serving).
    Both,
}

impl Role {
    /// Decodes the wire `i32` of field `field` of `message`.
    pub fn from_wire(value: i32, message: &'static str, field: &'static str) -> Result<Self> {
        match enum_field::<pb::Role>(value, message, field)? {
            pb::Role::Unspecified => Err(Error::missing(message, field)),
            pb::Role::Prefill => Ok(Self::Prefill),
            pb::Role::Decode => Ok(Self::Decode),
            pb::Role::Both => Ok(Self::Both),
        }
    }

    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
            Self::Both => "both",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Role> for pb::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Prefill => Self::Prefill,
            Role::Decode => Self::Decode,
            Role::Both => Self::Both,
        }
    }
}

impl From<Role> for i32 {
    fn from(role: Role) -> Self {
        pb::Role::from(role) as i32
    }
}

/// Health of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuHealth {
    /// Not reported; treat as unusable.
    Unknown,
    /// Usable.
    Healthy,
    /// Running but erroring; place no new work.
    Degraded,
    /// Failed.
    Unhealthy,
}

impl GpuHealth {
    /// Decodes the wire `i32` of field `field` of `message`.
    pub fn from_wire(value: i32, message: &'static str, field: &'static str) -> Result<Self> {
        Ok(match enum_field::<pb::GpuHealth>(value, message, field)? {
            pb::GpuHealth::Unspecified => Self::Unknown,
            pb::GpuHealth::Healthy => Self::Healthy,
            pb::GpuHealth::Degraded => Self::Degraded,
            pb::GpuHealth::Unhealthy => Self::Unhealthy,
        })
    }

    /// Whether new work may be placed on the GPU.
    pub fn is_usable(self) -> bool {
        self == Self::Healthy
    }
}

impl From<GpuHealth> for i32 {
    fn from(health: GpuHealth) -> Self {
        let wire = match health {
            GpuHealth::Unknown => pb::GpuHealth::Unspecified,
            GpuHealth::Healthy => pb::GpuHealth::Healthy,
            GpuHealth::Degraded => pb::GpuHealth::Degraded,
            GpuHealth::Unhealthy => pb::GpuHealth::Unhealthy,
        };
        wire as i32
    }
}

/// Identity of one worker within a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    /// Namespace of the owning ModelDeployment.
    pub namespace: String,
    /// Name of the owning ModelDeployment.
    pub deployment: String,
    /// Worker name, unique within the deployment.
    pub worker: String,
}

impl WorkerId {
    /// Builds an id from its three names.
    pub fn new(
        namespace: impl Into<String>,
        deployment: impl Into<String>,
        worker: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            deployment: deployment.into(),
            worker: worker.into(),
        }
    }

    /// Decodes a required `WorkerId` field of `message`.
    pub fn from_field(
        value: Option<pb::WorkerId>,
        message: &'static str,
        field: &'static str,
    ) -> Result<Self> {
        value
            .ok_or_else(|| Error::missing(message, field))?
            .try_into()
    }

    /// Checks that no segment is empty or contains `/`, which would break the key layout.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("namespace", &self.namespace),
            ("deployment", &self.deployment),
            ("worker", &self.worker),
        ] {
            if value.is_empty() {
                return Err(Error::missing("WorkerId", field));
            }
            if value.contains('/') {
                return Err(Error::invalid("WorkerId", field, "must not contain '/'"));
            }
        }
        Ok(())
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.deployment, self.worker)
    }
}

impl TryFrom<pb::WorkerId> for WorkerId {
    type Error = Error;

    fn try_from(wire: pb::WorkerId) -> Result<Self> {
        let id = Self::new(wire.namespace, wire.deployment, wire.worker);
        id.validate()?;
        Ok(id)
    }
}

impl From<WorkerId> for pb::WorkerId {
    fn from(id: WorkerId) -> Self {
        Self {
            namespace: id.namespace,
            deployment: id.deployment,
            worker: id.worker,
        }
    }
}

/// Parallel shape of a worker: tensor-parallel and expert-parallel widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Tensor-parallel width, at least 1.
    pub tp: u32,
    /// Expert-parallel width, at least 1.
    pub ep: u32,
}

impl Shape {
    /// Decodes a required `Shape` field of `message`.
    pub fn from_field(
        value: Option<pb::Shape>,
        message: &'static str,
        field: &'static str,
    ) -> Result<Self> {
        value
            .ok_or_else(|| Error::missing(message, field))?
            .try_into()
    }
}

impl TryFrom<pb::Shape> for Shape {
    type Error = Error;

    fn try_from(wire: pb::Shape) -> Result<Self> {
        if wire.tp == 0 {
            return Err(Error::invalid("Shape", "tp", "must be at least 1"));
        }
        if wire.ep == 0 {
            return Err(Error::invalid("Shape", "ep", "must be at least 1"));
        }
        Ok(Self {
            tp: wire.tp,
            ep: wire.ep,
        })
    }
}

impl From<Shape> for pb::Shape {
    fn from(shape: Shape) -> Self {
        Self {
            tp: shape.tp,
            ep: shape.ep,
        }
    }
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Index on the node.
    pub index: u32,
    /// GPU UUID; empty for simulated GPUs.
    pub uuid: String,
    /// Product name (GFD spelling).
    pub product: String,
    /// Device memory in MiB.
    pub memory_mib: u64,
    /// Current health.
    pub health: GpuHealth,
    /// Why it is not healthy; empty when healthy.
    pub reason: String,
}

impl TryFrom<pb::Gpu> for Gpu {
    type Error = Error;

    fn try_from(wire: pb::Gpu) -> Result<Self> {
        Ok(Self {
            index: wire.index,
            uuid: wire.uuid,
            product: wire.product,
            memory_mib: wire.memory_mib,
            health: GpuHealth::from_wire(wire.health, "Gpu", "health")?,
            reason: wire.reason,
        })
    }
}

impl From<Gpu> for pb::Gpu {
    fn from(gpu: Gpu) -> Self {
        Self {
            index: gpu.index,
            uuid: gpu.uuid,
            product: gpu.product,
            memory_mib: gpu.memory_mib,
            health: gpu.health.into(),
            reason: gpu.reason,
        }
    }
}

/// Load of one engine worker (modelled time for the simulated backend).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineLoad {
    /// Requests waiting to be scheduled.
    pub queue_depth: u32,
    /// Requests in the running batch.
    pub running: u32,
    /// KV blocks in use.
    pub kv_blocks_used: u64,
    /// KV blocks in total.
    pub kv_blocks_total: u64,
    /// Recent time to first token, seconds.
    pub ttft_seconds: f64,
    /// Recent time per output token, seconds.
    pub tpot_seconds: f64,
    /// Recent prefill throughput, prompt tokens per second.
    pub prefill_tokens_per_second: f64,
    /// Prompts accepted for prefill since start (counter).
    pub prefills_total: u64,
    /// Prompt tokens of those prompts (counter).
    pub prompt_tokens_total: u64,
    /// Decodes accepted since start (counter).
    pub decodes_total: u64,
    /// Output tokens those decodes asked for (counter).
    pub requested_output_tokens_total: u64,
    /// Prefilled KV caches waiting to be pulled.
    pub kv_held: u32,
}

impl EngineLoad {
    /// Fraction of KV blocks in use, 0 when the total is unknown.
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            self.kv_blocks_used as f64 / self.kv_blocks_total as f64
        }
    }
}

impl TryFrom<pb::EngineLoad> for EngineLoad {
    type Error = Error;

    fn try_from(wire: pb::EngineLoad) -> Result<Self> {
        if wire.kv_blocks_used > wire.kv_blocks_total {
            return Err(Error::invalid(
                "EngineLoad",
                "kv_blocks_used",
                "exceeds kv_blocks_total",
            ));
        }
        for (field, value) in [
            ("ttft_seconds", wire.ttft_seconds),
            ("tpot_seconds", wire.tpot_seconds),
            ("prefill_tokens_per_second", wire.prefill_tokens_per_second),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(Error::invalid(
                    "EngineLoad",
                    field,
                    "must be finite and not negative",
                ));
            }
        }
        Ok(Self {
            queue_depth: wire.queue_depth,
            running: wire.running,
            kv_blocks_used: wire.kv_blocks_used,
            kv_blocks_total: wire.kv_blocks_total,
            ttft_seconds: wire.ttft_seconds,
            tpot_seconds: wire.tpot_seconds,
            prefill_tokens_per_second: wire.prefill_tokens_per_second,
            prefills_total: wire.prefills_total,
            prompt_tokens_total: wire.prompt_tokens_total,
            decodes_total: wire.decodes_total,
            requested_output_tokens_total: wire.requested_output_tokens_total,
            kv_held: wire.kv_held,
        })
    }
}

impl From<EngineLoad> for pb::EngineLoad {
    fn from(load: EngineLoad) -> Self {
        Self {
            queue_depth: load.queue_depth,
            running: load.running,
            kv_blocks_used: load.kv_blocks_used,
            kv_blocks_total: load.kv_blocks_total,
            ttft_seconds: load.ttft_seconds,
            tpot_seconds: load.tpot_seconds,
            prefill_tokens_per_second: load.prefill_tokens_per_second,
            prefills_total: load.prefills_total,
            prompt_tokens_total: load.prompt_tokens_total,
            decodes_total: load.decodes_total,
            requested_output_tokens_total: load.requested_output_tokens_total,
            kv_held: load.kv_held,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_and_rejects_unspecified_and_unknown() {
        for role in [Role::Prefill, Role::Decode, Role::Both] {
            assert_eq!(Role::from_wire(role.into(), "M", "role").ok(), Some(role));
        }
        let err = Role::from_wire(0, "M", "role").err();
        assert!(matches!(
            err,
            Some(Error::MissingField { field: "role", .. })
        ));
        let err = Role::from_wire(42, "M", "role").err();
        assert!(matches!(
            err,
            Some(Error::InvalidField { field: "role", .. })
        ));
    }

    #[test]
    fn worker_id_rejects_empty_and_slashes() {
        let ok = pb::WorkerId {
            namespace: "llm".into(),
            deployment: "dsv4".into(),
            worker: "decode-0".into(),
        };
        assert!(WorkerId::try_from(ok.clone()).is_ok());
        let empty = pb::WorkerId {
            worker: String::new(),
            ..ok.clone()
        };
        assert!(matches!(
            WorkerId::try_from(empty),
            Err(Error::MissingField {
                field: "worker",
                ..
            })
        ));
        let slash = pb::WorkerId {
            deployment: "a/b".into(),
            ..ok
        };
        assert!(matches!(
            WorkerId::try_from(slash),
            Err(Error::InvalidField {
                field: "deployment",
                ..
            })
        ));
    }

    #[test]
    fn shape_needs_positive_widths() {
        assert!(Shape::try_from(pb::Shape { tp: 4, ep: 16 }).is_ok());
        assert!(Shape::try_from(pb::Shape { tp: 0, ep: 16 }).is_err());
        assert!(Shape::try_from(pb::Shape { tp: 1, ep: 0 }).is_err());
    }

    #[test]
    fn load_rejects_impossible_figures() {
        let ok = pb::EngineLoad {
            kv_blocks_used: 5,
            kv_blocks_total: 10,
            ttft_seconds: 0.2,
            ..Default::default()
        };
        let load = EngineLoad::try_from(ok).ok();
        assert_eq!(load.map(|l| l.kv_usage()), Some(0.5));
        let over = pb::EngineLoad {
            kv_blocks_used: 11,
            ..ok
        };
        assert!(EngineLoad::try_from(over).is_err());
        let nan = pb::EngineLoad {
            tpot_seconds: f64::NAN,
            ..ok
        };
        assert!(EngineLoad::try_from(nan).is_err());
    }
}
