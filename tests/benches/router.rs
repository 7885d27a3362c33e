//! Router overhead: the rackscale frontend against vllm-router, side by side
//! in one run, in front of the same aggregated workers.
//!
//! Starts a real etcd (harness) and two deployments of engine workers of role
//! `both` registered in it (`--time-scale 1e6`: modelled GPU time is ~nothing,
//! so a decode step costs one tick of the worker's timer and the HTTP path
//! dominates): `pool` with `--workers N` workers and `solo` with one. Each
//! deployment gets our frontend following it in the registry
//! (`rackscale-engine --role frontend`; an aggregated pool is forwarded whole,
//! see `engine/src/frontend/proxy.rs`) and vllm-router given its workers'
//! URLs (`--policy round_robin` by default). `rackscale bench` is the client
//! for every target, so the client is identical: streamed completions of
//! ISL/OSL 128/16 by default (80-100% each, token-id prompts).
//!
//! - **Saturation** (closed loop, `--concurrency C`): requests/s through
//!   each router over `pool`, and straight to one of its workers (one
//!   worker's capacity, for scale).
//! - **Added latency** (open loop, Poisson at `--rate R` for `--duration S`):
//!   e2e and TTFT p50/p99 straight to `solo`'s worker and through each router
//!   in front of that worker alone, so the worker sees the same load, batch
//!   and timer-paced steps with and without a router; added = router minus
//!   direct. (Over two workers each would run half the batch, which lowers
//!   e2e more than a router adds.)
//!
//! With `--tls` two more deployments (`pool-tls`, `solo-tls`) run the same
//! workers and our frontend with every link between them over mutual TLS
//! (a CA made for the run; the frontend's pass-through dials the workers
//! with its certificate, ALPN http/1.1), a fourth target in the same
//! rounds: the cost of TLS is that row against the plaintext frontend's.
//! vllm-router cannot present a client certificate, so it has no TLS row.
//!
//! Each of `--rounds K` rounds runs every target once per load, starting one
//! target later than the round before; figures are medians over rounds.
//! Targets: the frontend's saturated requests/s at least vllm-router's, and
//! its added e2e p99 at the fixed rate under 2 ms (PASS/MISS). The client,
//! routers and workers share the machine's cores, so compare within one run.
//! The bench exits non-zero only when something is broken: a failed request
//! or a process that would not start or died.
//!
//! Run with `scripts/bench-router.sh` (builds the release binaries, installs
//! vllm-router), or `cargo bench -p rackscale-tests --bench router --
//! --engine PATH --rackscale PATH --vllm-router PATH [--workers N]
//! [--concurrency C] [--requests N] [--rate R] [--duration S] [--rounds K]
//! [--policy P] [--isl N] [--osl N] [--tls]`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use harness::process::{ManagedProcess, StartFailure, free_port, start_with_retries};
use harness::workdir::Workdir;
use harness::{Etcd, wait_until};
use proto::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACE: &str = "bench";
const READY: Duration = Duration::from_secs(60);
/// The frontend's added p99 target at the fixed rate.
const TARGET_ADDED_P99_MS: f64 = 2.0;

/// Bench parameters from the command line.
#[derive(Debug, Clone)]
struct Params {
    engine: PathBuf,
    rackscale: PathBuf,
    vllm_router: PathBuf,
    policy: String,
    workers: u32,
    isl: u32,
    osl: u32,
    concurrency: u32,
    requests: u64,
    rate: f64,
    duration: f64,
    rounds: usize,
    tls: bool,
}

fn parse_params() -> Result<Params> {
    let mut p = Params {
        engine: PathBuf::new(),
        rackscale: PathBuf::new(),
        vllm_router: PathBuf::new(),
        policy: "round_robin".into(),
        workers: 2,
        isl: 128,
        osl: 16,
        concurrency: 128,
        requests: 4000,
        rate: 500.0,
        duration: 15.0,
        rounds: 3,
        tls: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if arg == "--bench" {
            continue;
        }
        if arg == "--tls" {
            p.tls = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        let bad = || format!("bad value {value:?} for {arg}");
        match arg.as_str() {
            "--engine" => p.engine = value.into(),
            "--rackscale" => p.rackscale = value.into(),
            "--vllm-router" => p.vllm_router = value.into(),
            "--policy" => p.policy = value,
            "--workers" => p.workers = value.parse().with_context(bad)?,
            "--isl" => p.isl = value.parse().with_context(bad)?,
            "--osl" => p.osl = value.parse().with_context(bad)?,
            "--concurrency" => p.concurrency = value.parse().with_context(bad)?,
            "--requests" => p.requests = value.parse().with_context(bad)?,
            "--rate" => p.rate = value.parse().with_context(bad)?,
            "--duration" => p.duration = value.parse().with_context(bad)?,
            "--rounds" => p.rounds = value.parse().with_context(bad)?,
            other => bail!(
                "unknown argument {other}; usage: --engine PATH --rackscale PATH --vllm-router PATH \
                 [--policy P] [--workers N] [--isl N] [--osl N] [--concurrency C] [--requests N] \
                 [--rate R] [--duration S] [--rounds K] [--tls]"
            ),
        }
    }
    for (flag, path) in [
        ("--engine", &p.engine),
        ("--rackscale", &p.rackscale),
        ("--vllm-router", &p.vllm_router),
    ] {
        ensure!(
            path.is_file(),
            "{flag} {} is not a file (scripts/bench-router.sh builds and installs them)",
            path.display()
        );
    }
    // vllm-router refuses power_of_two over one worker, and the latency
    // phase puts each router in front of one.
    ensure!(
        p.policy != "power_of_two",
        "--policy power_of_two needs two workers; the added-latency phase has one"
    );
    ensure!(
        p.workers >= 1 && p.rounds >= 1,
        "--workers and --rounds must be at least 1"
    );
    Ok(p)
}

/// The status code of `GET path` on `addr` (HTTP/1.1, one connection).
async fn http_status(addr: &str, path: &str) -> Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    let text = String::from_utf8_lossy(&reply);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    Ok(code)
}

/// Starts `name` (`args` given the port it should listen on) and waits until
/// `GET ready_path` answers 200; retried on fresh ports after a port race.
async fn start(
    name: &str,
    program: &Path,
    dir: &Path,
    ready_path: &str,
    args: impl Fn(u16) -> Vec<String>,
) -> Result<(ManagedProcess, String)> {
    start_with_retries(name, || async {
        let port = free_port()?;
        let mut process = ManagedProcess::spawn(name, program, &args(port), dir)?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = harness::wait::Deadline::after(READY);
        loop {
            process.ensure_running()?;
            if http_status(&addr, ready_path).await.ok() == Some(200) {
                return Ok::<_, StartFailure>((process, addr));
            }
            if deadline.passed() {
                return Err(StartFailure::Failed(anyhow::anyhow!(
                    "{name} not ready within {READY:?}; log:\n{}",
                    process.log_tail(20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// How `rackscale bench` loads a target.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Saturation,
    FixedRate,
}

/// The figures of one `rackscale bench` run.
#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    e2e_p50: f64,
    e2e_p99: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    ok: u64,
    failed: u64,
    failures: String,
}

fn field(report: &Value, path: &[&str]) -> Result<f64> {
    let mut v = report;
    for key in path {
        v = &v[*key];
    }
    v.as_f64()
        .with_context(|| format!("no number at {} in the report", path.join(".")))
}

/// One `rackscale bench` run against `addr`.
async fn load(p: &Params, addr: &str, shape: Shape) -> Result<Run> {
    let mut args = strings(&[
        "bench",
        "--url",
        &format!("http://{addr}"),
        "--isl",
        &p.isl.to_string(),
        "--osl",
        &p.osl.to_string(),
        "--timeout",
        "60",
        "--json",
    ]);
    args.extend(match shape {
        Shape::Saturation => strings(&[
            "--concurrency",
            &p.concurrency.to_string(),
            "--requests",
            &p.requests.to_string(),
            "--warmup",
            &(u64::from(p.concurrency) * 2).to_string(),
        ]),
        Shape::FixedRate => strings(&[
            "--request-rate",
            &p.rate.to_string(),
            "--duration",
            &p.duration.to_string(),
            "--warmup",
            &((p.rate as u64).max(1)).to_string(),
        ]),
    });
    let out = tokio::process::Command::new(&p.rackscale)
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await
        .context("running rackscale bench")?;
    ensure!(
        out.status.success(),
        "rackscale bench {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).context("rackscale bench --json")?;
    let failures = report["failures"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|f| format!("{} x{}: {}", f["reason"], f["count"], f["example"]))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    Ok(Run {
        rps: field(&report, &["request_throughput_per_s"])?,
        e2e_p50: field(&report, &["e2e_ms", "p50"])?,
        e2e_p99: field(&report, &["e2e_ms", "p99"])?,
        ttft_p50: field(&report, &["ttft_ms", "p50"])?,
        ttft_p99: field(&report, &["ttft_ms", "p99"])?,
        ok: field(&report, &["successful"])? as u64,
        failed: field(&report, &["failed"])? as u64,
        failures,
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// One target's runs over every round.
#[derive(Debug, Default)]
struct Target {
    label: String,
    /// Where the saturation runs go (one worker or a router over the pool).
    saturation_addr: String,
    /// Where the fixed-rate runs go (the solo worker or a router over it).
    fixed_addr: String,
    saturation: Vec<Run>,
    fixed: Vec<Run>,
}

impl Target {
    fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
        median(runs.iter().map(f).collect())
    }
    fn rps(&self) -> f64 {
        Self::med(&self.saturation, |r| r.rps)
    }
    fn fixed(&self, f: impl Fn(&Run) -> f64) -> f64 {
        Self::med(&self.fixed, f)
    }
    fn failed(&self) -> u64 {
        self.saturation
            .iter()
            .chain(&self.fixed)
            .map(|r| r.failed)
            .sum()
    }
    fn ok(&self) -> u64 {
        self.saturation
            .iter()
            .chain(&self.fixed)
            .map(|r| r.ok)
            .sum()
    }
}

fn version_of(vllm_router: &Path) -> String {
    let python = vllm_router.with_file_name("python");
    std::process::Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('vllm-router'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "(version unknown)".into())
}

fn report(p: &Params, targets: &[Target]) -> (String, bool) {
    let direct = &targets[0];
    let mut out = String::new();
    let line = |out: &mut String, s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(
        &mut out,
        format!(
            "Workers: `rackscale-engine --role=both --time-scale=1e6`. Client: `rackscale bench` \
             for every target, streamed `/v1/completions`, ISL {} / OSL {} (80-100% each). \
             Saturation: closed loop, concurrency {}, {} requests; the routers spread over {} \
             workers, direct is one worker. Fixed rate: {} req/s Poisson for {} s, each router \
             in front of one worker of its own and direct on that worker, so the worker's batch \
             is the same with and without a router; added = router minus direct. Medians of {} \
             round(s); vllm-router `--policy {}`.\n",
            p.isl,
            p.osl,
            p.concurrency,
            p.requests,
            p.workers,
            p.rate,
            p.duration,
            p.rounds,
            p.policy
        ),
    );
    line(
        &mut out,
        format!(
            "| target | req/s at saturation | achieved req/s at {} | e2e p50 / p99 ms | added e2e p50 / p99 ms | TTFT p50 / p99 ms | added TTFT p50 / p99 ms | requests ok / failed |",
            p.rate
        ),
    );
    line(
        &mut out,
        "|---|---:|---:|---:|---:|---:|---:|---:|".to_string(),
    );
    for t in targets {
        let added = |f: &dyn Fn(&Run) -> f64| t.fixed(f) - direct.fixed(f);
        let added_e2e = if std::ptr::eq(t, direct) {
            "—".to_string()
        } else {
            format!(
                "{:+.2} / {:+.2}",
                added(&|r| r.e2e_p50),
                added(&|r| r.e2e_p99)
            )
        };
        let added_ttft = if std::ptr::eq(t, direct) {
            "—".to_string()
        } else {
            format!(
                "{:+.2} / {:+.2}",
                added(&|r| r.ttft_p50),
                added(&|r| r.ttft_p99)
            )
        };
        line(
            &mut out,
            format!(
                "| {} | {:.0} | {:.0} | {:.2} / {:.2} | {added_e2e} | {:.2} / {:.2} | {added_ttft} | {} / {} |",
                t.label,
                t.rps(),
                t.fixed(|r| r.rps),
                t.fixed(|r| r.e2e_p50),
                t.fixed(|r| r.e2e_p99),
                t.fixed(|r| r.ttft_p50),
                t.fixed(|r| r.ttft_p99),
                t.ok(),
                t.failed(),
            ),
        );
    }
    let (ours, peer) = (&targets[1], &targets[2]);
    let ratio = ours.rps() / peer.rps();
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    let added_p99 = ours.fixed(|r| r.e2e_p99) - direct.fixed(|r| r.e2e_p99);
    line(&mut out, String::new());
    line(
        &mut out,
        format!(
            "- frontend req/s at saturation >= vllm-router's: {} ({:.0} vs {:.0}, ratio {ratio:.2})",
            verdict(ratio >= 1.0),
            ours.rps(),
            peer.rps()
        ),
    );
    line(
        &mut out,
        format!(
            "- frontend added e2e p99 at {} req/s < {TARGET_ADDED_P99_MS} ms: {} ({added_p99:+.2} ms; vllm-router {:+.2} ms)",
            p.rate,
            verdict(added_p99 < TARGET_ADDED_P99_MS),
            peer.fixed(|r| r.e2e_p99) - direct.fixed(|r| r.e2e_p99)
        ),
    );
    if let Some(tls) = targets.get(3) {
        line(
            &mut out,
            format!(
                "- mTLS between frontend and workers: req/s at saturation {:.0} vs {:.0} plaintext \
                 (ratio {:.2}); added e2e p50 / p99 at {} req/s {:+.2} / {:+.2} ms vs {:+.2} / {:+.2} ms plaintext",
                tls.rps(),
                ours.rps(),
                tls.rps() / ours.rps(),
                p.rate,
                tls.fixed(|r| r.e2e_p50) - direct.fixed(|r| r.e2e_p50),
                tls.fixed(|r| r.e2e_p99) - direct.fixed(|r| r.e2e_p99),
                ours.fixed(|r| r.e2e_p50) - direct.fixed(|r| r.e2e_p50),
                added_p99,
            ),
        );
    }
    let broken = targets.iter().any(|t| t.failed() > 0);
    if broken {
        for t in targets {
            for r in t.saturation.iter().chain(&t.fixed) {
                if r.failed > 0 {
                    line(
                        &mut out,
                        format!(
                            "- **{} failed {} requests**: {}",
                            t.label, r.failed, r.failures
                        ),
                    );
                }
            }
        }
    }
    (out, broken)
}

/// Workers of one deployment with both routers in front of them (only our
/// frontend over mutual TLS).
#[derive(Debug)]
struct Deployment {
    workers: Vec<String>,
    frontend: String,
    peer: Option<String>,
}

/// The transport flags of a deployment's workers and frontend; `None`:
/// plaintext, workers straight on their HTTP port, vllm-router too.
struct Mtls {
    worker: Vec<String>,
    frontend: Vec<String>,
}

/// Starts `count` aggregated workers registered as `deployment`, our
/// frontend following it and vllm-router given their URLs; the processes go
/// to `processes` (killed when it drops).
async fn deploy(
    p: &Params,
    etcd: &Etcd,
    dir: &Path,
    deployment: &str,
    count: u32,
    mtls: Option<&Mtls>,
    processes: &mut Vec<ManagedProcess>,
) -> Result<Deployment> {
    let registry = Registry::new(etcd.client().await?);
    let mut workers = Vec::new();
    for i in 0..count {
        let name = format!("{deployment}-{i}");
        if let Some(mtls) = mtls {
            // Their port takes TLS only: no plain /ready to poll, so they
            // bind port 0 (no race) and count as up once registered.
            let mut args = mtls.worker.clone();
            args.extend(strings(&[
                "--role=both",
                "--time-scale=1000000",
                "--listen=127.0.0.1:0",
                &format!("--etcd-endpoints={}", etcd.endpoint()),
                &format!("--namespace={NAMESPACE}"),
                &format!("--deployment={deployment}"),
                &format!("--worker={name}"),
            ]));
            processes.push(ManagedProcess::spawn(&name, &p.engine, &args, dir)?);
            workers.push(String::new());
            continue;
        }
        let (process, addr) = start(&name, &p.engine, dir, "/ready", |port| {
            strings(&[
                "--insecure-plaintext",
                "--role=both",
                "--time-scale=1000000",
                &format!("--listen=127.0.0.1:{port}"),
                &format!("--etcd-endpoints={}", etcd.endpoint()),
                &format!("--namespace={NAMESPACE}"),
                &format!("--deployment={deployment}"),
                &format!("--worker={name}"),
            ])
        })
        .await?;
        processes.push(process);
        workers.push(addr);
    }
    wait_until(format!("{deployment}'s workers registered"), READY, || {
        let registry = registry.clone();
        let want = workers.len();
        async move {
            let listing = registry
                .list_workers(NAMESPACE, deployment, Duration::from_secs(5))
                .await?;
            Ok(listing.records.len() == want)
        }
    })
    .await?;
    // The frontend's watch starts with a resync of the registered workers.
    let name = format!("{deployment}-frontend");
    let transport = mtls.map_or_else(harness::pki::plaintext_flags, |m| m.frontend.clone());
    let (process, frontend) = start(&name, &p.engine, dir, "/ready", |port| {
        let mut args = transport.clone();
        args.extend(strings(&[
            "--role=frontend",
            &format!("--listen=127.0.0.1:{port}"),
            &format!("--etcd-endpoints={}", etcd.endpoint()),
            &format!("--namespace={NAMESPACE}"),
            &format!("--deployment={deployment}"),
        ]));
        args
    })
    .await?;
    processes.push(process);
    if mtls.is_some() {
        wait_until(format!("{frontend} lists the model"), READY, || async {
            Ok(http_status(&frontend, "/v1/models").await? == 200)
        })
        .await?;
        return Ok(Deployment {
            workers,
            frontend,
            peer: None,
        });
    }
    let name = format!("{deployment}-vllm-router");
    let (process, peer) = start(&name, &p.vllm_router, dir, "/health", |port| {
        let mut args = strings(&[
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--policy",
            &p.policy,
            "--log-level",
            "error",
            "--prometheus-port",
            &free_port().map_or(0, |p| p).to_string(),
            "--worker-urls",
        ]);
        args.extend(workers.iter().map(|a| format!("http://{a}")));
        args
    })
    .await?;
    processes.push(process);
    // The client looks the model up in /v1/models, which both routers ask
    // a worker for.
    for addr in [&frontend, &peer] {
        wait_until(format!("{addr} lists the model"), READY, || async move {
            Ok(http_status(addr, "/v1/models").await? == 200)
        })
        .await?;
    }
    Ok(Deployment {
        workers,
        frontend,
        peer: Some(peer),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let p = parse_params()?;
    let dir = Workdir::new("bench-router")?;
    let etcd = Etcd::start().await?;
    let mut processes = Vec::new();
    // Saturation: both routers over `--workers` workers. Added latency: each
    // router in front of one worker, the one the direct baseline uses, so
    // the worker's batch (and its timer-paced decode steps) is the same with
    // and without a router.
    let pool = deploy(
        &p,
        &etcd,
        dir.path(),
        "pool",
        p.workers,
        None,
        &mut processes,
    )
    .await?;
    let solo = deploy(&p, &etcd, dir.path(), "solo", 1, None, &mut processes).await?;
    let peer_version = version_of(&p.vllm_router);
    let mut targets = vec![
        Target {
            label: "direct (no router)".into(),
            saturation_addr: pool.workers[0].clone(),
            fixed_addr: solo.workers[0].clone(),
            ..Target::default()
        },
        Target {
            label: "rackscale frontend".into(),
            saturation_addr: pool.frontend,
            fixed_addr: solo.frontend,
            ..Target::default()
        },
        Target {
            label: format!("vllm-router {peer_version} ({})", p.policy),
            saturation_addr: pool.peer.context("the plaintext pool has vllm-router")?,
            fixed_addr: solo.peer.context("the plaintext solo has vllm-router")?,
            ..Target::default()
        },
    ];
    if p.tls {
        let pki = harness::pki::Pki::create(&dir.path().join("pki"), "router bench CA")?;
        let mtls = Mtls {
            worker: pki.args("worker")?,
            frontend: pki.args("frontend")?,
        };
        let pool = deploy(
            &p,
            &etcd,
            dir.path(),
            "pool-tls",
            p.workers,
            Some(&mtls),
            &mut processes,
        )
        .await?;
        let solo = deploy(
            &p,
            &etcd,
            dir.path(),
            "solo-tls",
            1,
            Some(&mtls),
            &mut processes,
        )
        .await?;
        targets.push(Target {
            label: "rackscale frontend, mTLS to the workers".into(),
            saturation_addr: pool.frontend,
            fixed_addr: solo.frontend,
            ..Target::default()
        });
    }
    // Each round runs every target once per load, starting one target
    // later than the round before, so drift on a shared machine and the
    // position in a round fall on every target alike.
    for round in 0..p.rounds {
        let order: Vec<usize> = (0..targets.len())
            .map(|k| (k + round) % targets.len())
            .collect();
        for &i in &order {
            let t = &mut targets[i];
            eprintln!(
                "[bench-router] round {}: {} at saturation",
                round + 1,
                t.label
            );
            let run = load(&p, &t.saturation_addr, Shape::Saturation).await?;
            t.saturation.push(run);
        }
        for &i in &order {
            let t = &mut targets[i];
            eprintln!(
                "[bench-router] round {}: {} at {} req/s",
                round + 1,
                t.label,
                p.rate
            );
            let run = load(&p, &t.fixed_addr, Shape::FixedRate).await?;
            t.fixed.push(run);
        }
    }
    for process in processes.iter_mut() {
        process
            .ensure_running()
            .map_err(|e| anyhow::anyhow!("a process died during the bench: {e:?}"))?;
    }
    let (table, broken) = report(&p, &targets);
    println!("{table}");
    if broken {
        bail!("requests failed (see the table)");
    }
    Ok(())
}
