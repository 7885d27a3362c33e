//! The planner edge: a `ModelDeployment` spec in, a recipe with predicted
//! figures out, through `perfmodel`. Pure (no API calls); the expensive
//! sweep runs only when the spec generation changes.

use perfmodel::search::{self, Slo};
use perfmodel::{Calibration, Evaluator, ModelProfile, Parallelism, Recipe, Sku, Workload};

use crate::crd::{ModelDeploymentSpec, Pool, PredictedFigures, RecipeMode, RecipeStatus, SkuName};
use crate::error::{Error, Result};

/// One worker the recipe asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    pub name: String,
    pub role: Pool,
    pub gpus: u32,
}

/// A recipe in force and the workers it implies.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub recipe: RecipeStatus,
    pub workers: Vec<WorkerPlan>,
    /// Something the user should know (e.g. an explicit recipe misses its SLO).
    pub note: Option<String>,
}

pub(crate) fn sku(name: SkuName) -> Sku {
    match name {
        SkuName::Gb200 => Sku::Gb200,
        SkuName::Gb300 => Sku::Gb300,
    }
}

pub(crate) fn slo(spec: &ModelDeploymentSpec) -> Slo {
    Slo {
        min_tok_s_user: spec.slo.min_tokens_per_second_per_user,
        max_tpot_ms: spec.slo.max_tpot_ms,
        max_ttft_ms: spec.slo.max_ttft_ms,
    }
}

/// Plans the recipe for `spec`.
pub fn plan(spec: &ModelDeploymentSpec) -> Result<Plan> {
    let model = ModelProfile::builtin(spec.model.profile.as_str())?;
    let sku = sku(spec.hardware.sku);
    let workload = Workload {
        isl: spec.workload.isl,
        osl: spec.workload.osl,
    };
    let cal = Calibration::fitted();
    let slo = slo(spec);
    let (recipe, figures, source, note) = match spec.recipe.mode {
        RecipeMode::Auto => {
            let sweep = search::sweep(&model, sku, workload, spec.hardware.gpu_budget, cal)?;
            let best = search::best(&sweep.points, &slo).ok_or_else(|| {
                let reach = sweep.points.iter().map(|p| p.figures.tok_s_user).fold(0.0, f64::max);
                Error::NoRecipe(format!(
                    "within {} {} GPUs the fastest recipe reaches {reach:.1} tok/s/user; relax the SLO or raise hardware.gpuBudget",
                    spec.hardware.gpu_budget,
                    sku
                ))
            })?;
            let mut recipe = best.recipe;
            if let Some(cap) = spec.recipe.max_concurrency {
                recipe.concurrency = recipe.concurrency.min(cap);
            }
            (recipe, Some(best.figures), "planner", None)
        }
        RecipeMode::Explicit => {
            let (Some(p), Some(d)) = (&spec.recipe.prefill, &spec.recipe.decode) else {
                return Err(Error::Invalid(
                    "recipe.mode explicit needs recipe.prefill and recipe.decode".into(),
                ));
            };
            let decode = match (d.ep, d.tp) {
                (Some(ep), None) => Parallelism::Ep(ep),
                (None, Some(tp)) => Parallelism::Tp(tp),
                _ => {
                    return Err(Error::Invalid(
                        "set exactly one of recipe.decode.ep and recipe.decode.tp".into(),
                    ));
                }
            };
            let eval = Evaluator::new(&model, sku.hardware(), workload, cal);
            let decode_pool = eval.decode_pool(decode);
            let default_concurrency = (decode_pool.memory.max_batch * d.workers).max(1);
            let recipe = Recipe {
                prefill_workers: p.workers,
                prefill: Parallelism::Tp(p.tp),
                decode_workers: d.workers,
                decode,
                concurrency: spec.recipe.max_concurrency.unwrap_or(default_concurrency),
            };
            let evaluation = eval.evaluate(recipe);
            let Some(figures) = evaluation.figures else {
                return Err(Error::DoesNotFit(evaluation.reason.unwrap_or_default()));
            };
            let note = (!slo.admits(&figures)).then(|| {
                format!(
                    "explicit recipe predicted at {:.1} tok/s/user, TPOT {:.1} ms, TTFT {:.0} ms: outside the SLO",
                    figures.tok_s_user, figures.tpot_ms, figures.ttft_ms
                )
            });
            (recipe, Some(figures), "spec", note)
        }
    };
    if recipe.gpus() > spec.hardware.gpu_budget {
        return Err(Error::Invalid(format!(
            "the recipe needs {} GPUs, more than hardware.gpuBudget {}",
            recipe.gpus(),
            spec.hardware.gpu_budget
        )));
    }
    let mut workers = Vec::new();
    for i in 0..recipe.prefill_workers {
        workers.push(WorkerPlan {
            name: format!("prefill-{i}"),
            role: Pool::Prefill,
            gpus: recipe.prefill.gpus(),
        });
    }
    for i in 0..recipe.decode_workers {
        workers.push(WorkerPlan {
            name: format!("decode-{i}"),
            role: Pool::Decode,
            gpus: recipe.decode.gpus(),
        });
    }
    let (decode_ep, decode_tp) = match recipe.decode {
        Parallelism::Ep(e) => (Some(e), None),
        Parallelism::Tp(t) => (None, Some(t)),
    };
    Ok(Plan {
        recipe: RecipeStatus {
            prefill: format!("{}x{}", recipe.prefill_workers, recipe.prefill),
            decode: format!("{}x{}", recipe.decode_workers, recipe.decode),
            prefill_workers: recipe.prefill_workers,
            prefill_tp: recipe.prefill.gpus(),
            decode_workers: recipe.decode_workers,
            decode_ep,
            decode_tp,
            concurrency: recipe.concurrency,
            gpus: recipe.gpus(),
            source: source.to_string(),
            predicted: figures.map(|f| PredictedFigures {
                tok_s_per_gpu: f.tok_s_gpu.round() as i64,
                tok_s_per_user: (f.tok_s_user * 100.0).round() / 100.0,
                tpot_ms: (f.tpot_ms * 100.0).round() / 100.0,
                ttft_ms: f.ttft_ms.round(),
                usd_per_mtok: (f.usd_per_mtok * 1e4).round() / 1e4,
            }),
        },
        workers,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;

    fn spec(yaml: &str) -> ModelDeploymentSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    const AUTO: &str = r#"
model: {name: deepseek-ai/DeepSeek-V4-Pro, profile: deepseek-v4-pro}
hardware: {sku: gb300, gpuBudget: 72}
workload: {isl: 8192, osl: 1024}
slo: {minTokensPerSecondPerUser: 27}
recipe: {mode: auto}
"#;

    #[test]
    fn auto_picks_the_best_recipe_within_budget_and_slo() {
        let p = plan(&spec(AUTO)).unwrap();
        let pred = p.recipe.predicted.clone().unwrap();
        assert!(pred.tok_s_per_user >= 27.0);
        assert!(p.recipe.gpus <= 72);
        assert_eq!(p.recipe.source, "planner");
        let gpus: u32 = p.workers.iter().map(|w| w.gpus).sum();
        assert_eq!(gpus, p.recipe.gpus);
        assert_eq!(
            p.workers.iter().filter(|w| w.role == Pool::Prefill).count() as u32,
            p.recipe.prefill_workers
        );
    }

    #[test]
    fn unreachable_slo_and_oversized_shapes_are_permanent_errors() {
        let mut s = spec(AUTO);
        s.slo.min_tokens_per_second_per_user = Some(500.0);
        let e = plan(&s).unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("tok/s/user"),
            "{e}"
        );

        let explicit = AUTO.replace("sku: gb300", "sku: gb200").replace(
            "recipe: {mode: auto}",
            "recipe: {mode: explicit, prefill: {workers: 1, tp: 4}, decode: {workers: 1, ep: 8}}",
        );
        let e = plan(&spec(&explicit)).unwrap_err();
        assert_eq!(e.reason(), "DoesNotFitInHbm");
        assert!(e.to_string().contains("weights"), "{e}");
    }

    #[test]
    fn explicit_recipe_is_kept_and_predicted() {
        let explicit = AUTO.replace(
            "recipe: {mode: auto}",
            "recipe: {mode: explicit, prefill: {workers: 2, tp: 8}, decode: {workers: 1, ep: 8}, maxConcurrency: 4096}",
        );
        let p = plan(&spec(&explicit)).unwrap();
        assert_eq!(
            (p.recipe.prefill.as_str(), p.recipe.decode.as_str()),
            ("2xTP8", "1xDEP8")
        );
        assert_eq!(p.recipe.concurrency, 4096);
        assert_eq!(p.recipe.gpus, 24);
        // InferenceX measured 10,214 tok/s/GPU for this recipe; the fit is within 25%.
        let tok = p.recipe.predicted.unwrap().tok_s_per_gpu as f64;
        assert!((tok / 10214.0 - 1.0).abs() < 0.25, "{tok}");
        assert!(
            p.note.is_some(),
            "17.6 tok/s/user misses a 27 tok/s/user SLO"
        );
    }
}
