//! Whole racks, end to end: two simulated NVL72 racks (GB200 and GB300, 18
//! trays x 4 GPUs, one real `rackscale-agent` per tray), the operator, etcd
//! and a real API server, all on loopback.
//!
//! - A GB300 deployment using the whole rack (72 GPUs) becomes Ready; the
//!   registry lists each worker's endpoints, and every rank of every worker
//!   runs on the tray and GPUs the status names.
//! - On a smaller GB200 deployment, a prefill through `EngineService` gives a
//!   KV handle and the decode worker pulls that KV and streams the tokens.
//! - `kill -9` of one engine rank: the agent reports it and restarts it, the
//!   deployment goes Degraded, then Ready again, and no GPU ever carries two
//!   ranks.
//! - `kill -9` of an agent: its lease expires, the operator re-places its
//!   worker on another tray of the same rack, and the deployment is Ready.
//! - A GPU the agent reports failed (its fault-injection hook, as NVML
//!   would): the operator moves the worker using it to healthy GPUs and the
//!   Rack counts one healthy GPU fewer; no node annotation is involved.
//!
//! Needs the `rackscale-agent` and `rackscale-engine` binaries beside the
//! operator's (`cargo test --workspace` and `make test` build them).

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Cluster, Sku, Topology, install_crds, wait_for};
use kube::api::{Api, PostParams};
use operator::crd::{ModelDeployment, ModelDeploymentStatus, Phase, Pool, Rack, WorkerState};
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::registry::Registry;
use proto::types::WorkerId;
use serde_json::json;

const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds");
const TIMEOUT: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(5);

fn sibling(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_rackscale-operator")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

fn deployment(
    name: &str,
    sku: &str,
    budget: u32,
    (prefill, prefill_tp): (u32, u32),
    decode_ep: u32,
) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "rackscale.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"name": "deepseek-ai/DeepSeek-V4-Pro", "profile": "deepseek-v4-pro"},
            "hardware": {"sku": sku, "gpuBudget": budget},
            "workload": {"isl": 8192, "osl": 1024},
            "slo": {"maxTpotMs": 80.0},
            "recipe": {"mode": "explicit",
                       "prefill": {"workers": prefill, "tp": prefill_tp},
                       "decode": {"workers": 1, "ep": decode_ep}}
        }
    }))
    .unwrap()
}

/// etcd and kube-apiserver with the CRDs installed and `topo`'s trays as
/// GFD-labelled Nodes.
async fn start_cluster(topo: &Topology) -> (Cluster, kube::Client) {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    install_crds(&client, CRDS).await.unwrap();
    topo.create(&client).await.unwrap();
    (cluster, client)
}

/// `rackscale-operator run` against `cluster`'s API server and `etcd`.
fn start_operator(cluster: &Cluster, etcd: &str, dir: &Path) -> ManagedProcess {
    let args = harness::fleet::operator_args(
        cluster.kubeconfig_path(),
        etcd,
        free_port().unwrap(),
        &harness::pki::plaintext_flags(),
    );
    ManagedProcess::spawn(
        "operator",
        Path::new(env!("CARGO_BIN_EXE_rackscale-operator")),
        &args,
        dir,
    )
    .unwrap()
}

/// Every agent's AgentService address, by node.
async fn agent_addresses(registry: &Registry) -> BTreeMap<String, String> {
    registry
        .list_agents(T)
        .await
        .unwrap()
        .records
        .into_iter()
        .map(|r| {
            let address = if r.address.starts_with("http") {
                r.address
            } else {
                format!("http://{}", r.address)
            };
            (r.node, address)
        })
        .collect()
}

/// Every rank the agents hold (not exited): (node, status).
async fn all_ranks(agents: &BTreeMap<String, String>) -> Vec<(String, pb::RankStatus)> {
    let mut out = Vec::new();
    for (node, address) in agents {
        let mut client = AgentServiceClient::connect(address.clone()).await.unwrap();
        let list = client
            .list_ranks(pb::ListRanksRequest::default())
            .await
            .unwrap();
        out.extend(
            list.into_inner()
                .ranks
                .into_iter()
                .filter(|r| r.phase != pb::RankPhase::Exited as i32)
                .map(|r| (node.clone(), r)),
        );
    }
    out
}

/// Panics when any GPU is held by two live ranks.
fn assert_no_gpu_twice(ranks: &[(String, pb::RankStatus)]) {
    let mut held = BTreeSet::new();
    for (node, r) in ranks {
        for gpu in &r.gpu_indices {
            assert!(
                held.insert((node.clone(), *gpu)),
                "GPU {gpu} of {node} is held by two ranks: {ranks:#?}"
            );
        }
    }
}

async fn status_of(mds: &Api<ModelDeployment>, name: &str) -> ModelDeploymentStatus {
    mds.get(name).await.unwrap().status.unwrap_or_default()
}

async fn wait_phase(
    mds: &Api<ModelDeployment>,
    name: &str,
    phase: Phase,
    agents: &[ManagedProcess],
) -> ModelDeploymentStatus {
    let found = wait_for(format!("{name} {phase:?}"), TIMEOUT, || {
        let mds = mds.clone();
        let name = name.to_string();
        async move {
            let md = mds.get(&name).await?;
            Ok(md.status.filter(|s| s.phase == Some(phase)))
        }
    })
    .await;
    match found {
        Ok(s) => s,
        Err(e) => {
            let s = status_of(mds, name).await;
            for a in agents.iter().take(4) {
                eprintln!("--- {}\n{}", a.log_path().display(), a.log_tail(10));
            }
            panic!("{e}; status: {s:#?}");
        }
    }
}

#[tokio::test]
async fn whole_racks_run_recover_from_crashes_and_re_place_lost_trays() {
    let topo = Topology::new()
        .rack("a", Sku::Gb200, 18, 4)
        .rack("b", Sku::Gb300, 18, 4);
    let (cluster, client) = start_cluster(&topo).await;
    let etcd = cluster.etcd().endpoint().to_string();
    let dir = Workdir::new("rack").unwrap();

    let engine = sibling("rackscale-engine").display().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &etcd,
        engine_bin: &engine,
        time_scale: 100,
        lease_ttl_seconds: 2,
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
    let agent_of: BTreeMap<String, usize> = fleet
        .iter()
        .enumerate()
        .map(|(i, a)| (a.node.clone(), i))
        .collect();
    let mut agents: Vec<ManagedProcess> = fleet.into_iter().map(|a| a.process).collect();
    let _operator = start_operator(&cluster, &etcd, dir.path());

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    // The whole GB300 rack: 2 x TP4 prefill + one DEP64 decode worker (16 trays).
    mds.create(
        &PostParams::default(),
        &deployment("whole", "gb300", 72, (2, 4), 64),
    )
    .await
    .unwrap();
    // A part of the GB200 rack, for the faults: 1 x TP8 prefill + one DEP8.
    mds.create(
        &PostParams::default(),
        &deployment("part", "gb200", 16, (1, 8), 8),
    )
    .await
    .unwrap();

    let whole = wait_phase(&mds, "whole", Phase::Ready, &agents).await;
    assert_eq!(whole.ready.as_deref(), Some("3/3"));
    let gpus: u32 = whole
        .workers
        .iter()
        .flat_map(|w| w.placement.iter().map(|n| n.gpus.len() as u32))
        .sum();
    assert_eq!(gpus, 72, "the deployment uses the whole rack");
    let addresses = agent_addresses(&registry).await;
    let ranks = all_ranks(&addresses).await;
    assert_no_gpu_twice(&ranks);
    for w in &whole.workers {
        assert_eq!(w.state, WorkerState::Running);
        assert_eq!(w.rack, whole.workers[0].rack, "one NVLink domain");
        let record = registry
            .get_worker(&WorkerId::new("default", "whole", w.name.clone()), T)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} is not registered", w.name));
        // The registry lists every rank, on the trays and GPUs the status names.
        assert_eq!(record.ranks.len(), w.placement.len(), "{record:?}");
        for (rank, placed) in record.ranks.iter().zip(&w.placement) {
            assert_eq!(rank.node, placed.node);
            assert_eq!(rank.gpu_indices, placed.gpus);
            assert!(rank.grpc_endpoint.starts_with("http://127.0.0.1:"));
            // ... and the agent of that tray runs exactly that rank there.
            let held = ranks.iter().find(|(node, r)| {
                node == &placed.node
                    && r.rank.as_ref().is_some_and(|k| {
                        k.rank == rank.rank
                            && k.worker.as_ref().is_some_and(|id| id.worker == w.name)
                    })
            });
            let (_, held) = held.unwrap_or_else(|| panic!("no rank {} of {}", rank.rank, w.name));
            assert_eq!(held.gpu_indices, placed.gpus);
            assert_eq!(held.phase, pb::RankPhase::Running as i32);
        }
    }
    let decode = whole
        .workers
        .iter()
        .find(|w| w.role == Pool::Decode)
        .unwrap();
    assert_eq!(decode.placement.len(), 16, "DEP64 spans 16 trays");

    // Disaggregated serving on the GB200 deployment: prefill gives a KV
    // handle, the decode worker pulls the KV and streams the tokens.
    let part = wait_phase(&mds, "part", Phase::Ready, &agents).await;
    assert_ne!(
        part.workers[0].rack, whole.workers[0].rack,
        "GB200 is rack a"
    );
    let endpoint_of = |role: Pool| {
        let name = part
            .workers
            .iter()
            .find(|w| w.role == role)
            .unwrap()
            .name
            .clone();
        let registry = registry.clone();
        async move {
            registry
                .get_worker(&WorkerId::new("default", "part", name), T)
                .await
                .unwrap()
                .unwrap()
                .grpc_endpoint()
                .unwrap()
                .to_string()
        }
    };
    let mut prefill = EngineServiceClient::connect(endpoint_of(Pool::Prefill).await)
        .await
        .unwrap();
    let kv = prefill
        .prefill(pb::PrefillRequest {
            request_id: "r1".into(),
            prompt: Some(pb::prefill_request::Prompt::PromptLength(4096)),
            max_tokens: 0,
            sampling: None,
        })
        .await
        .unwrap()
        .into_inner()
        .kv
        .unwrap();
    assert!(kv.bytes > 1 << 20, "{kv:?}");
    let mut decoder = EngineServiceClient::connect(endpoint_of(Pool::Decode).await)
        .await
        .unwrap();
    let mut stream = decoder
        .decode(pb::DecodeRequest {
            request_id: "r1".into(),
            kv: Some(kv),
            max_tokens: 16,
            sampling: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        tokens += chunk.token_ids.len();
    }
    assert_eq!(tokens, 16);

    // kill -9 one rank (rank 1 of the two-tray decode worker).
    let decode = part
        .workers
        .iter()
        .find(|w| w.role == Pool::Decode)
        .unwrap();
    assert_eq!(decode.placement.len(), 2);
    let tray = decode.placement[1].node.clone();
    let victim = all_ranks(&BTreeMap::from([(tray.clone(), addresses[&tray].clone())]))
        .await
        .into_iter()
        .find(|(_, r)| r.rank.as_ref().is_some_and(|k| k.rank == 1))
        .map(|(_, r)| r)
        .unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let degraded = wait_phase(&mds, "part", Phase::Degraded, &agents).await;
    let condition = degraded
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(condition.status, "True");
    assert!(
        condition.message.contains("decode-0"),
        "the condition names the worker that is down: {condition:?}"
    );
    let ready = wait_phase(&mds, "part", Phase::Ready, &agents).await;
    let ranks = all_ranks(&addresses).await;
    assert_no_gpu_twice(&ranks);
    let restarted = ranks
        .iter()
        .find(|(node, r)| {
            node == &tray
                && r.rank.as_ref().is_some_and(|k| {
                    k.rank == 1 && k.worker.as_ref().is_some_and(|w| w.deployment == "part")
                })
        })
        .unwrap();
    assert!(restarted.1.restarts >= 1, "{restarted:?}");
    assert_ne!(restarted.1.pid, victim.pid);
    assert_eq!(
        ready
            .workers
            .iter()
            .find(|w| w.role == Pool::Decode)
            .unwrap()
            .placement,
        decode.placement,
        "a restarted rank stays where it was"
    );

    // kill -9 the agent of the prefill worker's tray: its lease expires and
    // the worker is re-placed on another tray of rack a.
    let prefill_worker = ready
        .workers
        .iter()
        .find(|w| w.role == Pool::Prefill)
        .unwrap();
    let lost = prefill_worker.placement[0].node.clone();
    agents[agent_of[&lost]].kill().unwrap();
    let moved = wait_for("prefill re-placed and Ready", TIMEOUT, || {
        let mds = mds.clone();
        let (lost, name) = (lost.clone(), prefill_worker.name.clone());
        async move {
            let s = mds.get("part").await?.status.unwrap_or_default();
            let w = s.workers.iter().find(|w| w.name == name).cloned();
            Ok(w.filter(|w| {
                s.phase == Some(Phase::Ready) && w.placement.iter().all(|n| n.node != lost)
            })
            .map(|w| (s.clone(), w)))
        }
    })
    .await;
    let (after, moved) = match moved {
        Ok(m) => m,
        Err(e) => panic!("{e}; status: {:#?}", status_of(&mds, "part").await),
    };
    assert_eq!(moved.rack, prefill_worker.rack, "re-placed within its rack");
    let record = registry
        .get_worker(&WorkerId::new("default", "part", moved.name.clone()), T)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.ranks[0].node, moved.placement[0].node);
    assert_eq!(after.ready.as_deref(), Some("2/2"));
    let live = agent_addresses(&registry).await;
    assert!(!live.contains_key(&lost));
    assert_no_gpu_twice(&all_ranks(&live).await);
}

/// `POST path` on loopback `port`: the status code.
async fn post(port: u16, path: &str) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    raw.get(9..12).unwrap_or("0").parse().unwrap()
}

#[tokio::test]
async fn a_gpu_fault_an_agent_reports_moves_its_worker_in_kubernetes_mode() {
    let topo = Topology::new().rack("h", Sku::Gb300, 3, 4);
    let (cluster, client) = start_cluster(&topo).await;
    let etcd = cluster.etcd().endpoint().to_string();
    let dir = Workdir::new("rack-health").unwrap();
    let engine = sibling("rackscale-engine").display().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &etcd,
        engine_bin: &engine,
        time_scale: 100,
        lease_ttl_seconds: 2,
        flags: &harness::pki::plaintext_flags(),
    };
    // Each agent also serves its fault-injection hook on its own port.
    let agent_bin = sibling("rackscale-agent");
    let mut agents: Vec<ManagedProcess> = Vec::new();
    let mut hook_port: BTreeMap<String, u16> = BTreeMap::new();
    for rack in topo.racks() {
        for node in rack.node_names() {
            let http_port = free_port().unwrap();
            let mut args = harness::fleet::agent_args(rack, &node, free_port().unwrap(), &opts);
            args.extend(harness::fleet::fault_hook_flags(http_port));
            agents.push(ManagedProcess::spawn(&node, &agent_bin, &args, dir.path()).unwrap());
            hook_port.insert(node, http_port);
        }
    }
    let registry = Registry::new(cluster.etcd().client().await.unwrap());
    wait_for("every agent registered", TIMEOUT, || {
        let (registry, hook_port) = (&registry, &hook_port);
        async move {
            let listing = registry.list_agents(T).await?;
            let seen: BTreeSet<&str> = listing.records.iter().map(|r| r.node.as_str()).collect();
            Ok(hook_port
                .keys()
                .all(|n| seen.contains(n.as_str()))
                .then_some(()))
        }
    })
    .await
    .unwrap();
    let _operator = start_operator(&cluster, &etcd, dir.path());

    // 1 x TP4 prefill + one DEP4 decode: two of the three trays.
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    mds.create(
        &PostParams::default(),
        &deployment("sick", "gb300", 8, (1, 4), 4),
    )
    .await
    .unwrap();
    let ready = wait_phase(&mds, "sick", Phase::Ready, &agents).await;
    let prefill = ready
        .workers
        .iter()
        .find(|w| w.role == Pool::Prefill)
        .unwrap()
        .clone();
    let node = prefill.placement[0].node.clone();
    let rack_name = operator::inventory::rack_name(&topo.racks()[0].clique());
    let racks: Api<Rack> = Api::all(client.clone());

    // The agent under the prefill worker reports GPU 1 failed.
    assert_eq!(
        post(hook_port[&node], "/debug/gpus/1/health/unhealthy").await,
        200
    );
    let moved = wait_for(
        "prefill moved off the failed GPU and Ready",
        TIMEOUT,
        || {
            let (mds, node, name) = (mds.clone(), node.clone(), prefill.name.clone());
            async move {
                let s = mds.get("sick").await?.status.unwrap_or_default();
                let w = s.workers.iter().find(|w| w.name == name).cloned();
                Ok(w.filter(|w| {
                    s.phase == Some(Phase::Ready) && w.placement.iter().all(|n| n.node != node)
                }))
            }
        },
    )
    .await;
    let moved = match moved {
        Ok(m) => m,
        Err(e) => panic!("{e}; status: {:#?}", status_of(&mds, "sick").await),
    };
    assert_eq!(moved.rack, prefill.rack, "re-placed within its rack");
    let healthy = wait_for("the Rack counts 11 healthy GPUs", TIMEOUT, || {
        let (racks, name) = (racks.clone(), rack_name.clone());
        async move {
            let s = racks.get(&name).await?.status.unwrap_or_default();
            Ok((s.gpus_healthy == 11).then_some(s))
        }
    })
    .await
    .unwrap();
    assert_eq!(healthy.gpus_total, 12);
    let live = agent_addresses(&registry).await;
    assert_no_gpu_twice(&all_ranks(&live).await);
    // The decode worker was left where it was.
    let after = status_of(&mds, "sick").await;
    let decode = |s: &ModelDeploymentStatus| {
        s.workers
            .iter()
            .find(|w| w.role == Pool::Decode)
            .map(|w| w.placement.clone())
    };
    assert_eq!(
        decode(&after),
        decode(&ready),
        "only the affected worker moves"
    );
}
