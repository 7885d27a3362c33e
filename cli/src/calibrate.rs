//! `rackscale calibrate`: fit the perf model's free parameters to a CSV of
//! measured recipes and write them as JSON (by default over the constants
//! checked in at `perfmodel/calibration.json`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use perfmodel::fit::{self, MeasuredRow};
use perfmodel::{Calibration, ModelProfile, Workload};

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Measured recipes (InferenceX CSV columns); default: the rows shipped
    /// with perfmodel.
    #[arg(long, env = "RACKSCALE_CALIBRATION_CSV")]
    csv: Option<PathBuf>,
    /// Where to write the fitted constants.
    #[arg(long, default_value = "perfmodel/calibration.json")]
    out: PathBuf,
    /// Only report errors of the current constants; write nothing.
    #[arg(long)]
    check: bool,
    /// Model the rows were measured on.
    #[arg(long, default_value = "deepseek-v4-pro")]
    model: String,
    #[arg(long, default_value_t = 8192)]
    isl: u32,
    #[arg(long, default_value_t = 1024)]
    osl: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let model = ModelProfile::builtin(&args.model)?;
    let workload = Workload {
        isl: args.isl,
        osl: args.osl,
    };
    let rows: Vec<MeasuredRow> = match &args.csv {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            fit::parse_csv(&text)?
        }
        None => fit::builtin_rows()?,
    };
    let cal = if args.check {
        Calibration::fitted()
    } else {
        let cal = fit::fit(&model, workload, &rows, Calibration::prior())?;
        let text = serde_json::to_string_pretty(&cal)? + "\n";
        std::fs::write(&args.out, text)
            .with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!("wrote {}", args.out.display());
        cal
    };
    let report = fit::report(&model, workload, &rows, cal)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"calibration": cal, "report": report})
            )?
        );
        return Ok(());
    }
    println!("constants: {}", serde_json::to_string(&cal)?);
    println!(
        "{:<6} {:>6} {:>9} {:>9} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}",
        "sku",
        "conc",
        "prefill",
        "decode",
        "tok/s/gpu",
        "predicted",
        "error",
        "tpot ms",
        "predicted",
        "error"
    );
    for e in &report.rows {
        let r = &e.recipe;
        println!(
            "{:<6} {:>6} {:>9} {:>9} {:>10.1} {:>10.1} {:>+7.1}% {:>9.2} {:>9.2} {:>+7.1}%",
            e.row.sku.as_str(),
            e.row.concurrency,
            format!("{}x{}", r.prefill_workers, r.prefill),
            format!("{}x{}", r.decode_workers, r.decode),
            e.row.tok_s_gpu,
            e.predicted_tok_s_gpu,
            100.0 * e.tok_s_gpu_error,
            e.row.tpot_ms,
            e.predicted_tpot_ms,
            100.0 * e.tpot_error
        );
    }
    println!(
        "median |error|: tok/s/GPU {:.1}%, TPOT {:.1}%; max: {:.1}%, {:.1}%",
        100.0 * report.median_abs_tok_s_gpu_error,
        100.0 * report.median_abs_tpot_error,
        100.0 * report.max_abs_tok_s_gpu_error,
        100.0 * report.max_abs_tpot_error
    );
    Ok(())
}
