//! Adopting the workers that already run. A standalone operator keeps its
//! statuses and its GPU ledger in memory, so after a restart (a crash, an
//! upgrade) it starts with neither, while the workers its predecessor
//! launched still serve and stay registered. Planning from scratch would
//! place some of them elsewhere and stop them there, dropping their
//! streams. Instead their registry records seed the ledger before the first
//! pass; placement keeps every worker whose GPUs are still valid (its
//! stability rule) and the agents find the ranks already running. Pure
//! except [`fetch`].

use std::collections::BTreeMap;
use std::time::Duration;

use proto::records::{AgentRecord, WorkerRecord};
use proto::types::Role;

use crate::crd::{NodeGpus, Pool};
use crate::ledger::LedgerEntry;

/// The ledger entries of deployment `key` from its registered workers;
/// `cliques` maps a node to its NVLink clique (the rack's name). Workers of
/// another `generation`, aggregated workers (role both, which this
/// operator does not launch) and workers on a node of no known clique are
/// left out: they are not what the current spec asks for.
pub fn entries(
    key: &str,
    generation: u64,
    workers: &[WorkerRecord],
    cliques: &BTreeMap<String, String>,
) -> Vec<LedgerEntry> {
    let mut out = Vec::new();
    for w in workers.iter().filter(|w| w.generation == generation) {
        let role = match w.role {
            Role::Prefill => Pool::Prefill,
            Role::Decode => Pool::Decode,
            Role::Both => continue,
        };
        let Some(rack) = w.ranks.first().and_then(|r| cliques.get(&r.node)) else {
            continue;
        };
        let mut by_node: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for r in &w.ranks {
            by_node
                .entry(r.node.as_str())
                .or_default()
                .extend(&r.gpu_indices);
        }
        out.push(LedgerEntry {
            deployment: key.to_string(),
            worker: w.id.worker.clone(),
            role,
            rack: rack.clone(),
            placement: by_node
                .into_iter()
                .map(|(node, mut gpus)| {
                    gpus.sort_unstable();
                    NodeGpus {
                        node: node.to_string(),
                        gpus,
                    }
                })
                .collect(),
        });
    }
    out
}

/// Node -> clique of every registered agent.
pub fn cliques(agents: &[AgentRecord]) -> BTreeMap<String, String> {
    agents
        .iter()
        .map(|a| (a.node.clone(), a.clique.clone()))
        .collect()
}

/// The registered workers of `namespace/name`.
pub async fn fetch(
    registry: &proto::registry::Registry,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> proto::Result<Vec<WorkerRecord>> {
    Ok(registry
        .list_workers(namespace, name, timeout)
        .await?
        .records)
}

#[cfg(test)]
mod tests {
    use proto::records::{RankEndpoint, WorkerState};
    use proto::types::{Shape, WorkerId};

    use super::*;

    fn worker(name: &str, role: Role, generation: u64, ranks: &[(&str, &[u32])]) -> WorkerRecord {
        WorkerRecord {
            id: WorkerId::new("llm", "small", name),
            role,
            shape: Shape { tp: 1, ep: 8 },
            ranks: ranks
                .iter()
                .enumerate()
                .map(|(i, (node, gpus))| RankEndpoint {
                    rank: i as u32,
                    node: (*node).into(),
                    gpu_indices: gpus.to_vec(),
                    grpc_endpoint: "http://127.0.0.1:1".into(),
                    kv_endpoint: String::new(),
                })
                .collect(),
            state: WorkerState::Ready,
            generation,
        }
    }

    #[test]
    fn running_workers_of_the_generation_become_ledger_entries() {
        let cliques: BTreeMap<String, String> = [("t0", "c.1"), ("t1", "c.1"), ("t2", "c.1")]
            .into_iter()
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .collect();
        let workers = [
            worker(
                "decode-0",
                Role::Decode,
                1,
                &[("t1", &[3, 2, 1, 0]), ("t2", &[0, 1, 2, 3])],
            ),
            worker("prefill-0", Role::Prefill, 1, &[("t0", &[0, 1, 2, 3])]),
            worker("prefill-1", Role::Prefill, 2, &[("t0", &[0, 1])]),
            worker("both-0", Role::Both, 1, &[("t0", &[0])]),
            worker("lost-0", Role::Decode, 1, &[("gone", &[0])]),
        ];
        let got = entries("llm/small", 1, &workers, &cliques);
        assert_eq!(got.len(), 2, "{got:?}");
        let decode = &got[0];
        assert_eq!(
            (decode.worker.as_str(), decode.role),
            ("decode-0", Pool::Decode)
        );
        assert_eq!(decode.rack, "c.1");
        assert_eq!(
            decode.placement,
            vec![
                NodeGpus {
                    node: "t1".into(),
                    gpus: vec![0, 1, 2, 3]
                },
                NodeGpus {
                    node: "t2".into(),
                    gpus: vec![0, 1, 2, 3]
                },
            ]
        );
        assert_eq!(got[1].worker, "prefill-0");
        assert_eq!(got[1].gpus(), 4);
    }
}
