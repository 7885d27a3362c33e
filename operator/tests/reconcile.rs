//! The operator as a process against a real kube-apiserver: racks appear
//! from GPU Feature Discovery labels, a GB300 auto-recipe deployment is
//! planned and placed inside the GB300 rack, an unhealthy GPU re-places its
//! worker within the rack, deletion frees every GPU, and of two replicas only
//! the leader reconciles until it dies.

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Cluster, Sku, Topology, install_crds, wait_for, wait_until};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use operator::crd::{ModelDeployment, Phase, Rack};
use serde_json::json;

const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds");
const TIMEOUT: Duration = Duration::from_secs(60);

struct Operator {
    _process: ManagedProcess,
    metrics_port: u16,
}

fn start_operator(cluster: &Cluster, dir: &Path, name: &str) -> Operator {
    let metrics_port = free_port().unwrap();
    let args: Vec<String> = [
        "run",
        "--insecure-plaintext",
        "--kubeconfig",
        &cluster.kubeconfig_path().display().to_string(),
        "--lease-namespace",
        "default",
        "--identity",
        name,
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--lease-duration-ms",
        "3000",
        "--renew-deadline-ms",
        "2000",
        "--retry-period-ms",
        "300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let process = ManagedProcess::spawn(
        name,
        Path::new(env!("CARGO_BIN_EXE_rackscale-operator")),
        &args,
        dir,
    )
    .unwrap();
    Operator {
        _process: process,
        metrics_port,
    }
}

/// Value of an unlabelled metric sample (0 when absent).
async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest_get(port, "/metrics").await?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// A minimal HTTP GET over loopback (keeps the test free of an HTTP client crate).
async fn reqwest_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn gb300_auto(name: &str) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "rackscale.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"name": "deepseek-ai/DeepSeek-V4-Pro", "profile": "deepseek-v4-pro"},
            "hardware": {"sku": "gb300", "gpuBudget": 72},
            "workload": {"isl": 8192, "osl": 1024},
            "slo": {"minTokensPerSecondPerUser": 27.0},
            "recipe": {"mode": "auto"}
        }
    }))
    .unwrap()
}

async fn placed(api: &Api<ModelDeployment>, name: &str) -> ModelDeployment {
    let name = name.to_string();
    wait_for(&format!("{name} placed"), TIMEOUT, || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let md = api.get(&name).await?;
            let done = md.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Placed)
                    && s.observed_generation == md.metadata.generation
                    && !s.workers.is_empty()
            });
            Ok(done.then_some(md))
        }
    })
    .await
    .unwrap()
}

fn assert_inside(md: &ModelDeployment, rack: &str, rack_nodes: &BTreeSet<String>) {
    let status = md.status.as_ref().unwrap();
    let mut seen = BTreeSet::new();
    for w in &status.workers {
        assert_eq!(w.rack, rack, "{} left the rack", w.name);
        for n in &w.placement {
            assert!(
                rack_nodes.contains(&n.node),
                "{} on foreign node {}",
                w.name,
                n.node
            );
            for g in &n.gpus {
                assert!(
                    seen.insert((n.node.clone(), *g)),
                    "GPU {}/{g} assigned twice",
                    n.node
                );
            }
        }
    }
    assert_eq!(seen.len() as u32, status.recipe.as_ref().unwrap().gpus);
}

#[tokio::test]
async fn deployment_is_planned_placed_replaced_and_released() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    install_crds(&client, CRDS).await.unwrap();
    let topo = Topology::new()
        .rack("a", Sku::Gb200, 18, 4)
        .rack("b", Sku::Gb300, 18, 4);
    topo.create(&client).await.unwrap();
    let gb300 = topo.rack_named("b").unwrap();
    let gb300_nodes: BTreeSet<String> = gb300.node_names().into_iter().collect();
    let gb300_rack = operator::inventory::rack_name(&gb300.clique());

    harness::apply_crd_yaml(&client, include_str!("fixtures/computedomain-crd.yaml"))
        .await
        .unwrap();
    let dir = Workdir::new("operator").unwrap();
    let op = start_operator(&cluster, dir.path(), "operator-0");

    let racks: Api<Rack> = Api::all(client.clone());
    wait_until("two racks with 72 free GPUs", TIMEOUT, || {
        let racks = racks.clone();
        async move {
            let list = racks.list(&Default::default()).await?;
            Ok(list.items.len() == 2
                && list
                    .items
                    .iter()
                    .all(|r| r.status.as_ref().is_some_and(|s| s.gpus_free == 72)))
        }
    })
    .await
    .unwrap();

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    mds.create(&PostParams::default(), &gb300_auto("dsv4"))
        .await
        .unwrap();
    let md = placed(&mds, "dsv4").await;
    assert_inside(&md, &gb300_rack, &gb300_nodes);
    let recipe = md.status.as_ref().unwrap().recipe.clone().unwrap();
    assert_eq!(recipe.source, "planner");
    assert!(recipe.predicted.as_ref().unwrap().tok_s_per_user >= 27.0);
    let used = recipe.gpus;
    wait_until("rack status shows the allocation", TIMEOUT, || {
        let (racks, name) = (racks.clone(), gb300_rack.clone());
        async move {
            let s = racks.get(&name).await?.status.unwrap_or_default();
            Ok((s.gpus_allocated, s.gpus_free) == (used, 72 - used))
        }
    })
    .await
    .unwrap();

    // Workers spanning trays get an IMEX channel (ComputeDomain), one per worker.
    let cd_resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "resource.nvidia.com",
        "v1beta1",
        "ComputeDomain",
    ));
    let cds: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &cd_resource);
    let spanning: BTreeSet<String> = md
        .status
        .as_ref()
        .unwrap()
        .workers
        .iter()
        .filter(|w| w.placement.len() > 1)
        .map(|w| format!("dsv4-{}", w.name))
        .collect();
    assert!(
        !spanning.is_empty(),
        "a 72-GPU recipe has workers wider than a tray"
    );
    let names: BTreeSet<String> = cds
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(names, spanning);

    // kubectl shows the columns users read.
    let out = cluster
        .apiserver()
        .kubectl()
        .unwrap()
        .args(["get", "md,racks"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for col in [
        "MODEL",
        "PREFILL",
        "DECODE",
        "TOK/S/GPU",
        "READY",
        "ALLOCATED",
        "FREE",
    ] {
        assert!(text.contains(col), "missing {col} in\n{text}");
    }
    assert!(
        text.contains(&recipe.prefill) && text.contains("deepseek-ai/DeepSeek-V4-Pro"),
        "{text}"
    );

    // Deleting the deployment frees every GPU.
    mds.delete("dsv4", &DeleteParams::default()).await.unwrap();
    wait_until("deployment gone and rack free", TIMEOUT, || {
        let (mds, racks, rack_name) = (mds.clone(), racks.clone(), gb300_rack.clone());
        async move {
            let gone = mds.get_opt("dsv4").await?.is_none();
            let rack = racks.get(&rack_name).await?;
            let s = rack.status.unwrap_or_default();
            Ok(gone && s.gpus_allocated == 0 && s.gpus_free == 72 && s.allocations.is_empty())
        }
    })
    .await
    .unwrap();
    assert!(
        cds.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "ComputeDomains left behind"
    );

    // A deployment that leaves room: a GPU taken out of service moves only
    // the worker that used it, within the rack.
    let mut partial = gb300_auto("partial");
    partial.spec.hardware.gpu_budget = 56;
    mds.create(&PostParams::default(), &partial).await.unwrap();
    let md = placed(&mds, "partial").await;
    assert_inside(&md, &gb300_rack, &gb300_nodes);
    let victim = md.status.as_ref().unwrap().workers[0].clone();
    let (node, gpu) = (
        victim.placement[0].node.clone(),
        victim.placement[0].gpus[0],
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let patch =
        json!({"metadata": {"annotations": {"rackscale.io/unhealthy-gpus": gpu.to_string()}}});
    nodes
        .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let moved = wait_for("worker moved off the unhealthy GPU", TIMEOUT, || {
        let mds = mds.clone();
        let (node, name) = (node.clone(), victim.name.clone());
        async move {
            let md = mds.get("partial").await?;
            let w = md
                .status
                .as_ref()
                .and_then(|s| s.workers.iter().find(|w| w.name == name))
                .cloned();
            let off = w.is_some_and(|w| {
                !w.placement
                    .iter()
                    .any(|p| p.node == node && p.gpus.contains(&gpu))
            });
            Ok(off.then_some(md))
        }
    })
    .await
    .unwrap();
    assert_inside(&moved, &gb300_rack, &gb300_nodes);
    for (before, after) in md
        .status
        .as_ref()
        .unwrap()
        .workers
        .iter()
        .zip(&moved.status.as_ref().unwrap().workers)
    {
        if before.name != victim.name {
            assert_eq!(
                before.placement, after.placement,
                "{} moved without cause",
                before.name
            );
        }
    }
    let used = moved.status.as_ref().unwrap().recipe.as_ref().unwrap().gpus;
    assert!(used <= 56);
    wait_until("rack counts the unhealthy GPU", TIMEOUT, || {
        let (racks, name) = (racks.clone(), gb300_rack.clone());
        async move {
            let s = racks.get(&name).await?.status.unwrap_or_default();
            Ok((s.gpus_healthy, s.gpus_allocated, s.gpus_free) == (71, used, 71 - used))
        }
    })
    .await
    .unwrap();
    assert!(
        metric(op.metrics_port, "rackscale_operator_reconciles_total")
            .await
            .unwrap_or(0.0)
            > 0.0
    );
    drop(op);
}

#[tokio::test]
async fn only_the_leader_reconciles_and_the_follower_takes_over() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    install_crds(&client, CRDS).await.unwrap();
    Topology::new()
        .rack("b", Sku::Gb300, 18, 4)
        .create(&client)
        .await
        .unwrap();
    let dir = Workdir::new("operators").unwrap();
    let mut ops = [
        Some(start_operator(&cluster, dir.path(), "operator-a")),
        Some(start_operator(&cluster, dir.path(), "operator-b")),
    ];
    let ports: Vec<u16> = ops.iter().flatten().map(|o| o.metrics_port).collect();
    let leader = wait_for("one leader", TIMEOUT, || {
        let ports = ports.clone();
        async move {
            let mut leading = Vec::new();
            for (i, p) in ports.iter().enumerate() {
                if metric(*p, "rackscale_operator_leader").await == Some(1.0) {
                    leading.push(i);
                }
            }
            Ok((leading.len() == 1).then(|| leading[0]))
        }
    })
    .await
    .unwrap();
    let follower = 1 - leader;

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    let mut first = gb300_auto("first");
    first.spec.hardware.gpu_budget = 48;
    mds.create(&PostParams::default(), &first).await.unwrap();
    placed(&mds, "first").await;
    assert!(
        metric(ports[leader], "rackscale_operator_reconciles_total")
            .await
            .unwrap()
            > 0.0
    );
    assert_eq!(
        metric(ports[follower], "rackscale_operator_reconciles_total")
            .await
            .unwrap_or(0.0),
        0.0,
        "the follower reconciled"
    );
    assert_eq!(
        metric(ports[follower], "rackscale_operator_leader").await,
        Some(0.0)
    );

    // kill -9 the leader: the follower takes over within the lease duration.
    let started = std::time::Instant::now();
    ops[leader].take();
    wait_until("follower leads", Duration::from_secs(10), || {
        let p = ports[follower];
        async move { Ok(metric(p, "rackscale_operator_leader").await == Some(1.0)) }
    })
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "takeover took {:?}",
        started.elapsed()
    );
    let mut second = gb300_auto("second");
    second.spec.hardware.gpu_budget = 16;
    second.spec.slo.min_tokens_per_second_per_user = Some(20.0);
    mds.create(&PostParams::default(), &second).await.unwrap();
    let md = placed(&mds, "second").await;
    // The new leader rebuilt the ledger: no GPU of `first` was reused.
    let first = mds.get("first").await.unwrap();
    let gpus = |m: &ModelDeployment| -> BTreeSet<(String, u32)> {
        m.status
            .as_ref()
            .unwrap()
            .workers
            .iter()
            .flat_map(|w| {
                w.placement
                    .iter()
                    .flat_map(|p| p.gpus.iter().map(|g| (p.node.clone(), *g)))
            })
            .collect()
    };
    assert!(gpus(&first).is_disjoint(&gpus(&md)));
}
