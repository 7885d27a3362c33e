//! A worker registers its endpoints and reports load in a real etcd, and
//! its keys disappear when it stops (revoked) or dies (lease lapses).

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use engine::registration::{self, Registration};
use engine::{EngineConfig, EngineMetrics, Role};
use harness::{Etcd, wait_for, wait_until};
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::records::{RankEndpoint, WorkerRecord, WorkerState};
use proto::registry::Registry;
use proto::types::{Shape, WorkerId};
use tokio::sync::oneshot;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn worker_registers_reports_load_and_leaves() {
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

    let id = WorkerId::new("llm", "dsv4", "decode-0");
    let record = WorkerRecord {
        id: id.clone(),
        role: proto::types::Role::Decode,
        shape: Shape { tp: 1, ep: 8 },
        ranks: vec![RankEndpoint {
            rank: 0,
            node: "tray-0".into(),
            gpu_indices: vec![0, 1, 2, 3],
            grpc_endpoint: endpoint.clone(),
            kv_endpoint: endpoint.clone(),
        }],
        state: WorkerState::Ready,
        generation: 3,
    };
    let reg = Registration {
        registry: registry.clone(),
        record,
        ttl: Duration::from_secs(2),
        interval: Duration::from_millis(200),
        timeout: T,
    };
    let (stop_reg, reg_stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(registration::run(reg, endpoint.clone(), async move {
        let _ = reg_stopped.await;
    }));

    let found = wait_for("worker record", T, || {
        let (registry, id) = (registry.clone(), id.clone());
        async move { Ok(registry.get_worker(&id, T).await?) }
    })
    .await
    .unwrap();
    assert_eq!(found.ranks[0].grpc_endpoint, endpoint);
    assert_eq!(found.generation, 3);
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

    // A clean stop revokes the lease: both keys go at once.
    stop_reg.send(()).unwrap();
    task.await.unwrap().unwrap();
    wait_until("keys removed", T, || {
        let (registry, id) = (registry.clone(), id.clone());
        async move {
            Ok(registry.get_worker(&id, T).await?.is_none()
                && registry.get_load(&id, T).await?.is_none())
        }
    })
    .await
    .unwrap();
    stop_server.send(()).unwrap();
    server.await.unwrap().unwrap();
}
