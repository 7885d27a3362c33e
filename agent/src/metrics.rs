//! The agent's Prometheus metrics (prefix `rackscale_agent`); served by [`crate::http`].
//!
//! Labels are bounded: exit reasons come from a fixed set
//! (`completed`, `stopped`, `crashed`, `signaled`, `spawn_failed`) and GPU
//! health from the four health words.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use proto::types::{Gpu, GpuHealth};

use crate::gpu::health_label;

/// Metric names, without the `rackscale_agent_` prefix.
pub mod names {
    /// Ranks whose process is running.
    pub const RANKS_RUNNING: &str = "ranks_running";
    /// Restarts of crashed ranks.
    pub const RANK_RESTARTS_TOTAL: &str = "rank_restarts_total";
    /// Rank process exits, by reason.
    pub const RANK_EXITS_TOTAL: &str = "rank_exits_total";
    /// GPUs by health.
    pub const GPUS: &str = "gpus";
}

/// The agent's metrics, registered in their own prefixed registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Ranks whose process is running.
    pub ranks_running: IntGauge,
    /// Restarts of crashed ranks.
    pub rank_restarts: IntCounter,
    rank_exits: IntCounterVec,
    gpus: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("rackscale_agent".into()), None)?;
        let ranks_running = IntGauge::new(names::RANKS_RUNNING, "Ranks whose process is running")?;
        let rank_restarts =
            IntCounter::new(names::RANK_RESTARTS_TOTAL, "Restarts of crashed ranks")?;
        let rank_exits = IntCounterVec::new(
            Opts::new(names::RANK_EXITS_TOTAL, "Rank process exits by reason"),
            &["reason"],
        )?;
        let gpus = IntGaugeVec::new(Opts::new(names::GPUS, "GPUs by health"), &["health"])?;
        registry.register(Box::new(ranks_running.clone()))?;
        registry.register(Box::new(rank_restarts.clone()))?;
        registry.register(Box::new(rank_exits.clone()))?;
        registry.register(Box::new(gpus.clone()))?;
        Ok(Self {
            registry,
            ranks_running,
            rank_restarts,
            rank_exits,
            gpus,
        })
    }

    /// Counts one rank exit with a bounded `reason`.
    pub fn rank_exit(&self, reason: &'static str) {
        self.rank_exits.with_label_values(&[reason]).inc();
    }

    /// Sets the GPUs-by-health gauges from a snapshot.
    pub fn set_gpus(&self, gpus: &[Gpu]) {
        for health in [
            GpuHealth::Unknown,
            GpuHealth::Healthy,
            GpuHealth::Degraded,
            GpuHealth::Unhealthy,
        ] {
            let n = gpus.iter().filter(|g| g.health == health).count();
            self.gpus
                .with_label_values(&[health_label(health)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_prefix() {
        let m = Metrics::new().unwrap();
        m.ranks_running.set(2);
        m.rank_exit("crashed");
        m.set_gpus(&[]);
        let text = m.render();
        assert!(text.contains("rackscale_agent_ranks_running 2"), "{text}");
        assert!(text.contains("rackscale_agent_rank_exits_total{reason=\"crashed\"} 1"));
        assert!(text.contains("rackscale_agent_gpus{health=\"healthy\"} 0"));
    }
}
