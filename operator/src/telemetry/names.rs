//! Every metric and label name the operator exports, in one place, so
//! dashboards, alerts and code agree. Names are relative to [`PREFIX`],
//! which the registry prepends (`rackscale_operator_reconciles_total`).

/// Namespace prepended to every metric name (with an `_`).
pub const PREFIX: &str = "rackscale_operator";

/// Counter of finished reconciles, by [`RESULT`].
pub const RECONCILES_TOTAL: &str = "reconciles_total";
/// Counter of failed reconciles, by error [`CATEGORY`].
pub const RECONCILE_ERRORS_TOTAL: &str = "reconcile_errors_total";
/// Histogram of reconcile durations in seconds.
pub const RECONCILE_DURATION_SECONDS: &str = "reconcile_duration_seconds";
/// Histogram of placement (pure decision) durations in seconds.
pub const PLACEMENT_DURATION_SECONDS: &str = "placement_duration_seconds";
/// Gauge of GPUs, by [`STATE`] and [`POOL`].
pub const GPUS: &str = "gpus";
/// Gauge: 1 while this replica leads, else 0.
pub const LEADER: &str = "leader";
/// Counter of lease hand-overs this replica observed.
pub const LEASE_TRANSITIONS_TOTAL: &str = "lease_transitions_total";
/// Counter of rebalancing decisions, by [`ACTION`] and [`REASON`].
pub const REBALANCE_DECISIONS_TOTAL: &str = "rebalance_decisions_total";
/// Counter of workers drained and relaunched in the other role, by the
/// [`POOL`] they left.
pub const ROLE_SWITCHES_TOTAL: &str = "role_switches_total";
/// Histogram of moves from decision to the relaunched workers serving, in
/// wall seconds.
pub const REBALANCE_MOVE_DURATION_SECONDS: &str = "rebalance_move_duration_seconds";

/// Label: `success` or `error`.
pub const RESULT: &str = "result";
/// Label: an error's bounded category.
pub const CATEGORY: &str = "category";
/// Label: `healthy`, `unhealthy`, `allocated` or `free`.
pub const STATE: &str = "state";
/// Label: `prefill`, `decode` or `none`.
pub const POOL: &str = "pool";
/// Label: `hold` or `move`.
pub const ACTION: &str = "action";
/// Label: a rebalancing decision's bounded reason (`balanced`, ...).
pub const REASON: &str = "reason";

/// The exported (prefixed) name of `name`, for tests and dashboards.
pub fn full(name: &str) -> String {
    format!("{PREFIX}_{name}")
}
