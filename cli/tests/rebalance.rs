//! The rebalancer with real processes: real etcd, one `rackscale-agent` per
//! GB300 tray (engines on the simulated backend at time scale 5, waiting out
//! perfmodel's weight load before they serve), the standalone operator with
//! `rebalance.enabled`, a frontend, every gRPC link over mutual TLS, and
//! `rackscale bench` sending requests whose outputs are long enough to
//! overload the single decode worker.
//!
//! The load must make the operator move a prefill worker to decode on the
//! same GPUs while requests are in flight, and every request must complete
//! or fail with a clear error (none hangs to its deadline). Afterwards no GPU
//! is driven by two engines and the new decode worker runs on the trays the
//! drained prefill worker had.
//!
//! Needs the `rackscale-agent`, `rackscale-engine` and `rackscale-operator`
//! binaries beside `rackscale` (`cargo build --workspace --bins`; make test
//! does).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use harness::pki::Pki;
use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Etcd, Sku, Topology, wait_for};
use proto::registry::Registry;
use serde_json::Value;

use common::{RACKSCALE, assert_clear, check_engines, engines, http, outcome, sibling};

const TIMEOUT: Duration = Duration::from_secs(120);
/// Modelled seconds per wall second of the engines and the operator.
const TIME_SCALE: u32 = 5;
const REQUEST_DEADLINE_S: u64 = 60;

/// Three TP4 prefill workers and one DEP4 decode worker on four trays. The
/// SLO (21 ms per token) lets one DEP4 worker run only about eight requests
/// within it, so sixteen clients with 512-token outputs overload decode.
const SPEC: &str = r#"
apiVersion: rackscale.io/v1alpha1
kind: ModelDeployment
metadata: {name: shift, namespace: llm}
spec:
  model: {name: deepseek-ai/DeepSeek-V4-Pro, profile: deepseek-v4-pro}
  hardware: {sku: gb300, gpuBudget: 16}
  workload: {isl: 256, osl: 512}
  slo: {maxTpotMs: 21, maxTtftMs: 30000}
  recipe: {mode: explicit, prefill: {workers: 3, tp: 4}, decode: {workers: 1, ep: 4}}
  rebalance:
    enabled: true
    intervalSeconds: 10
    stabilizationWindowSeconds: 20
    maxMovesPerInterval: 1
"#;

struct Rack {
    etcd: Etcd,
    dir: Workdir,
    agents: Vec<ManagedProcess>,
    _operator: ManagedProcess,
    status_port: u16,
    frontend_port: u16,
    _frontend: ManagedProcess,
}

impl Rack {
    async fn start() -> Rack {
        let etcd = Etcd::start().await.unwrap();
        let endpoint = etcd.endpoint().to_string();
        let dir = Workdir::new("rebalance").unwrap();
        // Every gRPC link over mutual TLS, the operator's Drain calls too.
        let pki = Pki::create(&dir.path().join("pki"), "rebalance test CA").unwrap();
        let topo = Topology::new().rack("r", Sku::Gb300, 4, 4);
        let engine = sibling("rackscale-engine").display().to_string();
        let mut flags = pki.args("agent").unwrap();
        flags.push("--engine-arg=--model-startup".into());
        let opts = harness::fleet::AgentOptions {
            etcd: &endpoint,
            engine_bin: &engine,
            time_scale: TIME_SCALE,
            lease_ttl_seconds: 3,
            flags: &flags,
        };
        let agent_bin = sibling("rackscale-agent");
        let mut fleet = harness::fleet::spawn_agents(&topo, &agent_bin, &opts, dir.path()).unwrap();
        let registry = Registry::new(etcd.client().await.unwrap());
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
        let agents = fleet.into_iter().map(|a| a.process).collect();

        let specs = dir.path().join("specs");
        std::fs::create_dir_all(&specs).unwrap();
        std::fs::write(specs.join("shift.yaml"), SPEC).unwrap();
        let status_port = free_port().unwrap();
        let mut operator_args: Vec<String> = vec!["standalone".into()];
        operator_args.extend(pki.args("operator").unwrap());
        operator_args.extend([
            "--specs".into(),
            specs.display().to_string(),
            "--etcd-endpoints".into(),
            endpoint.clone(),
            "--status-addr".into(),
            format!("127.0.0.1:{status_port}"),
            "--resync-ms".into(),
            "1000".into(),
            format!("--time-scale={TIME_SCALE}"),
        ]);
        let operator = ManagedProcess::spawn(
            "operator",
            &sibling("rackscale-operator"),
            &operator_args,
            dir.path(),
        )
        .unwrap();
        let frontend_port = free_port().unwrap();
        let mut frontend_args = pki.args("frontend").unwrap();
        frontend_args.extend([
            "--role=frontend".into(),
            "--model=deepseek-v4-pro".into(),
            format!("--listen=127.0.0.1:{frontend_port}"),
            format!("--etcd-endpoints={endpoint}"),
            "--namespace=llm".into(),
            "--deployment=shift".into(),
        ]);
        let frontend = ManagedProcess::spawn(
            "frontend",
            &sibling("rackscale-engine"),
            &frontend_args,
            dir.path(),
        )
        .unwrap();
        Rack {
            etcd,
            dir,
            agents,
            _operator: operator,
            status_port,
            frontend_port,
            _frontend: frontend,
        }
    }

    /// `llm/shift` in `/status` once `accept` holds for it.
    async fn deployment_when(&self, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let port = self.status_port;
        let found = wait_for(what, TIMEOUT, || {
            let accept = &accept;
            async move {
                let (code, body) = http(port, "GET", "/status").await?;
                anyhow::ensure!(code == 200, "/status answered {code}");
                let board: Value = serde_json::from_str(&body)?;
                let md = board["deployments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| d["name"] == "shift")
                    .cloned();
                Ok(md.filter(|d| accept(d)))
            }
        })
        .await;
        match found {
            Ok(md) => md,
            Err(e) => {
                let (_, body) = http(port, "GET", "/status").await.unwrap_or_default();
                panic!(
                    "{e}\nlast /status: {body}\nlogs in {}",
                    self.dir.path().display()
                );
            }
        }
    }

    /// Starts `rackscale bench` against the frontend for `seconds`.
    fn load(&self, seconds: u32) -> tokio::task::JoinHandle<Value> {
        let url = format!("http://127.0.0.1:{}", self.frontend_port);
        tokio::spawn(async move {
            let out = tokio::process::Command::new(RACKSCALE)
                .args(["bench", "--url", &url, "--isl", "256", "--osl", "512"])
                .args(["--concurrency", "16", "--duration", &seconds.to_string()])
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
}

/// Every GPU of `worker` in a `/status` deployment, as `node/index`.
fn gpus(md: &Value, worker: &str) -> BTreeSet<String> {
    md["status"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == worker)
        .flat_map(|w| w["placement"].as_array().unwrap().iter())
        .flat_map(|n| {
            let node = n["node"].as_str().unwrap().to_string();
            n["gpus"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |g| format!("{node}/{g}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn workers_of(md: &Value, role: &str) -> BTreeSet<String> {
    md["status"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["role"] == role)
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_shift_moves_a_worker_between_the_pools_with_nothing_lost() {
    let rack = Rack::start().await;
    let before = rack
        .deployment_when("the deployment Ready", |d| d["status"]["phase"] == "Ready")
        .await;
    assert_eq!(workers_of(&before, "prefill").len(), 3);
    assert_eq!(workers_of(&before, "decode").len(), 1);

    let started = Instant::now();
    let load = rack.load(60);
    let after = rack
        .deployment_when("a worker moved to the decode pool", |d| {
            let r = &d["status"]["rebalance"];
            r["moves"].as_array().is_some_and(|m| !m.is_empty())
                && r["inProgress"].is_null()
                && d["status"]["phase"] == "Ready"
        })
        .await;
    let moved_in = started.elapsed();
    let report = load.await.unwrap();
    eprintln!(
        "moved after {:.1} s of load; rebalance status: {}",
        moved_in.as_secs_f64(),
        after["status"]["rebalance"]
    );
    assert!(
        moved_in < Duration::from_secs(60),
        "the move finished after the load ended ({moved_in:?}): nothing was in flight during it"
    );

    // Nothing lost: every request completed or failed with a clear error.
    let o = outcome("role switch under load", &report, None);
    assert_clear(&o, &[]);

    // One prefill worker left; a decode worker runs on exactly its GPUs.
    let r = &after["status"]["rebalance"];
    assert!(r["switches"].as_u64().unwrap() >= 1, "{r}");
    let mv = &r["moves"][0];
    assert_eq!(mv["action"], "move");
    assert_eq!(mv["split"], "3P:1D");
    let gone: Vec<String> = workers_of(&before, "prefill")
        .difference(&workers_of(&after, "prefill"))
        .cloned()
        .collect();
    assert!(!gone.is_empty(), "no prefill worker left: {after}");
    let new_decode: Vec<String> = workers_of(&after, "decode")
        .difference(&workers_of(&before, "decode"))
        .cloned()
        .collect();
    assert!(!new_decode.is_empty(), "no new decode worker: {after}");
    let freed: BTreeSet<String> = gone.iter().flat_map(|w| gpus(&before, w)).collect();
    let taken: BTreeSet<String> = new_decode.iter().flat_map(|w| gpus(&after, w)).collect();
    assert_eq!(
        taken, freed,
        "the new decode worker is not on the drained GPUs"
    );

    // The processes agree: no GPU driven twice, no engine without its agent,
    // and the drained prefill worker's engine is gone.
    let agent_pids: BTreeSet<u32> = rack.agents.iter().map(|a| a.pid()).collect();
    let endpoint = rack.etcd.endpoint().to_string();
    wait_for("engines consistent", TIMEOUT, || {
        let live = engines(&endpoint);
        let (agent_pids, gone) = (&agent_pids, &gone);
        async move {
            check_engines(&live, agent_pids)?;
            Ok((!live.iter().any(|e| gone.contains(&e.worker))).then_some(()))
        }
    })
    .await
    .unwrap();
}
