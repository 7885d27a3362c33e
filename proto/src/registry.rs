//! The etcd registry: key layout and a typed client.
//!
//! Every key lives under [`PREFIX`]. The layout is the contract between the
//! operator (sole writer of placement), agents and engines (writers of their
//! own liveness and load, under leases) and the frontend (a watcher). Keys are
//! built only through these functions so that writers and watchers agree;
//! values are the records of [`crate::records`]. The client lives in
//! [`Registry`] (calls with deadlines), [`KeepAlive`] (lease renewal and loss)
//! and [`Watcher`] (typed, resuming watches); [`security`] holds how it
//! authenticates to etcd (TLS, a user).

mod client;
mod lease;
pub mod security;
mod watch;

pub use client::{Listing, Registry};
pub use lease::{KeepAlive, Lease, LeaseLoss, LeaseState};
pub use security::{EtcdArgs, EtcdSecurity};
pub use watch::{WatchEvent, Watcher};

use crate::types::WorkerId;

/// Root of every registry key; the version segment changes when the layout does.
pub const PREFIX: &str = "/rackscale/v1/";

/// Prefix under which each node agent keeps its lease-bound record.
pub fn agents_prefix() -> String {
    format!("{PREFIX}agents/")
}

/// Key of one agent, named after its Kubernetes node (one per compute tray).
pub fn agent_key(node: &str) -> String {
    format!("{}{node}", agents_prefix())
}

/// Prefix of every worker of one deployment.
pub fn workers_prefix(namespace: &str, deployment: &str) -> String {
    format!("{PREFIX}workers/{namespace}/{deployment}/")
}

/// Key of one worker (engine rank group) of a deployment.
pub fn worker_key(namespace: &str, deployment: &str, worker: &str) -> String {
    format!("{}{worker}", workers_prefix(namespace, deployment))
}

/// Prefix of the load reports of one deployment's workers.
pub fn load_prefix(namespace: &str, deployment: &str) -> String {
    format!("{PREFIX}load/{namespace}/{deployment}/")
}

/// Key of one worker's periodic load report.
pub fn load_key(namespace: &str, deployment: &str, worker: &str) -> String {
    format!("{}{worker}", load_prefix(namespace, deployment))
}

/// Prefix of the rank records of one worker.
pub fn ranks_prefix(worker: &WorkerId) -> String {
    format!(
        "{PREFIX}ranks/{}/{}/{}/",
        worker.namespace, worker.deployment, worker.worker
    )
}

/// Key of one rank's own record (written by the rank once it is up).
pub fn rank_key(worker: &WorkerId, rank: u32) -> String {
    format!("{}{rank}", ranks_prefix(worker))
}

/// Parses a worker or load key (`workers/…` or `load/…`) back into the worker's
/// id; `None` for any other key. Watchers use it to name a deleted worker.
pub fn parse_worker_key(key: &str) -> Option<WorkerId> {
    let rest = key.strip_prefix(PREFIX)?;
    let rest = rest
        .strip_prefix("workers/")
        .or_else(|| rest.strip_prefix("load/"))?;
    let mut parts = rest.split('/');
    let (namespace, deployment, worker) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [namespace, deployment, worker].iter().any(|s| s.is_empty()) {
        return None;
    }
    Some(WorkerId::new(namespace, deployment, worker))
}

/// Parses an agent key back into the node name; `None` for any other key.
pub fn parse_agent_key(key: &str) -> Option<&str> {
    let node = key.strip_prefix(PREFIX)?.strip_prefix("agents/")?;
    (!node.is_empty() && !node.contains('/')).then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_their_prefixes() {
        assert_eq!(agent_key("tray-07"), "/rackscale/v1/agents/tray-07");
        let w = worker_key("llm", "dsv4", "decode-0");
        assert_eq!(w, "/rackscale/v1/workers/llm/dsv4/decode-0");
        assert!(w.starts_with(&workers_prefix("llm", "dsv4")));
        assert!(load_key("llm", "dsv4", "prefill-1").starts_with(&load_prefix("llm", "dsv4")));
        // A deployment's prefix must not capture a sibling whose name extends it.
        assert!(!worker_key("llm", "dsv4-b", "w").starts_with(&workers_prefix("llm", "dsv4")));
    }

    #[test]
    fn keys_parse_back() {
        let id = WorkerId::new("llm", "dsv4", "decode-0");
        assert_eq!(
            parse_worker_key(&worker_key("llm", "dsv4", "decode-0")),
            Some(id.clone())
        );
        assert_eq!(
            parse_worker_key(&load_key("llm", "dsv4", "decode-0")),
            Some(id)
        );
        assert_eq!(parse_worker_key("/rackscale/v1/workers/llm/dsv4/"), None);
        assert_eq!(parse_worker_key("/rackscale/v1/workers/llm/dsv4/a/b"), None);
        assert_eq!(parse_worker_key("/other/workers/a/b/c"), None);
        assert_eq!(parse_agent_key(&agent_key("tray-07")), Some("tray-07"));
        assert_eq!(parse_agent_key("/rackscale/v1/agents/"), None);
    }
}

/// The client types can move into spawned tasks and errors cross threads.
#[cfg(test)]
mod send_sync {
    use super::*;
    use crate::records::WorkerRecord;

    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn client_types_are_send() {
        send::<Watcher<WorkerRecord>>();
        send::<KeepAlive>();
        send_sync::<Registry>();
        send_sync::<crate::Error>();
    }
}
