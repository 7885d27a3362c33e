//! `rackscale plan`: best recipe, SKU comparison, explanations, frontier
//! plot, or a single recipe evaluated in the calibration CSV's terms.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use perfmodel::fit::{MeasuredRow, tp_only_decode_width};
use perfmodel::memory::MemoryFit;
use perfmodel::search::{self, Point, Slo, Sweep};
use perfmodel::{Calibration, Evaluator, ModelProfile, Parallelism, Recipe, Sku, Workload};
use serde_json::{Value, json};

use crate::svg;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Built-in model profile (deepseek-v4-pro, deepseek-v4-flash, deepseek-v3).
    #[arg(long, default_value = "deepseek-v4-pro", env = "RACKSCALE_MODEL")]
    model: String,
    /// A Hugging Face config.json to use instead of a built-in profile.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Its hf_quant_config.json, when experts are quantised by ModelOpt.
    #[arg(long, requires = "model_config")]
    quant_config: Option<PathBuf>,
    /// Rack SKU: gb200, gb300 (NVL72), b200, h200 (8-GPU nodes).
    #[arg(long, default_value = "gb300")]
    sku: String,
    /// Nominal input length (requests draw 80-100% of it).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    isl: u32,
    /// Nominal output length (requests draw 80-100% of it).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    osl: u32,
    /// GPU budget for the deployment.
    #[arg(long, default_value_t = 72, value_parser = clap::value_parser!(u32).range(2..))]
    gpus: u32,
    /// SLO: minimum tok/s/user (1000 / TPOT in ms).
    #[arg(long)]
    min_interactivity: Option<f64>,
    /// SLO: maximum TPOT in milliseconds.
    #[arg(long)]
    max_tpot_ms: Option<f64>,
    /// SLO: maximum TTFT in milliseconds.
    #[arg(long)]
    max_ttft_ms: Option<f64>,
    /// Second SKU to compare against at each level of --levels.
    #[arg(long)]
    compare: Option<String>,
    /// Interactivity levels (tok/s/user) for --compare.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "16,18,20,22,25,27,28,32,36,50"
    )]
    levels: Vec<f64>,
    /// List every shape considered: its best recipe, or why it has none.
    #[arg(long)]
    explain: bool,
    /// Draw the frontier(s) to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Evaluate one recipe: prefill GPUs (with --prefill-tp, --decode-gpus,
    /// --decode-ep, --concurrency).
    #[arg(long, requires_all = ["prefill_tp", "decode_gpus", "decode_ep", "concurrency"])]
    prefill_gpus: Option<u32>,
    #[arg(long, requires = "prefill_gpus")]
    prefill_tp: Option<u32>,
    #[arg(long, requires = "prefill_gpus")]
    decode_gpus: Option<u32>,
    /// Decode EP width; 1 means TP-only decode at the smallest TP that holds
    /// the model.
    #[arg(long, requires = "prefill_gpus")]
    decode_ep: Option<u32>,
    #[arg(long, requires = "prefill_gpus")]
    concurrency: Option<u32>,
}

impl PlanArgs {
    fn model(&self) -> Result<ModelProfile> {
        Ok(match &self.model_config {
            Some(path) => {
                let name = path
                    .parent()
                    .and_then(|p| p.file_name())
                    .map_or_else(|| self.model.clone(), |n| n.to_string_lossy().into_owned());
                ModelProfile::from_files(&name, path, self.quant_config.as_deref())?
            }
            None => ModelProfile::builtin(&self.model)?,
        })
    }

    fn slo(&self) -> Result<Slo> {
        for (flag, v) in [
            ("--min-interactivity", self.min_interactivity),
            ("--max-tpot-ms", self.max_tpot_ms),
            ("--max-ttft-ms", self.max_ttft_ms),
        ] {
            if let Some(v) = v
                && !(v > 0.0 && v.is_finite())
            {
                bail!("{flag} must be a positive number, got {v}");
            }
        }
        Ok(Slo {
            min_tok_s_user: self.min_interactivity,
            max_tpot_ms: self.max_tpot_ms,
            max_ttft_ms: self.max_ttft_ms,
        })
    }
}

pub fn run(args: PlanArgs) -> Result<()> {
    let model = args.model()?;
    let sku: Sku = args.sku.parse()?;
    let workload = Workload {
        isl: args.isl,
        osl: args.osl,
    };
    let cal = Calibration::fitted();
    if args.prefill_gpus.is_some() {
        return evaluate_one(&args, &model, sku, workload, cal);
    }
    let slo = args.slo()?;
    if args.levels.iter().any(|l| !(*l > 0.0 && l.is_finite())) {
        bail!("--levels must be positive numbers");
    }
    let sweep = search::sweep(&model, sku, workload, args.gpus, cal)?;
    let other = match &args.compare {
        Some(name) => {
            let other: Sku = name.parse()?;
            Some(search::sweep(&model, other, workload, args.gpus, cal)?)
        }
        None => None,
    };
    let best = search::best(&sweep.points, &slo);
    if let Some(path) = &args.plot {
        let mut sweeps = vec![&sweep];
        sweeps.extend(other.as_ref());
        // The InferenceX rows were measured for this model and workload only.
        let measured: Vec<svg::Measured> =
            if model.name == "deepseek-v4-pro" && (workload.isl, workload.osl) == (8192, 1024) {
                perfmodel::fit::builtin_rows()?
                    .iter()
                    .map(|r| (r.sku, r.tok_s_user, r.tok_s_gpu))
                    .collect()
            } else {
                Vec::new()
            };
        std::fs::write(
            path,
            svg::frontiers(
                &sweeps,
                best.as_ref(),
                &measured,
                "InferenceX",
                &model.name,
                workload,
            ),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let mut out = json!({
            "model": model.name,
            "sku": sku.as_str(),
            "isl": workload.isl,
            "osl": workload.osl,
            "gpus": args.gpus,
            "slo": slo,
            "evaluated": sweep.evaluated,
            "best": best.map(|p| point_json(&p, &sweep)),
            "frontier": search::frontier(&sweep.points).iter().map(|p| point_json(p, &sweep)).collect::<Vec<_>>(),
        });
        if let Some(o) = &other {
            out["compare"] = compare_json(&sweep, o, &args.levels);
        }
        if args.explain {
            out["explain"] = serde_json::to_value(search::explain(&sweep, &slo))?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    println!(
        "{} on {}, ISL {} / OSL {}, budget {} GPUs{}",
        model.name,
        sku.hardware().name,
        workload.isl,
        workload.osl,
        args.gpus,
        slo_text(&slo)
    );
    match &best {
        Some(p) => print_best(p, &sweep),
        None => println!(
            "No recipe meets the SLO within {} GPUs (run with --explain for why).",
            args.gpus
        ),
    }
    if let Some(o) = &other {
        print_compare(&sweep, o, &args.levels);
    }
    if args.explain {
        println!("\nShapes considered (best first):");
        for v in search::explain(&sweep, &slo) {
            println!("  {:<14} {}", v.shape.to_string(), v.reason);
        }
    }
    if let Some(path) = &args.plot {
        println!("\nFrontier plot written to {}", path.display());
    }
    Ok(())
}

fn slo_text(slo: &Slo) -> String {
    let mut parts = Vec::new();
    if let Some(v) = slo.min_tok_s_user {
        parts.push(format!(">= {v} tok/s/user"));
    }
    if let Some(v) = slo.max_tpot_ms {
        parts.push(format!("TPOT <= {v} ms"));
    }
    if let Some(v) = slo.max_ttft_ms {
        parts.push(format!("TTFT <= {v} ms"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(", SLO {}", parts.join(", "))
    }
}

fn recipe_text(r: &Recipe) -> String {
    format!(
        "{} x prefill {} ({} GPUs) + {} x decode {} ({} GPUs), concurrency {}",
        r.prefill_workers,
        r.prefill,
        r.prefill_gpus(),
        r.decode_workers,
        r.decode,
        r.decode_gpus(),
        r.concurrency
    )
}

fn memory_text(m: &MemoryFit) -> String {
    let b = &m.breakdown;
    let gb = |v: f64| v / 1e9;
    let limit = match m.shape.role {
        perfmodel::Role::Prefill => format!("token budget {}", m.max_token_budget),
        perfmodel::Role::Decode => format!("up to {} requests", m.max_batch),
    };
    format!(
        "{:<13} weights {:>6.1} GB + KV {:>5.1} GB + activations {:>5.1} GB + reserve {:>3.0} GB = {:>6.1} of {:.0} GB; {} (limited by {})",
        m.shape.to_string(),
        gb(b.weights),
        gb(b.kv_cache),
        gb(b.activations),
        gb(b.reserve),
        gb(b.total()),
        gb(m.capacity),
        limit,
        serde_json::to_value(m.limiting)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    )
}

fn shape_fit(sweep: &Sweep, role: perfmodel::Role, par: Parallelism) -> Option<&MemoryFit> {
    sweep
        .shapes
        .iter()
        .find(|m| m.shape.role == role && m.shape.parallelism == par)
}

fn print_best(p: &Point, sweep: &Sweep) {
    let f = &p.figures;
    println!(
        "Best recipe: {} -> {} GPUs",
        recipe_text(&p.recipe),
        p.recipe.gpus()
    );
    println!(
        "  tok/s/GPU {:.0}   tok/s/user {:.1}   TPOT {:.1} ms   TTFT {:.0} ms   $/Mtok {:.3}   bound by {}",
        f.tok_s_gpu,
        f.tok_s_user,
        f.tpot_ms,
        f.ttft_ms,
        f.usd_per_mtok,
        serde_json::to_value(f.bottleneck)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    println!("Memory per GPU:");
    for (role, par) in [
        (perfmodel::Role::Prefill, p.recipe.prefill),
        (perfmodel::Role::Decode, p.recipe.decode),
    ] {
        if let Some(m) = shape_fit(sweep, role, par) {
            println!("  {}", memory_text(m));
        }
    }
}

fn point_json(p: &Point, sweep: &Sweep) -> Value {
    let r = &p.recipe;
    let f = &p.figures;
    json!({
        "prefill_workers": r.prefill_workers,
        "prefill_tp": r.prefill.gpus(),
        "prefill_gpus": r.prefill_gpus(),
        "decode_workers": r.decode_workers,
        "decode_shape": r.decode.to_string(),
        "decode_ep": match r.decode { Parallelism::Ep(e) => e, Parallelism::Tp(_) => 1 },
        "decode_gpus": r.decode_gpus(),
        "concurrency": r.concurrency,
        "gpus": r.gpus(),
        "fits": true,
        "tok_s_gpu": f.tok_s_gpu,
        "tok_s_user": f.tok_s_user,
        "tpot_ms": f.tpot_ms,
        "ttft_ms": f.ttft_ms,
        "usd_per_mtok": f.usd_per_mtok,
        "bottleneck": f.bottleneck,
        "memory": {
            "prefill": shape_fit(sweep, perfmodel::Role::Prefill, r.prefill),
            "decode": shape_fit(sweep, perfmodel::Role::Decode, r.decode),
        },
    })
}

fn compare_json(base: &Sweep, other: &Sweep, levels: &[f64]) -> Value {
    let rows: Vec<Value> = search::compare(base, other, levels)
        .iter()
        .map(|c| {
            let mut o = json!({
                "tok_s_user": c.tok_s_user,
                "throughput_ratio": c.throughput_ratio,
                "cost_ratio": c.cost_ratio,
            });
            o[base.sku.as_str()] = serde_json::to_value(c.base).unwrap_or(Value::Null);
            o[other.sku.as_str()] = serde_json::to_value(c.other).unwrap_or(Value::Null);
            o
        })
        .collect();
    Value::Array(rows)
}

fn print_compare(base: &Sweep, other: &Sweep, levels: &[f64]) {
    let (a, b) = (base.sku.as_str(), other.sku.as_str());
    println!("\nIso-interactivity comparison ({a} vs {b}; ratios are {a} / {b}):");
    println!(
        "{:>10} {:>14} {:>14} {:>12} {:>12} {:>10} {:>10}",
        "tok/s/user",
        format!("{a} tok/s/GPU"),
        format!("{b} tok/s/GPU"),
        format!("{a} $/Mtok"),
        format!("{b} $/Mtok"),
        "tput ratio",
        "cost ratio"
    );
    let cell = |v: Option<f64>, prec: usize| {
        v.map_or_else(|| "unreachable".to_string(), |v| format!("{v:.prec$}"))
    };
    for c in search::compare(base, other, levels) {
        println!(
            "{:>10} {:>14} {:>14} {:>12} {:>12} {:>10} {:>10}",
            c.tok_s_user,
            cell(c.base.map(|x| x.tok_s_gpu), 0),
            cell(c.other.map(|x| x.tok_s_gpu), 0),
            cell(c.base.map(|x| x.usd_per_mtok), 3),
            cell(c.other.map(|x| x.usd_per_mtok), 3),
            cell(c.throughput_ratio, 2),
            cell(c.cost_ratio, 2)
        );
    }
}

fn evaluate_one(
    args: &PlanArgs,
    model: &ModelProfile,
    sku: Sku,
    workload: Workload,
    cal: Calibration,
) -> Result<()> {
    let (Some(pg), Some(ptp), Some(dg), Some(dep), Some(c)) = (
        args.prefill_gpus,
        args.prefill_tp,
        args.decode_gpus,
        args.decode_ep,
        args.concurrency,
    ) else {
        bail!(
            "evaluate mode needs --prefill-gpus, --prefill-tp, --decode-gpus, --decode-ep and --concurrency"
        );
    };
    let row = MeasuredRow {
        sku,
        concurrency: c,
        prefill_gpus: pg,
        prefill_tp: ptp,
        decode_gpus: dg,
        decode_ep: dep,
        tok_s_gpu: 0.0,
        tok_s_user: 0.0,
        tpot_ms: 0.0,
    };
    let recipe = row.recipe(model, workload)?;
    let hw = sku.hardware();
    for (shape, what) in [
        (perfmodel::WorkerShape::prefill_tp(ptp), "prefill"),
        (
            perfmodel::WorkerShape {
                role: perfmodel::Role::Decode,
                parallelism: recipe.decode,
            },
            "decode",
        ),
    ] {
        shape
            .validate(model, &hw)
            .with_context(|| format!("{what} shape"))?;
    }
    let eval = Evaluator::new(model, hw, workload, cal).evaluate(recipe);
    if args.json {
        let f = eval.figures;
        let out = json!({
            "sku": sku.as_str(),
            "concurrency": c,
            "prefill_gpus": pg,
            "prefill_tp": ptp,
            "decode_gpus": dg,
            "decode_ep": dep,
            "decode_shape": recipe.decode.to_string(),
            "fits": eval.fits,
            "reason": eval.reason,
            "tok_s_gpu": f.map(|f| f.tok_s_gpu),
            "tok_s_user": f.map(|f| f.tok_s_user),
            "tpot_ms": f.map(|f| f.tpot_ms),
            "ttft_ms": f.map(|f| f.ttft_ms),
            "usd_per_mtok": f.map(|f| f.usd_per_mtok),
            "bottleneck": f.map(|f| f.bottleneck),
            "memory": {"prefill": eval.prefill_memory, "decode": eval.decode_memory},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{} on {}: {}", model.name, hw.name, recipe_text(&recipe));
    if dep <= 1 {
        println!(
            "  (decode_ep=1 read as TP-only decode workers of TP{}, the smallest TP that holds the model)",
            tp_only_decode_width(model, sku, workload)?
        );
    }
    match eval.figures {
        Some(f) => println!(
            "  tok/s/GPU {:.1}   tok/s/user {:.2}   TPOT {:.2} ms   TTFT {:.0} ms   $/Mtok {:.3}",
            f.tok_s_gpu, f.tok_s_user, f.tpot_ms, f.ttft_ms, f.usd_per_mtok
        ),
        None => println!("  does not fit: {}", eval.reason.unwrap_or_default()),
    }
    println!("Memory per GPU:");
    println!("  {}", memory_text(&eval.prefill_memory));
    println!("  {}", memory_text(&eval.decode_memory));
    Ok(())
}
