//! Recipe search: enumerate the recipes that fit a GPU budget, keep the
//! Pareto frontier of tok/s/GPU against tok/s/user, read it at given
//! interactivity levels, compare SKUs, and pick the best recipe for an SLO.
//!
//! The space: prefill TP in {4, 8}; decode as TP-only (the smallest TP that
//! holds the model, the CSV's `decode_ep=1`) or DEP in {4, 8, 16, 32, 64};
//! every worker count that fits the budget (all counts up to 16, then steps of
//! about 25%); concurrency on a half-octave grid. Shapes wider than an NVLink
//! domain or whose EP does not divide the experts are skipped with a reason.

use serde::Serialize;

use crate::calibration::Calibration;
use crate::fit::tp_only_decode_width;
use crate::hardware::Sku;
use crate::memory::MemoryFit;
use crate::model::ModelProfile;
use crate::recipe::{Bottleneck, Evaluator, Figures, Recipe, Workload};
use crate::shape::{Parallelism, WorkerShape};
use crate::{Error, Result};

/// Prefill TP widths considered.
pub const PREFILL_TPS: [u32; 2] = [4, 8];
/// Decode EP widths considered besides TP-only decode.
pub const DECODE_EPS: [u32; 5] = [4, 8, 16, 32, 64];

/// A service-level objective a recipe must meet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub min_tok_s_user: Option<f64>,
    pub max_tpot_ms: Option<f64>,
    pub max_ttft_ms: Option<f64>,
}

impl Slo {
    pub fn admits(&self, f: &Figures) -> bool {
        self.min_tok_s_user.is_none_or(|m| f.tok_s_user >= m)
            && self.max_tpot_ms.is_none_or(|m| f.tpot_ms <= m)
            && self.max_ttft_ms.is_none_or(|m| f.ttft_ms <= m)
    }
}

/// One evaluated recipe that fits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub recipe: Recipe,
    pub figures: Figures,
}

/// A worker shape the search could not use, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejected {
    pub shape: WorkerShape,
    pub reason: String,
    pub memory: Option<MemoryFit>,
}

/// Everything one sweep found for one SKU.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub sku: Sku,
    pub model: String,
    pub workload: Workload,
    pub gpu_budget: u32,
    pub evaluated: usize,
    pub points: Vec<Point>,
    pub rejected: Vec<Rejected>,
    /// Memory fits of the shapes that were used.
    pub shapes: Vec<MemoryFit>,
}

/// Worker counts tried for a pool that may hold up to `max` workers.
fn counts(max: u32) -> Vec<u32> {
    let mut out: Vec<u32> = (1..=max.min(16)).collect();
    let mut n = 16.0_f64;
    loop {
        n = (n * 1.25).ceil();
        if n > f64::from(max) {
            break;
        }
        out.push(n as u32);
    }
    if max > 16 && out.last() != Some(&max) {
        out.push(max);
    }
    out
}

/// Concurrency levels on a half-octave grid up to `max`.
fn concurrencies(max: u32) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for half_octave in 0..64 {
        let v = 2f64.powf(f64::from(half_octave) / 2.0).round() as u32;
        if v > max {
            break;
        }
        if out.last() != Some(&v) {
            out.push(v);
        }
    }
    out
}

/// Enumerates and evaluates every recipe within `gpu_budget` GPUs.
pub fn sweep(
    model: &ModelProfile,
    sku: Sku,
    workload: Workload,
    gpu_budget: u32,
    cal: Calibration,
) -> Result<Sweep> {
    if gpu_budget < 2 {
        return Err(Error::InvalidRequest(format!(
            "a GPU budget of {gpu_budget} cannot hold a prefill and a decode worker"
        )));
    }
    if workload.isl == 0 || workload.osl == 0 {
        return Err(Error::InvalidRequest("ISL and OSL must be positive".into()));
    }
    let hw = sku.hardware();
    let eval = Evaluator::new(model, hw, workload, cal);
    let mut rejected = Vec::new();
    let mut shapes = Vec::new();

    let mut prefills = Vec::new();
    for tp in PREFILL_TPS {
        let shape = WorkerShape::prefill_tp(tp);
        if let Err(e) = shape.validate(model, &hw) {
            rejected.push(Rejected {
                shape,
                reason: e.to_string(),
                memory: None,
            });
            continue;
        }
        let pool = eval.prefill_pool(tp);
        match &pool.memory.reason {
            Some(r) => rejected.push(Rejected {
                shape,
                reason: r.clone(),
                memory: Some(pool.memory.clone()),
            }),
            None => {
                shapes.push(pool.memory.clone());
                prefills.push((tp, pool));
            }
        }
    }

    let mut decode_shapes = Vec::new();
    match tp_only_decode_width(model, sku, workload) {
        Ok(t) => decode_shapes.push(Parallelism::Tp(t)),
        Err(e) => rejected.push(Rejected {
            shape: WorkerShape::decode_tp(hw.gpus_per_domain),
            reason: e.to_string(),
            memory: None,
        }),
    }
    decode_shapes.extend(DECODE_EPS.map(Parallelism::Ep));
    let mut decodes = Vec::new();
    for par in decode_shapes {
        let shape = WorkerShape {
            role: crate::shape::Role::Decode,
            parallelism: par,
        };
        if let Err(e) = shape.validate(model, &hw) {
            rejected.push(Rejected {
                shape,
                reason: e.to_string(),
                memory: None,
            });
            continue;
        }
        let pool = eval.decode_pool(par);
        match &pool.memory.reason {
            Some(r) => rejected.push(Rejected {
                shape,
                reason: r.clone(),
                memory: Some(pool.memory.clone()),
            }),
            None => {
                shapes.push(pool.memory.clone());
                decodes.push((par, pool));
            }
        }
    }

    let mut points = Vec::new();
    let mut evaluated = 0;
    for (tp, prefill) in &prefills {
        for np in counts(gpu_budget / tp) {
            let left = gpu_budget - np * tp;
            for (par, decode) in &decodes {
                for nd in counts(left / par.gpus()) {
                    if nd == 0 {
                        continue;
                    }
                    let cap = 2 * nd * decode.memory.max_batch + 64 * np;
                    for c in concurrencies(cap) {
                        let recipe = Recipe {
                            prefill_workers: np,
                            prefill: Parallelism::Tp(*tp),
                            decode_workers: nd,
                            decode: *par,
                            concurrency: c,
                        };
                        evaluated += 1;
                        let Some(figures) = eval.evaluate_pools(prefill, decode, recipe).figures
                        else {
                            break;
                        };
                        points.push(Point { recipe, figures });
                        // Past saturation more clients only lengthen queues:
                        // throughput and TPOT stay, TTFT grows without bound.
                        if figures.bottleneck != Bottleneck::Concurrency {
                            break;
                        }
                    }
                }
            }
        }
    }
    Ok(Sweep {
        sku,
        model: model.name.clone(),
        workload,
        gpu_budget,
        evaluated,
        points,
        rejected,
        shapes,
    })
}

/// The Pareto frontier: no other point has both more tok/s/GPU and more
/// tok/s/user. Sorted by tok/s/user ascending (tok/s/GPU descending).
pub fn frontier(points: &[Point]) -> Vec<Point> {
    let mut sorted: Vec<Point> = points.to_vec();
    sorted.sort_by(|a, b| {
        b.figures
            .tok_s_user
            .total_cmp(&a.figures.tok_s_user)
            .then(b.figures.tok_s_gpu.total_cmp(&a.figures.tok_s_gpu))
    });
    let mut out: Vec<Point> = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for p in sorted {
        if p.figures.tok_s_gpu > best {
            best = p.figures.tok_s_gpu;
            out.push(p);
        }
    }
    out.reverse();
    out
}

/// Throughput and cost read off a frontier at one interactivity level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AtLevel {
    pub tok_s_gpu: f64,
    pub usd_per_mtok: f64,
}

/// Reads `frontier` at `tok_s_user`: linear between the neighbouring points;
/// below the frontier's range the highest-throughput point serves (it is
/// faster than asked); above it the level is unreachable (`None`).
pub fn at_level(frontier: &[Point], tok_s_user: f64, tco_usd_per_gpu_hour: f64) -> Option<AtLevel> {
    let last = frontier.last()?;
    if tok_s_user > last.figures.tok_s_user {
        return None;
    }
    let first = frontier.first()?;
    let tok = if tok_s_user <= first.figures.tok_s_user {
        first.figures.tok_s_gpu
    } else {
        let i = frontier
            .iter()
            .position(|p| p.figures.tok_s_user >= tok_s_user)?;
        let (a, b) = (&frontier[i - 1].figures, &frontier[i].figures);
        let t = (tok_s_user - a.tok_s_user) / (b.tok_s_user - a.tok_s_user);
        a.tok_s_gpu + t * (b.tok_s_gpu - a.tok_s_gpu)
    };
    Some(AtLevel {
        tok_s_gpu: tok,
        usd_per_mtok: tco_usd_per_gpu_hour * 1e6 / (3600.0 * tok),
    })
}

/// Two SKUs side by side at one interactivity level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LevelComparison {
    pub tok_s_user: f64,
    pub base: Option<AtLevel>,
    pub other: Option<AtLevel>,
    /// base tok/s/GPU divided by other tok/s/GPU (how many times faster
    /// per GPU the base SKU is).
    pub throughput_ratio: Option<f64>,
    /// base $/Mtok divided by other $/Mtok (below 1: the base is cheaper).
    pub cost_ratio: Option<f64>,
}

/// Compares two sweeps at each level, as the InferenceX article does.
pub fn compare(base: &Sweep, other: &Sweep, levels: &[f64]) -> Vec<LevelComparison> {
    let (fa, fb) = (frontier(&base.points), frontier(&other.points));
    let (ta, tb) = (
        base.sku.hardware().tco_usd_per_gpu_hour,
        other.sku.hardware().tco_usd_per_gpu_hour,
    );
    levels
        .iter()
        .map(|&level| {
            let a = at_level(&fa, level, ta);
            let b = at_level(&fb, level, tb);
            let both = a.zip(b);
            LevelComparison {
                tok_s_user: level,
                base: a,
                other: b,
                throughput_ratio: both.map(|(a, b)| a.tok_s_gpu / b.tok_s_gpu),
                cost_ratio: both.map(|(a, b)| a.usd_per_mtok / b.usd_per_mtok),
            }
        })
        .collect()
}

/// The recipe with the most tok/s/GPU that meets `slo`; ties go to fewer
/// GPUs, then fewer clients.
pub fn best(points: &[Point], slo: &Slo) -> Option<Point> {
    points
        .iter()
        .filter(|p| slo.admits(&p.figures))
        .copied()
        .max_by(|a, b| {
            a.figures
                .tok_s_gpu
                .total_cmp(&b.figures.tok_s_gpu)
                .then(b.recipe.gpus().cmp(&a.recipe.gpus()))
                .then(b.recipe.concurrency.cmp(&a.recipe.concurrency))
        })
}

/// Why a decode or prefill shape lost: it does not fit, or its best recipe
/// misses the SLO, or another shape beat it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShapeVerdict {
    pub shape: WorkerShape,
    pub best: Option<Point>,
    pub reason: String,
}

/// Explains, for every shape the search considered, its best recipe under
/// `slo` or why it has none.
pub fn explain(sweep: &Sweep, slo: &Slo) -> Vec<ShapeVerdict> {
    let mut out: Vec<ShapeVerdict> = sweep
        .rejected
        .iter()
        .map(|r| ShapeVerdict {
            shape: r.shape,
            best: None,
            reason: r.reason.clone(),
        })
        .collect();
    for fit in &sweep.shapes {
        let shape = fit.shape;
        let mine: Vec<Point> = sweep
            .points
            .iter()
            .filter(|p| match shape.role {
                crate::shape::Role::Prefill => p.recipe.prefill == shape.parallelism,
                crate::shape::Role::Decode => p.recipe.decode == shape.parallelism,
            })
            .copied()
            .collect();
        let verdict = match best(&mine, slo) {
            Some(p) => ShapeVerdict {
                shape,
                best: Some(p),
                reason: format!("best {:.0} tok/s/GPU within the SLO", p.figures.tok_s_gpu),
            },
            None => {
                let top = mine
                    .iter()
                    .map(|p| p.figures.tok_s_user)
                    .fold(0.0, f64::max);
                ShapeVerdict {
                    shape,
                    best: None,
                    reason: format!(
                        "fits, but no recipe meets the SLO (at most {top:.1} tok/s/user, TTFT and TPOT limits as given)"
                    ),
                }
            }
        };
        out.push(verdict);
    }
    out.sort_by(|a, b| {
        let t = |v: &ShapeVerdict| v.best.map_or(-1.0, |p| p.figures.tok_s_gpu);
        t(b).total_cmp(&t(a))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep_for(sku: Sku) -> Sweep {
        let m = ModelProfile::builtin("deepseek-v4-pro").unwrap();
        sweep(
            &m,
            sku,
            Workload {
                isl: 8192,
                osl: 1024,
            },
            72,
            Calibration::fitted(),
        )
        .unwrap()
    }

    #[test]
    fn counts_and_concurrency_grids() {
        assert_eq!(counts(3), vec![1, 2, 3]);
        let c = counts(100);
        assert_eq!(&c[..3], &[1, 2, 3]);
        assert_eq!(*c.last().unwrap(), 100);
        assert!(c.windows(2).all(|w| w[0] < w[1]));
        let q = concurrencies(64);
        assert_eq!(q.first(), Some(&1));
        assert!(q.contains(&64) && q.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn every_point_fits_the_budget_and_frontier_is_pareto() {
        let s = sweep_for(Sku::Gb300);
        assert!(!s.points.is_empty());
        assert!(s.points.iter().all(|p| p.recipe.gpus() <= 72));
        let f = frontier(&s.points);
        assert!(
            f.windows(2)
                .all(|w| w[0].figures.tok_s_user < w[1].figures.tok_s_user
                    && w[0].figures.tok_s_gpu > w[1].figures.tok_s_gpu)
        );
        // Every point is matched or beaten on both axes by a frontier point.
        for p in &s.points {
            assert!(
                f.iter()
                    .any(|q| q.figures.tok_s_user >= p.figures.tok_s_user
                        && q.figures.tok_s_gpu >= p.figures.tok_s_gpu)
            );
        }
    }

    #[test]
    fn gb300_beats_gb200_and_unlocks_narrow_shapes() {
        let (a, b) = (sweep_for(Sku::Gb200), sweep_for(Sku::Gb300));
        let cmp = compare(&b, &a, &[16.0, 27.0, 36.0, 1000.0]);
        for c in &cmp[..3] {
            assert!(c.throughput_ratio.unwrap() > 1.0, "{c:?}");
        }
        assert!(cmp[3].other.is_none() && cmp[3].throughput_ratio.is_none());
        // TP4 prefill fits GB300 only: the HBM unlock.
        let tp4 = WorkerShape::prefill_tp(4);
        assert!(a.rejected.iter().any(|r| r.shape == tp4));
        assert!(b.shapes.iter().any(|s| s.shape == tp4));
    }

    #[test]
    fn best_meets_the_slo_and_explain_names_every_shape() {
        let s = sweep_for(Sku::Gb300);
        let slo = Slo {
            min_tok_s_user: Some(27.0),
            ..Slo::default()
        };
        let b = best(&s.points, &slo).unwrap();
        assert!(b.figures.tok_s_user >= 27.0);
        assert!(
            s.points
                .iter()
                .filter(|p| slo.admits(&p.figures))
                .all(|p| p.figures.tok_s_gpu <= b.figures.tok_s_gpu)
        );
        let ex = explain(&s, &slo);
        assert_eq!(ex.len(), s.shapes.len() + s.rejected.len());
        assert_eq!(ex[0].best.unwrap().figures.tok_s_gpu, b.figures.tok_s_gpu);
        let none = Slo {
            min_tok_s_user: Some(10_000.0),
            ..Slo::default()
        };
        assert!(best(&s.points, &none).is_none());
    }

    #[test]
    fn interpolation_is_linear_and_bounded() {
        let pt = |u: f64, g: f64| Point {
            recipe: Recipe {
                prefill_workers: 1,
                prefill: Parallelism::Tp(8),
                decode_workers: 1,
                decode: Parallelism::Ep(8),
                concurrency: 1,
            },
            figures: Figures {
                tok_s_gpu: g,
                tok_s_user: u,
                tpot_ms: 1000.0 / u,
                ttft_ms: 0.0,
                usd_per_mtok: 0.0,
                request_rate: 0.0,
                decode_batch_per_worker: 0.0,
                prefill_utilization: 0.0,
                bottleneck: crate::recipe::Bottleneck::Concurrency,
            },
        };
        let f = vec![pt(10.0, 1000.0), pt(20.0, 500.0)];
        assert_eq!(at_level(&f, 15.0, 1.0).unwrap().tok_s_gpu, 750.0);
        assert_eq!(at_level(&f, 5.0, 1.0).unwrap().tok_s_gpu, 1000.0);
        assert!(at_level(&f, 25.0, 1.0).is_none());
    }
}
