//! The election loop: every retry period, read the lease, apply
//! [`decide`], write under the read version, and publish the outcome.
//!
//! Owns this replica's leadership state; it is the only writer of the
//! [`LeaderStatus`] channel. Invariants: `leading` is published `true` only
//! after a successful guarded write naming us; it goes back to `false` as
//! soon as a read shows another holder, when no renewal succeeded for the
//! renew deadline (an in-flight request is cut off at that deadline), and
//! before the lease is released on shutdown. Waiting uses tokio time, so
//! tests drive it with a paused clock.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::decision::{self, Decision, decide};
use super::store::{LeaseStore, Stored};
use super::{Clock, Error, LeaderConfig, LeaderStatus, Leadership};

/// One replica's election over a lease store.
#[derive(Debug)]
pub(crate) struct Election<S> {
    store: S,
    config: LeaderConfig,
    clock: Arc<dyn Clock>,
    tx: watch::Sender<LeaderStatus>,
}

impl<S: LeaseStore> Election<S> {
    pub(crate) fn new(store: S, config: LeaderConfig, clock: Arc<dyn Clock>) -> Self {
        let (tx, _) = watch::channel(LeaderStatus::default());
        Self {
            store,
            config,
            clock,
            tx,
        }
    }

    pub(crate) fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    pub(crate) fn leadership(&self) -> Leadership {
        Leadership {
            rx: self.tx.subscribe(),
        }
    }

    /// Runs until `shutdown`, then steps down and releases the lease.
    pub(crate) async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let deadline = self.config.renew_deadline;
        // When the last successful write started; `Some` while leading.
        let mut renewed_at: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let budget = renewed_at.map_or(deadline, |at| {
                (at + deadline).saturating_duration_since(started)
            });
            let attempt = tokio::time::timeout(budget, self.try_acquire_or_renew());
            let outcome = tokio::select! {
                biased;
                () = &mut shutdown => break,
                outcome = attempt => outcome.unwrap_or(Err(Error::Timeout)),
            };
            match outcome {
                Ok(status) => {
                    renewed_at = status.leading.then_some(started);
                    self.publish(status);
                }
                Err(err) => {
                    let expired = renewed_at.is_some_and(|at| Instant::now() >= at + deadline);
                    warn!(
                        identity = %self.config.identity,
                        category = err.category(),
                        error = %err,
                        stepping_down = expired,
                        "lease acquire/renew failed"
                    );
                    if expired {
                        renewed_at = None;
                        self.step_down();
                    }
                }
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
        self.step_down();
        match tokio::time::timeout(deadline, self.release()).await {
            Ok(Ok(released)) => {
                if released {
                    info!(identity = %self.config.identity, "released lease");
                }
                Ok(())
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// One round: read, decide, write if the decision says so. A lost race
    /// is re-read once at once, so a stolen lease is noticed in this round.
    async fn try_acquire_or_renew(&self) -> Result<LeaderStatus, Error> {
        let mut retried = false;
        loop {
            let current = self.store.get().await?;
            let record = current.as_ref().map(|stored| &stored.record);
            let decision = decide(
                record,
                &self.config.identity,
                self.clock.now(),
                self.config.lease_duration,
            );
            let new = match decision {
                Decision::Follow { holder, .. } => {
                    return Ok(LeaderStatus {
                        leading: false,
                        holder: Some(holder),
                        transitions: record.map_or(0, |record| record.transitions),
                    });
                }
                Decision::Acquire(new) | Decision::Renew(new) => new,
            };
            let written = match &current {
                None => self.store.create(&new).await,
                Some(stored) => self.store.replace(&stored.version, &new).await,
            };
            match written {
                Ok(Stored { record, .. }) => {
                    return Ok(LeaderStatus {
                        leading: true,
                        holder: Some(self.config.identity.clone()),
                        transitions: record.transitions,
                    });
                }
                Err(Error::Conflict) if !retried => {
                    debug!(identity = %self.config.identity, "lease changed under us; re-reading");
                    retried = true;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Clears our holder identity if we hold the lease; `true` if we did.
    async fn release(&self) -> Result<bool, Error> {
        let Some(current) = self.store.get().await? else {
            return Ok(false);
        };
        let released = decision::release(&current.record, &self.config.identity, self.clock.now());
        let Some(released) = released else {
            return Ok(false);
        };
        self.store.replace(&current.version, &released).await?;
        Ok(true)
    }

    fn publish(&self, status: LeaderStatus) {
        let identity = &self.config.identity;
        self.tx.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            if status.leading != current.leading {
                if status.leading {
                    info!(%identity, transitions = status.transitions, "became leader");
                } else {
                    info!(%identity, holder = ?status.holder, "lost leadership");
                }
            }
            *current = status;
            true
        });
    }

    fn step_down(&self) {
        self.tx.send_if_modified(|current| {
            if !current.leading {
                return false;
            }
            info!(identity = %self.config.identity, "stepping down");
            current.leading = false;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::leader::LeaseRecord;

    /// Wall time that advances with tokio's clock (also when paused).
    #[derive(Debug)]
    struct TokioClock {
        wall: SystemTime,
        start: Instant,
    }

    impl TokioClock {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                start: Instant::now(),
            })
        }
    }

    impl Clock for TokioClock {
        fn now(&self) -> SystemTime {
            self.wall + self.start.elapsed()
        }
    }

    #[derive(Debug, Default)]
    struct Server {
        lease: Option<(LeaseRecord, u64)>,
        failing: bool,
        hanging: bool,
        writes: u64,
    }

    /// An in-memory API server for one lease, shared by several electors.
    #[derive(Debug, Clone, Default)]
    struct FakeStore(Arc<Mutex<Server>>);

    impl FakeStore {
        fn with<T>(&self, f: impl FnOnce(&mut Server) -> T) -> T {
            f(&mut self.0.lock().unwrap())
        }

        fn record(&self) -> Option<LeaseRecord> {
            self.with(|server| server.lease.as_ref().map(|(record, _)| record.clone()))
        }

        /// Fails or hangs as configured, else runs `f` on the server.
        async fn call<T>(
            &self,
            f: impl FnOnce(&mut Server) -> Result<T, Error>,
        ) -> Result<T, Error> {
            let (failing, hanging) = self.with(|server| (server.failing, server.hanging));
            if hanging {
                std::future::pending::<()>().await;
            }
            if failing {
                return Err(Error::Timeout);
            }
            self.with(f)
        }
    }

    impl LeaseStore for FakeStore {
        type Version = u64;

        async fn get(&self) -> Result<Option<Stored<u64>>, Error> {
            self.call(|server| {
                Ok(server
                    .lease
                    .clone()
                    .map(|(record, version)| Stored { record, version }))
            })
            .await
        }

        async fn create(&self, record: &LeaseRecord) -> Result<Stored<u64>, Error> {
            self.call(|server| {
                if server.lease.is_some() {
                    return Err(Error::Conflict);
                }
                server.writes += 1;
                server.lease = Some((record.clone(), server.writes));
                Ok(Stored {
                    record: record.clone(),
                    version: server.writes,
                })
            })
            .await
        }

        async fn replace(&self, version: &u64, record: &LeaseRecord) -> Result<Stored<u64>, Error> {
            self.call(|server| {
                if server.lease.as_ref().map(|(_, v)| v) != Some(version) {
                    return Err(Error::Conflict);
                }
                server.writes += 1;
                server.lease = Some((record.clone(), server.writes));
                Ok(Stored {
                    record: record.clone(),
                    version: server.writes,
                })
            })
            .await
        }
    }

    // Real time, scaled down: a leader steps down (after at most
    // DEADLINE + RETRY) well before its lease ends.
    const LEASE: Duration = Duration::from_millis(800);
    const DEADLINE: Duration = Duration::from_millis(400);
    const RETRY: Duration = Duration::from_millis(100);
    /// Scheduling allowance on a busy machine.
    const SLACK: Duration = Duration::from_millis(150);

    fn config(identity: &str) -> LeaderConfig {
        LeaderConfig {
            lease_duration: LEASE,
            renew_deadline: DEADLINE,
            retry_period: RETRY,
            ..LeaderConfig::new("ns", "lease", identity)
        }
    }

    struct Running {
        leadership: Leadership,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), Error>>,
    }

    fn start(store: &FakeStore, clock: &Arc<TokioClock>, identity: &str) -> Running {
        let election = Election::new(store.clone(), config(identity), clock.clone());
        let leadership = election.leadership();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(election.run(async {
            let _ = stopped.await;
        }));
        Running {
            leadership,
            stop,
            task,
        }
    }

    /// Waits (in paused time) until `leadership` leads; returns how long.
    async fn until_leading(leadership: &mut Leadership, limit: Duration) -> Duration {
        let started = Instant::now();
        tokio::time::timeout(limit, leadership.wait_leading())
            .await
            .expect("should lead in time");
        started.elapsed()
    }

    #[tokio::test]
    async fn single_elector_acquires_then_renews() {
        let (store, clock) = (FakeStore::default(), TokioClock::new());
        let mut a = start(&store, &clock, "a");
        until_leading(&mut a.leadership, RETRY + SLACK).await;
        let first = store.record().unwrap();
        assert_eq!(first.holder(), Some("a"));
        assert_eq!(first.transitions, 0);
        assert_eq!(first.lease_duration, Some(LEASE));

        tokio::time::sleep(RETRY * 3).await;
        let later = store.record().unwrap();
        assert!(later.renew_time > first.renew_time);
        assert_eq!(later.acquire_time, first.acquire_time);
        assert!(a.leadership.is_leading());
    }

    #[tokio::test]
    async fn crash_hands_over_after_the_lease_expires() {
        let (store, clock) = (FakeStore::default(), TokioClock::new());
        let mut a = start(&store, &clock, "a");
        until_leading(&mut a.leadership, RETRY + SLACK).await;
        let mut b = start(&store, &clock, "b");

        // While a renews across two lease durations, b follows and knows
        // who leads.
        tokio::time::sleep(LEASE * 2).await;
        assert!(a.leadership.is_leading());
        assert!(!b.leadership.is_leading());
        assert_eq!(b.leadership.status().holder.as_deref(), Some("a"));

        let renewed = store.record().unwrap().renew_time.unwrap();
        a.task.abort();
        let _ = (&mut a.task).await;
        assert!(
            !a.leadership.is_leading(),
            "an aborted elector reads as not leading"
        );

        until_leading(&mut b.leadership, LEASE + RETRY + SLACK).await;
        let taken = store.record().unwrap();
        assert_eq!(taken.holder(), Some("b"));
        assert_eq!(taken.transitions, 1);
        assert_eq!(b.leadership.status().transitions, 1);
        assert!(
            taken.renew_time.unwrap() >= renewed + LEASE,
            "b waited out a's lease"
        );
    }

    #[tokio::test]
    async fn graceful_shutdown_releases_for_an_immediate_handover() {
        let (store, clock) = (FakeStore::default(), TokioClock::new());
        let mut a = start(&store, &clock, "a");
        until_leading(&mut a.leadership, RETRY + SLACK).await;
        let mut b = start(&store, &clock, "b");
        tokio::time::sleep(RETRY * 2).await;

        let stopped = Instant::now();
        a.stop.send(()).unwrap();
        a.task.await.unwrap().unwrap();
        assert!(!a.leadership.is_leading());
        // Released: free, or already taken by b.
        assert_ne!(store.record().unwrap().holder(), Some("a"));

        until_leading(&mut b.leadership, LEASE).await;
        let took = stopped.elapsed();
        assert!(took <= RETRY + SLACK, "took {took:?}");
        assert_eq!(store.record().unwrap().transitions, 1);
    }

    #[tokio::test]
    async fn failing_renewals_step_down_at_the_deadline_before_the_lease_ends() {
        let (store, clock) = (FakeStore::default(), TokioClock::new());
        let mut a = start(&store, &clock, "a");
        until_leading(&mut a.leadership, RETRY + SLACK).await;
        let renewed = Instant::now();
        store.with(|server| server.failing = true);

        let mut view = a.leadership.clone();
        tokio::time::timeout(DEADLINE + RETRY + SLACK, view.wait_not_leading())
            .await
            .unwrap();
        let stepped = renewed.elapsed();
        assert!(
            stepped >= DEADLINE - RETRY && stepped < LEASE,
            "{stepped:?}"
        );

        // Once the API is back, the lease (still ours) is renewed.
        store.with(|server| server.failing = false);
        until_leading(&mut a.leadership, RETRY + SLACK).await;
        assert_eq!(store.record().unwrap().transitions, 0);
    }

    #[tokio::test]
    async fn a_hung_request_is_cut_off_at_the_deadline() {
        let (store, clock) = (FakeStore::default(), TokioClock::new());
        let mut a = start(&store, &clock, "a");
        until_leading(&mut a.leadership, RETRY + SLACK).await;
        let renewed = Instant::now();
        store.with(|server| server.hanging = true);

        tokio::time::timeout(LEASE, a.leadership.wait_not_leading())
            .await
            .unwrap();
        let stepped = renewed.elapsed();
        assert!(stepped <= DEADLINE + SLACK, "{stepped:?}");
    }

    #[tokio::test]
    async fn a_stolen_lease_is_noticed_on_the_next_renewal() {
        let (store, clock) = (FakeStore::default(), TokioClock::new());
        let mut a = start(&store, &clock, "a");
        until_leading(&mut a.leadership, RETRY + SLACK).await;
        let now = clock.now();
        store.with(|server| {
            server.writes += 1;
            server.lease = Some((
                LeaseRecord {
                    holder: Some("intruder".into()),
                    lease_duration: Some(Duration::from_secs(60)),
                    acquire_time: Some(now),
                    renew_time: Some(now),
                    transitions: 1,
                },
                server.writes,
            ));
        });
        tokio::time::timeout(RETRY + SLACK, a.leadership.wait_not_leading())
            .await
            .unwrap();
        assert_eq!(a.leadership.status().holder.as_deref(), Some("intruder"));
    }

    #[tokio::test]
    async fn many_contenders_elect_exactly_one() {
        let (store, clock) = (FakeStore::default(), TokioClock::new());
        let running: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| start(&store, &clock, id))
            .collect();
        for _ in 0..20 {
            tokio::time::sleep(RETRY / 3).await;
            let leaders = running.iter().filter(|r| r.leadership.is_leading()).count();
            assert!(leaders <= 1, "{leaders} leaders");
        }
        let leaders: Vec<_> = running
            .iter()
            .filter(|r| r.leadership.is_leading())
            .collect();
        assert_eq!(leaders.len(), 1);
        assert_eq!(
            store.record().unwrap().holder(),
            leaders[0].leadership.status().holder.as_deref()
        );
    }

    #[tokio::test]
    async fn invalid_timing_is_rejected() {
        let mut bad = config("a");
        bad.renew_deadline = LEASE;
        assert!(matches!(bad.validate(), Err(Error::InvalidConfig(_))));
        let mut bad = config("a");
        bad.retry_period = DEADLINE;
        assert!(matches!(bad.validate(), Err(Error::InvalidConfig(_))));
        let mut bad = config("");
        bad.identity.clear();
        assert!(bad.validate().is_err());
        assert!(config("a").validate().is_ok());
    }
}
