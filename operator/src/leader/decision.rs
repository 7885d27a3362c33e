//! The pure leader-election rule: given the lease as last read, the time and
//! who we are, decide whether to acquire, renew or follow, and what to write.
//!
//! Owns [`LeaseRecord`] (the election-relevant part of a `Lease`, free of
//! Kubernetes types), [`decide`] and [`release`]. Invariants kept here:
//! a live lease held by someone else is never taken; `transitions` grows by
//! exactly one each time the holder changes to us; a renewal keeps
//! `acquire_time` and `transitions`. Nothing here reads a clock or talks to
//! the API server; the caller passes `now` and performs the write under
//! optimistic concurrency.

use std::time::{Duration, SystemTime};

/// The election state stored in a lease, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Who holds the lease; `None` (or empty) when it is free.
    pub holder: Option<String>,
    /// How long the holder's claim lasts after `renew_time`.
    pub lease_duration: Option<Duration>,
    /// When the current holder acquired the lease.
    pub acquire_time: Option<SystemTime>,
    /// When the current holder last renewed the lease.
    pub renew_time: Option<SystemTime>,
    /// How many times the lease changed hands.
    pub transitions: u32,
}

impl LeaseRecord {
    /// The holder, with an empty identity read as "nobody".
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|holder| !holder.is_empty())
    }

    /// When the holder's claim runs out; `None` when there is no claim to
    /// respect (no holder, or no renew time).
    ///
    /// `default_duration` stands in when the record carries no duration.
    pub fn expires_at(&self, default_duration: Duration) -> Option<SystemTime> {
        self.holder()?;
        let renewed = self.renew_time?;
        let duration = self.lease_duration.unwrap_or(default_duration);
        Some(renewed.checked_add(duration).unwrap_or(renewed))
    }
}

/// What to do with the lease this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The lease is free or expired: write this record to become leader.
    Acquire(LeaseRecord),
    /// We hold the lease: write this record to keep it.
    Renew(LeaseRecord),
    /// Someone else holds a live lease: wait at least until `expires_at`.
    Follow {
        /// The current holder.
        holder: String,
        /// When its claim runs out unless it renews.
        expires_at: SystemTime,
    },
}

impl Decision {
    /// The record to write, when the decision is to write one.
    pub fn record(&self) -> Option<&LeaseRecord> {
        match self {
            Decision::Acquire(record) | Decision::Renew(record) => Some(record),
            Decision::Follow { .. } => None,
        }
    }
}

/// Decides what `me` should do with the lease `current` (`None` when no
/// lease object exists yet) at `now`; `lease_duration` is the duration `me`
/// claims, and the fallback for a record without one.
///
/// The lease is taken when nobody holds it or the holder's
/// `renew_time + lease_duration` is not after `now`. Our own lease is
/// renewed even when it looks expired: nobody else has written it since.
pub fn decide(
    current: Option<&LeaseRecord>,
    me: &str,
    now: SystemTime,
    lease_duration: Duration,
) -> Decision {
    let Some(current) = current else {
        return Decision::Acquire(LeaseRecord {
            holder: Some(me.to_owned()),
            lease_duration: Some(lease_duration),
            acquire_time: Some(now),
            renew_time: Some(now),
            transitions: 0,
        });
    };
    match current.holder() {
        Some(holder) if holder == me => Decision::Renew(LeaseRecord {
            holder: Some(me.to_owned()),
            lease_duration: Some(lease_duration),
            acquire_time: current.acquire_time.or(Some(now)),
            renew_time: Some(now),
            transitions: current.transitions,
        }),
        Some(holder) => match current.expires_at(lease_duration) {
            Some(expires_at) if expires_at > now => Decision::Follow {
                holder: holder.to_owned(),
                expires_at,
            },
            _ => acquire_from(current, me, now, lease_duration),
        },
        None => acquire_from(current, me, now, lease_duration),
    }
}

/// Taking over an existing record: the holder changes, so it counts as a
/// transition.
fn acquire_from(
    current: &LeaseRecord,
    me: &str,
    now: SystemTime,
    lease_duration: Duration,
) -> Decision {
    Decision::Acquire(LeaseRecord {
        holder: Some(me.to_owned()),
        lease_duration: Some(lease_duration),
        acquire_time: Some(now),
        renew_time: Some(now),
        transitions: current.transitions.saturating_add(1),
    })
}

/// The record that hands the lease back, when `me` holds it: no holder, so
/// the next contender takes it on its next try instead of waiting out the
/// lease. `None` when `me` does not hold it (nothing to release).
pub fn release(current: &LeaseRecord, me: &str, now: SystemTime) -> Option<LeaseRecord> {
    (current.holder() == Some(me)).then(|| LeaseRecord {
        holder: None,
        lease_duration: Some(Duration::from_secs(1)),
        acquire_time: current.acquire_time,
        renew_time: Some(now),
        transitions: current.transitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn held_by(holder: &str, renewed: u64, transitions: u32) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.to_owned()),
            lease_duration: Some(LEASE),
            acquire_time: Some(at(0)),
            renew_time: Some(at(renewed)),
            transitions,
        }
    }

    #[test]
    fn no_lease_object_is_acquired_without_transition() {
        let decision = decide(None, "a", at(5), LEASE);
        assert_eq!(
            decision,
            Decision::Acquire(LeaseRecord {
                holder: Some("a".into()),
                lease_duration: Some(LEASE),
                acquire_time: Some(at(5)),
                renew_time: Some(at(5)),
                transitions: 0,
            })
        );
    }

    #[test]
    fn live_lease_of_another_is_followed() {
        let current = held_by("b", 10, 3);
        let decision = decide(Some(&current), "a", at(24), LEASE);
        assert_eq!(
            decision,
            Decision::Follow {
                holder: "b".into(),
                expires_at: at(25)
            }
        );
        assert!(decision.record().is_none());
    }

    #[test]
    fn expiry_is_exclusive_at_renew_plus_duration() {
        let current = held_by("b", 10, 3);
        let Decision::Acquire(record) = decide(Some(&current), "a", at(25), LEASE) else {
            panic!("an expired lease must be acquired");
        };
        assert_eq!(record.holder(), Some("a"));
        assert_eq!(record.transitions, 4);
        assert_eq!(record.acquire_time, Some(at(25)));
    }

    #[test]
    fn the_holders_own_duration_counts_not_ours() {
        let mut current = held_by("b", 10, 0);
        current.lease_duration = Some(Duration::from_secs(60));
        let decision = decide(Some(&current), "a", at(30), LEASE);
        assert!(matches!(decision, Decision::Follow { expires_at, .. } if expires_at == at(70)));
    }

    #[test]
    fn missing_duration_falls_back_to_ours() {
        let mut current = held_by("b", 10, 0);
        current.lease_duration = None;
        assert!(matches!(
            decide(Some(&current), "a", at(24), LEASE),
            Decision::Follow { .. }
        ));
        assert!(matches!(
            decide(Some(&current), "a", at(26), LEASE),
            Decision::Acquire(_)
        ));
    }

    #[test]
    fn own_lease_is_renewed_keeping_acquire_time_and_transitions() {
        let current = held_by("a", 10, 7);
        let decision = decide(Some(&current), "a", at(40), LEASE);
        assert_eq!(
            decision,
            Decision::Renew(LeaseRecord {
                holder: Some("a".into()),
                lease_duration: Some(LEASE),
                acquire_time: Some(at(0)),
                renew_time: Some(at(40)),
                transitions: 7,
            })
        );
    }

    #[test]
    fn released_lease_is_acquired_at_once_as_a_transition() {
        let current = held_by("b", 10, 2);
        let released = release(&current, "b", at(11)).unwrap();
        assert_eq!(released.holder(), None);
        let Decision::Acquire(record) = decide(Some(&released), "a", at(11), LEASE) else {
            panic!("a released lease must be acquired at once");
        };
        assert_eq!(record.transitions, 3);
    }

    #[test]
    fn empty_holder_means_free() {
        let mut current = held_by("", 10, 1);
        current.renew_time = Some(at(100));
        assert!(matches!(
            decide(Some(&current), "a", at(11), LEASE),
            Decision::Acquire(_)
        ));
    }

    #[test]
    fn holder_without_renew_time_is_not_respected() {
        let mut current = held_by("b", 10, 1);
        current.renew_time = None;
        assert!(matches!(
            decide(Some(&current), "a", at(11), LEASE),
            Decision::Acquire(_)
        ));
    }

    #[test]
    fn only_the_holder_can_release() {
        let current = held_by("b", 10, 2);
        assert_eq!(release(&current, "a", at(11)), None);
        let released = release(&current, "b", at(11)).unwrap();
        assert_eq!(released.transitions, 2);
        assert_eq!(released.renew_time, Some(at(11)));
    }

    #[test]
    fn transitions_saturate() {
        let current = held_by("b", 0, u32::MAX);
        let Decision::Acquire(record) = decide(Some(&current), "a", at(100), LEASE) else {
            panic!("expired");
        };
        assert_eq!(record.transitions, u32::MAX);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn record() -> impl Strategy<Value = Option<LeaseRecord>> {
            let holder = prop::option::of(prop_oneof![Just("a"), Just("b"), Just("")]);
            let record = (
                holder,
                prop::option::of(1u64..60),
                prop::option::of(0u64..200),
                0u32..1000,
            )
                .prop_map(|(holder, duration, renewed, transitions)| LeaseRecord {
                    holder: holder.map(str::to_owned),
                    lease_duration: duration.map(Duration::from_secs),
                    acquire_time: Some(at(0)),
                    renew_time: renewed.map(at),
                    transitions,
                });
            prop::option::of(record)
        }

        proptest! {
            /// Whatever the lease, a write never takes a live lease from
            /// another holder, always names `me`, and counts a transition
            /// exactly when the holder changes.
            #[test]
            fn writes_are_safe(current in record(), now in 0u64..300) {
                let now = at(now);
                let decision = decide(current.as_ref(), "a", now, LEASE);
                if let Some(written) = decision.record() {
                    prop_assert_eq!(written.holder(), Some("a"));
                    prop_assert_eq!(written.renew_time, Some(now));
                    if let Some(current) = &current {
                        if let Some(expiry) = current.expires_at(LEASE) {
                            prop_assert!(current.holder() == Some("a") || expiry <= now);
                        }
                        let changed = current.holder() != Some("a");
                        let expected = current.transitions.saturating_add(u32::from(changed));
                        prop_assert_eq!(written.transitions, expected);
                    }
                } else if let Decision::Follow { holder, expires_at } = &decision {
                    prop_assert_ne!(holder.as_str(), "a");
                    prop_assert!(*expires_at > now);
                }
            }
        }
    }
}
