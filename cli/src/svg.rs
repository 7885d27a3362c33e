//! A dependency-free SVG chart of tok/s/GPU against tok/s/user frontiers,
//! one polyline per SKU, in the InferenceX style.

use std::fmt::Write;

use perfmodel::Workload;
use perfmodel::search::{self, Point, Sweep};

const W: f64 = 860.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 4] = ["#76b900", "#1f77b4", "#d62728", "#9467bd"];

/// A measured point to draw beside the frontiers: (SKU, tok/s/user, tok/s/GPU).
pub type Measured = (perfmodel::Sku, f64, f64);

/// Renders the frontiers of `sweeps`, marking `best` when given and drawing
/// `measured` points (hollow diamonds in their SKU's colour), labelled as
/// measured by `measured_by` (e.g. `InferenceX`, `rackscale bench`).
pub fn frontiers(
    sweeps: &[&Sweep],
    best: Option<&Point>,
    measured: &[Measured],
    measured_by: &str,
    model: &str,
    wl: Workload,
) -> String {
    let fronts: Vec<Vec<Point>> = sweeps.iter().map(|s| search::frontier(&s.points)).collect();
    let all = fronts.iter().flatten();
    let x_max = nice(
        all.clone()
            .map(|p| p.figures.tok_s_user)
            .fold(10.0, f64::max),
    );
    let y_max = nice(all.map(|p| p.figures.tok_s_gpu).fold(100.0, f64::max));
    let x = |v: f64| LEFT + v / x_max * (W - LEFT - RIGHT);
    let y = |v: f64| H - BOTTOM - v / y_max * (H - TOP - BOTTOM);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="25" font-size="15" text-anchor="middle">{model}, ISL {} / OSL {}: throughput vs interactivity</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        wl.isl,
        wl.osl
    );
    for i in 0..=5 {
        let (vx, vy) = (x_max * f64::from(i) / 5.0, y_max * f64::from(i) / 5.0);
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#ddd"/><text x="{0}" y="{3}" text-anchor="middle">{4:.0}</text>"##,
            x(vx),
            TOP,
            H - BOTTOM,
            H - BOTTOM + 18.0,
            vx
        );
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#ddd"/><text x="{3}" y="{4}" text-anchor="end">{5:.0}</text>"##,
            LEFT,
            y(vy),
            W - RIGHT,
            LEFT - 8.0,
            y(vy) + 4.0,
            vy
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">tok/s/user (1000 / TPOT ms)</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {}) rotate(-90)" text-anchor="middle">tok/s/GPU (input + output)</text>"#,
        (H - BOTTOM + TOP) / 2.0
    );
    for (i, (sweep, front)) in sweeps.iter().zip(&fronts).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = front
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    x(p.figures.tok_s_user),
                    y(p.figures.tok_s_gpu)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        for p in front {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{} {}x{} + {}x{} c={}: {:.0} tok/s/GPU at {:.1} tok/s/user</title></circle>"#,
                x(p.figures.tok_s_user),
                y(p.figures.tok_s_gpu),
                sweep.sku,
                p.recipe.prefill_workers,
                p.recipe.prefill,
                p.recipe.decode_workers,
                p.recipe.decode,
                p.recipe.concurrency,
                p.figures.tok_s_gpu,
                p.figures.tok_s_user
            );
        }
        let ly = TOP + 20.0 + 22.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{color}" stroke-width="3"/><text x="{3}" y="{4}">{5} ({6} GPUs)</text>"#,
            W - RIGHT + 15.0,
            ly,
            W - RIGHT + 40.0,
            W - RIGHT + 46.0,
            ly + 4.0,
            sweep.sku.hardware().name.trim_start_matches("NVIDIA "),
            sweep.gpu_budget
        );
    }
    for (sku, user, gpu) in measured {
        let Some(i) = sweeps.iter().position(|s| s.sku == *sku) else {
            continue;
        };
        let (cx, cy) = (x(*user), y(*gpu));
        let _ = writeln!(
            s,
            r#"<path d="M {cx:.1} {:.1} L {:.1} {cy:.1} L {cx:.1} {:.1} L {:.1} {cy:.1} Z" fill="white" stroke="{}" stroke-width="2"><title>{sku} measured ({measured_by}): {gpu:.0} tok/s/GPU at {user:.1} tok/s/user</title></path>"#,
            cy - 6.0,
            cx + 6.0,
            cy + 6.0,
            cx - 6.0,
            COLORS[i % COLORS.len()]
        );
    }
    if !measured.is_empty() {
        let ly = TOP + 20.0 + 22.0 * sweeps.len() as f64;
        let _ = writeln!(
            s,
            r##"<path d="M {0} {1} L {2} {3} L {0} {4} L {5} {3} Z" fill="white" stroke="#555" stroke-width="2"/><text x="{6}" y="{7}">measured ({8})</text>"##,
            W - RIGHT + 27.5,
            ly - 6.0,
            W - RIGHT + 33.5,
            ly,
            ly + 6.0,
            W - RIGHT + 21.5,
            W - RIGHT + 46.0,
            ly + 4.0,
            measured_by
        );
    }
    if let Some(b) = best {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="7" fill="none" stroke="black" stroke-width="2"><title>chosen recipe</title></circle>"#,
            x(b.figures.tok_s_user),
            y(b.figures.tok_s_gpu)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Rounds an axis maximum up to 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    let exp = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * exp)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_rounds_up() {
        assert_eq!(nice(7.3), 10.0);
        assert_eq!(nice(1200.0), 2000.0);
        assert_eq!(nice(50.0), 50.0);
    }
}
