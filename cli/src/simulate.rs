//! `rackscale simulate`: one deployment under a load trace, in a seeded
//! discrete-event simulation, with the rebalancer and the baselines
//! (static split, oracle, Dynamo-style throughput planner) side by side.
//!
//! The worker shapes are the planner's for the trace's first phase unless
//! given; the rebalancing knobs default to the `ModelDeployment` CRD's.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use operator::crd::RebalanceSpec;
use operator::rebalance::{Settings, Shapes, SloTarget};
use operator::simulate::{self, PolicyKind, Report, SimConfig, Trace};
use perfmodel::search::{self, Slo};
use perfmodel::{Calibration, ModelProfile, Parallelism, Sku, Workload};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Load trace (YAML: phases of rate, isl, osl, durationSeconds).
    #[arg(long)]
    trace: PathBuf,
    /// Built-in model profile.
    #[arg(long, default_value = "deepseek-v4-pro", env = "RACKSCALE_MODEL")]
    model: String,
    /// Rack SKU.
    #[arg(long, default_value = "gb300")]
    sku: String,
    /// GPU budget of the deployment.
    #[arg(long, default_value_t = 72, value_parser = clap::value_parser!(u32).range(2..))]
    gpus: u32,
    /// Seed of the arrivals and lengths (same seed, same result).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// rebalance, static, oracle, dynamo, or all.
    #[arg(long, default_value = "all")]
    policy: String,
    /// SLO: minimum tok/s/user (1000 / TPOT in ms).
    #[arg(long, default_value_t = 20.0)]
    min_interactivity: f64,
    /// SLO: maximum TTFT in milliseconds.
    #[arg(long, default_value_t = 10_000.0)]
    max_ttft_ms: f64,
    /// Prefill worker TP width (default: the planner's for the first phase).
    #[arg(long, requires = "decode_ep")]
    prefill_tp: Option<u32>,
    /// Decode worker EP width (default: the planner's for the first phase).
    #[arg(long, requires = "prefill_tp")]
    decode_ep: Option<u32>,
    /// Seconds between rebalancing decisions [default: the CRD's].
    #[arg(long)]
    interval: Option<u32>,
    /// Stabilization window, seconds [default: the CRD's].
    #[arg(long)]
    window: Option<u32>,
    /// Most moves per decision [default: the CRD's].
    #[arg(long)]
    max_moves: Option<u32>,
    /// Hysteresis in percent of served requests [default: the CRD's].
    #[arg(long)]
    min_gain_percent: Option<u32>,
    /// Payback horizon of a move, seconds [default: the CRD's].
    #[arg(long)]
    payback: Option<u32>,
    /// Minimum workers per pool [default: the CRD's].
    #[arg(long)]
    min_workers: Option<u32>,
    /// Seconds after the trace in which in-flight requests may finish.
    #[arg(long, default_value_t = 900.0)]
    tail: f64,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("cannot read trace {}", args.trace.display()))?;
    let trace = Trace::from_yaml(&text).with_context(|| format!("in {}", args.trace.display()))?;
    let policies: Vec<PolicyKind> = match args.policy.as_str() {
        "all" => PolicyKind::ALL.to_vec(),
        one => vec![one.parse().map_err(anyhow::Error::msg)?],
    };
    let cfg = config(&args, &trace)?;
    let reports = policies
        .iter()
        .map(|p| simulate::run(&cfg, &trace, *p))
        .collect::<Result<Vec<_>, _>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", render(&cfg, &trace, &reports));
    }
    Ok(())
}

fn config(args: &SimulateArgs, trace: &Trace) -> Result<SimConfig> {
    let model = ModelProfile::builtin(&args.model)?;
    let sku: Sku = args.sku.parse()?;
    let cal = Calibration::fitted();
    let slo = Slo {
        min_tok_s_user: Some(args.min_interactivity),
        max_tpot_ms: None,
        max_ttft_ms: Some(args.max_ttft_ms),
    };
    let target = SloTarget::from_slo(&slo).context("--min-interactivity must be positive")?;
    let (prefill_tp, decode) = match (args.prefill_tp, args.decode_ep) {
        (Some(tp), Some(ep)) => (tp, Parallelism::Ep(ep)),
        _ => {
            let first = &trace.phases[0];
            let workload = Workload {
                isl: first.isl,
                osl: first.osl,
            };
            let sweep = search::sweep(&model, sku, workload, args.gpus, cal)?;
            let Some(best) = search::best(&sweep.points, &slo) else {
                bail!(
                    "no recipe within {} {sku} GPUs meets {} tok/s/user for the first phase; pass --prefill-tp and --decode-ep",
                    args.gpus,
                    args.min_interactivity
                );
            };
            (best.recipe.prefill.gpus(), best.recipe.decode)
        }
    };
    let d = RebalanceSpec::default();
    let spec = RebalanceSpec {
        enabled: true,
        interval_seconds: args.interval.unwrap_or(d.interval_seconds),
        stabilization_window_seconds: args.window.unwrap_or(d.stabilization_window_seconds),
        min_workers_per_pool: args.min_workers.unwrap_or(d.min_workers_per_pool),
        max_moves_per_interval: args.max_moves.unwrap_or(d.max_moves_per_interval),
        min_gain_percent: args.min_gain_percent.unwrap_or(d.min_gain_percent),
        payback_seconds: args.payback.unwrap_or(d.payback_seconds),
    };
    if spec.interval_seconds == 0 || spec.stabilization_window_seconds < spec.interval_seconds {
        bail!("--interval must be positive and --window at least --interval");
    }
    if spec.max_moves_per_interval == 0 || spec.min_workers_per_pool == 0 {
        bail!("--max-moves and --min-workers must be at least 1");
    }
    Ok(SimConfig {
        model,
        sku,
        calibration: cal,
        shapes: Shapes {
            prefill_tp,
            decode,
            gpu_budget: args.gpus,
        },
        slo: target,
        settings: Settings::from_spec(&spec),
        seed: args.seed,
        tail_s: args.tail,
    })
}

fn render(cfg: &SimConfig, trace: &Trace, reports: &[Report]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let s = &cfg.settings;
    let _ = writeln!(
        o,
        "{} on {} {} GPUs: prefill TP{} workers, decode {} workers; SLO TPOT <= {:.1} ms, TTFT <= {:.1} s; seed {}",
        cfg.model.name,
        cfg.shapes.gpu_budget,
        cfg.sku,
        cfg.shapes.prefill_tp,
        cfg.shapes.decode,
        cfg.slo.max_tpot_s * 1e3,
        cfg.slo.max_ttft_s.unwrap_or(f64::INFINITY),
        cfg.seed
    );
    let _ = writeln!(
        o,
        "rebalancer: interval {:.0} s, window {:.0} s, max {} moves, min gain {:.0}%, payback {:.0} s, min {} workers/pool",
        s.interval_s,
        s.window_s,
        s.max_moves,
        s.min_gain * 100.0,
        s.payback_s,
        s.min_workers
    );
    let _ = writeln!(o, "trace {} ({:.0} s):", trace.name, trace.duration_s());
    for p in &trace.phases {
        let _ = writeln!(
            o,
            "  {:<10} {:>6.2} req/s  ISL {:>6}  OSL {:>5}  {:>5.0} s",
            p.name, p.rate, p.isl, p.osl, p.duration_seconds
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "policy",
        "goodput/GPUh",
        "SLO met",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "switches",
        "GPU-s lost",
        "finished"
    );
    for r in reports {
        let _ = writeln!(
            o,
            "{:<10} {:>12.2} {:>8.1}% {:>8.2}s {:>8.2}s {:>7.1}ms {:>7.1}ms {:>8} {:>9.0} {:>4}/{:<4}",
            r.policy.as_str(),
            r.goodput_per_gpu_hour,
            r.slo_attainment * 100.0,
            r.ttft_s.p50,
            r.ttft_s.p99,
            r.tpot_s.p50 * 1e3,
            r.tpot_s.p99 * 1e3,
            r.role_switches,
            r.gpu_seconds_switching,
            r.completed,
            r.requests
        );
    }
    let get = |p: PolicyKind| reports.iter().find(|r| r.policy == p);
    if let Some(rb) = get(PolicyKind::Rebalance) {
        let _ = writeln!(o);
        for other in [PolicyKind::Static, PolicyKind::Oracle, PolicyKind::Dynamo] {
            if let Some(r) = get(other)
                && r.goodput_per_gpu_hour > 0.0
            {
                let _ = writeln!(
                    o,
                    "rebalance / {:<7} goodput: {:.2}x",
                    other.as_str(),
                    rb.goodput_per_gpu_hour / r.goodput_per_gpu_hour
                );
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "rebalance per phase (start split {}):", rb.start_split);
        for p in &rb.phases {
            let _ = writeln!(
                o,
                "  {:<10} SLO met {:>5.1}%  split at end {:<7} best {:<7} last move {:>4.0} s after the phase start ({} intervals)",
                p.name,
                p.slo_attainment * 100.0,
                p.split_at_end.to_string(),
                p.best_split.to_string(),
                p.settle_s,
                p.intervals_to_settle.unwrap_or(0)
            );
        }
        let _ = writeln!(o, "moves:");
        for m in &rb.move_log {
            let _ = writeln!(
                o,
                "  t={:>5.0}s {} -> {}: {}",
                m.at_s, m.from, m.to, m.reason
            );
        }
    }
    o
}
