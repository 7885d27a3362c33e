//! Ranks register in a real etcd, rank 0 forms the worker once every rank is
//! up and withdraws it when one goes, reports load while formed, and every
//! key disappears when the ranks stop (revoked) or die (lease lapses).

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use engine::registration::{self, Registration};
use engine::{EngineConfig, EngineMetrics, Role};
use harness::{Etcd, wait_for, wait_until};
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::records::{RankEndpoint, RankRecord};
use proto::registry::{self as keys, Registry};
use proto::types::{Shape, WorkerId};
use tokio::sync::oneshot;

const T: Duration = Duration::from_secs(5);

fn rank(id: &WorkerId, rank: u32, world: u32, endpoint: &str, generation: u64) -> RankRecord {
    RankRecord {
        worker: id.clone(),
        endpoint: RankEndpoint {
            rank,
            node: format!("tray-{rank}"),
            gpu_indices: vec![0, 1, 2, 3],
            grpc_endpoint: endpoint.to_string(),
            kv_endpoint: endpoint.to_string(),
        },
        generation,
        world_size: world,
    }
}

fn registration(registry: &Registry, rank: RankRecord) -> Registration {
    Registration {
        registry: registry.clone(),
        rank,
        role: proto::types::Role::Decode,
        shape: Shape { tp: 1, ep: 8 },
        ttl: Duration::from_secs(2),
        interval: Duration::from_millis(200),
        timeout: T,
        tls: proto::tls::ClientTls::plaintext(),
    }
}

#[tokio::test]
async fn ranks_form_a_worker_that_reports_load_and_leaves() {
    let etcd = Etcd::start().await.unwrap();
    let registry = Registry::new(etcd.client().await.unwrap());

    let model = ModelProfile::builtin("deepseek-v4-pro").unwrap();
    let mut config = EngineConfig::new(Role::Decode, model, Sku::Gb300, Parallelism::Ep(8));
    config.time_scale = 1000.0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(engine::serve(config, listener, metrics, async move {
        let _ = server_stopped.await;
    }));

    // Rank 0 of a two-rank DEP8 worker (two trays of four GPUs).
    let id = WorkerId::new("llm", "dsv4", "decode-0");
    let leader = registration(&registry, rank(&id, 0, 2, &endpoint, 3));
    let (stop_leader, leader_stopped) = oneshot::channel::<()>();
    let leader_task = tokio::spawn(registration::run(leader, endpoint.clone(), async move {
        let _ = leader_stopped.await;
    }));
    wait_for("rank 0 record", T, || {
        let registry = registry.clone();
        let key = keys::rank_key(&id, 0);
        async move { Ok(registry.get::<RankRecord>(&key, T).await?) }
    })
    .await
    .unwrap();
    // A stale rank 1 of an older generation does not complete the group.
    let lease = registry
        .grant_lease(Duration::from_secs(30), T)
        .await
        .unwrap();
    registry
        .put(lease, &rank(&id, 1, 2, "http://127.0.0.1:1", 2), T)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        registry.get_worker(&id, T).await.unwrap().is_none(),
        "a worker with one of two ranks up must not be registered"
    );

    // Rank 1 of this generation joins: the worker is formed with both ranks.
    let follower = registration(&registry, rank(&id, 1, 2, "http://127.0.0.1:2", 3));
    let (stop_follower, follower_stopped) = oneshot::channel::<()>();
    let follower_task = tokio::spawn(registration::run(
        follower,
        "http://127.0.0.1:2".into(),
        async move {
            let _ = follower_stopped.await;
        },
    ));
    let found = wait_for("worker record", T, || {
        let (registry, id) = (registry.clone(), id.clone());
        async move { Ok(registry.get_worker(&id, T).await?) }
    })
    .await
    .unwrap();
    assert_eq!(found.grpc_endpoint(), Some(endpoint.as_str()));
    assert_eq!(found.generation, 3);
    let nodes: Vec<&str> = found.ranks.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["tray-0", "tray-1"]);
    let load = wait_for("load report", T, || {
        let (registry, id) = (registry.clone(), id.clone());
        async move { Ok(registry.get_load(&id, T).await?) }
    })
    .await
    .unwrap();
    assert_eq!(load.load.running, 0);
    assert!(
        load.load.kv_blocks_total > 0,
        "the report carries the memory-fit budget"
    );

    // Rank 1 goes (as when its agent deletes the key of a crashed rank):
    // the worker is withdrawn, and comes back when the rank does.
    stop_follower.send(()).unwrap();
    follower_task.await.unwrap().unwrap();
    wait_until("worker withdrawn", T, || {
        let (registry, id) = (registry.clone(), id.clone());
        async move { Ok(registry.get_worker(&id, T).await?.is_none()) }
    })
    .await
    .unwrap();
    registry
        .put(lease, &rank(&id, 1, 2, "http://127.0.0.1:3", 3), T)
        .await
        .unwrap();
    let back = wait_for("worker formed again", T, || {
        let (registry, id) = (registry.clone(), id.clone());
        async move { Ok(registry.get_worker(&id, T).await?) }
    })
    .await
    .unwrap();
    assert_eq!(back.ranks[1].grpc_endpoint, "http://127.0.0.1:3");

    // A clean stop of rank 0 revokes its lease: its keys go at once.
    stop_leader.send(()).unwrap();
    leader_task.await.unwrap().unwrap();
    wait_until("keys removed", T, || {
        let (registry, id) = (registry.clone(), id.clone());
        async move {
            Ok(registry.get_worker(&id, T).await?.is_none()
                && registry.get_load(&id, T).await?.is_none()
                && registry
                    .get::<RankRecord>(&keys::rank_key(&id, 0), T)
                    .await?
                    .is_none())
        }
    })
    .await
    .unwrap();
    stop_server.send(()).unwrap();
    server.await.unwrap().unwrap();
}
