//! Kubernetes-style conditions: set one, keeping its transition time when its
//! status does not change, so `kubectl describe` shows when things changed.

use crate::crd::Condition;

pub const PLANNED: &str = "Planned";
pub const PLACED: &str = "Placed";
pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";
/// True while the rebalancer moves workers between the pools.
pub const REBALANCING: &str = "Rebalancing";

/// Sets condition `type_` in `conditions` (adding it if missing).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &str,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.to_string();
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: now.to_string(),
            observed_generation: generation,
        }),
    }
}

/// Whether condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut c = Vec::new();
        set(&mut c, PLACED, false, "Waiting", "", Some(1), "t1");
        set(&mut c, PLACED, false, "StillWaiting", "m", Some(2), "t2");
        assert_eq!(c[0].last_transition_time, "t1");
        assert_eq!(c[0].reason, "StillWaiting");
        set(&mut c, PLACED, true, "Placed", "", Some(2), "t3");
        assert_eq!(c[0].last_transition_time, "t3");
        assert!(is_true(&c, PLACED) && !is_true(&c, READY));
        assert_eq!(c.len(), 1);
    }
}
