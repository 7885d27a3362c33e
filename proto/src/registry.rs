//! Key layout of the etcd registry.
//!
//! Every key lives under [`PREFIX`]. The layout is the contract between the
//! operator (sole writer of placement), agents and engines (writers of their
//! own liveness and load, under leases) and the frontend (a watcher). Keys are
//! built only through these functions so that writers and watchers agree.

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
}
