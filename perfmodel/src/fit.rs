//! Calibration against measured recipes: parse the InferenceX CSV, predict
//! each row, report errors, and fit the free parameters.
//!
//! The fit minimises the sum of squared log errors of tok/s/GPU and TPOT over
//! the rows with Nelder-Mead in log-parameter space, bounded so that each
//! parameter keeps its physical meaning (efficiencies in (0, 1]).

use serde::Serialize;

use crate::calibration::Calibration;
use crate::hardware::Sku;
use crate::model::ModelProfile;
use crate::recipe::{Evaluator, Recipe, Workload};
use crate::shape::Parallelism;
use crate::{Error, Result};

/// One measured recipe in the CSV's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeasuredRow {
    pub sku: Sku,
    pub concurrency: u32,
    pub prefill_gpus: u32,
    pub prefill_tp: u32,
    pub decode_gpus: u32,
    pub decode_ep: u32,
    pub tok_s_gpu: f64,
    pub tok_s_user: f64,
    pub tpot_ms: f64,
}

/// The smallest power-of-two TP whose weights fit, for `decode_ep=1` rows:
/// the CSV does not say how those GPUs are grouped, and the smallest TP that
/// holds the model is the natural reading.
pub fn tp_only_decode_width(model: &ModelProfile, sku: Sku, workload: Workload) -> Result<u32> {
    let hw = sku.hardware();
    [1u32, 2, 4, 8, 16, 32, 64]
        .into_iter()
        .filter(|&t| t <= hw.gpus_per_domain)
        .find(|&t| {
            crate::memory::fit(
                model,
                &hw,
                crate::shape::WorkerShape::decode_tp(t),
                f64::from(workload.isl),
                workload.max_context(),
            )
            .fits
        })
        .ok_or_else(|| {
            Error::InvalidShape(format!("no TP-only decode shape holds the model on {sku}"))
        })
}

impl MeasuredRow {
    /// The recipe this row measured.
    pub fn recipe(&self, model: &ModelProfile, workload: Workload) -> Result<Recipe> {
        let decode = if self.decode_ep <= 1 {
            Parallelism::Tp(tp_only_decode_width(model, self.sku, workload)?)
        } else {
            Parallelism::Ep(self.decode_ep)
        };
        let per = |gpus: u32, width: u32, what: &str| {
            if width == 0 || !gpus.is_multiple_of(width) {
                Err(Error::InvalidShape(format!(
                    "{what}: {gpus} GPUs is not a multiple of {width}"
                )))
            } else {
                Ok(gpus / width)
            }
        };
        Ok(Recipe {
            prefill_workers: per(self.prefill_gpus, self.prefill_tp, "prefill")?,
            prefill: Parallelism::Tp(self.prefill_tp),
            decode_workers: per(self.decode_gpus, decode.gpus(), "decode")?,
            decode,
            concurrency: self.concurrency,
        })
    }
}

/// Parses the calibration CSV (comment lines start with `#`).
pub fn parse_csv(text: &str) -> Result<Vec<MeasuredRow>> {
    let mut lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'));
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| Error::InvalidConfig("calibration CSV is empty".into()))?
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| Error::InvalidConfig(format!("calibration CSV: no `{name}` column")))
    };
    let idx = [
        col("sku")?,
        col("concurrency")?,
        col("prefill_gpus")?,
        col("prefill_tp")?,
        col("decode_gpus")?,
        col("decode_ep")?,
        col("tok_s_gpu")?,
        col("tok_s_user")?,
        col("tpot_ms")?,
    ];
    lines
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let get = |j: usize| {
                f.get(idx[j]).copied().ok_or_else(|| {
                    Error::InvalidConfig(format!("calibration CSV row {}: too few fields", i + 1))
                })
            };
            let int = |j: usize| -> Result<u32> {
                get(j)?.parse().map_err(|_| {
                    Error::InvalidConfig(format!("calibration CSV row {}: bad count", i + 1))
                })
            };
            let num = |j: usize| -> Result<f64> {
                get(j)?.parse().map_err(|_| {
                    Error::InvalidConfig(format!("calibration CSV row {}: bad number", i + 1))
                })
            };
            Ok(MeasuredRow {
                sku: get(0)?.parse()?,
                concurrency: int(1)?,
                prefill_gpus: int(2)?,
                prefill_tp: int(3)?,
                decode_gpus: int(4)?,
                decode_ep: int(5)?,
                tok_s_gpu: num(6)?,
                tok_s_user: num(7)?,
                tpot_ms: num(8)?,
            })
        })
        .collect()
}

/// The calibration rows shipped with the crate (InferenceX, 2026-05-22).
pub fn builtin_rows() -> Result<Vec<MeasuredRow>> {
    parse_csv(include_str!(
        "../data/inferencex-dsv4pro-fp4-8k1k-calibration.csv"
    ))
}

/// Prediction against measurement for one row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RowError {
    pub row: MeasuredRow,
    pub recipe: Recipe,
    pub predicted_tok_s_gpu: f64,
    pub predicted_tpot_ms: f64,
    /// (predicted - measured) / measured.
    pub tok_s_gpu_error: f64,
    pub tpot_error: f64,
}

/// Errors over a set of rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub rows: Vec<RowError>,
    pub median_abs_tok_s_gpu_error: f64,
    pub max_abs_tok_s_gpu_error: f64,
    pub median_abs_tpot_error: f64,
    pub max_abs_tpot_error: f64,
}

/// Predicts every row with `cal` and reports the errors.
pub fn report(
    model: &ModelProfile,
    workload: Workload,
    rows: &[MeasuredRow],
    cal: Calibration,
) -> Result<Report> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let recipe = row.recipe(model, workload)?;
        let eval = Evaluator::new(model, row.sku.hardware(), workload, cal).evaluate(recipe);
        let f = eval.figures.ok_or_else(|| {
            Error::InvalidShape(format!(
                "measured recipe {recipe:?} on {} does not fit: {}",
                row.sku,
                eval.reason.unwrap_or_default()
            ))
        })?;
        out.push(RowError {
            row: *row,
            recipe,
            predicted_tok_s_gpu: f.tok_s_gpu,
            predicted_tpot_ms: f.tpot_ms,
            tok_s_gpu_error: f.tok_s_gpu / row.tok_s_gpu - 1.0,
            tpot_error: f.tpot_ms / row.tpot_ms - 1.0,
        });
    }
    let stats = |f: &dyn Fn(&RowError) -> f64| {
        let mut v: Vec<f64> = out.iter().map(|r| f(r).abs()).collect();
        v.sort_by(f64::total_cmp);
        let median = if v.is_empty() {
            0.0
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            0.5 * (v[v.len() / 2 - 1] + v[v.len() / 2])
        };
        (median, v.last().copied().unwrap_or(0.0))
    };
    let (mt, xt) = stats(&|r| r.tok_s_gpu_error);
    let (mp, xp) = stats(&|r| r.tpot_error);
    Ok(Report {
        rows: out,
        median_abs_tok_s_gpu_error: mt,
        max_abs_tok_s_gpu_error: xt,
        median_abs_tpot_error: mp,
        max_abs_tpot_error: xp,
    })
}

/// Bounds that keep each parameter physical: (low, high).
const BOUNDS: [(f64, f64); 7] = [
    (1.0, 1000.0),   // layer latency, us
    (0.2, 0.95),     // HBM efficiency
    (0.02, 0.9),     // decode MFU
    (0.05, 0.9),     // prefill MFU
    (0.1, 0.95),     // link efficiency
    (0.0, 200.0),    // token overhead, us
    (0.0, 10_000.0), // request overhead, ms
];

/// Parameters the fit moves. Decode MFU and link efficiency are held at
/// their priors: the calibration rows cannot tell them apart from the host
/// cost per token (all scale with tokens per rank), and a fit left free
/// drives them to their bounds, which would lose their meaning.
const FREE: [bool; 7] = [true, true, false, true, false, true, true];

fn clamp(v: [f64; 7]) -> [f64; 7] {
    let mut out = v;
    for (x, (lo, hi)) in out.iter_mut().zip(BOUNDS) {
        *x = x.clamp(lo, hi);
    }
    out
}

/// Fits the free parameters to `rows`, starting from `start`.
pub fn fit(
    model: &ModelProfile,
    workload: Workload,
    rows: &[MeasuredRow],
    start: Calibration,
) -> Result<Calibration> {
    // Validate the rows once so the objective cannot fail.
    report(model, workload, rows, start)?;
    let held = start.to_vec();
    let with_held = move |v: &[f64; 7]| {
        let mut out = *v;
        for i in 0..7 {
            if !FREE[i] {
                out[i] = held[i];
            }
        }
        clamp(out)
    };
    let objective = |v: &[f64; 7]| -> f64 {
        let cal = Calibration::from_vec(with_held(v));
        match report(model, workload, rows, cal) {
            Ok(r) => r
                .rows
                .iter()
                .map(|e| (1.0 + e.tok_s_gpu_error).ln().powi(2) + (1.0 + e.tpot_error).ln().powi(2))
                .sum(),
            Err(_) => f64::INFINITY,
        }
    };
    let mut best = clamp(start.to_vec());
    // Restarts shake the simplex out of the narrow valleys that the
    // bounds create.
    for _ in 0..4 {
        best = nelder_mead(&objective, best, 600);
    }
    Ok(Calibration::from_vec(with_held(&best)))
}

/// Nelder-Mead minimisation in log space (all parameters are positive or
/// zero; zero maps to a small floor).
fn nelder_mead(f: &dyn Fn(&[f64; 7]) -> f64, start: [f64; 7], iters: usize) -> [f64; 7] {
    const N: usize = 7;
    let to_log = |v: [f64; N]| v.map(|x| x.max(1e-3).ln());
    let from_log = |v: [f64; N]| v.map(f64::exp);
    let eval = |x: &[f64; N]| f(&clamp(from_log(*x)));
    let mut simplex: Vec<([f64; N], f64)> = Vec::with_capacity(N + 1);
    let x0 = to_log(start);
    simplex.push((x0, eval(&x0)));
    for i in 0..N {
        let mut x = x0;
        x[i] += if FREE[i] { 0.3 } else { 0.0 };
        simplex.push((x, eval(&x)));
    }
    for _ in 0..iters {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut centroid = [0.0; N];
        for (x, _) in &simplex[..N] {
            for i in 0..N {
                centroid[i] += x[i] / N as f64;
            }
        }
        let worst = simplex[N];
        let point = |t: f64| {
            let mut p = [0.0; N];
            for i in 0..N {
                p[i] = centroid[i] + t * (worst.0[i] - centroid[i]);
            }
            p
        };
        let xr = point(-1.0);
        let fr = eval(&xr);
        if fr < simplex[0].1 {
            let xe = point(-2.0);
            let fe = eval(&xe);
            simplex[N] = if fe < fr { (xe, fe) } else { (xr, fr) };
        } else if fr < simplex[N - 1].1 {
            simplex[N] = (xr, fr);
        } else {
            let xc = point(0.5);
            let fc = eval(&xc);
            if fc < worst.1 {
                simplex[N] = (xc, fc);
            } else {
                let best = simplex[0].0;
                for s in simplex.iter_mut().skip(1) {
                    for (x, b) in s.0.iter_mut().zip(best) {
                        *x = b + 0.5 * (*x - b);
                    }
                    s.1 = eval(&s.0);
                }
            }
        }
    }
    simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
    clamp(from_log(simplex[0].0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (ModelProfile, Workload, Vec<MeasuredRow>) {
        (
            ModelProfile::builtin("deepseek-v4-pro").unwrap(),
            Workload {
                isl: 8192,
                osl: 1024,
            },
            builtin_rows().unwrap(),
        )
    }

    #[test]
    fn csv_parses_and_rows_map_to_recipes() {
        let (m, wl, rows) = setup();
        assert_eq!(rows.len(), 10);
        let r = rows[1].recipe(&m, wl).unwrap();
        // gb200 decode_ep=1 with 32 GPUs: four TP8 workers.
        assert_eq!((r.decode, r.decode_workers), (Parallelism::Tp(8), 4));
        let g = rows[6].recipe(&m, wl).unwrap();
        // gb300 holds the model in TP4: 68 GPUs are 17 workers.
        assert_eq!((g.decode, g.decode_workers), (Parallelism::Tp(4), 17));
        assert!(parse_csv("sku,concurrency\ngb200,1\n").is_err());
        assert!(parse_csv("").is_err());
    }

    /// The acceptance bar: over the calibration rows, median absolute error
    /// at most 10% and no row beyond 25%, for tok/s/GPU and for TPOT.
    #[test]
    fn fitted_constants_reproduce_the_measurements() {
        let (m, wl, rows) = setup();
        let r = report(&m, wl, &rows, Calibration::fitted()).unwrap();
        for e in &r.rows {
            eprintln!(
                "{} c={} {}x{} + {}x{}: tok/s/gpu {:+.1}%  tpot {:+.1}%",
                e.row.sku,
                e.row.concurrency,
                e.recipe.prefill_workers,
                e.recipe.prefill,
                e.recipe.decode_workers,
                e.recipe.decode,
                100.0 * e.tok_s_gpu_error,
                100.0 * e.tpot_error
            );
        }
        assert!(r.median_abs_tok_s_gpu_error <= 0.10, "{r:?}");
        assert!(r.max_abs_tok_s_gpu_error <= 0.25, "{r:?}");
        assert!(r.median_abs_tpot_error <= 0.10, "{r:?}");
        assert!(r.max_abs_tpot_error <= 0.25, "{r:?}");
    }
}
