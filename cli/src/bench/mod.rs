//! `rackscale bench`: a load generator for OpenAI-compatible endpoints that
//! reports in InferenceX's terms (tok/s/GPU, tok/s/user, TTFT, TPOT).
//!
//! Flow: flags → validated [`Config`] → model lookup → warmup phase (its
//! records dropped) → measured phase → [`stats::aggregate`] → table or JSON.
//! Definitions of every figure live in [`stats`] and `docs/bench.md`.

mod client;
mod load;
mod openai;
mod report;
mod sse;
mod stats;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args};
use tokio::time::Instant;

use client::Target;
use load::{Load, Phase, Stop};
use openai::Endpoint;
use report::{Report, RunConfig};
use workload::Workload;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("load").required(true).args(["concurrency", "request_rate"])))]
#[command(group(ArgGroup::new("stop").required(true).args(["requests", "duration"])))]
pub struct BenchArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is
    /// accepted).
    #[arg(long, env = "RACKSCALE_BENCH_URL")]
    url: String,
    /// Route to drive: completions (token-id prompts) or chat (text prompts).
    #[arg(long, value_enum, default_value = "completions")]
    endpoint: Endpoint,
    /// Model name; default: the first model GET /v1/models lists.
    #[arg(long, env = "RACKSCALE_BENCH_MODEL")]
    model: Option<String>,
    /// Nominal input length; each request draws 80-100% of it.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    isl: u32,
    /// Nominal output length; each request draws 80-100% of it (max_tokens).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    osl: u32,
    /// Seed of the request lengths, prompts and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Closed loop: this many clients, each sending back to back.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: Option<u32>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Open loop: at most this many requests in flight; later arrivals wait.
    #[arg(long, requires = "request_rate", value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrency: Option<u32>,
    /// Measure this many requests.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Send measured requests for this many seconds, then await those in flight.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests sent first, with the same load shape, and left out of every figure.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Closed loop with --requests: measure in steady state. The clients
    /// never pause between warmup and measurement; the window runs from the
    /// last warmup completion to the last measured one, and the requests
    /// still in flight then are cancelled and left out. Without it the
    /// window runs from the first measured send to the last end
    /// (benchmark_serving's, which includes the clients' ramp and drain).
    #[arg(long)]
    steady: bool,
    /// GPUs serving the endpoint (prefill + decode): per-GPU figures divide by it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    gpus: u32,
    /// Per-request limit in seconds, send to [DONE].
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Bearer token for the server.
    #[arg(long, env = "RACKSCALE_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The validated run.
#[derive(Debug, Clone)]
struct Config {
    base_url: String,
    endpoint: Endpoint,
    model: Option<String>,
    workload: Workload,
    load: Load,
    stop: Stop,
    warmup: u64,
    steady: bool,
    gpus: u32,
    timeout: Duration,
    api_key: Option<String>,
}

fn positive_seconds(flag: &str, value: f64) -> Result<f64> {
    if !(value.is_finite() && value > 0.0) {
        bail!("--{flag} must be a positive number, got {value}");
    }
    Ok(value)
}

impl TryFrom<&BenchArgs> for Config {
    type Error = anyhow::Error;

    fn try_from(args: &BenchArgs) -> Result<Self> {
        let trimmed = args.url.trim_end_matches('/');
        let base_url = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            bail!(
                "--url must start with http:// or https://, got {}",
                args.url
            );
        }
        let load = match (args.concurrency, args.request_rate) {
            (Some(concurrency), None) => Load::Closed { concurrency },
            (None, Some(rate)) => Load::Open {
                rate: positive_seconds("request-rate", rate)?,
                max_concurrency: args.max_concurrency,
            },
            _ => bail!("give exactly one of --concurrency and --request-rate"),
        };
        let stop = match (args.requests, args.duration) {
            (Some(n), None) => Stop::Requests(n),
            (None, Some(s)) => {
                Stop::Duration(Duration::from_secs_f64(positive_seconds("duration", s)?))
            }
            _ => bail!("give exactly one of --requests and --duration"),
        };
        if args.steady && !matches!((load, stop), (Load::Closed { .. }, Stop::Requests(_))) {
            bail!(
                "--steady measures a closed loop by request count: give --concurrency and --requests"
            );
        }
        Ok(Self {
            base_url,
            endpoint: args.endpoint,
            model: args.model.clone(),
            workload: Workload {
                isl: args.isl,
                osl: args.osl,
                seed: args.seed,
                text: args.endpoint == Endpoint::Chat,
            },
            load,
            stop,
            warmup: args.warmup,
            steady: args.steady,
            gpus: args.gpus,
            timeout: Duration::from_secs_f64(positive_seconds("timeout", args.timeout)?),
            api_key: args.api_key.clone(),
        })
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let config = Config::try_from(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(bench(config))?;
    let json = serde_json::to_string_pretty(&report)? + "\n";
    if let Some(path) = &args.out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        print!("{json}");
    } else {
        print!("{}", report::render(&report));
    }
    Ok(())
}

async fn bench(config: Config) -> Result<Report> {
    let target = Arc::new(Target::connect(&config).await?);
    let epoch = Instant::now();
    let phase = |stop, first_index| Phase {
        target: Arc::clone(&target),
        workload: config.workload,
        load: config.load,
        stop,
        first_index,
        epoch,
    };
    if config.steady
        && let (Load::Closed { concurrency }, Stop::Requests(n)) = (config.load, config.stop)
    {
        eprintln!(
            "measuring in steady state: {} warmup then {n} requests to {}",
            config.warmup,
            target.url()
        );
        let (records, start) = phase(config.stop, 0)
            .steady(concurrency, config.warmup, n)
            .await?;
        return Ok(Report {
            config: RunConfig::new(&config, target.url(), target.model()),
            figures: stats::aggregate_from(&records, config.gpus, Some(start)),
        });
    }
    if config.warmup > 0 {
        eprintln!("warmup: {} requests to {}", config.warmup, target.url());
        phase(Stop::Requests(config.warmup), 0).run().await?;
    }
    eprintln!("measuring: {}", target.url());
    let records = phase(config.stop, config.warmup).run().await?;
    Ok(Report {
        config: RunConfig::new(&config, target.url(), target.model()),
        figures: stats::aggregate(&records, config.gpus),
    })
}
