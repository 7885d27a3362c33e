//! Registration: the agent's record in the registry, under a kept-alive lease.
//!
//! On start the task grants a lease, starts its keep-alive and puts the
//! [`proto::records::AgentRecord`]; it re-puts the record whenever a GPU's
//! health changes and once per TTL (refreshing the heartbeat). If the lease
//! is lost it grants a new one. Errors are retried with a capped backoff, so
//! an etcd outage never stops the agent from supervising ranks. On shutdown
//! the lease is revoked only when asked; otherwise the record expires with it.

use std::future::Future;
use std::time::Duration;

use proto::registry::Registry;
use tracing::{info, warn};

use crate::node::Node;

/// How the agent registers itself.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// The `AgentService` address published in the record.
    pub address: String,
    /// Lease TTL.
    pub ttl: Duration,
    /// Deadline of each etcd call.
    pub call_timeout: Duration,
    /// Whether to revoke the lease (delete the record at once) on shutdown.
    pub revoke_on_shutdown: bool,
}

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Keeps the agent registered until `shutdown` completes.
pub async fn run(
    registry: Registry,
    node: Node,
    config: RegistrationConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut health = node.health_changes();
    let mut retry = RETRY_MIN;
    loop {
        let lease = tokio::select! {
            () = &mut shutdown => return,
            granted = registry.grant_lease(config.ttl, config.call_timeout) => granted,
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(err) => {
                warn!(error = %err, category = err.category(), "granting the agent lease failed");
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        let mut keep_alive = registry.keep_alive(lease);
        let mut put_pending = true;
        let mut refresh = tokio::time::interval(lease.ttl().max(Duration::from_secs(1)));
        loop {
            if put_pending {
                let record = node.record(&config.address);
                match registry
                    .put_agent(lease, &record, config.call_timeout)
                    .await
                {
                    Ok(_) => {
                        put_pending = false;
                        retry = RETRY_MIN;
                        info!(node = %record.node, lease = lease.id(), "agent record published");
                    }
                    Err(err) => {
                        warn!(error = %err, category = err.category(), "publishing the agent record failed");
                    }
                }
            }
            let wait = if put_pending { retry } else { Duration::MAX };
            tokio::select! {
                () = &mut shutdown => {
                    if config.revoke_on_shutdown
                        && let Err(err) = registry.revoke(lease, config.call_timeout).await
                    {
                        warn!(error = %err, "revoking the agent lease failed");
                    }
                    return;
                }
                loss = keep_alive.lost() => {
                    warn!(?loss, "agent lease lost; registering again");
                    break;
                }
                changed = health.changed() => {
                    if changed.is_ok() {
                        put_pending = true;
                    }
                }
                _ = refresh.tick() => put_pending = true,
                () = tokio::time::sleep(wait) => {
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}
