//! `rack-ready`: how long a ModelDeployment that fills a whole NVL72 rack
//! takes from `create` to Ready through the real control plane (API server,
//! operator, etcd registry, 18 agents, engine processes), on one machine.
//!
//! One GB300 rack (18 trays x 4 GPUs) with one agent per tray; each run
//! applies a 72-GPU deployment (2 x TP4 prefill + one DEP64 decode worker
//! spanning 16 trays: 18 engine processes), records when the status reaches
//! Placed and Ready, deletes it, waits until every rank has stopped and the
//! registry is empty, and starts the next. The simulated engines model no
//! weight loading, so the time is the control plane's alone. Prints a
//! Markdown table and writes it to `--out` when given.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Cluster, Sku, Topology, install_crds, wait_until};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use proto::registry::Registry;

const TARGET: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(10);

fn sibling(name: &str) -> Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --workspace --bins`",
            bin.display()
        );
    }
    Ok(bin)
}

fn deployment(name: &str) -> Result<DynamicObject> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "rackscale.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"name": "deepseek-ai/DeepSeek-V4-Pro", "profile": "deepseek-v4-pro"},
            "hardware": {"sku": "gb300", "gpuBudget": 72},
            "workload": {"isl": 8192, "osl": 1024},
            "slo": {"maxTpotMs": 80.0},
            "recipe": {"mode": "explicit",
                       "prefill": {"workers": 2, "tp": 4},
                       "decode": {"workers": 1, "ep": 64}}
        }
    }))?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut runs = 5usize;
    let mut out: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs needs a number")?.parse()?,
            "--out" => out = Some(it.next().context("--out needs a path")?.into()),
            other => bail!("unknown argument {other}; usage: rack-ready [--runs N] [--out FILE]"),
        }
    }
    let cluster = Cluster::start().await?;
    let client = cluster.client();
    install_crds(&client, "deploy/crds").await?;
    let topology = Topology::new().rack("gb300-a", Sku::Gb300, 18, 4);
    topology.create(&client).await?;
    let dir = Workdir::new("rack-ready")?;
    let etcd = cluster.etcd().endpoint().to_string();
    let engine = sibling("rackscale-engine")?.display().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &etcd,
        engine_bin: &engine,
        time_scale: 100,
        lease_ttl_seconds: 10,
        flags: &harness::pki::plaintext_flags(),
    };
    let agent_bin = sibling("rackscale-agent")?;
    let mut agents = harness::fleet::spawn_agents(&topology, &agent_bin, &opts, dir.path())?;
    let registry = Registry::new(cluster.etcd().client().await?);
    harness::fleet::wait_registered(
        &registry,
        &mut agents,
        &agent_bin,
        &opts,
        dir.path(),
        TIMEOUT,
    )
    .await?;
    let args = harness::fleet::operator_args(
        cluster.kubeconfig_path(),
        &etcd,
        free_port()?,
        &harness::pki::plaintext_flags(),
    );
    let _operator = ManagedProcess::spawn(
        "operator",
        &sibling("rackscale-operator")?,
        &args,
        dir.path(),
    )?;

    let gvk = GroupVersionKind::gvk("rackscale.io", "v1alpha1", "ModelDeployment");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk));
    let mut placed = Vec::new();
    let mut ready = Vec::new();
    // Run 0 warms the operator (leader election, caches) and is not counted.
    for run in 0..=runs {
        let name = format!("bench-{run}");
        let started = Instant::now();
        api.create(&PostParams::default(), &deployment(&name)?)
            .await?;
        let mut placed_at = None;
        let ready_at = loop {
            let phase = api.get(&name).await?.data["status"]["phase"]
                .as_str()
                .map(str::to_owned);
            let t = started.elapsed();
            match phase.as_deref() {
                Some("Placed") if placed_at.is_none() => placed_at = Some(t),
                Some("Ready") => break t,
                Some("Failed") => bail!("{name} failed"),
                _ => {}
            }
            if t > TIMEOUT {
                bail!("{name} not Ready after {TIMEOUT:?}");
            }
            tokio::time::sleep(POLL).await;
        };
        let placed_at = placed_at.unwrap_or(ready_at);
        println!(
            "run {run}: Placed after {:.2} s, Ready after {:.2} s{}",
            placed_at.as_secs_f64(),
            ready_at.as_secs_f64(),
            if run == 0 { " (warm-up)" } else { "" }
        );
        if run > 0 {
            placed.push(placed_at.as_secs_f64());
            ready.push(ready_at.as_secs_f64());
        }
        api.delete(&name, &DeleteParams::default()).await?;
        wait_until("deployment deleted and ranks gone", TIMEOUT, || {
            let (api, registry, name) = (api.clone(), registry.clone(), name.clone());
            async move {
                Ok(api.get_opt(&name).await?.is_none()
                    && registry
                        .list_workers("default", &name, Duration::from_secs(5))
                        .await?
                        .records
                        .is_empty())
            }
        })
        .await?;
    }
    ready.sort_by(f64::total_cmp);
    placed.sort_by(f64::total_cmp);
    let median = percentile(&ready, 0.5);
    let table = format!(
        "| runs | Placed, median (s) | Ready, median (s) | Ready, max (s) | target | verdict |\n\
         |---:|---:|---:|---:|---:|---|\n\
         | {runs} | {:.2} | {median:.2} | {:.2} | < {} s | {} |\n",
        percentile(&placed, 0.5),
        ready.last().copied().unwrap_or(0.0),
        TARGET.as_secs(),
        if median < TARGET.as_secs_f64() {
            "PASS"
        } else {
            "MISS"
        }
    );
    println!(
        "\n72-GPU GB300 rack, 2 x TP4 + 1 x DEP64 (18 engine processes), create -> Ready:\n\n{table}"
    );
    if let Some(path) = out {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, table)?;
    }
    Ok(())
}
