//! Pure supervisor decisions: may a rank start here, and when to restart it.
//!
//! No processes, clocks or locks: the supervisor feeds these functions a
//! snapshot and acts on the answer. The invariant they keep is that no GPU is
//! ever held by two active ranks, and that no rank starts on a GPU that is
//! unknown or not healthy.

use std::time::Duration;

use proto::types::Gpu;

use crate::gpu::health_label;
use crate::rank::{RankKey, RankSpec};
use crate::{Error, Result};

/// An active rank (running, stopping or waiting to restart) and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Which rank.
    pub key: RankKey,
    /// Its generation.
    pub generation: u64,
    /// The GPU indices it holds.
    pub gpus: Vec<u32>,
}

/// What to do with a launch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchDecision {
    /// Start a new process.
    Start,
    /// The same rank and generation is already active: return it (idempotent).
    AlreadyActive,
}

/// Decides whether `spec` may start given the node's GPUs and the active ranks.
pub fn check_launch(spec: &RankSpec, gpus: &[Gpu], active: &[Held]) -> Result<LaunchDecision> {
    if let Some(same) = active.iter().find(|h| h.key == spec.key) {
        if same.generation == spec.generation && same.gpus == spec.gpus {
            return Ok(LaunchDecision::AlreadyActive);
        }
        if same.generation == spec.generation {
            return Err(Error::RankMoved {
                rank: spec.key.to_string(),
                gpus: same.gpus.clone(),
            });
        }
        return Err(Error::RankConflict {
            rank: spec.key.to_string(),
            running: same.generation,
        });
    }
    for &index in &spec.gpus {
        let gpu = gpus
            .iter()
            .find(|g| g.index == index)
            .ok_or(Error::UnknownGpu {
                index,
                count: gpus.len(),
            })?;
        if !gpu.health.is_usable() {
            return Err(Error::GpuUnusable {
                index,
                health: health_label(gpu.health),
            });
        }
        if let Some(holder) = active.iter().find(|h| h.gpus.contains(&index)) {
            return Err(Error::GpuInUse {
                index,
                holder: format!("{}@{}", holder.key, holder.generation),
            });
        }
    }
    Ok(LaunchDecision::Start)
}

/// How crashed ranks are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed per launch before the rank is left failed.
    pub max_restarts: u32,
    /// Delay before the first restart; doubles each time.
    pub base_delay: Duration,
    /// Cap on the delay.
    pub max_delay: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RestartPolicy {
    /// The delay before restart number `done + 1`, or `None` when `done`
    /// restarts already used up the budget.
    pub fn delay(&self, done: u32) -> Option<Duration> {
        if done >= self.max_restarts {
            return None;
        }
        let factor = 1u32.checked_shl(done).unwrap_or(u32::MAX);
        Some(
            self.base_delay
                .checked_mul(factor)
                .unwrap_or(self.max_delay)
                .min(self.max_delay),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proto::types::{GpuHealth, Role, Shape, WorkerId};

    use super::*;
    use crate::rank::{Backend, Model};

    fn gpus(n: u32) -> Vec<Gpu> {
        (0..n)
            .map(|index| Gpu {
                index,
                uuid: String::new(),
                product: "NVIDIA-GB200".into(),
                memory_mib: 1,
                health: GpuHealth::Healthy,
                reason: String::new(),
            })
            .collect()
    }

    fn spec(worker: &str, rank: u32, generation: u64, gpus: &[u32]) -> RankSpec {
        RankSpec {
            key: RankKey {
                worker: WorkerId::new("ns", "dep", worker),
                rank,
            },
            generation,
            role: Role::Decode,
            shape: Shape { tp: 1, ep: 2 },
            world_size: 2,
            gpus: gpus.to_vec(),
            leader_address: String::new(),
            peers: vec![],
            registry_key: String::new(),
            model: Model::default(),
            backend: Backend::Sim,
            engine_args: BTreeMap::new(),
        }
    }

    fn held(s: &RankSpec) -> Held {
        Held {
            key: s.key.clone(),
            generation: s.generation,
            gpus: s.gpus.clone(),
        }
    }

    #[test]
    fn free_healthy_gpus_start() {
        let a = spec("w0", 0, 1, &[0, 1]);
        assert_eq!(
            check_launch(&a, &gpus(4), &[]).unwrap(),
            LaunchDecision::Start
        );
        let b = spec("w0", 1, 1, &[2, 3]);
        assert_eq!(
            check_launch(&b, &gpus(4), &[held(&a)]).unwrap(),
            LaunchDecision::Start
        );
    }

    #[test]
    fn a_gpu_held_by_another_rank_is_refused() {
        let a = spec("w0", 0, 1, &[0, 1]);
        let b = spec("w1", 0, 1, &[1, 2]);
        let err = check_launch(&b, &gpus(4), &[held(&a)]).unwrap_err();
        assert!(matches!(err, Error::GpuInUse { index: 1, .. }), "{err}");
        assert!(err.to_string().contains("ns/dep/w0#0@1"), "{err}");
    }

    #[test]
    fn unknown_and_unhealthy_gpus_are_refused() {
        let mut node = gpus(2);
        let err = check_launch(&spec("w", 0, 1, &[2]), &node, &[]).unwrap_err();
        assert!(matches!(err, Error::UnknownGpu { index: 2, count: 2 }));
        node[1].health = GpuHealth::Unhealthy;
        let err = check_launch(&spec("w", 0, 1, &[1]), &node, &[]).unwrap_err();
        assert!(matches!(err, Error::GpuUnusable { index: 1, .. }));
        assert_eq!(err.category(), "gpu_unusable");
    }

    #[test]
    fn relaunch_is_idempotent_per_generation() {
        let a = spec("w0", 0, 3, &[0]);
        assert_eq!(
            check_launch(&a, &gpus(2), &[held(&a)]).unwrap(),
            LaunchDecision::AlreadyActive
        );
        let newer = spec("w0", 0, 4, &[1]);
        let err = check_launch(&newer, &gpus(2), &[held(&a)]).unwrap_err();
        assert!(matches!(err, Error::RankConflict { running: 3, .. }));
        // Same generation on other GPUs: the worker moved; the old rank must
        // be stopped first, never silently kept or doubled.
        let moved = spec("w0", 0, 3, &[1]);
        let err = check_launch(&moved, &gpus(2), &[held(&a)]).unwrap_err();
        assert!(matches!(err, Error::RankMoved { .. }), "{err}");
        assert_eq!(err.category(), "rank_moved");
    }

    #[test]
    fn backoff_doubles_is_capped_and_bounded() {
        let policy = RestartPolicy {
            max_restarts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        let delays: Vec<_> = (0..7).map(|n| policy.delay(n)).collect();
        let ms = |v: u64| Some(Duration::from_millis(v));
        assert_eq!(
            delays,
            vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000), None]
        );
        let huge = RestartPolicy {
            max_restarts: u32::MAX,
            ..policy
        };
        assert_eq!(huge.delay(40), ms(1000));
        let none = RestartPolicy {
            max_restarts: 0,
            ..policy
        };
        assert_eq!(none.delay(0), None);
    }
}
