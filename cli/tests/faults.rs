//! Faults under load: real etcd, one real `rackscale-agent` per tray (each
//! starting `rackscale-engine` ranks, simulated backend), the standalone
//! operator and two frontends, with `rackscale bench` sending requests the
//! whole time. Each fault is injected while requests are in flight.
//!
//! For every fault the test asserts that each request either completed or
//! failed with a clear error (an HTTP status with a message, an error event,
//! a refused connection), that none hung until its deadline (`timeout`, the
//! only way a bench request can be lost), that the deployment recovers to
//! Ready, that no GPU ends up driven by two engine processes, and that no
//! engine outlives its agent. It prints a table of the outcomes and
//! recovery times (`docs/reliability.md` records one run).
//!
//! Needs the `rackscale-agent`, `rackscale-engine` and `rackscale-operator`
//! binaries beside `rackscale` (`cargo build --workspace --bins`; make test
//! does).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Etcd, Sku, Topology, wait_for};
use proto::registry::Registry;
use serde_json::Value;

use common::{
    Outcome, RACKSCALE, assert_clear, check_engines, engines, http, outcome, sibling, signal,
};

const TIMEOUT: Duration = Duration::from_secs(90);
/// Per-request deadline of the bench: a request still open then is lost.
const REQUEST_DEADLINE_S: u64 = 30;
/// Lease TTL of agents and engines: a dead tray is noticed within it.
const LEASE_TTL_S: u32 = 3;

/// Two TP4 prefill and two DEP4 decode workers: one tray each, on a rack
/// of six trays, so two trays are spare for re-placement.
const SPEC: &str = r#"
apiVersion: rackscale.io/v1alpha1
kind: ModelDeployment
metadata: {name: faults, namespace: llm}
spec:
  model: {name: deepseek-ai/DeepSeek-V4-Pro, profile: deepseek-v4-pro}
  hardware: {sku: gb300, gpuBudget: 16}
  workload: {isl: 1024, osl: 128}
  slo: {maxTpotMs: 80}
  recipe: {mode: explicit, prefill: {workers: 2, tp: 4}, decode: {workers: 2, ep: 4}}
"#;

struct Agent {
    node: String,
    process: ManagedProcess,
    /// Serves `/metrics` and the fault-injection hook.
    http_port: u16,
    args: Vec<String>,
}

struct Frontend {
    port: u16,
    process: ManagedProcess,
    args: Vec<String>,
}

/// Everything one test runs; dropping it kills what is left.
struct Rack {
    etcd: Etcd,
    dir: Workdir,
    agents: Vec<Agent>,
    operator: ManagedProcess,
    operator_args: Vec<String>,
    status_port: u16,
    frontends: Vec<Frontend>,
}

/// Injects a fault and returns when it was injected.
type Fault<'a> = Pin<Box<dyn Future<Output = Instant> + 'a>>;

impl Rack {
    async fn start() -> Rack {
        let etcd = Etcd::start().await.unwrap();
        let endpoint = etcd.endpoint().to_string();
        let dir = Workdir::new("faults").unwrap();
        let topo = Topology::new().rack("f", Sku::Gb300, 6, 4);
        let engine = sibling("rackscale-engine").display().to_string();
        let opts = harness::fleet::AgentOptions {
            etcd: &endpoint,
            engine_bin: &engine,
            time_scale: 20,
            lease_ttl_seconds: LEASE_TTL_S,
            flags: &harness::pki::plaintext_flags(),
        };
        let agent_bin = sibling("rackscale-agent");
        let mut agents = Vec::new();
        for rack in topo.racks() {
            for node in rack.node_names() {
                let http_port = free_port().unwrap();
                let mut args = harness::fleet::agent_args(rack, &node, free_port().unwrap(), &opts);
                args.extend(harness::fleet::fault_hook_flags(http_port));
                let process = ManagedProcess::spawn(&node, &agent_bin, &args, dir.path()).unwrap();
                agents.push(Agent {
                    node,
                    process,
                    http_port,
                    args,
                });
            }
        }
        let registry = Registry::new(etcd.client().await.unwrap());
        wait_for("every agent registered", TIMEOUT, || {
            let (registry, agents) = (&registry, &agents);
            async move {
                let listing = registry.list_agents(Duration::from_secs(5)).await?;
                let seen: BTreeSet<&str> =
                    listing.records.iter().map(|r| r.node.as_str()).collect();
                Ok(agents
                    .iter()
                    .all(|a| seen.contains(a.node.as_str()))
                    .then_some(()))
            }
        })
        .await
        .unwrap();

        let specs = dir.path().join("specs");
        std::fs::create_dir_all(&specs).unwrap();
        std::fs::write(specs.join("faults.yaml"), SPEC).unwrap();
        let status_port = free_port().unwrap();
        let operator_args: Vec<String> = vec![
            "standalone".into(),
            "--insecure-plaintext".into(),
            "--specs".into(),
            specs.display().to_string(),
            "--etcd-endpoints".into(),
            endpoint.clone(),
            "--status-addr".into(),
            format!("127.0.0.1:{status_port}"),
            "--resync-ms".into(),
            "1000".into(),
        ];
        let operator = ManagedProcess::spawn(
            "operator",
            &sibling("rackscale-operator"),
            &operator_args,
            dir.path(),
        )
        .unwrap();
        let mut rack = Rack {
            etcd,
            dir,
            agents,
            operator,
            operator_args,
            status_port,
            frontends: Vec::new(),
        };
        for i in 0..2 {
            let port = free_port().unwrap();
            let args = vec![
                "--insecure-plaintext".into(),
                "--role=frontend".into(),
                "--model=deepseek-v4-pro".into(),
                format!("--listen=127.0.0.1:{port}"),
                format!("--etcd-endpoints={endpoint}"),
                "--namespace=llm".into(),
                "--deployment=faults".into(),
            ];
            let process = ManagedProcess::spawn(
                &format!("frontend-{i}"),
                &sibling("rackscale-engine"),
                &args,
                rack.dir.path(),
            )
            .unwrap();
            rack.frontends.push(Frontend {
                port,
                process,
                args,
            });
        }
        rack.ready("the deployment Ready").await;
        for f in 0..2 {
            rack.serving(f).await;
        }
        rack
    }

    /// `llm/faults` in `/status` once `accept` holds for it.
    async fn deployment_when(&self, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let port = self.status_port;
        wait_for(what, TIMEOUT, || {
            let accept = &accept;
            async move {
                let (code, body) = http(port, "GET", "/status").await?;
                anyhow::ensure!(code == 200, "/status answered {code}");
                let board: Value = serde_json::from_str(&body)?;
                let md = board["deployments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| d["name"] == "faults")
                    .cloned();
                Ok(md.filter(|d| accept(d)))
            }
        })
        .await
        .unwrap()
    }

    async fn ready(&self, what: &str) -> Value {
        self.deployment_when(what, |d| d["status"]["phase"] == "Ready")
            .await
    }

    /// Waits until frontend `i` completes a request end to end.
    async fn serving(&self, i: usize) {
        let port = self.frontends[i].port;
        wait_for(format!("frontend {i} serving"), TIMEOUT, || async move {
            let out = tokio::process::Command::new(RACKSCALE)
                .args(["bench", "--url", &format!("http://127.0.0.1:{port}")])
                .args(["--isl", "64", "--osl", "4", "--concurrency", "1"])
                .args(["--requests", "1", "--timeout", "10", "--json"])
                .output()
                .await?;
            let report: Value = serde_json::from_slice(&out.stdout)?;
            Ok((report["successful"] == 1).then_some(()))
        })
        .await
        .unwrap();
    }

    /// Starts `rackscale bench` against frontend `i` for `seconds`.
    fn load(&self, i: usize, seconds: u32) -> tokio::task::JoinHandle<Value> {
        let url = format!("http://127.0.0.1:{}", self.frontends[i].port);
        tokio::spawn(async move {
            let out = tokio::process::Command::new(RACKSCALE)
                .args(["bench", "--url", &url, "--isl", "1024", "--osl", "128"])
                .args(["--concurrency", "6", "--duration", &seconds.to_string()])
                .args(["--timeout", &REQUEST_DEADLINE_S.to_string()])
                .args(["--gpus", "16", "--json"])
                .kill_on_drop(true)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).unwrap()
        })
    }

    /// No GPU driven by two engines, and every engine's parent is a live
    /// agent of this test (none orphaned by a dead agent).
    async fn check_gpus_and_orphans(&mut self, fault: &str) {
        // A replaced rank may take a moment to exit after its stop.
        let agent_pids: BTreeSet<u32> = self.agents.iter().map(|a| a.process.pid()).collect();
        let etcd = self.etcd.endpoint().to_string();
        let result = wait_for(format!("{fault}: engines consistent"), TIMEOUT, || {
            let engines = engines(&etcd);
            let agent_pids = &agent_pids;
            async move { check_engines(&engines, agent_pids).map(Some) }
        })
        .await;
        result.unwrap();
    }

    /// Runs load on frontend 0, injects `fault` after a few seconds, waits
    /// until the deployment is Ready and frontend 0 serves again, and
    /// checks the engines once the load has ended.
    async fn scenario<F>(&mut self, name: &'static str, fault: F) -> Outcome
    where
        F: for<'a> FnOnce(&'a mut Rack) -> Fault<'a>,
    {
        let load = self.load(0, 12);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let injected = fault(self).await;
        self.ready(&format!("{name}: Ready again")).await;
        self.serving(0).await;
        let recovery = injected.elapsed();
        let report = load.await.unwrap();
        self.check_gpus_and_orphans(name).await;
        outcome(name, &report, Some(recovery))
    }

    fn agent_on(&mut self, node: &str) -> &mut Agent {
        self.agents.iter_mut().find(|a| a.node == node).unwrap()
    }
}

/// The node hosting `worker` in a `/status` deployment.
fn node_of(md: &Value, worker: &str) -> String {
    md["status"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == worker)
        .unwrap()["placement"][0]["node"]
        .as_str()
        .unwrap()
        .to_string()
}

fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| fault | completed | failed with error | lost | recovery s | errors |\n|---|---:|---:|---:|---:|---|\n",
    );
    for o in outcomes {
        let reasons: Vec<String> = o.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            o.fault,
            o.completed,
            o.failed - o.lost,
            o.lost,
            o.recovery
                .map_or_else(|| "-".to_string(), |r| format!("{:.1}", r.as_secs_f64())),
            reasons.join(", ")
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_completes_or_fails_clearly_through_every_fault() {
    let mut rack = Rack::start().await;
    let mut outcomes = Vec::new();

    // 1. kill -9 of a decode rank: its agent reports the exit and relaunches
    // it; streams on it end with an error event.
    let o = rack
        .scenario("kill -9 of an engine rank (decode)", |rack| {
            Box::pin(async move {
                let victim = engines(rack.etcd.endpoint())
                    .into_iter()
                    .find(|e| e.worker == "decode-0")
                    .unwrap();
                signal("KILL", victim.pid);
                let at = Instant::now();
                // Back when a new decode-0 rank runs.
                wait_for("decode-0 relaunched", TIMEOUT, || {
                    let engines = engines(rack.etcd.endpoint());
                    async move {
                        Ok(engines
                            .iter()
                            .any(|e| e.worker == "decode-0" && e.pid != victim.pid)
                            .then_some(()))
                    }
                })
                .await
                .unwrap();
                at
            })
        })
        .await;
    assert_clear(&o, &[]);
    outcomes.push(o);

    // 2. kill -9 of the agent under a decode worker: its ranks exit with it,
    // its lease expires, the worker is re-placed on a spare tray.
    let before = rack.ready("Ready before the agent kill").await;
    let node = node_of(&before, "decode-1");
    let o = rack
        .scenario("kill -9 of an agent (under decode-1)", |rack| {
            let node = node.clone();
            Box::pin(async move {
                rack.agent_on(&node).process.kill().unwrap();
                let at = Instant::now();
                rack.deployment_when("decode-1 re-placed", |d| {
                    d["status"]["phase"] == "Ready" && node_of(d, "decode-1") != node
                })
                .await;
                at
            })
        })
        .await;
    assert_clear(&o, &[]);
    outcomes.push(o);
    // The tray comes back empty (its engines died with their agent).
    {
        let dir = rack.dir.path().to_path_buf();
        let agent = rack.agent_on(&node);
        agent.process = ManagedProcess::spawn(
            &format!("{node}-2"),
            &sibling("rackscale-agent"),
            &agent.args,
            &dir,
        )
        .unwrap();
    }

    // 3. kill -9 of the operator: the data plane keeps serving; a new
    // operator adopts the running workers.
    let o = rack
        .scenario("kill -9 of the operator, then a new one", |rack| {
            Box::pin(async move {
                rack.operator.kill().unwrap();
                let at = Instant::now();
                tokio::time::sleep(Duration::from_secs(2)).await;
                rack.operator = ManagedProcess::spawn(
                    "operator-2",
                    &sibling("rackscale-operator"),
                    &rack.operator_args,
                    rack.dir.path(),
                )
                .unwrap();
                at
            })
        })
        .await;
    assert_clear(&o, &[]);
    assert_eq!(
        o.failed, 0,
        "the data plane does not need the operator: {o:?}"
    );
    // The new operator adopted the running workers (decode-1 among them,
    // away from where a fresh plan would put it) instead of moving them.
    let log = std::fs::read_to_string(rack.operator.log_path()).unwrap();
    assert!(
        log.contains("llm/faults: adopted 4 running worker(s)"),
        "{log}"
    );
    assert!(!log.contains("stopping a rank"), "{log}");
    outcomes.push(o);

    // 4. kill -9 of one of two frontends: its clients see their connections
    // break, then refused; the other frontend's clients see nothing.
    let other = rack.load(1, 12);
    let o = rack
        .scenario(
            "kill -9 of one of two frontends (the other's clients)",
            |rack| {
                Box::pin(async move {
                    // Kill frontend 1 while frontend 0 carries the scenario's load.
                    rack.frontends[1].process.kill().unwrap();
                    let at = Instant::now();
                    let f = &mut rack.frontends[1];
                    f.process = ManagedProcess::spawn(
                        "frontend-1-2",
                        &sibling("rackscale-engine"),
                        &f.args,
                        rack.dir.path(),
                    )
                    .unwrap();
                    at
                })
            },
        )
        .await;
    assert_clear(&o, &[]);
    assert_eq!(o.failed, 0, "the surviving frontend's clients: {o:?}");
    outcomes.push(o);
    let killed = outcome(
        "kill -9 of one of two frontends (its own clients)",
        &other.await.unwrap(),
        None,
    );
    // A client whose frontend dies mid-stream sees its connection break
    // (transport / incomplete stream); later ones are refused.
    assert_clear(&killed, &["transport", "incomplete_stream"]);
    rack.serving(1).await;
    outcomes.push(killed);

    // 5. etcd restart: registrations come back, the frontend keeps its pool.
    let o = rack
        .scenario("restart of etcd (kill -9, 2 s down)", |rack| {
            Box::pin(async move {
                let at = Instant::now();
                rack.etcd.restart(Duration::from_secs(2)).await.unwrap();
                at
            })
        })
        .await;
    assert_clear(&o, &[]);
    outcomes.push(o);

    // 6. A GPU marked failed under a prefill worker: the worker moves off it.
    let before = rack.ready("Ready before the GPU fault").await;
    let node = node_of(&before, "prefill-0");
    let port = rack.agent_on(&node).http_port;
    let o = rack
        .scenario("GPU marked failed (under prefill-0)", |rack| {
            let node = node.clone();
            Box::pin(async move {
                let (code, body) = http(port, "POST", "/debug/gpus/0/health/unhealthy")
                    .await
                    .unwrap();
                assert_eq!(code, 200, "{body}");
                let at = Instant::now();
                rack.deployment_when("prefill-0 moved off the failed GPU", |d| {
                    d["status"]["phase"] == "Ready" && node_of(d, "prefill-0") != node
                })
                .await;
                at
            })
        })
        .await;
    assert_clear(&o, &[]);
    outcomes.push(o);

    println!("{}", table(&outcomes));
    rack.operator.ensure_running().unwrap();

    // An orderly stop leaves no engine behind: SIGTERM to the operator
    // (it releases the deployment), then to every agent.
    signal("TERM", rack.operator.pid());
    for a in &rack.agents {
        signal("TERM", a.process.pid());
    }
    wait_for("every engine stopped", TIMEOUT, || {
        let left = engines(rack.etcd.endpoint());
        async move { Ok(left.is_empty().then_some(())) }
    })
    .await
    .unwrap();
}
