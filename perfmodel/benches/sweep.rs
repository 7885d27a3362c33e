//! Wall time of `perfmodel::search::sweep`, the planner's whole search, for
//! DeepSeek-V4-Pro at ISL 8192 / OSL 1024 with the fitted calibration, on
//! GB300 and GB200 at 72 GPUs (one rack) and 1152 GPUs (16 racks).
//!
//! No criterion: each case runs once to warm up, then `--reps N` timed runs
//! (default 5) with `std::time::Instant`; the table gives min and median wall
//! time, the recipes evaluated (`Sweep::evaluated`) and the time per recipe.
//! Meant to run pinned to one core:
//! `cargo bench -p perfmodel --bench sweep --no-run && taskset -c 0 cargo bench -p perfmodel --bench sweep`.
//! Exits non-zero when a 72-GPU median exceeds the 1 s target.

use std::error::Error;
use std::hint::black_box;
use std::time::{Duration, Instant};

use perfmodel::search::{frontier, sweep};
use perfmodel::{Calibration, ModelProfile, Sku, Workload};

/// Target for one 72-GPU sweep (the planner answers interactively).
const TARGET_72: Duration = Duration::from_secs(1);

/// One measured case.
struct Case {
    sku: Sku,
    gpus: u32,
    min: Duration,
    median: Duration,
    max: Duration,
    evaluated: usize,
    points: usize,
    frontier: usize,
}

fn parse_reps() -> Result<usize, Box<dyn Error>> {
    // `cargo bench` passes `--bench`; ignore what is not ours.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 5;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--reps" {
            let v = args.get(i + 1).ok_or("--reps needs a value")?;
            reps = v.parse().map_err(|e| format!("--reps {v}: {e}"))?;
            i += 1;
        }
        i += 1;
    }
    if reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    Ok(reps)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn Error>> {
    let reps = parse_reps()?;
    let model = ModelProfile::builtin("deepseek-v4-pro")?;
    let workload = Workload {
        isl: 8192,
        osl: 1024,
    };
    let cal = Calibration::fitted();

    let mut cases = Vec::new();
    for gpus in [72u32, 1152] {
        for sku in [Sku::Gb300, Sku::Gb200] {
            // Warm-up run; also the one whose counts are reported (the
            // search is deterministic).
            let s = sweep(&model, sku, workload, gpus, cal)?;
            let (evaluated, points, front) =
                (s.evaluated, s.points.len(), frontier(&s.points).len());
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                let start = Instant::now();
                let s = sweep(black_box(&model), sku, workload, black_box(gpus), cal)?;
                times.push(start.elapsed());
                black_box(s);
            }
            times.sort();
            cases.push(Case {
                sku,
                gpus,
                min: times[0],
                median: times[times.len() / 2],
                max: times[times.len() - 1],
                evaluated,
                points,
                frontier: front,
            });
        }
    }

    println!(
        "sweep: DeepSeek-V4-Pro, ISL 8192 / OSL 1024, Calibration::fitted(), {reps} timed runs after 1 warm-up\n"
    );
    println!(
        "| SKU | GPU budget | min (ms) | median (ms) | max (ms) | recipes evaluated | points that fit | frontier points | µs / recipe (median) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in &cases {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.2} |",
            c.sku,
            c.gpus,
            ms(c.min),
            ms(c.median),
            ms(c.max),
            c.evaluated,
            c.points,
            c.frontier,
            ms(c.median) * 1e3 / c.evaluated.max(1) as f64
        );
    }
    let slow: Vec<String> = cases
        .iter()
        .filter(|c| c.gpus == 72 && c.median > TARGET_72)
        .map(|c| format!("{} ({:.0} ms)", c.sku, ms(c.median)))
        .collect();
    if slow.is_empty() {
        println!(
            "\n72-GPU target (< {} ms median): met",
            TARGET_72.as_millis()
        );
        Ok(())
    } else {
        Err(format!(
            "72-GPU target (< {} ms median) missed: {}",
            TARGET_72.as_millis(),
            slow.join(", ")
        )
        .into())
    }
}
