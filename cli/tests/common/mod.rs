//! Helpers the end-to-end tests of real processes share: binaries beside
//! `rackscale`, a bare HTTP/1.1 call, the live engine processes a test
//! started (from `/proc`: their node, GPUs and parent), the checks that no
//! GPU is driven twice and no engine is orphaned, and how a `rackscale
//! bench` report becomes completed / failed-clearly / lost.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const RACKSCALE: &str = env!("CARGO_BIN_EXE_rackscale");

/// One load's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub fault: &'static str,
    pub completed: u64,
    pub failed: u64,
    pub reasons: BTreeMap<String, u64>,
    pub lost: u64,
    /// Fault to Ready and serving again; none where nothing needs recovering.
    pub recovery: Option<Duration>,
}

pub fn sibling(name: &str) -> PathBuf {
    let bin = Path::new(RACKSCALE).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

/// `method path` on loopback `port`: status code and body.
pub async fn http(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await?;
    let code = raw.get(9..12).unwrap_or("0").parse()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

#[derive(Debug)]
pub struct Engine {
    pub pid: u32,
    pub ppid: u32,
    pub node: String,
    pub worker: String,
    pub gpus: Vec<u32>,
}

/// The node and pid of the live engine processes started for a test
/// (their command line names its etcd `endpoint`), with their GPUs.
pub fn engines(endpoint: &str) -> Vec<Engine> {
    let etcd = endpoint.to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let argv: Vec<&str> = cmdline.split('\0').collect();
        // An engine rank: the engine binary (not an agent naming it in
        // --engine-bin), of this test's registry, not a frontend.
        if !argv[0].ends_with("rackscale-engine")
            || !argv.iter().any(|a| a.contains(&etcd))
            || argv.contains(&"--role=frontend")
        {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let env: BTreeMap<String, String> = String::from_utf8_lossy(&environ)
            .split('\0')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let mut fields = after.split_whitespace();
        if fields.next() == Some("Z") {
            continue; // exited, not yet reaped
        }
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        out.push(Engine {
            pid,
            ppid,
            node: env.get("RACKSCALE_NODE").cloned().unwrap_or_default(),
            worker: env.get("RACKSCALE_WORKER").cloned().unwrap_or_default(),
            gpus: env
                .get("RACKSCALE_GPU_INDICES")
                .map(|g| g.split(',').filter_map(|i| i.parse().ok()).collect())
                .unwrap_or_default(),
        });
    }
    out
}

/// Failure reasons a client can act on: an HTTP status with an OpenAI
/// error body, an error event in the stream, a refused connection.
pub const CLEAR: [&str; 3] = ["error_event", "connect", "http_"];

pub fn outcome(fault: &'static str, report: &Value, recovery: Option<Duration>) -> Outcome {
    let mut reasons = BTreeMap::new();
    for f in report["failures"].as_array().unwrap() {
        reasons.insert(
            f["reason"].as_str().unwrap().to_string(),
            f["count"].as_u64().unwrap(),
        );
    }
    let o = Outcome {
        fault,
        completed: report["successful"].as_u64().unwrap(),
        failed: report["failed"].as_u64().unwrap(),
        lost: reasons.get("timeout").copied().unwrap_or(0),
        reasons,
        recovery,
    };
    eprintln!("{o:?}\n  failures: {}", report["failures"]);
    o
}

pub fn assert_clear(o: &Outcome, also: &[&str]) {
    assert_eq!(
        o.lost, 0,
        "{}: requests hung until their deadline: {o:?}",
        o.fault
    );
    for reason in o.reasons.keys() {
        assert!(
            CLEAR.iter().chain(also).any(|c| reason.starts_with(c)),
            "{}: failures without a clear error ({reason}): {o:?}",
            o.fault
        );
    }
    assert!(o.completed > 0, "{}: nothing completed: {o:?}", o.fault);
}

/// No GPU driven by two engines, and every engine's parent is one of
/// `agent_pids` (none orphaned by a dead agent).
pub fn check_engines(engines: &[Engine], agent_pids: &BTreeSet<u32>) -> anyhow::Result<()> {
    let mut owners: BTreeMap<(String, u32), &str> = BTreeMap::new();
    for e in engines {
        anyhow::ensure!(
            agent_pids.contains(&e.ppid),
            "engine {} ({}) has parent {}, not a live agent",
            e.pid,
            e.worker,
            e.ppid
        );
        for &g in &e.gpus {
            if let Some(other) = owners.insert((e.node.clone(), g), &e.worker) {
                anyhow::bail!(
                    "GPU {g} of {} is driven by {other} and {}",
                    e.node,
                    e.worker
                );
            }
        }
    }
    Ok(())
}

/// `kill -<name> <pid>`.
pub fn signal(name: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {pid} failed");
}
