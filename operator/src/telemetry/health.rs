//! Liveness and readiness as the probes see them.
//!
//! Owns the heartbeat of the operator's main loop and the readiness flag.
//! Invariants: the process is alive while its loop has beaten within
//! `stale_after` (counting from creation, so start-up gets one window); it
//! is ready only between a [`Health::set_ready`] and the next
//! [`Health::set_not_ready`], and starts not ready. Time is tokio's, so
//! tests can pause it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long without a heartbeat before `/healthz` fails, unless configured.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);

/// Why the operator is (not) ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Caches are synced; the operator can serve.
    Ready,
    /// Not ready, and why (for the probe's response body, not for labels).
    NotReady(String),
}

/// The probes' view of the process; cheap to clone, clones share state.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    born: Instant,
    stale_after: Duration,
    /// Milliseconds from `born` to the last heartbeat.
    last_beat_ms: AtomicU64,
    readiness: Mutex<Readiness>,
}

impl Health {
    /// Alive for `stale_after` from now, and not ready ("starting").
    pub fn new(stale_after: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                born: Instant::now(),
                stale_after,
                last_beat_ms: AtomicU64::new(0),
                readiness: Mutex::new(Readiness::NotReady("starting".to_owned())),
            }),
        }
    }

    /// Records that the main loop made progress.
    pub fn beat(&self) {
        let ms = u64::try_from(self.inner.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.last_beat_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Time since the last heartbeat (or since creation).
    pub fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_beat_ms.load(Ordering::Relaxed));
        self.inner.born.elapsed().saturating_sub(last)
    }

    /// Whether the main loop beat within the staleness window.
    pub fn is_alive(&self) -> bool {
        self.since_beat() <= self.inner.stale_after
    }

    /// Marks the operator ready (its caches are synced).
    pub fn set_ready(&self) {
        *self.lock() = Readiness::Ready;
    }

    /// Marks the operator not ready, saying why.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.lock() = Readiness::NotReady(reason.into());
    }

    /// The current readiness.
    pub fn readiness(&self) -> Readiness {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Readiness> {
        // The value is always whole: a panic elsewhere cannot tear it.
        self.inner
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new(DEFAULT_STALE_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn liveness_needs_heartbeats() {
        let window = Duration::from_millis(100);
        let health = Health::new(window);
        assert!(health.is_alive(), "alive during the first window");
        tokio::time::sleep(window * 2).await;
        assert!(!health.is_alive());
        assert!(health.since_beat() >= window * 2);
        health.beat();
        assert!(health.is_alive());
    }

    #[test]
    fn readiness_starts_false_and_follows_the_flag() {
        let health = Health::default();
        assert!(matches!(health.readiness(), Readiness::NotReady(_)));
        health.set_ready();
        assert_eq!(health.clone().readiness(), Readiness::Ready);
        health.set_not_ready("lost watch");
        assert_eq!(
            health.readiness(),
            Readiness::NotReady("lost watch".to_owned())
        );
    }
}
