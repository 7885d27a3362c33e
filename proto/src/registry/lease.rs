//! Leases and their keep-alive task.
//!
//! A [`KeepAlive`] owns one task that renews a lease every TTL/3 over a
//! keep-alive stream, reopening the stream when it breaks. It publishes the
//! lease's state on a `watch` channel: `Alive` after each renewal, and `Lost`
//! once etcd says the lease is gone or no renewal succeeded for a whole TTL
//! (from then on the keys written under it must be presumed deleted, so the
//! owner re-registers under a new lease). Dropping the handle stops renewing
//! without revoking: the lease then expires on its own.

use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::call;
use crate::error::Error;

/// A granted etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    id: i64,
    ttl: Duration,
}

impl Lease {
    pub(crate) fn new(id: i64, ttl: Duration) -> Self {
        Self { id, ttl }
    }

    /// The etcd lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL etcd granted (may exceed the one asked for).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// Why a lease is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLoss {
    /// etcd reports the lease gone (expired or revoked).
    Expired,
    /// No renewal succeeded for a whole TTL, so etcd has expired it by now.
    Unreachable,
}

/// What the keep-alive task knows about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed at this instant; etcd keeps it at least a TTL past that.
    Alive {
        /// When the last renewal was acknowledged.
        renewed_at: Instant,
    },
    /// Lost for good; keys under it are gone.
    Lost(LeaseLoss),
}

/// Handle of a running keep-alive task; dropping it stops the renewals.
#[derive(Debug)]
pub struct KeepAlive {
    lease: Lease,
    state: watch::Receiver<LeaseState>,
    task: JoinHandle<()>,
}

impl KeepAlive {
    pub(crate) fn start(client: Client, lease: Lease) -> Self {
        let (tx, state) = watch::channel(LeaseState::Alive {
            renewed_at: Instant::now(),
        });
        let task = tokio::spawn(renew(client, lease, tx));
        Self { lease, state, task }
    }

    /// The lease being kept alive.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// A receiver of state changes, for callers that select on several events.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Waits until the lease is lost and says why.
    pub async fn lost(&mut self) -> LeaseLoss {
        let found = self
            .state
            .wait_for(|s| matches!(s, LeaseState::Lost(_)))
            .await
            .map(|s| *s);
        match found {
            Ok(LeaseState::Lost(loss)) => loss,
            // The task only ends after publishing a loss, so a closed channel
            // means it was aborted: the lease is no longer renewed.
            _ => LeaseLoss::Unreachable,
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Stream = (LeaseKeeper, LeaseKeepAliveStream);

/// Outcome of one renewal attempt.
enum Renewal {
    Renewed,
    Gone,
    Failed,
}

async fn renew(client: Client, lease: Lease, tx: watch::Sender<LeaseState>) {
    let period = (lease.ttl / 3).max(Duration::from_millis(100));
    let retry = (period / 4).max(Duration::from_millis(50));
    let mut last_renewed = Instant::now();
    let mut stream: Option<Stream> = None;
    loop {
        let outcome = renew_once(&client, lease, period, &mut stream).await;
        let now = Instant::now();
        let wait = match outcome {
            Renewal::Renewed => {
                last_renewed = now;
                tx.send_replace(LeaseState::Alive { renewed_at: now });
                period
            }
            Renewal::Gone => {
                tracing::warn!(lease = lease.id, "lease expired or revoked");
                tx.send_replace(LeaseState::Lost(LeaseLoss::Expired));
                return;
            }
            Renewal::Failed => {
                stream = None;
                retry
            }
        };
        if now.duration_since(last_renewed) >= lease.ttl {
            tracing::warn!(lease = lease.id, "lease not renewed for a whole TTL");
            tx.send_replace(LeaseState::Lost(LeaseLoss::Unreachable));
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

async fn renew_once(
    client: &Client,
    lease: Lease,
    timeout: Duration,
    stream: &mut Option<Stream>,
) -> Renewal {
    if stream.is_none() {
        // Opening the stream renews once and answers "lease not found" when gone.
        let mut leases = client.lease_client();
        return match call("lease_keep_alive", timeout, leases.keep_alive(lease.id)).await {
            Ok(opened) => {
                *stream = Some(opened);
                Renewal::Renewed
            }
            Err(Error::Etcd {
                source: etcd_client::Error::LeaseKeepAliveError(_),
                ..
            }) => Renewal::Gone,
            Err(err) => {
                tracing::debug!(lease = lease.id, error = %err, "opening keep-alive stream failed");
                Renewal::Failed
            }
        };
    }
    let Some((keeper, responses)) = stream.as_mut() else {
        return Renewal::Failed;
    };
    let exchange = async {
        keeper.keep_alive().await?;
        responses.message().await
    };
    match call("lease_keep_alive", timeout, exchange).await {
        Ok(Some(response)) if response.ttl() > 0 => Renewal::Renewed,
        Ok(Some(_)) => Renewal::Gone,
        Ok(None) => Renewal::Failed,
        Err(err) => {
            tracing::debug!(lease = lease.id, error = %err, "keep-alive failed");
            Renewal::Failed
        }
    }
}
