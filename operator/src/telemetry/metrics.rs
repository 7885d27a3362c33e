//! The operator's metrics and the guards that record them.
//!
//! Owns the prefixed registry and every metric in it. Invariants: label
//! values are closed sets (enums here, `&'static str` error categories from
//! `category()` methods), so series stay bounded; a [`ReconcileTimer`]
//! records exactly once, when dropped.

use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramTimer, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::names;
use crate::leader::{LeaderStatus, Leadership};

/// Reconcile latency buckets: from a no-op pass to a slow apply.
const RECONCILE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Placement latency buckets: pure computation, sub-millisecond to a second.
/// Moves take a drain (seconds to minutes of work in flight) plus a
/// weight reload (about a minute on real hardware).
const MOVE_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
const PLACEMENT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Category recorded for a reconcile whose timer was dropped without an
/// outcome (the future was cancelled, or it panicked).
pub const ABANDONED: &str = "abandoned";

/// How a reconcile ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileResult {
    /// It applied (or found nothing to do).
    Success,
    /// It failed, with this bounded category (an error's `category()`).
    Error(&'static str),
}

/// A GPU's state, as counted in the `gpus` gauge. Health
/// (`Healthy`/`Unhealthy`) and allocation (`Allocated`/`Free`) are two
/// partitions of the same GPUs: sum one of them, not all four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuState {
    /// Passes its health checks.
    Healthy,
    /// Fails its health checks.
    Unhealthy,
    /// Placed for a deployment.
    Allocated,
    /// Not placed.
    Free,
}

impl GpuState {
    /// Every state, for exhaustive exports.
    pub const ALL: [GpuState; 4] = [Self::Healthy, Self::Unhealthy, Self::Allocated, Self::Free];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Allocated => "allocated",
            Self::Free => "free",
        }
    }
}

/// The serving pool a GPU belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuPool {
    /// Runs prefill workers.
    Prefill,
    /// Runs decode workers.
    Decode,
    /// In no pool.
    None,
}

impl GpuPool {
    /// Every pool, for exhaustive exports.
    pub const ALL: [GpuPool; 3] = [Self::Prefill, Self::Decode, Self::None];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
            Self::None => "none",
        }
    }
}

/// A full table of GPU counts, exported at once so no `(state, pool)`
/// series keeps a stale value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuCounts {
    counts: [[u64; GpuPool::ALL.len()]; GpuState::ALL.len()],
}

impl GpuCounts {
    /// Sets the count of GPUs in `state` and `pool`.
    pub fn set(&mut self, state: GpuState, pool: GpuPool, count: u64) -> &mut Self {
        self.counts[state as usize][pool as usize] = count;
        self
    }

    /// Adds `count` GPUs in `state` and `pool`.
    pub fn add(&mut self, state: GpuState, pool: GpuPool, count: u64) -> &mut Self {
        let cell = &mut self.counts[state as usize][pool as usize];
        *cell = cell.saturating_add(count);
        self
    }

    /// The count of GPUs in `state` and `pool`.
    pub fn get(&self, state: GpuState, pool: GpuPool) -> u64 {
        self.counts[state as usize][pool as usize]
    }
}

/// The operator's metrics, registered into one prefixed registry. Cheap to
/// clone: clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    reconcile_errors: IntCounterVec,
    reconcile_duration: Histogram,
    placement_duration: Histogram,
    gpus: IntGaugeVec,
    leader: IntGauge,
    lease_transitions: IntCounter,
    rebalance_decisions: IntCounterVec,
    role_switches: IntCounterVec,
    move_duration: Histogram,
}

impl Metrics {
    /// Creates and registers every metric under [`names::PREFIX`].
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some(names::PREFIX.to_owned()), None)?;
        let reconciles = IntCounterVec::new(
            Opts::new(names::RECONCILES_TOTAL, "Reconciles finished, by result."),
            &[names::RESULT],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                names::RECONCILE_ERRORS_TOTAL,
                "Reconciles failed, by error category.",
            ),
            &[names::CATEGORY],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                names::RECONCILE_DURATION_SECONDS,
                "Time spent in one reconcile.",
            )
            .buckets(RECONCILE_BUCKETS.to_vec()),
        )?;
        let placement_duration = Histogram::with_opts(
            HistogramOpts::new(
                names::PLACEMENT_DURATION_SECONDS,
                "Time spent computing one placement.",
            )
            .buckets(PLACEMENT_BUCKETS.to_vec()),
        )?;
        let gpus = IntGaugeVec::new(
            Opts::new(names::GPUS, "GPUs by state and pool."),
            &[names::STATE, names::POOL],
        )?;
        let leader = IntGauge::new(names::LEADER, "1 while this replica leads, else 0.")?;
        let lease_transitions = IntCounter::new(
            names::LEASE_TRANSITIONS_TOTAL,
            "Lease hand-overs observed by this replica.",
        )?;
        let rebalance_decisions = IntCounterVec::new(
            Opts::new(
                names::REBALANCE_DECISIONS_TOTAL,
                "Rebalancing decisions, by action (hold or move) and reason.",
            ),
            &[names::ACTION, names::REASON],
        )?;
        let role_switches = IntCounterVec::new(
            Opts::new(
                names::ROLE_SWITCHES_TOTAL,
                "Workers drained and relaunched in the other role, by the pool they left.",
            ),
            &[names::POOL],
        )?;
        let move_duration = Histogram::with_opts(
            HistogramOpts::new(
                names::REBALANCE_MOVE_DURATION_SECONDS,
                "Wall time of one move, from the decision to the relaunched workers serving.",
            )
            .buckets(MOVE_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(rebalance_decisions.clone()))?;
        registry.register(Box::new(role_switches.clone()))?;
        registry.register(Box::new(move_duration.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(placement_duration.clone()))?;
        registry.register(Box::new(gpus.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(lease_transitions.clone()))?;
        // Export both results from the start, so rates exist before the
        // first failure.
        for result in ["success", "error"] {
            reconciles.with_label_values(&[result]);
        }
        for pool in ["prefill", "decode"] {
            role_switches.with_label_values(&[pool]);
        }
        Ok(Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            placement_duration,
            gpus,
            leader,
            lease_transitions,
            rebalance_decisions,
            role_switches,
            move_duration,
        })
    }

    /// Counts one rebalancing decision.
    pub fn record_rebalance(&self, action: &'static str, reason: &'static str) {
        self.rebalance_decisions
            .with_label_values(&[action, reason])
            .inc();
    }

    /// Counts `count` workers that left `pool` for the other one.
    pub fn add_role_switches(&self, pool: &'static str, count: u64) {
        self.role_switches.with_label_values(&[pool]).inc_by(count);
    }

    /// Records a finished move that took `elapsed` (wall time).
    pub fn record_move(&self, elapsed: Duration) {
        self.move_duration.observe(elapsed.as_secs_f64());
    }

    /// The registry, for components that register their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Starts timing a reconcile; see [`ReconcileTimer`].
    pub fn reconcile_timer(&self) -> ReconcileTimer {
        ReconcileTimer {
            metrics: self.clone(),
            started: Instant::now(),
            result: None,
        }
    }

    /// Records a finished reconcile that took `elapsed`.
    pub fn record_reconcile(&self, result: ReconcileResult, elapsed: Duration) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        match result {
            ReconcileResult::Success => self.reconciles.with_label_values(&["success"]).inc(),
            ReconcileResult::Error(category) => {
                self.reconciles.with_label_values(&["error"]).inc();
                self.reconcile_errors.with_label_values(&[category]).inc();
            }
        }
    }

    /// Starts timing a placement; the duration is recorded when the
    /// returned timer drops (or on `observe_duration`).
    pub fn placement_timer(&self) -> HistogramTimer {
        self.placement_duration.start_timer()
    }

    /// Exports a full table of GPU counts.
    pub fn set_gpus(&self, counts: &GpuCounts) {
        for state in GpuState::ALL {
            for pool in GpuPool::ALL {
                let value = i64::try_from(counts.get(state, pool)).unwrap_or(i64::MAX);
                self.gpus
                    .with_label_values(&[state.as_str(), pool.as_str()])
                    .set(value);
            }
        }
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Counts `count` more lease hand-overs.
    pub fn add_lease_transitions(&self, count: u64) {
        self.lease_transitions.inc_by(count);
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|err| prometheus::Error::Msg(err.to_string()))
    }
}

/// Times one reconcile and records it when dropped: its duration, the
/// result, and the error category on failure. Dropped without
/// [`success`](Self::success) or [`error`](Self::error) (cancelled, or
/// panicked), it counts as an error of category [`ABANDONED`].
#[derive(Debug)]
#[must_use = "the reconcile is recorded when the timer drops"]
pub struct ReconcileTimer {
    metrics: Metrics,
    started: Instant,
    result: Option<ReconcileResult>,
}

impl ReconcileTimer {
    /// Records a successful reconcile now.
    pub fn success(mut self) {
        self.result = Some(ReconcileResult::Success);
    }

    /// Records a failed reconcile now, under a bounded `category`.
    pub fn error(mut self, category: &'static str) {
        self.result = Some(ReconcileResult::Error(category));
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        let result = self.result.unwrap_or(ReconcileResult::Error(ABANDONED));
        self.metrics
            .record_reconcile(result, self.started.elapsed());
    }
}

/// Mirrors an elector's [`Leadership`] into the leader gauge and the lease
/// transitions counter until the elector ends (then the gauge reads 0).
pub async fn track_leadership(metrics: Metrics, mut leadership: Leadership) {
    let mut transitions = TransitionTracker::default();
    loop {
        let status = leadership.status();
        metrics.set_leader(status.leading);
        metrics.add_lease_transitions(transitions.observe(&status));
        if !leadership.changed().await {
            break;
        }
    }
    metrics.set_leader(false);
}

/// Turns observed `leaseTransitions` values into counter increments: the
/// first observation is the baseline, so a restart does not recount history.
#[derive(Debug, Default)]
struct TransitionTracker {
    seen: Option<u32>,
}

impl TransitionTracker {
    /// How many hand-overs `status` shows since the last observation.
    fn observe(&mut self, status: &LeaderStatus) -> u64 {
        // Without a holder the status is not an observation of the lease.
        if status.holder.is_none() {
            return 0;
        }
        let before = self.seen.replace(status.transitions);
        match before {
            Some(before) if status.transitions >= before => u64::from(status.transitions - before),
            // First sight, or the lease was recreated: a new baseline.
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;

    use super::*;

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn every_metric_is_exported_under_the_prefix() {
        let metrics = Metrics::new().unwrap();
        metrics.set_gpus(&GpuCounts::default());
        metrics.reconcile_timer().error("kube");
        drop(metrics.placement_timer());
        let text = metrics.encode().unwrap();
        for name in [
            names::RECONCILES_TOTAL,
            names::RECONCILE_ERRORS_TOTAL,
            names::RECONCILE_DURATION_SECONDS,
            names::PLACEMENT_DURATION_SECONDS,
            names::GPUS,
            names::LEADER,
            names::LEASE_TRANSITIONS_TOTAL,
        ] {
            assert!(
                text.contains(&format!("# TYPE {} ", names::full(name))),
                "{name} missing in\n{text}"
            );
        }
    }

    #[test]
    fn timer_records_result_category_and_duration_once() {
        let metrics = Metrics::new().unwrap();
        metrics.reconcile_timer().success();
        metrics.reconcile_timer().error("conflict");
        drop(metrics.reconcile_timer());
        let text = metrics.encode().unwrap();
        let total = names::full(names::RECONCILES_TOTAL);
        let errors = names::full(names::RECONCILE_ERRORS_TOTAL);
        let count = names::full(names::RECONCILE_DURATION_SECONDS) + "_count";
        assert_eq!(
            value_of(&text, &format!("{total}{{result=\"success\"}}")),
            Some(1.0)
        );
        assert_eq!(
            value_of(&text, &format!("{total}{{result=\"error\"}}")),
            Some(2.0)
        );
        assert_eq!(
            value_of(&text, &format!("{errors}{{category=\"conflict\"}}")),
            Some(1.0)
        );
        assert_eq!(
            value_of(&text, &format!("{errors}{{category=\"abandoned\"}}")),
            Some(1.0)
        );
        assert_eq!(value_of(&text, &count), Some(3.0));
    }

    #[test]
    fn gpu_table_is_exported_in_full() {
        let metrics = Metrics::new().unwrap();
        let mut counts = GpuCounts::default();
        counts.set(GpuState::Allocated, GpuPool::Decode, 8).add(
            GpuState::Allocated,
            GpuPool::Decode,
            4,
        );
        metrics.set_gpus(&counts);
        metrics.set_gpus(
            &GpuCounts::default()
                .set(GpuState::Free, GpuPool::None, 3)
                .clone(),
        );
        let text = metrics.encode().unwrap();
        let gpus = names::full(names::GPUS);
        assert_eq!(
            value_of(
                &text,
                &format!("{gpus}{{pool=\"decode\",state=\"allocated\"}}")
            ),
            Some(0.0),
            "a later table resets earlier cells"
        );
        assert_eq!(
            value_of(&text, &format!("{gpus}{{pool=\"none\",state=\"free\"}}")),
            Some(3.0)
        );
        let series = text
            .lines()
            .filter(|l| l.starts_with(&format!("{gpus}{{")))
            .count();
        assert_eq!(series, GpuState::ALL.len() * GpuPool::ALL.len());
    }

    fn status(leading: bool, holder: Option<&str>, transitions: u32) -> LeaderStatus {
        LeaderStatus {
            leading,
            holder: holder.map(str::to_owned),
            transitions,
        }
    }

    #[test]
    fn transitions_count_from_the_first_observation() {
        let mut tracker = TransitionTracker::default();
        assert_eq!(tracker.observe(&status(false, None, 0)), 0);
        assert_eq!(tracker.observe(&status(false, Some("a"), 5)), 0);
        assert_eq!(tracker.observe(&status(true, Some("me"), 6)), 1);
        assert_eq!(tracker.observe(&status(true, Some("me"), 6)), 0);
        assert_eq!(tracker.observe(&status(false, Some("b"), 8)), 2);
        assert_eq!(
            tracker.observe(&status(false, Some("b"), 0)),
            0,
            "recreated"
        );
        assert_eq!(tracker.observe(&status(true, Some("me"), 1)), 1);
    }

    #[tokio::test]
    async fn leader_gauge_follows_leadership_and_drops_with_the_elector() {
        let metrics = Metrics::new().unwrap();
        let (tx, rx) = watch::channel(LeaderStatus::default());
        let task = tokio::spawn(track_leadership(
            metrics.clone(),
            Leadership::from_receiver(rx),
        ));
        tx.send(status(true, Some("me"), 0)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while metrics.leader.get() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!(metrics.leader.get(), 0);
    }
}
