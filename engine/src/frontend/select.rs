//! Pure worker selection for the disaggregated router.
//!
//! Prefill goes to the worker with the fewest outstanding prompt tokens (what
//! this frontend has sent and not yet seen finish, which is exact and
//! immediate, plus the queue the worker last reported). Decode goes to the
//! least-loaded worker that still has KV room: load is the larger of what
//! this frontend has running there and what the worker reports (other
//! frontends send work too). Workers that failed recently are skipped while
//! any other worker can serve. Ties break on the name so choices are stable.
//!
//! An aggregated pool (every worker of role `both`) is not split at all: each
//! request goes whole to the least-loaded worker, preferring ones with KV
//! room ([`pick_aggregated`], used by [`super::proxy`]). A worker whose
//! registry record says it is draining is never picked: it finishes what it
//! has and then changes role or stops.

use proto::types::{EngineLoad, Role};

/// KV use above which a decode worker counts as full.
pub const KV_FULL: f64 = 0.95;

/// What selection knows about one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub role: Role,
    /// Prompt tokens this frontend sent and not yet seen finish.
    pub outstanding_prefill_tokens: u64,
    /// Decode streams this frontend has open there.
    pub active_decodes: u32,
    /// The worker's last load report, if any.
    pub load: Option<EngineLoad>,
    /// Whether a call failed within the back-off window.
    pub cooling: bool,
    /// The worker is draining (its record says so): it takes no new work.
    pub draining: bool,
}

fn prefills(role: Role) -> bool {
    matches!(role, Role::Prefill | Role::Both)
}

fn decodes(role: Role) -> bool {
    matches!(role, Role::Decode | Role::Both)
}

/// Index of the prefill worker to use, skipping `exclude` (already tried).
pub fn pick_prefill(candidates: &[Candidate], exclude: &[String]) -> Option<usize> {
    pick(
        candidates,
        exclude,
        |c| prefills(c.role),
        |c| {
            let queued = c.load.map_or(0, |l| u64::from(l.queue_depth));
            (c.outstanding_prefill_tokens, queued)
        },
    )
}

/// Index of the decode worker to use, skipping `exclude` and full workers.
pub fn pick_decode(candidates: &[Candidate], exclude: &[String]) -> Option<usize> {
    pick(
        candidates,
        exclude,
        |c| decodes(c.role) && c.load.is_none_or(|l| l.kv_usage() < KV_FULL),
        |c| {
            let reported = c.load.map_or(0, |l| l.running + l.queue_depth);
            (u64::from(c.active_decodes.max(reported)), 0)
        },
    )
}

/// Whether the pool is aggregated: at least one worker, every one of role
/// `both`.
pub fn aggregated(candidates: &[Candidate]) -> bool {
    !candidates.is_empty() && candidates.iter().all(|c| c.role == Role::Both)
}

/// Index of the role-`both` worker to send a whole request to, skipping
/// `exclude`: the least loaded (as for decode), workers with KV room first;
/// a full one still serves when all are full (it queues or answers 429
/// itself).
pub fn pick_aggregated(candidates: &[Candidate], exclude: &[String]) -> Option<usize> {
    pick(
        candidates,
        exclude,
        |c| c.role == Role::Both,
        |c| {
            let full = c.load.is_some_and(|l| l.kv_usage() >= KV_FULL);
            let reported = c.load.map_or(0, |l| l.running + l.queue_depth);
            (u64::from(full), u64::from(c.active_decodes.max(reported)))
        },
    )
}

fn pick(
    candidates: &[Candidate],
    exclude: &[String],
    eligible: impl Fn(&Candidate) -> bool,
    score: impl Fn(&Candidate) -> (u64, u64),
) -> Option<usize> {
    let best = |cooling_ok: bool| {
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| eligible(c) && !c.draining && !exclude.contains(&c.name))
            .filter(|(_, c)| cooling_ok || !c.cooling)
            .min_by(|(_, a), (_, b)| score(a).cmp(&score(b)).then(a.name.cmp(&b.name)))
            .map(|(i, _)| i)
    };
    best(false).or_else(|| best(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, role: Role) -> Candidate {
        Candidate {
            name: name.into(),
            role,
            outstanding_prefill_tokens: 0,
            active_decodes: 0,
            load: None,
            cooling: false,
            draining: false,
        }
    }

    fn load(running: u32, queue: u32, used: u64) -> Option<EngineLoad> {
        Some(EngineLoad {
            queue_depth: queue,
            running,
            kv_blocks_used: used,
            kv_blocks_total: 100,
            ttft_seconds: 0.0,
            tpot_seconds: 0.0,
            prefill_tokens_per_second: 0.0,
            ..Default::default()
        })
    }

    #[test]
    fn prefill_goes_to_the_fewest_outstanding_tokens() {
        let mut p = vec![
            c("p0", Role::Prefill),
            c("p1", Role::Prefill),
            c("d0", Role::Decode),
        ];
        p[0].outstanding_prefill_tokens = 8192;
        p[1].outstanding_prefill_tokens = 1024;
        assert_eq!(pick_prefill(&p, &[]), Some(1));
        // Already tried: the next best.
        assert_eq!(pick_prefill(&p, &["p1".into()]), Some(0));
        // Decode-only workers never prefill.
        assert_eq!(pick_prefill(&p, &["p0".into(), "p1".into()]), None);
    }

    #[test]
    fn decode_needs_kv_room_and_prefers_the_least_loaded() {
        let mut d = vec![
            c("d0", Role::Decode),
            c("d1", Role::Decode),
            c("b0", Role::Both),
        ];
        d[0].load = load(10, 0, 50);
        d[1].load = load(2, 0, 99);
        d[2].load = load(5, 1, 10);
        // d1 is least busy but its KV is full.
        assert_eq!(pick_decode(&d, &[]), Some(2));
        // What this frontend has open counts when the report lags.
        d[2].active_decodes = 20;
        assert_eq!(pick_decode(&d, &[]), Some(0));
    }

    #[test]
    fn cooling_workers_serve_only_when_nothing_else_can() {
        let mut p = vec![c("p0", Role::Prefill), c("p1", Role::Prefill)];
        p[1].outstanding_prefill_tokens = 10;
        p[0].cooling = true;
        assert_eq!(pick_prefill(&p, &[]), Some(1));
        p[1].cooling = true;
        assert_eq!(pick_prefill(&p, &[]), Some(0));
    }

    #[test]
    fn aggregated_pools_send_whole_requests_to_the_least_loaded() {
        let mut b = vec![c("b0", Role::Both), c("b1", Role::Both)];
        assert!(aggregated(&b));
        assert!(!aggregated(&[]));
        assert!(!aggregated(&[c("b0", Role::Both), c("p0", Role::Prefill)]));
        b[0].active_decodes = 3;
        assert_eq!(pick_aggregated(&b, &[]), Some(1));
        // A reported load counts when this frontend's own is lower.
        b[1].load = load(7, 1, 10);
        assert_eq!(pick_aggregated(&b, &[]), Some(0));
        // Room first; when every worker is full, the least loaded still serves.
        b[0].load = load(0, 0, 99);
        assert_eq!(pick_aggregated(&b, &[]), Some(1));
        b[1].load = load(7, 1, 99);
        assert_eq!(pick_aggregated(&b, &[]), Some(0));
        assert_eq!(pick_aggregated(&b, &["b0".into()]), Some(1));
        assert_eq!(pick_aggregated(&[c("p0", Role::Prefill)], &[]), None);
    }

    #[test]
    fn ties_break_on_the_name() {
        let p = vec![c("p1", Role::Both), c("p0", Role::Both)];
        assert_eq!(pick_prefill(&p, &[]), Some(1));
        assert_eq!(pick_decode(&p, &[]), Some(1));
    }
}
