//! Standalone mode end to end: real etcd, one real `rackscale-agent` per
//! tray (each starting `rackscale-engine` ranks), and `rackscale-operator
//! standalone` reading a ModelDeployment from a YAML file. The deployment
//! reaches Ready through the shared reconcile core, `/status` shows it with
//! its workers on the trays, a killed agent's workers are re-placed, and an
//! invalid file is refused with the CRD rule's message.
//!
//! Needs the `rackscale-agent` and `rackscale-engine` binaries beside the
//! operator's (`cargo build --workspace --bins`; make test does).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Etcd, Sku, Topology, wait_for};
use proto::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(90);
const OPERATOR: &str = env!("CARGO_BIN_EXE_rackscale-operator");

const SPEC: &str = r#"
apiVersion: rackscale.io/v1alpha1
kind: ModelDeployment
metadata: {name: small, namespace: llm}
spec:
  model: {name: deepseek-ai/DeepSeek-V4-Pro, profile: deepseek-v4-pro}
  hardware: {sku: gb300, gpuBudget: 12}
  workload: {isl: 1024, osl: 128}
  slo: {maxTpotMs: 80}
  recipe: {mode: explicit, prefill: {workers: 1, tp: 4}, decode: {workers: 1, ep: 8}}
  engine: {args: [--lease-ttl-seconds=3, --kv-ttl-seconds=45]}
"#;

/// The command lines of the live engine ranks started for this test (their
/// agents pass them the test's etcd `endpoint`).
fn engine_command_lines(endpoint: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = String::from_utf8_lossy(&raw)
            .split('\0')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if argv
            .first()
            .is_some_and(|a| a.ends_with("rackscale-engine"))
            && argv.iter().any(|a| a.contains(endpoint))
        {
            out.push(argv);
        }
    }
    out
}

fn sibling(name: &str) -> PathBuf {
    let bin = Path::new(OPERATOR).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

/// `GET path` on loopback `port`: status code and body.
async fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await?;
    let code = raw.get(9..12).unwrap_or("0").parse()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

/// The deployment `llm/small` in `/status` once `accept` holds for it.
async fn deployment_when(port: u16, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, TIMEOUT, || {
        let accept = &accept;
        async move {
            let (code, body) = get(port, "/status").await?;
            anyhow::ensure!(code == 200, "/status answered {code}");
            let board: Value = serde_json::from_str(&body)?;
            let md = board["deployments"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["name"] == "small")
                .cloned();
            Ok(md.filter(|d| accept(d)))
        }
    })
    .await
    .unwrap()
}

fn nodes_of(md: &Value) -> Vec<String> {
    md["status"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["placement"].as_array().unwrap().clone())
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_deployment_from_a_file_becomes_ready_and_recovers_a_lost_tray() {
    let etcd = Etcd::start().await.unwrap();
    let endpoint = etcd.endpoint().to_string();
    let dir = Workdir::new("standalone").unwrap();
    // 5 trays of 4: the 12-GPU recipe fits with one tray to spare.
    let topo = Topology::new().rack("s", Sku::Gb300, 5, 4);
    let engine = sibling("rackscale-engine").display().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &endpoint,
        engine_bin: &engine,
        time_scale: 100,
        lease_ttl_seconds: 3,
        flags: &harness::pki::plaintext_flags(),
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

    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("small.yaml"), SPEC).unwrap();
    let port = free_port().unwrap();
    let args: Vec<String> = [
        "standalone",
        "--insecure-plaintext",
        "--specs",
        &specs.display().to_string(),
        "--etcd-endpoints",
        &endpoint,
        "--status-addr",
        &format!("127.0.0.1:{port}"),
        "--resync-ms",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut operator =
        ManagedProcess::spawn("operator", Path::new(OPERATOR), &args, dir.path()).unwrap();

    let ready = deployment_when(port, "llm/small Ready in /status", |d| {
        d["status"]["phase"] == "Ready"
    })
    .await;
    assert_eq!(ready["generation"], 1);
    assert_eq!(ready["status"]["ready"], "2/2");
    assert_eq!(ready["status"]["recipe"]["prefill"], "1xTP4");
    assert_eq!(ready["status"]["recipe"]["decode"], "1xDEP8");
    let used = nodes_of(&ready);
    assert_eq!(used.len(), 3, "TP4 on one tray, DEP8 on two: {used:?}");
    // The spec's engine.args reach every rank after the agent's own engine
    // flags (one of which they repeat: the later one wins, nothing fails).
    let engines = engine_command_lines(&endpoint);
    assert_eq!(engines.len(), 3, "{engines:?}");
    for argv in &engines {
        assert_eq!(
            argv[argv.len() - 2..],
            ["--kv-ttl-seconds=45", "--lease-ttl-seconds=3"],
            "{argv:?}"
        );
    }
    let (code, metrics) = get(port, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("rackscale_operator_reconcile"),
        "{metrics}"
    );
    assert_eq!(get(port, "/healthz").await.unwrap().0, 200);
    let log = std::fs::read_to_string(operator.log_path()).unwrap();
    assert!(
        log.contains("llm/small (generation 1): Ready, 2/2 workers running"),
        "{log}"
    );

    // A tray's agent dies: its lease expires, the worker on it is re-placed
    // on the spare tray and the deployment is Ready again.
    let victim = used[0].clone();
    let agent = fleet.iter_mut().find(|a| a.node == victim).unwrap();
    agent.process.kill().unwrap();
    let recovered = deployment_when(port, "llm/small Ready off the lost tray", |d| {
        d["status"]["phase"] == "Ready" && !nodes_of(d).contains(&victim)
    })
    .await;
    assert_eq!(recovered["status"]["ready"], "2/2");
    operator.ensure_running().unwrap();
}

#[tokio::test]
async fn an_invalid_spec_file_is_refused_with_the_rule_that_it_breaks() {
    let dir = Workdir::new("standalone-invalid").unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, SPEC.replace("ep: 8", "ep: 72")).unwrap();
    let out = tokio::process::Command::new(OPERATOR)
        .args(["standalone", "--specs"])
        .arg(&file)
        .args(["--etcd-endpoints", "http://127.0.0.1:9"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml (document 1)"), "{err}");
    assert!(
        err.contains("recipe.decode.ep must divide the model's routed experts"),
        "{err}"
    );
    let also_bad = dir.path().join("worse.yaml");
    std::fs::write(&also_bad, "spec: [unclosed").unwrap();
    let out = tokio::process::Command::new(OPERATOR)
        .args(["standalone", "--specs"])
        .arg(&also_bad)
        .args(["--etcd-endpoints", "http://127.0.0.1:9"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worse.yaml (document 1): not YAML"), "{err}");
}

#[tokio::test]
async fn without_tls_files_or_the_plaintext_flag_the_operator_refuses_to_start() {
    let dir = Workdir::new("standalone-no-tls").unwrap();
    let file = dir.path().join("small.yaml");
    std::fs::write(&file, SPEC).unwrap();
    for mode in [
        vec!["standalone", "--specs", file.to_str().unwrap()],
        vec!["run"],
    ] {
        let out = tokio::process::Command::new(OPERATOR)
            .args(&mode)
            .args(["--etcd-endpoints", "http://127.0.0.1:9"])
            .env_remove("RACKSCALE_INSECURE_PLAINTEXT")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{mode:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for want in [
            "--tls-ca",
            "--tls-cert",
            "--tls-key",
            "--insecure-plaintext",
        ] {
            assert!(err.contains(want), "{mode:?}: {want} not named: {err}");
        }
    }
}
