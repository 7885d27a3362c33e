//! The Grafana dashboards of `deploy/grafana/` against real data: a rack
//! (etcd, kube-apiserver, GFD-labelled nodes, one agent per tray, the
//! operator, engines started by the agents, a frontend) runs under load
//! from `rackscale bench`, a real Prometheus scrapes every component each
//! second, and every panel's query (and every `label_values` variable) is
//! evaluated through Prometheus' HTTP API. Any query that errors or returns
//! no series fails the test, listing all such queries at once.
//!
//! Prometheus scrapes what the chart's PodMonitors / ServiceMonitor scrape
//! in a cluster (the operator, the agents, the frontend; engine workers
//! reach the dashboards through the frontend, which follows them in the
//! registry), with the labels those monitors give (`job`, `namespace`,
//! `pod`, `node`, `clique`, `deployment`).
//!
//! Needs etcd, kube-apiserver and prometheus from `scripts/setup.sh`, and
//! the `rackscale-agent`, `rackscale-engine`, `rackscale-operator` and
//! `rackscale` binaries beside `local-rack` (`cargo build --workspace
//! --bins`).

// Test helpers fail loudly: a panic is the test failing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, anyhow};
use harness::dashboards::{label_values_variables, panel_queries, substitute};
use harness::process::{ManagedProcess, StartFailure, free_port};
use harness::prometheus::{Prometheus, ScrapeTarget};
use harness::workdir::Workdir;
use harness::{Cluster, RackSpec, Sku, Topology, install_crds, wait_for, wait_until};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use proto::registry::Registry;
use serde_json::{Value, json};

const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds");
const DASHBOARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana");
const TIMEOUT: Duration = Duration::from_secs(90);
/// The namespace label every target gets (the chart's release namespace).
const NS: &str = "rackscale-system";
const DEPLOYMENT: &str = "dsv4";
/// What Grafana would put for its built-in interval variables with a 1 s
/// scrape interval: the rate window spans several scrapes.
const RATE_INTERVAL: &str = "15s";
const INTERVAL: &str = "2s";
const RANGE: &str = "1m";

fn sibling(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_local-rack")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

/// One agent per tray with its `/metrics` on a port of its own; an agent
/// that lost a port race is started again on fresh ports.
struct Agents {
    processes: Vec<(String, String, u16, ManagedProcess)>,
}

impl Agents {
    fn spawn_one(
        rack: &RackSpec,
        node: &str,
        opts: &harness::fleet::AgentOptions<'_>,
        dir: &Path,
    ) -> Result<(u16, ManagedProcess)> {
        let metrics = free_port()?;
        let mut args = harness::fleet::agent_args(rack, node, free_port()?, opts);
        args.push(format!("--metrics-listen=127.0.0.1:{metrics}"));
        Ok((
            metrics,
            ManagedProcess::spawn(node, &sibling("rackscale-agent"), &args, dir)?,
        ))
    }

    async fn start(
        topo: &Topology,
        opts: &harness::fleet::AgentOptions<'_>,
        registry: &Registry,
        dir: &Path,
    ) -> Result<Self> {
        let mut processes = Vec::new();
        for rack in topo.racks() {
            for node in rack.node_names() {
                let (port, p) = Self::spawn_one(rack, &node, opts, dir)?;
                processes.push((node, rack.clique(), port, p));
            }
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            for (node, _, port, p) in processes.iter_mut() {
                match p.ensure_running() {
                    Ok(()) => {}
                    Err(StartFailure::PortTaken) => {
                        let rack = topo
                            .racks()
                            .iter()
                            .find(|r| r.node_names().contains(node))
                            .ok_or_else(|| anyhow!("no rack holds {node}"))?;
                        (*port, *p) = Self::spawn_one(rack, node, opts, dir)?;
                    }
                    Err(StartFailure::Failed(e)) => return Err(e),
                }
            }
            let listing = registry.list_agents(Duration::from_secs(5)).await?;
            if listing.records.len() == processes.len() {
                return Ok(Self { processes });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(anyhow!("agents not registered within {TIMEOUT:?}"));
            }
            tokio::time::sleep(harness::wait::POLL_INTERVAL).await;
        }
    }
}

fn model_deployments(client: &kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("rackscale.io", "v1alpha1", "ModelDeployment");
    Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk))
}

/// `GET path` on `addr`: the status code.
async fn http_status(addr: &str, path: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    Ok(text
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("no status line"))?
        .parse()?)
}

/// The frontend of the deployment, once `/ready` answers 200.
async fn start_frontend(etcd: &str, dir: &Path) -> Result<(ManagedProcess, String)> {
    harness::process::start_with_retries("the frontend", || async {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let args = vec![
            "--insecure-plaintext".to_owned(),
            "--role=frontend".to_owned(),
            format!("--listen={addr}"),
            "--namespace=default".to_owned(),
            format!("--deployment={DEPLOYMENT}"),
            format!("--etcd-endpoints={etcd}"),
        ];
        let mut p = ManagedProcess::spawn("frontend", &sibling("rackscale-engine"), &args, dir)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Err(exited) = p.ensure_running() {
                if harness::process::is_bind_conflict(&p.log_tail(20)) {
                    return Err(StartFailure::PortTaken);
                }
                return Err(exited);
            }
            if http_status(&addr, "/ready").await.ok() == Some(200) {
                return Ok((p, addr));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StartFailure::Failed(anyhow!(
                    "frontend not ready; log:\n{}",
                    p.log_tail(30)
                )));
            }
            tokio::time::sleep(harness::wait::POLL_INTERVAL).await;
        }
    })
    .await
}

fn load_dashboards() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DASHBOARDS)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {DASHBOARDS}");
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn every_dashboard_query_returns_series_from_a_loaded_rack() {
    let dashboards = load_dashboards();
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    install_crds(&client, CRDS).await.unwrap();
    let topo = Topology::new().rack("b", Sku::Gb300, 4, 4);
    topo.create(&client).await.unwrap();
    let etcd = cluster.etcd().endpoint().to_string();
    let dir = Workdir::new("dashboards").unwrap();
    let registry = Registry::new(cluster.etcd().client().await.unwrap());

    // The rack: agents, then the operator (metrics on a known port).
    let engine = sibling("rackscale-engine").display().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &etcd,
        engine_bin: &engine,
        time_scale: 20,
        lease_ttl_seconds: 3,
        flags: &harness::pki::plaintext_flags(),
    };
    let agents = Agents::start(&topo, &opts, &registry, dir.path())
        .await
        .unwrap();
    let operator_port = free_port().unwrap();
    let operator_args = harness::fleet::operator_args(
        cluster.kubeconfig_path(),
        &etcd,
        operator_port,
        &harness::pki::plaintext_flags(),
    );
    let _operator = ManagedProcess::spawn(
        "operator",
        &sibling("rackscale-operator"),
        &operator_args,
        dir.path(),
    )
    .unwrap();

    let mds = model_deployments(&client);
    let md = |name: &str, prefill: u32, decode: u32| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "rackscale.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "model": {"name": "deepseek-ai/DeepSeek-V4-Pro", "profile": "deepseek-v4-pro"},
                "hardware": {"sku": "gb300", "gpuBudget": 72},
                "workload": {"isl": 1024, "osl": 128},
                "slo": {"maxTpotMs": 80.0},
                "recipe": {"mode": "explicit",
                           "prefill": {"workers": prefill, "tp": 4},
                           "decode": {"workers": decode, "ep": 8}}
            }
        }))
        .unwrap()
    };
    mds.create(&PostParams::default(), &md(DEPLOYMENT, 2, 1))
        .await
        .unwrap();
    wait_until("deployment Ready", TIMEOUT, || {
        let mds = mds.clone();
        async move { Ok(mds.get(DEPLOYMENT).await?.data["status"]["phase"] == "Ready") }
    })
    .await
    .unwrap();
    // A deployment the rack cannot hold: its reconciles fail with a
    // category, which the Operator dashboard's errors panel shows.
    mds.create(&PostParams::default(), &md("too-big", 8, 4))
        .await
        .unwrap();

    let workers = registry
        .list_workers("default", DEPLOYMENT, Duration::from_secs(5))
        .await
        .unwrap()
        .records;
    assert_eq!(workers.len(), 3, "{workers:?}");
    let (_frontend, frontend_addr) = start_frontend(&etcd, dir.path()).await.unwrap();

    let mut targets = vec![
        ScrapeTarget::new("rackscale-operator", &format!("127.0.0.1:{operator_port}"))
            .label("namespace", NS)
            .label("pod", "rackscale-operator-0"),
        ScrapeTarget::new("rackscale-frontend", &frontend_addr)
            .label("namespace", NS)
            .label("pod", "rackscale-frontend-0")
            .label("deployment", DEPLOYMENT),
    ];
    for (node, clique, port, _) in &agents.processes {
        targets.push(
            ScrapeTarget::new("rackscale-agent", &format!("127.0.0.1:{port}"))
                .label("namespace", NS)
                .label("pod", &format!("rackscale-agent-{node}"))
                .label("node", node)
                .label("clique", clique),
        );
    }
    let prometheus = Prometheus::start(&targets).await.unwrap();
    prometheus.wait_targets_up(TIMEOUT).await.unwrap();

    // Load for the rest of the test (killed on drop).
    let bench_log = std::fs::File::create(dir.path().join("bench.log")).unwrap();
    let _bench = tokio::process::Command::new(sibling("rackscale"))
        .args([
            "bench",
            "--url",
            &format!("http://{frontend_addr}"),
            "--isl",
            "256",
            "--osl",
            "64",
            "--concurrency",
            "4",
            "--duration",
            "120",
            "--gpus",
            "12",
        ])
        .stdin(Stdio::null())
        .stdout(bench_log.try_clone().unwrap())
        .stderr(bench_log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Rates need output tokens in two scrapes at least a few seconds apart,
    // and the failed deployment's errors must have been scraped.
    for ready in [
        format!("increase(rackscale_frontend_completion_tokens_total[{RATE_INTERVAL}]) > 0"),
        format!("rate(rackscale_frontend_time_to_first_token_seconds_count[{RATE_INTERVAL}]) > 0"),
        "sum(rackscale_operator_reconcile_errors_total) > 0".to_owned(),
        "count(rackscale_frontend_worker_gpus) == 3".to_owned(),
    ] {
        wait_for(format!("Prometheus to see {ready}"), TIMEOUT, || {
            let p = &prometheus;
            let ready = ready.clone();
            async move { Ok(Some(p.query(&ready).await?).filter(|s| !s.is_empty())) }
        })
        .await
        .unwrap();
    }

    let values = BTreeMap::from([
        ("namespace", NS),
        ("deployment", DEPLOYMENT),
        ("__rate_interval", RATE_INTERVAL),
        ("__interval", INTERVAL),
        ("__range", RANGE),
    ]);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut evaluated = 0;
    for (file, dashboard) in &dashboards {
        for var in label_values_variables(dashboard).unwrap() {
            let expr = substitute(&var.expr, &values).unwrap();
            let offered: Vec<String> = match prometheus.query(&expr).await {
                Ok(samples) => samples
                    .iter()
                    .filter_map(|s| s.labels.get(&var.label).cloned())
                    .collect(),
                Err(e) => {
                    failures.push(format!("{file}: variable {}: {expr}: {e}", var.name));
                    continue;
                }
            };
            let wanted = values.get(var.name.as_str()).copied().unwrap_or_default();
            if !offered.iter().any(|v| v == wanted) {
                failures.push(format!(
                    "{file}: variable {} offers {offered:?}, not {wanted:?} ({expr})",
                    var.name
                ));
            }
        }
        for q in panel_queries(dashboard).unwrap() {
            let expr = substitute(&q.expr, &values).unwrap();
            evaluated += 1;
            match prometheus.query(&expr).await {
                Ok(samples) if samples.is_empty() => failures.push(format!(
                    "{file}: {} / {}: no series: {expr}",
                    q.panel, q.ref_id
                )),
                Ok(samples) => report.push(format!(
                    "{file}: {} / {}: {} series, first {:.4}",
                    q.panel,
                    q.ref_id,
                    samples.len(),
                    samples[0].value
                )),
                Err(e) => failures.push(format!(
                    "{file}: {} / {}: error {e}: {expr}",
                    q.panel, q.ref_id
                )),
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} of {evaluated} dashboard queries failed:\n{}\nPrometheus: {} (log:\n{})",
        failures.len(),
        failures.join("\n"),
        prometheus.address(),
        prometheus.log_tail(10)
    );

    // The headline figures are real numbers, not just present series.
    let deployment = dashboards
        .iter()
        .find(|(f, _)| f == "deployment.json")
        .map(|(_, d)| d)
        .unwrap();
    for panel in ["Output tok/s per GPU", "tok/s per user", "GPUs"] {
        let q = panel_queries(deployment)
            .unwrap()
            .into_iter()
            .find(|q| q.panel == panel)
            .unwrap_or_else(|| panic!("no panel {panel}"));
        let samples = prometheus
            .query(&substitute(&q.expr, &values).unwrap())
            .await
            .unwrap();
        let v = samples[0].value;
        assert!(v.is_finite() && v > 0.0, "{panel} = {v}");
        if panel == "GPUs" {
            let registered: u32 = workers.iter().map(|w| w.shape.tp * w.shape.ep).sum();
            assert_eq!(registered, 16, "2 x TP4 prefill + 1 x EP8 decode");
            assert_eq!(v, f64::from(registered));
        }
    }
}
