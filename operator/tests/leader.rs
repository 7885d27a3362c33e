//! Leader election against a real kube-apiserver (harness): two replicas
//! contend for one Lease with short timings (lease 2 s, renew deadline 1 s,
//! retry 200 ms).
//!
//! Checks that exactly one leads, that the follower never leads while the
//! leader renews, that a crashed leader (task aborted, no release) is
//! replaced within the lease duration plus a retry, that a graceful
//! shutdown hands over at once, and that a leader whose Lease is taken
//! steps down. Waits are on conditions with deadlines, never fixed sleeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use harness::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use operator::leader::{Error, LeaderConfig, LeaderElector, Leadership};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const NAMESPACE: &str = "rackscale-system";
const LEASE_NAME: &str = "rackscale-operator";
const LEASE: Duration = Duration::from_secs(2);
const RENEW_DEADLINE: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(200);
/// Allowance for API round trips on a busy test machine.
const SLACK: Duration = Duration::from_millis(500);

fn config(identity: &str) -> LeaderConfig {
    LeaderConfig {
        lease_duration: LEASE,
        renew_deadline: RENEW_DEADLINE,
        retry_period: RETRY,
        ..LeaderConfig::new(NAMESPACE, LEASE_NAME, identity)
    }
}

/// One operator replica's election, running on its own task.
struct Replica {
    identity: &'static str,
    leadership: Leadership,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

impl Replica {
    fn start(client: &kube::Client, identity: &'static str) -> Result<Self> {
        let elector = LeaderElector::new(client.clone(), config(identity))?;
        let leadership = elector.leadership();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(elector.run(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            identity,
            leadership,
            stop: Some(stop),
            task,
        })
    }

    /// Graceful shutdown: step down and release.
    async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }

    /// A crash: the task dies without releasing.
    async fn crash(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn setup() -> Result<(Cluster, kube::Client, Api<Lease>)> {
    let cluster = Cluster::start().await?;
    let client = cluster.client();
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .context("creating the namespace")?;
    let leases = Api::namespaced(client.clone(), NAMESPACE);
    Ok((cluster, client, leases))
}

async fn lease(leases: &Api<Lease>) -> Result<Lease> {
    Ok(leases.get(LEASE_NAME).await?)
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn transitions(lease: &Lease) -> i32 {
    lease
        .spec
        .as_ref()
        .and_then(|spec| spec.lease_transitions)
        .unwrap_or(0)
}

fn renew_time(lease: &Lease) -> Option<SystemTime> {
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?;
    Some(SystemTime::from(renewed.0))
}

/// Waits until exactly one of `replicas` leads; returns (leader, follower).
async fn elected(mut a: Replica, mut b: Replica) -> Result<(Replica, Replica)> {
    harness::wait_until("a leader", LEASE * 3, || {
        let led = a.leadership.is_leading() || b.leadership.is_leading();
        async move { Ok(led) }
    })
    .await?;
    if a.leadership.is_leading() == b.leadership.is_leading() {
        bail!("both or neither lead");
    }
    if b.leadership.is_leading() {
        std::mem::swap(&mut a, &mut b);
    }
    Ok((a, b))
}

/// Records whether `leadership` ever reports leading from now on.
fn watch_for_leading(leadership: &Leadership) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let led = Arc::new(AtomicBool::new(leadership.is_leading()));
    let mut rx = leadership.receiver();
    let flag = led.clone();
    let task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            if rx.borrow_and_update().leading {
                flag.store(true, Ordering::SeqCst);
            }
        }
    });
    (led, task)
}

/// Waits until `replica` leads; returns how long it took.
async fn takes_over(replica: &Replica, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut leadership = replica.leadership.clone();
    tokio::time::timeout(limit, leadership.wait_leading())
        .await
        .with_context(|| format!("{} did not take over within {limit:?}", replica.identity))?;
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leads_while_renewing_and_a_crash_hands_over_after_the_lease() -> Result<()> {
    let (_cluster, client, leases) = setup().await?;
    let a = Replica::start(&client, "replica-a")?;
    let b = Replica::start(&client, "replica-b")?;
    let (leader, follower) = elected(a, b).await?;
    let (follower_led, recorder) = watch_for_leading(&follower.leadership);

    // Let the leader renew across several lease durations.
    let first = lease(&leases).await?;
    assert_eq!(holder(&first), Some(leader.identity));
    let first_renewal = renew_time(&first).context("renewTime")?;
    harness::wait_until("renewals past three lease durations", LEASE * 5, || {
        let leases = leases.clone();
        async move {
            let lease = lease(&leases).await?;
            Ok(renew_time(&lease).is_some_and(|t| t >= first_renewal + LEASE * 3))
        }
    })
    .await?;
    let renewed = lease(&leases).await?;
    assert_eq!(holder(&renewed), Some(leader.identity));
    assert_eq!(transitions(&renewed), 0);
    assert!(leader.leadership.is_leading());
    assert!(
        !follower_led.load(Ordering::SeqCst),
        "the follower led while the leader renewed"
    );
    assert_eq!(
        follower.leadership.status().holder.as_deref(),
        Some(leader.identity)
    );

    let leader_view = leader.leadership.clone();
    leader.crash().await;
    assert!(
        !leader_view.is_leading(),
        "a crashed elector reads as not leading"
    );
    let took = takes_over(&follower, LEASE + RETRY + SLACK).await?;
    eprintln!("crash takeover took {took:?}");
    // The follower respected the lease: it waited most of it out.
    assert!(
        took >= LEASE - RETRY - SLACK,
        "took over after only {took:?}"
    );

    let taken = lease(&leases).await?;
    assert_eq!(holder(&taken), Some(follower.identity));
    assert_eq!(transitions(&taken), 1);
    assert_eq!(follower.leadership.status().transitions, 1);

    recorder.abort();
    follower.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_release_hands_over_at_once() -> Result<()> {
    let (_cluster, client, leases) = setup().await?;
    let a = Replica::start(&client, "replica-a")?;
    let mut view = a.leadership.clone();
    tokio::time::timeout(LEASE * 3, view.wait_leading())
        .await
        .context("a did not lead")?;
    let b = Replica::start(&client, "replica-b")?;
    harness::wait_until("b to see a leading", LEASE * 3, || {
        let seen = b.leadership.status().holder.as_deref() == Some("replica-a");
        async move { Ok(seen) }
    })
    .await?;
    assert!(!b.leadership.is_leading());

    let started = Instant::now();
    a.shutdown().await?;
    assert!(!view.is_leading());
    takes_over(&b, LEASE).await?;
    let took = started.elapsed();
    eprintln!("graceful handover took {took:?}, release included");
    assert!(
        took < LEASE / 2,
        "handover took {took:?}: no faster than waiting out the lease"
    );

    let taken = lease(&leases).await?;
    assert_eq!(holder(&taken), Some("replica-b"));
    assert_eq!(transitions(&taken), 1);
    b.shutdown().await?;
    assert_eq!(holder(&lease(&leases).await?), None, "b released too");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_is_taken_steps_down() -> Result<()> {
    let (_cluster, client, leases) = setup().await?;
    let a = Replica::start(&client, "replica-a")?;
    let mut view = a.leadership.clone();
    tokio::time::timeout(LEASE * 3, view.wait_leading())
        .await
        .context("a did not lead")?;

    // Another writer takes the lease for a minute (guarded by its read).
    let mut taken = lease(&leases).await?;
    let spec = taken.spec.get_or_insert_default();
    spec.holder_identity = Some("intruder".to_owned());
    spec.lease_duration_seconds = Some(60);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    leases
        .replace(LEASE_NAME, &PostParams::default(), &taken)
        .await?;

    tokio::time::timeout(RETRY * 2 + SLACK, view.wait_not_leading())
        .await
        .context("a kept leading after losing its lease")?;
    harness::wait_until("a to see the intruder", RETRY * 5, || {
        let holder = a.leadership.status().holder;
        async move { Ok(holder.as_deref() == Some("intruder")) }
    })
    .await?;
    a.shutdown().await?;
    assert_eq!(
        holder(&lease(&leases).await?),
        Some("intruder"),
        "a released a lease it no longer held"
    );
    Ok(())
}
