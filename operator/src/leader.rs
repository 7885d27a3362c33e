//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several
//! operator replicas exactly one reconciles at a time.
//!
//! Owns the election loop ([`LeaderElector`]) and the leadership signal it
//! publishes ([`Leadership`]). The rule itself is pure ([`decision`]); the
//! Lease is read and written through a guarded store (`store`), in the
//! loop of `elector`.
//!
//! Invariants:
//! - a lease held by someone else is taken only after its
//!   `renewTime + leaseDurationSeconds` has passed, and every write names the
//!   `resourceVersion` it read, so two contenders cannot both win;
//! - a leader that cannot renew for [`LeaderConfig::renew_deadline`] reports
//!   itself as not leading; since the deadline is shorter than the lease,
//!   it stops before anyone else may start;
//! - on graceful shutdown the elector first reports "not leading", then
//!   clears `holderIdentity` so another replica takes over on its next try;
//! - once the elector is gone (its task ended or was aborted), its
//!   [`Leadership`] reads as not leading.
//!
//! Lease times are wall-clock times: replicas must have roughly synchronised
//! clocks, as for client-go's election; skew beyond
//! `lease_duration - renew_deadline` can give two leaders.

pub mod decision;
mod elector;
mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

pub use decision::{Decision, LeaseRecord, decide};

use elector::Election;
use store::KubeLeaseStore;

/// Where the lease is and how the election is timed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease; all replicas of one operator share it.
    pub lease_name: String,
    /// This replica's identity (typically the pod name); unique per replica.
    pub identity: String,
    /// How long a claim lasts after its last renewal; written to the Lease
    /// rounded up to whole seconds.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    /// Must be shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Pause between two tries to acquire or renew. Must be shorter than
    /// `renew_deadline`.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// The usual timing (as client-go's): lease 15 s, renew deadline 10 s,
    /// retry every 2 s.
    pub fn new(
        namespace: impl Into<String>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks names are set and `retry_period < renew_deadline <
    /// lease_duration`, the ordering the safety argument rests on.
    pub fn validate(&self) -> Result<(), Error> {
        if self.namespace.is_empty() || self.lease_name.is_empty() {
            return Err(Error::InvalidConfig("namespace and lease name must be set"));
        }
        if self.identity.is_empty() {
            return Err(Error::InvalidConfig("identity must be set"));
        }
        if self.retry_period.is_zero() {
            return Err(Error::InvalidConfig("retry period must be positive"));
        }
        if self.renew_deadline <= self.retry_period {
            return Err(Error::InvalidConfig(
                "renew deadline must exceed the retry period",
            ));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(Error::InvalidConfig(
                "lease duration must exceed the renew deadline",
            ));
        }
        Ok(())
    }
}

/// Why an election step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot give a safe election.
    #[error("invalid leader election config: {0}")]
    InvalidConfig(&'static str),
    /// The API server refused or failed a Lease request.
    #[error("lease request failed: {0}")]
    Kube(#[source] kube::Error),
    /// The Lease changed between our read and our write.
    #[error("lease was written concurrently")]
    Conflict,
    /// A Lease request did not finish in time.
    #[error("lease request timed out")]
    Timeout,
}

impl Error {
    /// Maps a client error, singling out lost optimistic-concurrency races
    /// (conflicting update, or create of a lease that appeared meanwhile).
    pub(crate) fn from_kube(err: kube::Error) -> Self {
        match &err {
            kube::Error::Api(status) if status.is_conflict() || status.is_already_exists() => {
                Error::Conflict
            }
            _ => Error::Kube(err),
        }
    }

    /// Whether retrying later may succeed (everything but bad config).
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::InvalidConfig(_))
    }

    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidConfig(_) => "lease_config",
            Error::Kube(_) => "kube_api",
            Error::Conflict => "lease_conflict",
            Error::Timeout => "lease_timeout",
        }
    }
}

/// What this replica last learned about the election.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderStatus {
    /// Whether this replica leads now.
    pub leading: bool,
    /// The holder as last seen, when known.
    pub holder: Option<String>,
    /// The Lease's `leaseTransitions` as last seen.
    pub transitions: u32,
}

/// A read-only view of the election, cheap to clone; hand one to each task
/// that must only act while this replica leads.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<LeaderStatus>,
}

impl Leadership {
    /// A view over a status channel fed by something other than
    /// [`LeaderElector`]: fixed leadership in tests, another elector.
    pub fn from_receiver(rx: watch::Receiver<LeaderStatus>) -> Self {
        Self { rx }
    }

    /// Whether this replica leads now; `false` once the elector is gone.
    pub fn is_leading(&self) -> bool {
        self.elector_alive() && self.rx.borrow().leading
    }

    /// The last published status, with `leading` forced to `false` once the
    /// elector is gone.
    pub fn status(&self) -> LeaderStatus {
        let mut status = self.rx.borrow().clone();
        status.leading &= self.elector_alive();
        status
    }

    /// Waits until this replica leads. Returns `false` if the elector ended
    /// first.
    pub async fn wait_leading(&mut self) -> bool {
        self.rx.wait_for(|status| status.leading).await.is_ok()
    }

    /// Waits until this replica does not lead (at once if it does not now),
    /// including because the elector ended; use it to stop leader-only work.
    pub async fn wait_not_leading(&mut self) {
        // An error means the elector is gone, which is also "not leading".
        let _ = self.rx.wait_for(|status| !status.leading).await;
    }

    /// Waits for the next published change; `false` once the elector is
    /// gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// The underlying channel, for `select!` loops and metrics.
    pub fn receiver(&self) -> watch::Receiver<LeaderStatus> {
        self.rx.clone()
    }

    fn elector_alive(&self) -> bool {
        self.rx.has_changed().is_ok()
    }
}

/// Wall-clock time for lease timestamps; injectable so tests control it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Runs the election for one replica against the API server.
///
/// Create it, take [`leadership`](Self::leadership) views, then drive
/// [`run`](Self::run) on a task until shutdown.
#[derive(Debug)]
pub struct LeaderElector {
    election: Election<KubeLeaseStore>,
}

impl LeaderElector {
    /// An elector for `config.identity` on the Lease
    /// `config.namespace/config.lease_name`; fails on an invalid config.
    pub fn new(client: kube::Client, config: LeaderConfig) -> Result<Self, Error> {
        config.validate()?;
        let store = KubeLeaseStore::new(client, &config.namespace, &config.lease_name);
        Ok(Self {
            election: Election::new(store, config, Arc::new(SystemClock)),
        })
    }

    /// Replaces the wall clock used for lease timestamps.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.election.set_clock(clock);
        self
    }

    /// A view of this replica's leadership.
    pub fn leadership(&self) -> Leadership {
        self.election.leadership()
    }

    /// Acquires and renews the lease every retry period until `shutdown`
    /// completes, then steps down and releases the lease.
    ///
    /// Transient API failures are retried, not returned; the error is that
    /// of the final release, after which others wait out the lease instead.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        self.election.run(shutdown).await
    }
}
