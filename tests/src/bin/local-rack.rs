//! `local-rack`: a simulated fleet on one machine, through the real control
//! plane. Starts etcd and kube-apiserver (as the test harness does), creates
//! a GB300 NVL72 and a GB200 NVL72 rack as nodes carrying GPU Feature
//! Discovery labels, starts one `rackscale-agent` per tray (which launch
//! `rackscale-engine` ranks), installs the CRDs, runs `rackscale-operator`, applies the
//! ModelDeployments in `deploy/examples/`, waits for each to be placed and
//! prints what the operator decided. With `--keep` (or KEEP=1) it stays up
//! for `kubectl` until Ctrl-C; otherwise it stops everything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use harness::process::{ManagedProcess, free_port};
use harness::workdir::Workdir;
use harness::{Cluster, Sku, Topology, install_crds, wait_until};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Args {
    examples: PathBuf,
    crds: PathBuf,
    keep: bool,
}

fn args() -> Result<Args> {
    let mut out = Args {
        examples: PathBuf::from("deploy/examples"),
        crds: PathBuf::from("deploy/crds"),
        keep: std::env::var("KEEP").is_ok_and(|v| v == "1"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--examples" => {
                out.examples = it.next().context("--examples needs a directory")?.into()
            }
            "--crds" => out.crds = it.next().context("--crds needs a directory")?.into(),
            "--keep" => out.keep = true,
            "-h" | "--help" => {
                println!("usage: local-rack [--examples DIR] [--crds DIR] [--keep]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; try --help"),
        }
    }
    Ok(out)
}

fn step(text: &str) {
    println!("[local-rack] {text}");
}

/// A binary built beside this one (`make build` builds them all).
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating local-rack")?;
    let bin = me.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --workspace --bins`",
            bin.display()
        );
    }
    Ok(bin)
}

/// Whether `GET path` on `port` answers 200 (a bare HTTP/1.1 exchange).
async fn http_ok(port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
}

/// Real traffic through the deployment: a `--role frontend` engine follows
/// its workers in the registry, and `rackscale bench` sends OpenAI requests
/// that each go prefill -> KV transfer -> decode across the rack.
async fn traffic(etcd: &str, ns: &str, name: &str, dir: &Path) -> Result<()> {
    let port = free_port()?;
    let args: Vec<String> = [
        "--insecure-plaintext",
        "--role=frontend",
        "--model=deepseek-v4-pro",
        &format!("--listen=127.0.0.1:{port}"),
        &format!("--etcd-endpoints={etcd}"),
        &format!("--namespace={ns}"),
        &format!("--deployment={name}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let frontend = ManagedProcess::spawn("frontend", &sibling("rackscale-engine")?, &args, dir)?;
    step(&format!(
        "frontend for {ns}/{name} on http://127.0.0.1:{port}/v1 (OpenAI API), log {}",
        frontend.log_path().display()
    ));
    wait_until("frontend ready", TIMEOUT, || async move {
        Ok(http_ok(port, "/ready").await)
    })
    .await?;
    step("rackscale bench: 48 requests, ISL 1024 / OSL 64 (80-100%), 8 concurrent clients");
    let out = tokio::process::Command::new(sibling("rackscale")?)
        .args([
            "bench",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--isl",
            "1024",
            "--osl",
            "64",
            "--concurrency",
            "8",
            "--requests",
            "48",
            "--warmup",
            "4",
            "--gpus",
            "72",
        ])
        .output()
        .await
        .context("running rackscale bench")?;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("rackscale bench failed ({})", out.status);
    }
    println!(
        "(figures in wall time: the simulated engines run 100x faster than the modelled GPUs)"
    );
    Ok(())
}

fn yaml_documents(dir: &Path) -> Result<Vec<(PathBuf, serde_json::Value)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing {}", f.display()))?;
            if !value.is_null() {
                out.push((f.clone(), value));
            }
        }
    }
    Ok(out)
}

async fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let out = cluster.apiserver().kubectl()?.args(args).output().await?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let operator = sibling("rackscale-operator")?;
    let agent_bin = sibling("rackscale-agent")?;
    let engine_bin = sibling("rackscale-engine")?.display().to_string();
    let started = std::time::Instant::now();
    step("starting etcd and kube-apiserver v1.37.2 on loopback");
    let cluster = Cluster::start().await?;
    let client = cluster.client();
    let n = install_crds(&client, &args.crds).await?;
    step(&format!("installed {n} CRDs from {}", args.crds.display()));
    let topology =
        Topology::new()
            .rack("gb300-a", Sku::Gb300, 18, 4)
            .rack("gb200-a", Sku::Gb200, 18, 4);
    topology.create(&client).await?;
    step("created 36 GPU trays: one GB300 NVL72 and one GB200 NVL72 rack (18 trays x 4 GPUs)");

    let mut dir = Workdir::new("local-rack")?;
    if args.keep {
        dir.keep();
    }
    // One agent per tray; each starts rackscale-engine ranks (simulated
    // backend, 100x time scale) and registers in etcd.
    let etcd = cluster.etcd().endpoint().to_string();
    let opts = harness::fleet::AgentOptions {
        etcd: &etcd,
        engine_bin: &engine_bin,
        time_scale: 100,
        lease_ttl_seconds: 10,
        flags: &harness::pki::plaintext_flags(),
    };
    let mut fleet = harness::fleet::spawn_agents(&topology, &agent_bin, &opts, dir.path())?;
    let registry = proto::registry::Registry::new(cluster.etcd().client().await?);
    harness::fleet::wait_registered(
        &registry,
        &mut fleet,
        &agent_bin,
        &opts,
        dir.path(),
        TIMEOUT,
    )
    .await?;
    let mut agents: Vec<ManagedProcess> = fleet.into_iter().map(|a| a.process).collect();
    step(&format!(
        "started {} rackscale-agent processes, one per tray; all registered in etcd",
        agents.len()
    ));

    let port = free_port()?;
    let op_args = harness::fleet::operator_args(
        cluster.kubeconfig_path(),
        &etcd,
        port,
        &harness::pki::plaintext_flags(),
    );
    let mut op = ManagedProcess::spawn("rackscale-operator", &operator, &op_args, dir.path())?;
    step(&format!(
        "operator running: metrics http://127.0.0.1:{port}/metrics, log {}",
        op.log_path().display()
    ));

    let docs = yaml_documents(&args.examples)?;
    let gvk = GroupVersionKind::gvk("rackscale.io", "v1alpha1", "ModelDeployment");
    let ar = ApiResource::from_gvk(&gvk);
    let mut names = Vec::new();
    for (file, doc) in docs {
        let obj: DynamicObject = serde_json::from_value(doc)?;
        let name = obj
            .metadata
            .name
            .clone()
            .context("example without a name")?;
        let ns = obj
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        api.patch(
            &name,
            &PatchParams::apply("local-rack").force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {}", file.display()))?;
        step(&format!("applied {} ({ns}/{name})", file.display()));
        names.push((ns, name));
    }

    step(
        "waiting for the operator to plan, place and launch every deployment (engines as processes)",
    );
    let outcome = wait_until("every deployment placed or failed", TIMEOUT, || {
        let (client, ar, names) = (client.clone(), ar.clone(), names.clone());
        async move {
            for (ns, name) in &names {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
                let phase = api.get(name).await?.data["status"]["phase"]
                    .as_str()
                    .map(str::to_owned);
                if !matches!(phase.as_deref(), Some("Ready" | "Failed")) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    })
    .await;
    if let Err(e) = outcome {
        op.ensure_running().ok();
        eprintln!("{}", op.log_tail(30));
        return Err(e);
    }

    println!();
    println!("{}", kubectl(&cluster, &["get", "md,racks", "-A"]).await?);
    for (ns, name) in &names {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let status = api.get(name).await?.data["status"].clone();
        println!("{ns}/{name}: {}", status["phase"].as_str().unwrap_or("?"));
        for c in status["conditions"].as_array().into_iter().flatten() {
            println!(
                "  {:<9} {:<6} {}",
                c["type"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            );
        }
        for w in status["workers"].as_array().into_iter().flatten() {
            let trays: Vec<String> = w["placement"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}({} GPUs)",
                        p["node"].as_str().unwrap_or(""),
                        p["gpus"].as_array().map(|g| g.len()).unwrap_or(0)
                    )
                })
                .collect();
            println!(
                "  {:<10} {:<8} {} tray(s): {}",
                w["name"].as_str().unwrap_or(""),
                w["role"].as_str().unwrap_or(""),
                trays.len(),
                trays.join(" ")
            );
        }
    }
    if let Some((ns, name)) = names.iter().find(|(_, n)| n.contains("gb300")) {
        traffic(&etcd, ns, name, dir.path()).await?;
    }
    step(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    if args.keep {
        println!("\nStaying up (Ctrl-C to stop). Try:");
        println!(
            "  export KUBECONFIG={}",
            cluster.kubeconfig_path().display()
        );
        println!(
            "  {} get md,racks",
            harness::bins::binary("kubectl")
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "kubectl".into())
        );
        println!("  logs: {}", dir.path().display());
        tokio::signal::ctrl_c().await?;
    }
    step("deleting the deployments: the operator releases their GPUs and stops every rank");
    for (ns, name) in &names {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        api.delete(name, &Default::default()).await?;
    }
    wait_until("every deployment released", TIMEOUT, || {
        let (client, ar, names) = (client.clone(), ar.clone(), names.clone());
        async move {
            for (ns, name) in &names {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
                if api.get_opt(name).await?.is_some() {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    })
    .await?;
    step(
        "stopping the agents (SIGTERM: each stops its ranks), the operator, kube-apiserver and etcd",
    );
    for a in &agents {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &a.pid().to_string()])
            .status();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agents.iter_mut().any(|a| a.ensure_running().is_ok()) {
        if std::time::Instant::now() > deadline {
            bail!("agents did not exit within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(op);
    drop(agents);
    drop(cluster);
    Ok(())
}
