//! `rackscale`: the user's command.
//!
//! - `plan`: the best recipe for a model, SKU, workload, GPU budget and SLO,
//!   with its memory breakdown; SKU comparison at interactivity levels;
//!   explanations of rejected shapes; an SVG of the frontiers; or one recipe
//!   evaluated in the calibration CSV's own terms.
//! - `calibrate`: fits the perf model's free parameters to measured recipes
//!   and writes the constants that are checked in.
//! - `bench`: drives an OpenAI-compatible endpoint with InferenceX's workload
//!   and reports tok/s/GPU, tok/s/user, TTFT, TPOT and failures.
//! - `simulate`: one deployment under a load trace in a seeded
//!   discrete-event simulation, the rebalancer against a static split, an
//!   oracle and a Dynamo-style planner.
//! - `up`: the whole system on one machine (etcd, one agent per simulated
//!   tray, the standalone operator, frontends), optionally benched against
//!   the perf model's predictions.

mod bench;
mod calibrate;
mod plan;
mod simulate;
mod svg;
mod up;

use clap::{Parser, Subcommand};

/// Disaggregated, expert-parallel LLM serving on rack-scale NVLink systems.
#[derive(Debug, Parser)]
#[command(name = "rackscale", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pick the best prefill/decode recipe, compare SKUs, or evaluate one recipe.
    Plan(plan::PlanArgs),
    /// Fit the performance model to measured recipes and write its constants.
    Calibrate(calibrate::CalibrateArgs),
    /// Load-test an OpenAI-compatible endpoint; report InferenceX figures.
    Bench(bench::BenchArgs),
    /// Run a local rack: etcd, agents, the operator and frontends.
    Up(up::UpArgs),
    /// Simulate a deployment under a load trace: rebalancer vs baselines.
    Simulate(simulate::SimulateArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Up(args) => up::run(args),
        Command::Simulate(args) => simulate::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
