//! The operator's gRPC `AgentControl` against real agents (in-process
//! AgentService servers with simulated GPUs and `/bin/sh` standing in for
//! the engine): a worker spanning two trays gets one rank per tray, reports
//! Running, is relaunched idempotently, and is stopped on release; the
//! operator's calls to the agents run over mutual TLS under one CA.

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agent::gpu::{NodeIdentity, SimulatedGpus};
use agent::metrics::Metrics;
use agent::node::Node;
use agent::supervisor::{EngineCommand, RestartPolicy, SupervisorConfig};
use harness::wait_until;
use operator::agent::{AgentControl, WorkerLaunch, WorkerReport};
use operator::agent_grpc::{GrpcAgents, StaticDirectory};
use operator::crd::{NodeGpus, Pool, WorkerState};
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use proto::tls::{Alpn, ClientTls, Transport};
use tokio::sync::oneshot;

struct Agent {
    node: Node,
    address: String,
    /// How the test itself reaches it.
    client: ClientTls,
    _stop: oneshot::Sender<()>,
}

/// An in-process agent serving over `transport`; the test dials it with
/// `client`.
async fn agent(name: &str, transport: &Transport, client: ClientTls) -> Agent {
    let config = SupervisorConfig {
        engine: EngineCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "sleep 30".into()],
            env: vec![],
        },
        restart: RestartPolicy {
            max_restarts: 1,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(100),
        },
    };
    let gpus = SimulatedGpus {
        count: 4,
        memory_mib: 294_912,
        product: "NVIDIA-GB300".into(),
        node: name.into(),
    };
    let identity = NodeIdentity {
        node: name.into(),
        sku: "GB300".into(),
        clique: "c.1".into(),
    };
    let node = Node::new(identity, &gpus, config, Metrics::new().unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!(
        "{}://{}",
        transport.scheme(),
        listener.local_addr().unwrap()
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let served = node.clone();
    let tls = transport.server(Alpn::H2).unwrap();
    tokio::spawn(async move {
        let _ = agent::service::serve(listener, served, tls, async {
            let _ = stopped.await;
        })
        .await;
    });
    Agent {
        node,
        address,
        client,
        _stop: stop,
    }
}

fn states(reports: Vec<WorkerReport>) -> Vec<WorkerState> {
    reports.into_iter().map(|r| r.state).collect()
}

/// Running ranks on the agent at `address`: (worker, rank, GPUs).
async fn placed_ranks(address: &str, tls: &ClientTls) -> Vec<(String, u32, Vec<u32>)> {
    let list = list_ranks(address, tls).await;
    list.ranks
        .iter()
        .filter(|r| r.phase == pb::RankPhase::Running as i32)
        .map(|r| {
            let rank = r.rank.clone().unwrap();
            (
                rank.worker.unwrap().worker,
                rank.rank,
                r.gpu_indices.clone(),
            )
        })
        .collect()
}

async fn running_ranks(address: &str, tls: &ClientTls) -> usize {
    let list = list_ranks(address, tls).await;
    list.ranks
        .iter()
        .filter(|r| r.phase == pb::RankPhase::Running as i32)
        .count()
}

async fn list_ranks(address: &str, tls: &ClientTls) -> pb::ListRanksResponse {
    let channel = tls.channel(&tls.endpoint(address).unwrap()).await.unwrap();
    AgentServiceClient::new(channel)
        .list_ranks(pb::ListRanksRequest {
            namespace: "llm".into(),
            deployment: "dsv4".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn workers_launch_one_rank_per_tray_and_stop_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let pki = harness::pki::Pki::create(dir.path(), "operator test CA").unwrap();
    let test_client = pki.transport("test").unwrap().client().unwrap();
    let (a, b) = (
        agent(
            "tray-a",
            &pki.transport("tray-a").unwrap(),
            test_client.clone(),
        )
        .await,
        agent("tray-b", &pki.transport("tray-b").unwrap(), test_client).await,
    );
    let directory = StaticDirectory(BTreeMap::from([
        ("tray-a".to_string(), a.address.clone()),
        ("tray-b".to_string(), b.address.clone()),
    ]));
    let agents = GrpcAgents::new(
        Arc::new(directory),
        pki.transport("operator").unwrap().client().unwrap(),
        Duration::from_secs(5),
        Duration::from_millis(200),
    );
    let decode = WorkerLaunch {
        deployment: "llm/dsv4".into(),
        worker: "decode-0".into(),
        role: Pool::Decode,
        tp: 1,
        ep: 8,
        model: "deepseek-v4-pro".into(),
        backend: "sim".into(),
        engine_args: Default::default(),
        generation: 1,
        placement: vec![
            NodeGpus {
                node: "tray-a".into(),
                gpus: vec![0, 1, 2, 3],
            },
            NodeGpus {
                node: "tray-b".into(),
                gpus: vec![0, 1, 2, 3],
            },
        ],
    };
    let orphan = WorkerLaunch {
        worker: "prefill-0".into(),
        placement: vec![NodeGpus {
            node: "tray-gone".into(),
            gpus: vec![0],
        }],
        ..decode.clone()
    };
    // Ranks start as Starting; reconcile calls ensure until they run.
    let workers = [decode.clone(), orphan];
    let first = agents.ensure(&workers).await;
    assert_ne!(first[0].state, WorkerState::Failed);
    assert_eq!(first[1].state, WorkerState::Failed, "no agent on tray-gone");
    assert_eq!(
        first[1].message.as_deref(),
        Some("no agent registered for node tray-gone")
    );
    harness::wait_until("decode-0 running", Duration::from_secs(10), || {
        let (agents, workers) = (agents.clone(), workers.clone());
        async move {
            Ok(states(agents.ensure(&workers).await)
                == vec![WorkerState::Running, WorkerState::Failed])
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (
            running_ranks(&a.address, &a.client).await,
            running_ranks(&b.address, &b.client).await
        ),
        (1, 1)
    );

    // Reconcile runs ensure again: same generation, same ranks, no duplicates.
    assert_eq!(
        states(agents.ensure(std::slice::from_ref(&decode)).await),
        vec![WorkerState::Running]
    );
    assert_eq!(
        (
            running_ranks(&a.address, &a.client).await,
            running_ranks(&b.address, &b.client).await
        ),
        (1, 1)
    );

    // The worker is re-placed: tray-b's rank moves to tray-a's other GPUs.
    // ensure stops the ranks that no longer match (the one on tray-b, and
    // the one on tray-a whose worker changed shape) before launching, so no
    // GPU is ever held twice and nothing stale keeps running.
    let moved = WorkerLaunch {
        placement: vec![NodeGpus {
            node: "tray-a".into(),
            gpus: vec![0, 1, 2, 3],
        }],
        ..decode.clone()
    };
    harness::wait_until("decode-0 re-placed", Duration::from_secs(10), || {
        let (agents, moved) = (agents.clone(), moved.clone());
        async move {
            Ok(states(agents.ensure(std::slice::from_ref(&moved)).await)
                == vec![WorkerState::Running])
        }
    })
    .await
    .unwrap();
    assert_eq!(
        placed_ranks(&a.address, &a.client).await,
        vec![("decode-0".to_string(), 0, vec![0, 1, 2, 3])]
    );
    assert!(placed_ranks(&b.address, &b.client).await.is_empty());

    agents.release("llm/dsv4").await;
    wait_until("ranks stopped", Duration::from_secs(10), || {
        let (a, b, tls) = (a.address.clone(), b.address.clone(), a.client.clone());
        async move { Ok(running_ranks(&a, &tls).await + running_ranks(&b, &tls).await == 0) }
    })
    .await
    .unwrap();
    for agent in [&a, &b] {
        agent.node.supervisor().shutdown(Duration::ZERO).await;
    }
}

#[tokio::test]
async fn with_the_registry_a_worker_runs_once_its_engine_registered() {
    use operator::agent_grpc::RegistryDirectory;
    use proto::records::fixtures;
    use proto::registry::Registry;

    let etcd = harness::Etcd::start().await.unwrap();
    let registry = Registry::new(etcd.client().await.unwrap());
    let a = agent("tray-a", &Transport::Plaintext, ClientTls::plaintext()).await;
    let t = Duration::from_secs(5);
    let lease = registry
        .grant_lease(Duration::from_secs(30), t)
        .await
        .unwrap();
    let mut record = fixtures::agent("tray-a");
    record.address = a.address.clone();
    registry.put_agent(lease, &record, t).await.unwrap();

    let directory = RegistryDirectory::new(registry.clone(), t);
    let agents = GrpcAgents::new(
        Arc::new(directory),
        ClientTls::plaintext(),
        t,
        Duration::from_millis(200),
    );
    let worker = WorkerLaunch {
        deployment: "llm/dsv4".into(),
        worker: "prefill-0".into(),
        role: Pool::Prefill,
        tp: 4,
        ep: 1,
        model: "deepseek-v4-pro".into(),
        backend: "sim".into(),
        engine_args: Default::default(),
        generation: 7,
        placement: vec![NodeGpus {
            node: "tray-a".into(),
            gpus: vec![0, 1, 2, 3],
        }],
    };
    // The rank runs, but nothing registered: still launching.
    agents.ensure(std::slice::from_ref(&worker)).await;
    wait_until("rank running", Duration::from_secs(10), || {
        let (a, tls) = (a.address.clone(), a.client.clone());
        async move { Ok(running_ranks(&a, &tls).await == 1) }
    })
    .await
    .unwrap();
    assert_eq!(
        states(agents.ensure(std::slice::from_ref(&worker)).await),
        vec![WorkerState::Launching]
    );

    // An old generation's record does not count; the current one does.
    let mut w = fixtures::worker("llm", "dsv4", "prefill-0");
    w.ranks.truncate(1);
    w.ranks[0].node = "tray-a".into();
    w.generation = 6;
    registry.put_worker(lease, &w, t).await.unwrap();
    assert_eq!(
        states(agents.ensure(std::slice::from_ref(&worker)).await),
        vec![WorkerState::Launching]
    );
    w.generation = 7;
    w.ranks[0].node = "tray-elsewhere".into();
    registry.put_worker(lease, &w, t).await.unwrap();
    assert_eq!(
        states(agents.ensure(std::slice::from_ref(&worker)).await),
        vec![WorkerState::Launching],
        "a record of the worker on other trays is a stale placement"
    );
    w.ranks[0].node = "tray-a".into();
    registry.put_worker(lease, &w, t).await.unwrap();
    assert_eq!(
        states(agents.ensure(std::slice::from_ref(&worker)).await),
        vec![WorkerState::Running]
    );
    let live = agents.live_nodes().await.unwrap();
    assert_eq!(live.into_iter().collect::<Vec<_>>(), ["tray-a"]);

    agents.release("llm/dsv4").await;
    a.node.supervisor().shutdown(Duration::ZERO).await;
}
