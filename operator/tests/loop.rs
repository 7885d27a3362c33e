//! The loop closes: a ModelDeployment applied to a real API server ends with
//! engine processes running on the placed trays, started by real agents,
//! registered with their endpoints in etcd, and the deployment Ready; deleting
//! it stops every rank and the registry forgets the workers.
//!
//! Needs the `rackscale-agent` and `rackscale-engine` binaries beside the
//! operator's (`cargo test --workspace` and `make test` build them).

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Cluster, Sku, Topology, install_crds, wait_for, wait_until};
use kube::api::{Api, DeleteParams, PostParams};
use operator::crd::{ModelDeployment, Phase, WorkerState};
use proto::registry::Registry;
use proto::types::WorkerId;
use serde_json::json;

const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds");
const TIMEOUT: Duration = Duration::from_secs(90);

fn sibling(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_rackscale-operator")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

#[tokio::test]
async fn applied_deployment_runs_engines_on_its_trays_and_becomes_ready() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    install_crds(&client, CRDS).await.unwrap();
    let topo = Topology::new().rack("b", Sku::Gb300, 4, 4);
    topo.create(&client).await.unwrap();
    let etcd = cluster.etcd().endpoint().to_string();
    let dir = Workdir::new("loop").unwrap();

    // One agent per tray, each starting rackscale-engine for its ranks.
    let engine = sibling("rackscale-engine").display().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &etcd,
        engine_bin: &engine,
        time_scale: 100,
        lease_ttl_seconds: 3,
        flags: &harness::pki::plaintext_flags(),
    };
    let agent_bin = sibling("rackscale-agent");
    let mut fleet = harness::fleet::spawn_agents(&topo, &agent_bin, &opts, dir.path()).unwrap();
    let registry = Registry::new(cluster.etcd().client().await.unwrap());
    harness::fleet::wait_registered(
        &registry,
        &mut fleet,
        &agent_bin,
        &opts,
        dir.path(),
        TIMEOUT,
    )
    .await
    .unwrap();
    let agents: Vec<ManagedProcess> = fleet.into_iter().map(|a| a.process).collect();
    let op_args = harness::fleet::operator_args(
        cluster.kubeconfig_path(),
        &etcd,
        free_port().unwrap(),
        &harness::pki::plaintext_flags(),
    );
    let _operator = ManagedProcess::spawn(
        "operator",
        Path::new(env!("CARGO_BIN_EXE_rackscale-operator")),
        &op_args,
        dir.path(),
    )
    .unwrap();

    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "rackscale.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "dsv4", "namespace": "default"},
        "spec": {
            "model": {"name": "deepseek-ai/DeepSeek-V4-Pro", "profile": "deepseek-v4-pro"},
            "hardware": {"sku": "gb300", "gpuBudget": 16},
            "workload": {"isl": 8192, "osl": 1024},
            "slo": {"maxTpotMs": 80.0},
            "recipe": {"mode": "explicit", "prefill": {"workers": 2, "tp": 4}, "decode": {"workers": 1, "ep": 8}}
        }
    }))
    .unwrap();
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    mds.create(&PostParams::default(), &md).await.unwrap();
    let ready = wait_for("deployment Ready", TIMEOUT, || {
        let mds = mds.clone();
        async move {
            let md = mds.get("dsv4").await?;
            Ok(md.status.clone().filter(|s| s.phase == Some(Phase::Ready)))
        }
    })
    .await;
    let status = match ready {
        Ok(s) => s,
        Err(e) => {
            for a in &agents {
                eprintln!("--- {}\n{}", a.log_path().display(), a.log_tail(15));
            }
            panic!("{e}");
        }
    };
    assert_eq!(status.workers.len(), 3);
    assert!(
        status
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Running)
    );
    assert_eq!(status.ready.as_deref(), Some("3/3"));
    // Every worker's engine registered where it serves.
    for w in &status.workers {
        let record = registry
            .get_worker(
                &WorkerId::new("default", "dsv4", w.name.clone()),
                Duration::from_secs(5),
            )
            .await
            .unwrap()
            .unwrap();
        assert!(
            record.ranks[0]
                .grpc_endpoint
                .starts_with("http://127.0.0.1:"),
            "{record:?}"
        );
        assert_eq!(record.ranks[0].node, w.placement[0].node);
    }

    // Delete: ranks stop (SIGTERM), engines revoke their leases.
    mds.delete("dsv4", &DeleteParams::default()).await.unwrap();
    wait_until("workers gone from the registry", TIMEOUT, || {
        let registry = registry.clone();
        async move {
            Ok(registry
                .list_workers("default", "dsv4", Duration::from_secs(5))
                .await?
                .records
                .is_empty())
        }
    })
    .await
    .unwrap();
}
