//! Withdrawal: the registry forgets a rank as soon as its process exits.
//!
//! A rank registers itself (a `RankRecord`, and on rank 0 the worker's
//! record) under its own lease. When the process is killed the lease would
//! keep those keys for a whole TTL, during which the operator and the
//! frontend would still count the worker as serving. The agent sees the exit
//! at once, so this task deletes the rank's key, and on rank 0 the worker's
//! record and load report, whenever a rank fails or exits. Keys of another
//! generation (a newer launch already registered) are left alone.

use std::time::Duration;

use proto::records::RankRecord;
use proto::registry::{self, Registry};
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use crate::events::{EventBus, EventKind};
use crate::rank::RankKey;

/// Deletes the registry keys of ranks that exit, until the bus closes.
pub async fn run(registry: Registry, events: EventBus, timeout: Duration) {
    let mut rx = events.subscribe();
    loop {
        let (key, generation) = match rx.recv().await {
            Ok(event) => match event.kind {
                EventKind::RankExited {
                    key, generation, ..
                }
                | EventKind::RankFailed {
                    key, generation, ..
                } => (key, generation),
                _ => continue,
            },
            Err(RecvError::Lagged(n)) => {
                warn!(lost = n, "withdrawal fell behind the event bus");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if let Err(e) = withdraw(&registry, &key, generation, timeout).await {
            warn!(rank = %key, error = %e, "could not withdraw an exited rank from the registry");
        }
    }
}

/// Deletes `key`'s rank record (and on rank 0 the worker's records) when
/// they belong to `generation`.
pub async fn withdraw(
    registry: &Registry,
    key: &RankKey,
    generation: u64,
    timeout: Duration,
) -> proto::Result<()> {
    let rank_key = registry::rank_key(&key.worker, key.rank);
    if let Some(record) = registry.get::<RankRecord>(&rank_key, timeout).await?
        && record.generation == generation
    {
        registry.delete(&rank_key, timeout).await?;
        debug!(rank = %key, "rank withdrawn");
    }
    if key.rank == 0 {
        let w = &key.worker;
        if let Some(record) = registry.get_worker(w, timeout).await?
            && record.generation == generation
        {
            registry
                .delete(
                    &registry::worker_key(&w.namespace, &w.deployment, &w.worker),
                    timeout,
                )
                .await?;
            registry
                .delete(
                    &registry::load_key(&w.namespace, &w.deployment, &w.worker),
                    timeout,
                )
                .await?;
            debug!(worker = %w, "worker withdrawn");
        }
    }
    Ok(())
}
