//! The `make run` summary: per deployment, the recipe in force, what the
//! performance model predicts for it at the bench's workload and
//! concurrency, and what `rackscale bench` measured through the real
//! processes, converted from wall time to modelled time.
//!
//! The engines run modelled GPU time `S` times faster than the wall clock
//! (`--time-scale` / `RACKSCALE_ENGINE_TIME_SCALE`: modelled seconds per
//! wall second), so a modelled latency is the wall latency x S and a
//! modelled rate is the wall rate / S. Pure: JSON in, figures and text out.

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use perfmodel::{Calibration, Evaluator, ModelProfile, Parallelism, Recipe, Sku, Workload};
use serde_json::Value;

/// The recipe of a deployment as its status records it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeView {
    /// e.g. `1xTP4 + 1xDEP16`.
    pub label: String,
    pub recipe: Recipe,
    pub gpus: u32,
    /// The planner's figures at the recipe's own concurrency and workload.
    pub planned: Option<Value>,
}

/// Reads `status.recipe` of a deployment from `/status`.
pub fn recipe_of(deployment: &Value) -> Result<RecipeView> {
    let r = &deployment["status"]["recipe"];
    let num = |field: &str| -> Result<u32> {
        r[field]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .with_context(|| format!("status.recipe.{field} missing"))
    };
    let decode = match (r["decodeEp"].as_u64(), r["decodeTp"].as_u64()) {
        (Some(ep), _) => Parallelism::Ep(u32::try_from(ep)?),
        (None, Some(tp)) => Parallelism::Tp(u32::try_from(tp)?),
        (None, None) => bail!("status.recipe has neither decodeEp nor decodeTp"),
    };
    let recipe = Recipe {
        prefill_workers: num("prefillWorkers")?,
        prefill: Parallelism::Tp(num("prefillTp")?),
        decode_workers: num("decodeWorkers")?,
        decode,
        concurrency: num("concurrency")?,
    };
    Ok(RecipeView {
        label: format!(
            "{} + {}",
            r["prefill"].as_str().unwrap_or("?"),
            r["decode"].as_str().unwrap_or("?")
        ),
        gpus: num("gpus")?,
        recipe,
        planned: r.get("predicted").cloned(),
    })
}

/// InferenceX figures of one point, in modelled time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub tok_s_gpu: f64,
    pub tok_s_user: f64,
    pub ttft_ms: f64,
    pub tpot_ms: f64,
    pub usd_per_mtok: f64,
}

/// perfmodel's figures for `recipe` at `concurrency` and `workload`.
pub fn predict(
    profile: &str,
    sku: Sku,
    recipe: Recipe,
    workload: Workload,
    concurrency: u32,
) -> Result<Point> {
    let model = ModelProfile::builtin(profile)?;
    let eval = Evaluator::new(&model, sku.hardware(), workload, Calibration::fitted());
    let evaluation = eval.evaluate(Recipe {
        concurrency,
        ..recipe
    });
    let f = evaluation.figures.with_context(|| {
        format!(
            "perfmodel: the recipe does not fit: {}",
            evaluation.reason.unwrap_or_default()
        )
    })?;
    Ok(Point {
        tok_s_gpu: f.tok_s_gpu,
        tok_s_user: f.tok_s_user,
        ttft_ms: f.ttft_ms,
        tpot_ms: f.tpot_ms,
        usd_per_mtok: f.usd_per_mtok,
    })
}

/// What a bench measured, converted to modelled time with `time_scale`
/// (modelled seconds per wall second). $/M tokens prices the modelled
/// total tok/s/GPU at the SKU's TCO per GPU-hour, as perfmodel does.
pub fn measured(report: &Value, time_scale: f64, sku: Sku) -> Result<Point> {
    let ok = report["successful"].as_u64().unwrap_or(0);
    if ok == 0 {
        bail!("the bench completed no request: {}", report["failures"]);
    }
    let p50 = |field: &str| -> Result<f64> {
        report[field]["p50"]
            .as_f64()
            .with_context(|| format!("bench report without {field}.p50"))
    };
    let wall_tok_s_gpu = report["total_tokens_per_s_per_gpu"]
        .as_f64()
        .context("bench report without total_tokens_per_s_per_gpu")?;
    let tok_s_gpu = wall_tok_s_gpu / time_scale;
    let tpot_ms = p50("tpot_ms")? * time_scale;
    Ok(Point {
        tok_s_gpu,
        tok_s_user: 1000.0 / tpot_ms,
        ttft_ms: p50("ttft_ms")? * time_scale,
        tpot_ms,
        usd_per_mtok: sku.hardware().tco_usd_per_gpu_hour * 1e6 / (3600.0 * tok_s_gpu.max(1e-9)),
    })
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub deployment: String,
    pub sku: Sku,
    pub recipe: String,
    pub gpus: u32,
    pub concurrency: u32,
    pub predicted: Point,
    pub measured: Point,
    /// Measured requests that failed.
    pub failed: u64,
}

/// The table: predicted vs measured and their ratio per figure.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:<6} {:<20} {:>4} {:>5} | {:>22} | {:>20} | {:>16} | {:>18} | {:>14}",
        "deployment",
        "sku",
        "recipe",
        "GPUs",
        "conc",
        "tok/s/GPU pred/meas",
        "tok/s/user pred/meas",
        "TTFT ms p50",
        "TPOT ms p50",
        "$/M tok"
    );
    for r in rows {
        let (p, m) = (&r.predicted, &r.measured);
        let _ = writeln!(
            out,
            "{:<34} {:<6} {:<20} {:>4} {:>5} | {:>7.0} {:>7.0} {:>5.2}x | {:>6.1} {:>6.1} {:>5.2}x | {:>7.0} {:>7.0} | {:>6.1} {:>6.1} {:>4.2}x | {:>6.3} {:>6.3}",
            r.deployment,
            format!("{:?}", r.sku).to_lowercase(),
            r.recipe,
            r.gpus,
            r.concurrency,
            p.tok_s_gpu,
            m.tok_s_gpu,
            m.tok_s_gpu / p.tok_s_gpu,
            p.tok_s_user,
            m.tok_s_user,
            m.tok_s_user / p.tok_s_user,
            p.ttft_ms,
            m.ttft_ms,
            p.tpot_ms,
            m.tpot_ms,
            m.tpot_ms / p.tpot_ms,
            p.usd_per_mtok,
            m.usd_per_mtok,
        );
        if r.failed > 0 {
            let _ = writeln!(out, "  ({} measured requests failed)", r.failed);
        }
    }
    out.push_str("ratios are measured / predicted; measured figures are wall-clock figures converted to modelled time by the engines' time scale\n");
    out
}

/// How far a measured figure may sit from perfmodel's before the
/// orchestration counts as losing what the recipe offers.
pub const TOLERANCE: f64 = 0.10;

/// The table as Markdown, with a verdict per row: tok/s/GPU and tok/s/user
/// within [`TOLERANCE`] of predicted.
pub fn markdown(title: &str, rows: &[Row]) -> String {
    let mut out = format!(
        "{title}\n\n| deployment | recipe | GPUs | conc | tok/s/GPU pred | meas | ratio | tok/s/user pred | meas | ratio | TTFT ms pred | meas | TPOT ms pred | meas | within {:.0}% |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        TOLERANCE * 100.0
    );
    for r in rows {
        let (p, m) = (&r.predicted, &r.measured);
        let (gpu, user) = (m.tok_s_gpu / p.tok_s_gpu, m.tok_s_user / p.tok_s_user);
        let ok = (gpu - 1.0).abs() <= TOLERANCE && (user - 1.0).abs() <= TOLERANCE && r.failed == 0;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {gpu:.2} | {:.1} | {:.1} | {user:.2} | {:.0} | {:.0} | {:.1} | {:.1} | {} |",
            r.deployment,
            r.recipe,
            r.gpus,
            r.concurrency,
            p.tok_s_gpu,
            m.tok_s_gpu,
            p.tok_s_user,
            m.tok_s_user,
            p.ttft_ms,
            m.ttft_ms,
            p.tpot_ms,
            m.tpot_ms,
            if ok { "yes" } else { "**no**" },
        );
    }
    out
}

/// The planner's own figures per deployment: at the recipe's planned
/// concurrency and the spec's workload (the SLO it was chosen for), from
/// `status.recipe.predicted`.
pub fn planned_table(deployments: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:<6} {:<20} {:>4} {:>11} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "deployment",
        "sku",
        "recipe",
        "GPUs",
        "ISL/OSL",
        "conc",
        "tok/s/GPU",
        "tok/s/user",
        "TTFT ms",
        "TPOT ms",
        "$/M tok"
    );
    for d in deployments {
        let (spec, r) = (&d["spec"], &d["status"]["recipe"]);
        let p = &r["predicted"];
        let f = |v: &Value, digits: usize| {
            v.as_f64()
                .map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
        };
        let _ = writeln!(
            out,
            "{:<34} {:<6} {:<20} {:>4} {:>11} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8}",
            format!(
                "{}/{}",
                d["namespace"].as_str().unwrap_or(""),
                d["name"].as_str().unwrap_or("")
            ),
            spec["hardware"]["sku"].as_str().unwrap_or(""),
            format!(
                "{} + {}",
                r["prefill"].as_str().unwrap_or("?"),
                r["decode"].as_str().unwrap_or("?")
            ),
            r["gpus"].to_string(),
            format!("{}/{}", spec["workload"]["isl"], spec["workload"]["osl"]),
            r["concurrency"].to_string(),
            f(&p["tokSPerGpu"], 0),
            f(&p["tokSPerUser"], 1),
            f(&p["ttftMs"], 0),
            f(&p["tpotMs"], 1),
            f(&p["usdPerMtok"], 3),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn wall_figures_become_modelled_ones_by_the_time_scale() {
        let report = json!({
            "successful": 10,
            "total_tokens_per_s_per_gpu": 200_000.0,
            "ttft_ms": {"p50": 5.0},
            "tpot_ms": {"p50": 0.25},
        });
        let m = measured(&report, 100.0, Sku::Gb300).unwrap();
        assert!((m.tok_s_gpu - 2000.0).abs() < 1e-9);
        assert!((m.tpot_ms - 25.0).abs() < 1e-9);
        assert!((m.tok_s_user - 40.0).abs() < 1e-9);
        assert!((m.ttft_ms - 500.0).abs() < 1e-9);
        let tco = Sku::Gb300.hardware().tco_usd_per_gpu_hour;
        assert!((m.usd_per_mtok - tco * 1e6 / (3600.0 * 2000.0)).abs() < 1e-9);
        let none = json!({"successful": 0, "failures": []});
        assert!(measured(&none, 100.0, Sku::Gb300).is_err());
    }

    #[test]
    fn the_recorded_recipe_is_evaluated_at_the_bench_concurrency() {
        let md = json!({"status": {"recipe": {
            "prefill": "1xTP8", "decode": "1xDEP8", "prefillWorkers": 1, "prefillTp": 8,
            "decodeWorkers": 1, "decodeEp": 8, "concurrency": 512, "gpus": 16, "source": "spec"
        }}});
        let view = recipe_of(&md).unwrap();
        assert_eq!(view.label, "1xTP8 + 1xDEP8");
        assert_eq!(view.gpus, 16);
        let wl = Workload {
            isl: 1024,
            osl: 128,
        };
        let low = predict("deepseek-v4-pro", Sku::Gb200, view.recipe, wl, 8).unwrap();
        let high = predict("deepseek-v4-pro", Sku::Gb200, view.recipe, wl, 256).unwrap();
        assert!(low.tok_s_user > high.tok_s_user, "{low:?} {high:?}");
        assert!(low.tok_s_gpu < high.tok_s_gpu, "{low:?} {high:?}");
        let text = table(&[Row {
            deployment: "default/x".into(),
            sku: Sku::Gb200,
            recipe: view.label,
            gpus: 16,
            concurrency: 8,
            predicted: low,
            measured: low,
            failed: 0,
        }]);
        assert!(text.contains("1.00x"), "{text}");
        let row = Row {
            deployment: "default/x".into(),
            sku: Sku::Gb200,
            recipe: "r".into(),
            gpus: 16,
            concurrency: 8,
            predicted: low,
            measured: low,
            failed: 0,
        };
        let slow = Row {
            measured: Point {
                tok_s_gpu: low.tok_s_gpu * 0.85,
                ..low
            },
            ..row.clone()
        };
        let md = markdown("t", &[row, slow]);
        assert!(md.contains("| yes |") && md.contains("| **no** |"), "{md}");
    }
}
