//! `rackscale up`: the whole system on one machine. Starts etcd, one
//! `rackscale-agent` per simulated tray of `--topology`, the operator in
//! standalone mode on the ModelDeployments of `--specs` (the same reconcile
//! core as in Kubernetes), and one `--role frontend` engine per deployment;
//! prints where everything is and the workers' progress, then stays up
//! until Ctrl-C. With `--bench` it drives each deployment with
//! `rackscale bench`, prints predicted against measured figures and draws
//! both racks' frontiers with the measured points, then stops (unless
//! `--keep`). `--kube` runs the same fleet through a local kube-apiserver
//! instead, with the operator in Kubernetes mode, so `kubectl get md,racks`
//! works; progress, frontends, bench and summary are the same code.
//!
//! Every gRPC link (operator -> agents, frontend -> engines, KV transfer,
//! expert ranks) is mutual TLS under a CA made for the run, unless
//! `--insecure-plaintext` (see [`rack::Transport`]).
//!
//! Whatever happens (Ctrl-C, an error, the end) every process is stopped
//! in order; see [`rack::LocalRack::stop`].

mod kube;
mod rack;
mod summary;
mod topology;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use perfmodel::{Sku, Workload};
use serde_json::Value;

use rack::{Bins, LocalRack};
use summary::Row;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Racks to simulate: `[NAME=]SKU[:TRAYSxGPUS]`, comma-separated
    /// (default: one GB300 NVL72 and one GB200 NVL72 rack).
    #[arg(long, env = "RACKSCALE_TOPOLOGY", default_value = "gb300,gb200")]
    topology: String,
    /// A ModelDeployment YAML file or a directory of them.
    #[arg(long, env = "RACKSCALE_SPECS", default_value = "deploy/examples")]
    specs: PathBuf,
    /// Where every process logs (emptied first).
    #[arg(long, env = "RACKSCALE_LOG_DIR", default_value = "target/rackscale-up")]
    log_dir: PathBuf,
    /// Modelled seconds per wall second in the simulated engines. Low enough
    /// that the processes' own overhead (HTTP, SSE, KV bytes on 2 cores)
    /// stays small against the modelled step times; high enough that the
    /// bench takes seconds.
    #[arg(long, env = "RACKSCALE_ENGINE_TIME_SCALE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    time_scale: u32,
    /// Longest wait for every deployment to turn Ready, seconds.
    #[arg(long, env = "RACKSCALE_UP_TIMEOUT_S", default_value_t = 240)]
    timeout_s: u64,
    /// Bench every deployment, print predicted vs measured, draw frontiers.
    #[arg(long, env = "RACKSCALE_UP_BENCH")]
    bench: bool,
    /// Bench input length (nominal; each request draws 80-100%).
    #[arg(long, default_value_t = 1024)]
    isl: u32,
    /// Bench output length (nominal).
    #[arg(long, default_value_t = 256)]
    osl: u32,
    /// Bench clients per deployment (closed loop); a comma-separated list
    /// benches every deployment at each level.
    #[arg(long, default_value = "16", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: Vec<u32>,
    /// Measured requests per client at each level (the bench measures
    /// rounds x concurrency requests in steady state).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Warm-up requests per client, left out of every figure.
    #[arg(long, default_value_t = 2)]
    warmup_rounds: u64,
    /// Also write the predicted-vs-measured table (Markdown) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where the frontier plot with the measured points goes.
    #[arg(long, default_value = "target/rackscale-run/measured.svg")]
    plot: PathBuf,
    /// After --bench, stay up until Ctrl-C instead of stopping.
    #[arg(long, env = "KEEP", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    keep: bool,
    /// Run through a local kube-apiserver with the operator in Kubernetes
    /// mode (`kubectl get md,racks` works).
    #[arg(long)]
    kube: bool,
    /// CRDs to install with --kube.
    #[arg(long, default_value = "deploy/crds")]
    crds: PathBuf,
    /// Run every gRPC link in plaintext instead of mutual TLS under a CA
    /// made for the run (quicker to poke at with grpcurl).
    #[arg(
        long,
        env = proto::tls::env::INSECURE_PLAINTEXT,
        value_parser = clap::builder::BoolishValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true"
    )]
    insecure_plaintext: bool,
}

pub fn run(args: UpArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(up(args))
}

fn step(text: &str) {
    println!("[up] {text}");
}

async fn up(args: UpArgs) -> Result<()> {
    let bins = Bins::beside_me()?;
    let topology = topology::parse(&args.topology)?;
    // Processes run in the log directory: hand them absolute paths.
    let specs = std::fs::canonicalize(&args.specs)
        .with_context(|| format!("--specs {}", args.specs.display()))?;
    if args.log_dir.exists() {
        std::fs::remove_dir_all(&args.log_dir)
            .with_context(|| format!("emptying {}", args.log_dir.display()))?;
    }
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("creating {}", args.log_dir.display()))?;
    let logs = std::fs::canonicalize(&args.log_dir)?;
    let transport = if args.insecure_plaintext {
        rack::Transport::plaintext()
    } else {
        rack::Transport::mtls(&logs.join("pki"))?
    };
    let mut rack = LocalRack {
        transport,
        ..LocalRack::default()
    };
    let outcome = tokio::select! {
        r = bring_up(&args, &bins, &topology, &specs, &logs, &mut rack) => r,
        _ = tokio::signal::ctrl_c() => {
            println!();
            step("Ctrl-C: stopping everything");
            Ok(())
        }
    };
    if let Err(e) = &outcome {
        eprintln!("[up] error: {e:#}");
        step(&format!(
            "stopping everything; logs stay in {}",
            logs.display()
        ));
    }
    rack.stop().await;
    outcome
}

async fn bring_up(
    args: &UpArgs,
    bins: &Bins,
    topology: &harness::Topology,
    specs: &Path,
    logs: &Path,
    rack: &mut LocalRack,
) -> Result<()> {
    let started = Instant::now();
    if args.kube {
        step("starting etcd and kube-apiserver on loopback");
        let n = kube::start_cluster(rack, topology, &args.crds).await?;
        step(&format!(
            "installed {n} CRDs from {}; one GFD-labelled Node per tray",
            args.crds.display()
        ));
    } else {
        step("starting etcd on loopback");
        rack.etcd = Some(harness::Etcd::start().await?);
    }
    let trays: usize = topology.racks().iter().map(|r| r.trays as usize).sum();
    let described: Vec<String> = topology
        .racks()
        .iter()
        .map(|r| {
            format!(
                "{} ({:?}, {} trays x {} GPUs)",
                r.name, r.sku, r.trays, r.gpus_per_tray
            )
        })
        .collect();
    step(&format!(
        "starting {trays} rackscale-agent processes, one per tray: {}",
        described.join(", ")
    ));
    rack.start_agents(topology, bins, args.time_scale, logs)
        .await?;
    step(&format!("all {trays} agents registered in etcd"));
    if args.kube {
        kube::start_operator(rack, bins, args.time_scale, logs)?;
        let applied = kube::apply_specs(rack, specs).await?;
        step(&format!(
            "operator (Kubernetes mode) planning and placing {} ModelDeployment(s) applied from {}",
            applied.len(),
            args.specs.display()
        ));
    } else {
        rack.start_operator(bins, specs, args.time_scale, logs)?;
        step(&format!(
            "operator (standalone) planning and placing {}",
            args.specs.display()
        ));
    }
    let board = wait_ready(rack, Duration::from_secs(args.timeout_s)).await?;
    let deployments: Vec<Value> = board["deployments"].as_array().cloned().unwrap_or_default();
    print_workers(&deployments);
    if args.kube {
        println!("{}", kube::get_md_racks(rack).await?);
    }
    for d in &deployments {
        let (ns, name) = (str_of(&d["namespace"]), str_of(&d["name"]));
        let profile = str_of(&d["spec"]["model"]["profile"]);
        // A CPU-backend deployment's frontend tokenises bytes, as its engines do.
        let backend = d["spec"]["engine"]["backend"].as_str().unwrap_or("sim");
        rack.start_frontend(bins, &ns, &name, &profile, backend, logs)?;
    }
    for f in &rack.frontends {
        let port = f.port;
        harness::wait_until(
            format!("frontend of {} ready", f.key),
            Duration::from_secs(60),
            || async move { Ok(http_get(port, "/ready").await.is_ok_and(|(c, _)| c == 200)) },
        )
        .await?;
    }
    print_where(rack, logs)?;
    step(&format!("up in {:.0} s", started.elapsed().as_secs_f64()));
    if args.bench {
        bench_all(args, bins, rack, &deployments, logs).await?;
        if !args.keep {
            return Ok(());
        }
    }
    step("staying up; Ctrl-C stops everything");
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rack.check_alive()?;
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// `GET path` on loopback `port`: status code and body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    let raw = String::from_utf8_lossy(&raw);
    let code = raw.get(9..12).unwrap_or("0").parse()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

/// Every deployment with its spec and status: the standalone operator's
/// `/status`, or the ModelDeployments on the API server with `--kube`.
async fn board(rack: &LocalRack) -> Result<Value> {
    if rack.cluster.is_some() {
        return kube::board(rack).await;
    }
    let (code, body) = http_get(rack.status_port, "/status").await?;
    if code != 200 {
        bail!("/status answered {code}");
    }
    serde_json::from_str(&body).context("parsing /status")
}

/// Polls the operator's `/status` until every deployment is Ready, printing
/// progress (workers running out of planned) as it changes. A deployment
/// that Failed (its spec cannot be planned or placed) is an error.
async fn wait_ready(rack: &mut LocalRack, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    let mut phases: BTreeMap<String, String> = BTreeMap::new();
    loop {
        rack.check_alive()?;
        if let Ok(board) = board(rack).await {
            let ds = board["deployments"].as_array().cloned().unwrap_or_default();
            let (mut running, mut total) = (0u32, 0u32);
            for d in &ds {
                let key = format!("{}/{}", str_of(&d["namespace"]), str_of(&d["name"]));
                let phase = d["status"]["phase"]
                    .as_str()
                    .unwrap_or("Pending")
                    .to_string();
                if phases.get(&key) != Some(&phase) {
                    let recipe = &d["status"]["recipe"];
                    let what = if recipe.is_null() {
                        String::new()
                    } else {
                        format!(
                            " ({} + {} on {} GPUs)",
                            str_of(&recipe["prefill"]),
                            str_of(&recipe["decode"]),
                            recipe["gpus"]
                        )
                    };
                    step(&format!("{key}: {phase}{what}"));
                    phases.insert(key.clone(), phase.clone());
                }
                if phase == "Failed" {
                    let why = d["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c["status"] == "False")
                        .map(|c| str_of(&c["message"]))
                        .next()
                        .unwrap_or_default();
                    bail!("{key} failed: {why}");
                }
                if let Some((r, t)) = d["status"]["ready"]
                    .as_str()
                    .and_then(|s| s.split_once('/'))
                {
                    running += r.parse::<u32>().unwrap_or(0);
                    total += t.parse::<u32>().unwrap_or(0);
                }
            }
            let line = format!("workers starting: {running}/{total} Ready");
            if line != last && total > 0 {
                step(&line);
                last = line;
            }
            if board["ready"] == true {
                return Ok(board);
            }
        }
        if Instant::now() > deadline {
            bail!("not every deployment was Ready within {timeout:?}; see the operator's log");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_workers(deployments: &[Value]) {
    for d in deployments {
        let s = &d["status"];
        let r = &s["recipe"];
        println!(
            "\n{}/{}: {} + {} on {} GPUs, predicted {} tok/s/GPU at {} tok/s/user ({})",
            str_of(&d["namespace"]),
            str_of(&d["name"]),
            str_of(&r["prefill"]),
            str_of(&r["decode"]),
            r["gpus"],
            r["predicted"]["tokSPerGpu"],
            r["predicted"]["tokSPerUser"],
            str_of(&r["source"]),
        );
        for w in s["workers"].as_array().into_iter().flatten() {
            let trays: Vec<String> = w["placement"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}({})",
                        str_of(&p["node"]),
                        p["gpus"].as_array().map_or(0, Vec::len)
                    )
                })
                .collect();
            println!(
                "  {:<10} {:<8} {:<8} {}",
                str_of(&w["name"]),
                str_of(&w["role"]),
                str_of(&w["state"]),
                trays.join(" ")
            );
        }
    }
    println!();
}

fn print_where(rack: &LocalRack, logs: &Path) -> Result<()> {
    let p = rack.status_port;
    println!("rackscale is up:");
    match kube::kubectl_hint(rack) {
        Some(hint) => println!("  kubectl           {hint}"),
        None => {
            println!("  operator status   http://127.0.0.1:{p}/status   (JSON of every deployment)")
        }
    }
    println!("  operator metrics  http://127.0.0.1:{p}/metrics  health /healthz");
    for f in &rack.frontends {
        println!(
            "  {:<17} http://127.0.0.1:{}/v1  (OpenAI API)  metrics http://127.0.0.1:{}/metrics",
            f.key, f.port, f.port
        );
    }
    println!("  etcd registry     {}", rack.etcd_endpoint()?);
    match &rack.transport.ca {
        Some(ca) => println!(
            "  gRPC links        mutual TLS, CA {} (certificates beside it)",
            ca.display()
        ),
        None => println!("  gRPC links        plaintext (--insecure-plaintext)"),
    }
    println!("  logs              {}", logs.display());
    println!();
    Ok(())
}

fn sku_of(d: &Value) -> Result<Sku> {
    match d["spec"]["hardware"]["sku"].as_str() {
        Some("gb300") => Ok(Sku::Gb300),
        Some("gb200") => Ok(Sku::Gb200),
        other => bail!("deployment with unknown SKU {other:?}"),
    }
}

/// Benches each deployment through its frontend, then prints the table and
/// writes the frontier plot with the measured points.
async fn bench_all(
    args: &UpArgs,
    bins: &Bins,
    rack: &mut LocalRack,
    deployments: &[Value],
    logs: &Path,
) -> Result<()> {
    let workload = Workload {
        isl: args.isl,
        osl: args.osl,
    };
    let scale = f64::from(args.time_scale);
    let mut rows = Vec::new();
    for (d, &concurrency) in deployments
        .iter()
        .flat_map(|d| args.concurrency.iter().map(move |c| (d, c)))
    {
        let (requests, warmup) = (
            args.rounds * u64::from(concurrency),
            args.warmup_rounds * u64::from(concurrency),
        );
        let key = format!("{}/{}", str_of(&d["namespace"]), str_of(&d["name"]));
        let port = rack
            .frontends
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.port)
            .with_context(|| format!("no frontend for {key}"))?;
        let view = summary::recipe_of(d)?;
        let sku = sku_of(d)?;
        step(&format!(
            "rackscale bench on {key}: {requests} requests (+{warmup} warm-up), ISL {} / OSL {}, {concurrency} clients",
            args.isl, args.osl
        ));
        let out_file = logs.join(format!("bench-{}-c{concurrency}.json", str_of(&d["name"])));
        let out = tokio::process::Command::new(&bins.rackscale)
            .args(["bench", "--url", &format!("http://127.0.0.1:{port}")])
            .args([
                "--isl",
                &args.isl.to_string(),
                "--osl",
                &args.osl.to_string(),
            ])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--requests", &requests.to_string()])
            .args(["--warmup", &warmup.to_string(), "--steady"])
            .args(["--gpus", &view.gpus.to_string(), "--json", "--out"])
            .arg(&out_file)
            .output()
            .await
            .context("running rackscale bench")?;
        if !out.status.success() {
            bail!(
                "rackscale bench on {key} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: Value = serde_json::from_slice(&out.stdout).context("bench JSON")?;
        let profile = str_of(&d["spec"]["model"]["profile"]);
        let predicted = summary::predict(&profile, sku, view.recipe, workload, concurrency)?;
        let measured = summary::measured(&report, scale, sku)?;
        rows.push(Row {
            deployment: key,
            sku,
            recipe: view.label,
            gpus: view.gpus,
            concurrency,
            predicted,
            measured,
            failed: report["failed"].as_u64().unwrap_or(0),
        });
    }
    println!(
        "\n== The recipes as planned: perfmodel at each recipe's concurrency and the spec's workload =="
    );
    print!("{}", summary::planned_table(deployments));
    println!(
        "\n== Predicted (perfmodel) vs measured (rackscale bench through the real processes), ISL {} / OSL {}, modelled time (time scale {}) ==",
        args.isl, args.osl, args.time_scale
    );
    print!("{}", summary::table(&rows));
    if let Some(path) = &args.report {
        let title = format!(
            "ISL {} / OSL {}, time scale {}, {} measured requests per client in steady state",
            args.isl, args.osl, args.time_scale, args.rounds
        );
        std::fs::write(path, summary::markdown(&title, &rows))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    plot(args, deployments, &rows)?;
    Ok(())
}

/// Both racks' frontiers at the bench workload with the measured points.
fn plot(args: &UpArgs, deployments: &[Value], rows: &[Row]) -> Result<()> {
    let workload = Workload {
        isl: args.isl,
        osl: args.osl,
    };
    let profile = deployments
        .first()
        .map(|d| str_of(&d["spec"]["model"]["profile"]))
        .unwrap_or_default();
    let model = perfmodel::ModelProfile::builtin(&profile)?;
    let cal = perfmodel::Calibration::fitted();
    let mut skus: Vec<Sku> = rows.iter().map(|r| r.sku).collect();
    skus.dedup();
    let mut sweeps = Vec::new();
    for sku in &skus {
        sweeps.push(perfmodel::search::sweep(&model, *sku, workload, 72, cal)?);
    }
    let refs: Vec<&perfmodel::search::Sweep> = sweeps.iter().collect();
    let measured: Vec<crate::svg::Measured> = rows
        .iter()
        .map(|r| (r.sku, r.measured.tok_s_user, r.measured.tok_s_gpu))
        .collect();
    let svg = crate::svg::frontiers(
        &refs,
        None,
        &measured,
        "rackscale bench",
        &model.name,
        workload,
    );
    if let Some(dir) = args.plot.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.plot, svg).with_context(|| format!("writing {}", args.plot.display()))?;
    step(&format!(
        "frontiers of both racks with the measured points: {}",
        args.plot.display()
    ));
    Ok(())
}
