#!/usr/bin/env python3
"""rackscale's planner side by side with NVIDIA aiconfigurator, against InferenceX.

One run does two things for DeepSeek-V4-Pro FP4, ISL 8192 / OSL 1024, disaggregated
prefill/decode on NVL72 (vLLM backend in aiconfigurator, as InferenceX measured):

(a) Per-recipe accuracy: for every row of the InferenceX calibration CSV, asks
    `rackscale plan ... --json` for its prediction of that exact recipe and, where
    aiconfigurator can evaluate that exact configuration (`aiconfigurator cli
    estimate --estimate-mode disagg`), aiconfigurator's; reports the relative
    errors of tok/s/GPU and TPOT against the measurement. When aiconfigurator
    refuses a configuration, its own error message is recorded, not a number.

(b) Frontiers: both tools' Pareto frontiers (tok/s/GPU against tok/s/user) for
    gb300 and gb200 at a GPU budget, read at the InferenceX interactivity levels,
    and the GB300/GB200 ratio of each (InferenceX: 6,182 / 2,189 = 2.83x at 27).

Units. InferenceX tok/s/GPU counts input + output tokens over all GPUs of the
recipe; aiconfigurator reports OUTPUT tokens/s per GPU, so its figure is
multiplied by (ISL + OSL) / OSL. Its `tokens/s/gpu` column (per GPU of the
recipe) is used, not `tokens/s/gpu_cluster` (which also charges GPUs of the
budget that no whole replica fills). Both frontiers are read the way rackscale
reads its own (`perfmodel::search::at_level`): the Pareto points are sorted by
tok/s/user, linear interpolation between neighbours, the highest-throughput
point below the frontier's range, null above it.

Mapping a CSV row onto aiconfigurator's estimate flags (assumptions, also written
into the JSON):
- prefill: `prefill_gpus / prefill_tp` workers of TP=prefill_tp with MoE TP (no
  EP), batch 1 (what aiconfigurator's own sweep uses for an 8k prompt);
- decode `decode_ep > 1`: DEP workers (attention DP = EP = decode_ep, TP 1);
- decode `decode_ep = 1`: TP-only workers of the width rackscale chose (the
  smallest TP that holds the model, read from rackscale's `decode_shape`);
- decode batch per attention-DP rank = round(concurrency / (workers x DP)),
  at least 1 (aiconfigurator's concurrency is that batch times the ranks).

Usage (from the repository root):
  scripts/aiconfigurator_compare.py [--rackscale target/release/rackscale]
      [--aiconfigurator PATH] [--json-out FILE] [--markdown-out FILE]
      [--work-dir DIR] [--skip-aiconfigurator] [--reuse]

aiconfigurator runs with HF_HUB_OFFLINE=1 (its model configs are bundled). With
--reuse, aiconfigurator results already in --work-dir for the same command line
are read back instead of recomputed (each estimate takes ~10 s, each frontier
1-2 min on a 2-core machine).
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODEL_AIC = "deepseek-ai/DeepSeek-V4-Pro"
MODEL_RS = "deepseek-v4-pro"
BACKEND = "vllm"
ISL, OSL = 8192, 1024
LEVELS = [16, 18, 20, 22, 25, 27, 28, 32, 36, 50]
SKUS = ["gb300", "gb200"]
# The InferenceX article's headline, at 27 tok/s/user.
# The article states the ratio as 2.83x; the rounded figures give 2.824.
ARTICLE = {"tok_s_user": 27.0, "gb300": 6182.0, "gb200": 2189.0, "ratio": 2.83}

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(
    os.environ.get("RACKSCALE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rackscale"
)


def die(msg: str) -> None:
    print(f"[aiconfigurator_compare] ERROR: {msg}", file=sys.stderr)
    sys.exit(2)


def log(msg: str) -> None:
    print(f"[aiconfigurator_compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- rackscale


def rackscale_json(binary: str, args: list[str]) -> dict:
    cmd = [binary, "plan", "--model", MODEL_RS, "--isl", str(ISL), "--osl", str(OSL), *args, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        die(f"`{' '.join(cmd)}` failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout)


# ----------------------------------------------------------- aiconfigurator


class Aic:
    """Runs aiconfigurator's CLI, caching results by command line in work_dir."""

    def __init__(self, binary: str, work_dir: Path, reuse: bool, timeout: int):
        self.binary = binary
        self.work_dir = work_dir
        self.reuse = reuse
        self.timeout = timeout
        work_dir.mkdir(parents=True, exist_ok=True)

    def run(self, args: list[str], save_dir: Path | None = None) -> dict:
        """Runs `aiconfigurator cli ARGS`; returns rc, wall time, output."""
        key = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]
        cache = self.work_dir / f"run-{key}.json"
        if self.reuse and cache.exists():
            rec = json.loads(cache.read_text())
            if save_dir is None or save_dir.exists():
                rec["reused"] = True
                return rec
        if save_dir is not None and save_dir.exists():
            shutil.rmtree(save_dir)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore::DeprecationWarning")
        cmd = [self.binary, "cli", *args]
        start = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=self.timeout)
            rc, out = p.returncode, p.stdout + "\n" + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            out += f"\n[timed out after {self.timeout} s]"
        rec = {
            "command": "HF_HUB_OFFLINE=1 aiconfigurator cli " + " ".join(args),
            "rc": rc,
            "wall_s": round(time.monotonic() - start, 1),
            "output": out,
            "reused": False,
        }
        cache.write_text(json.dumps(rec))
        return rec


def aic_error(out: str) -> str:
    """The tool's own error line, or the tail of its output."""
    for line in out.splitlines():
        if line.startswith("Error:") or "Traceback" in line:
            return line.strip()
    tail = [l for l in out.splitlines() if l.strip()][-3:]
    return " | ".join(tail)[-600:]


def aic_db_version(out: str) -> str | None:
    m = re.search(r"Loading database for system='[^']+', backend='[^']+', version='([^']+)'", out)
    return m.group(1) if m else None


def aic_fallbacks(out: str) -> list[str]:
    """The data-fallback warnings aiconfigurator printed (fidelity caveats)."""
    seen = []
    for line in out.splitlines():
        if "low-fidelity fallback" in line or "falling back to" in line:
            msg = re.sub(r"^\S+ \[aiconfigurator\] \[W\] \[[^\]]+\] ", "", line.strip())
            msg = re.sub(r"/\S*/site-packages/", "", msg)
            if msg not in seen:
                seen.append(msg)
    return seen


ESTIMATE_FIELDS = {
    "ttft_ms": r"TTFT:\s+([\d.]+) ms",
    "tpot_ms": r"TPOT:\s+([\d.]+) ms",
    "output_tok_s": r"tokens/s:\s+([\d.]+)",
    "output_tok_s_gpu": r"tokens/s/gpu:\s+([\d.]+)",
    "tok_s_user": r"tokens/s/user:\s+([\d.]+)",
    "seq_s": r"seq/s:\s+([\d.]+)",
    "concurrency": r"Concurrency:\s+([\d.]+)",
    "total_gpus": r"Total GPUs:\s+(\d+)",
    "prefill_memory_gb": r"\(p\) Memory:\s+([\d.]+) GB",
    "decode_memory_gb": r"\(d\) Memory:\s+([\d.]+) GB",
}


def parse_estimate(out: str) -> dict | None:
    vals = {}
    for k, pat in ESTIMATE_FIELDS.items():
        m = re.search(pat, out)
        vals[k] = float(m.group(1)) if m else None
    if vals["tpot_ms"] is None or vals["output_tok_s_gpu"] is None:
        return None
    vals["tok_s_gpu"] = vals["output_tok_s_gpu"] * (ISL + OSL) / OSL
    return vals


def estimate_args(row: dict, sku: str, decode_tp_only: int) -> tuple[list[str], dict]:
    pg, ptp = int(row["prefill_gpus"]), int(row["prefill_tp"])
    dg, dep, conc = int(row["decode_gpus"]), int(row["decode_ep"]), int(row["concurrency"])
    if dep > 1:
        d = {"tp": 1, "dp": dep, "moe_tp": 1, "moe_ep": dep}
    else:
        d = {"tp": decode_tp_only, "dp": 1, "moe_tp": decode_tp_only, "moe_ep": 1}
    d_width = d["tp"] * d["dp"]
    d_workers = dg // d_width
    d_bs = max(1, round(conc / (d_workers * d["dp"])))
    mapping = {
        "prefill": f"{pg // ptp} x TP{ptp} (MoE TP{ptp}), batch 1",
        "decode": f"{d_workers} x "
        + (f"DEP{dep} (attention DP{dep}, MoE EP{dep})" if dep > 1 else f"TP{decode_tp_only} (MoE TP)")
        + f", batch {d_bs} per rank",
        "aic_concurrency": d_bs * d["dp"] * d_workers,
    }
    args = [
        "estimate", "--model", MODEL_AIC, "--system", sku, "--backend", BACKEND,
        "--estimate-mode", "disagg", "--isl", str(ISL), "--osl", str(OSL),
        "--prefill-tp-size", str(ptp), "--prefill-moe-tp-size", str(ptp),
        "--prefill-moe-ep-size", "1", "--prefill-batch-size", "1",
        "--prefill-num-workers", str(pg // ptp),
        "--decode-tp-size", str(d["tp"]), "--decode-attention-dp-size", str(d["dp"]),
        "--decode-moe-tp-size", str(d["moe_tp"]), "--decode-moe-ep-size", str(d["moe_ep"]),
        "--decode-batch-size", str(d_bs), "--decode-num-workers", str(d_workers),
    ]  # fmt: skip
    return args, mapping


def pareto_points(save_dir: Path) -> tuple[list[dict], str | None]:
    files = glob.glob(str(save_dir / "**" / "disagg" / "pareto.csv"), recursive=True)
    if not files:
        return [], None
    path = sorted(files)[-1]
    pts = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                out_gpu = float(r["tokens/s/gpu"])
                user = float(r["tokens/s/user"])
            except (KeyError, ValueError):
                continue
            pts.append(
                {
                    "tok_s_user": user,
                    "output_tok_s_gpu": out_gpu,
                    "tok_s_gpu": out_gpu * (ISL + OSL) / OSL,
                    "tpot_ms": float(r.get("tpot") or "nan"),
                    "ttft_ms": float(r.get("ttft") or "nan"),
                    "concurrency": r.get("concurrency"),
                    "prefill": f"{r.get('(p)workers')} x {r.get('(p)parallel')}",
                    "decode": f"{r.get('(d)workers')} x {r.get('(d)parallel')} bs {r.get('(d)bs')}",
                    "gpus": r.get("num_total_gpus"),
                }
            )
    return pts, path


# ------------------------------------------------------- frontier reading


def frontier(points: list[dict]) -> list[dict]:
    """Non-dominated points, sorted by tok/s/user ascending (as perfmodel)."""
    pts = sorted(points, key=lambda p: (-p["tok_s_user"], -p["tok_s_gpu"]))
    out, best = [], float("-inf")
    for p in pts:
        if p["tok_s_gpu"] > best:
            best = p["tok_s_gpu"]
            out.append(p)
    return out[::-1]


def at_level(front: list[dict], level: float) -> float | None:
    """perfmodel::search::at_level on tok/s/GPU."""
    if not front or level > front[-1]["tok_s_user"]:
        return None
    if level <= front[0]["tok_s_user"]:
        return front[0]["tok_s_gpu"]
    for a, b in zip(front, front[1:]):
        if b["tok_s_user"] >= level:
            t = (level - a["tok_s_user"]) / (b["tok_s_user"] - a["tok_s_user"])
            return a["tok_s_gpu"] + t * (b["tok_s_gpu"] - a["tok_s_gpu"])
    return None


# ---------------------------------------------------------------- helpers


def rel(pred: float | None, meas: float) -> float | None:
    return None if pred is None else pred / meas - 1.0


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:+.0f}%"


def num(v: float | None, prec: int = 0) -> str:
    return "—" if v is None else f"{v:,.{prec}f}"


def mape(vals: list[float | None]) -> float | None:
    xs = [abs(v) for v in vals if v is not None]
    return sum(xs) / len(xs) if xs else None


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        lines = [l for l in f if not l.lstrip().startswith("#") and l.strip()]
    return list(csv.DictReader(lines))


# -------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    ap.add_argument(
        "--rackscale",
        default=os.environ.get("RACKSCALE_BIN") or str(target / "release/rackscale"),
        help="rackscale binary (default: $RACKSCALE_BIN, else $CARGO_TARGET_DIR/release/rackscale, else target/release/rackscale)",
    )
    ap.add_argument("--aiconfigurator", default=str(CACHE / "venv-bench/bin/aiconfigurator"))
    ap.add_argument("--csv", default=str(REPO / "perfmodel/data/inferencex-dsv4pro-fp4-8k1k-calibration.csv"))
    ap.add_argument("--gpus", type=int, default=72)
    ap.add_argument("--work-dir", default=str(REPO / "target/bench/aiconfigurator"))
    ap.add_argument("--json-out", default=str(REPO / "target/bench/aiconfigurator_compare.json"))
    ap.add_argument("--markdown-out", help="write the markdown here instead of stdout")
    ap.add_argument("--skip-aiconfigurator", action="store_true", help="rackscale only")
    ap.add_argument("--reuse", action="store_true", help="reuse cached aiconfigurator runs")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per aiconfigurator call")
    a = ap.parse_args()

    if not (os.path.isfile(a.rackscale) and os.access(a.rackscale, os.X_OK)):
        die(f"rackscale binary not found at {a.rackscale}; build it with `cargo build --release -p cli` or pass --rackscale")
    if not os.path.isfile(a.csv):
        die(f"calibration CSV not found at {a.csv}")
    aic = None
    aic_version = None
    if not a.skip_aiconfigurator:
        if not (os.path.isfile(a.aiconfigurator) and os.access(a.aiconfigurator, os.X_OK)):
            die(
                f"aiconfigurator not found at {a.aiconfigurator}; install it with "
                f"`scripts/bench-planner.sh` (creates {CACHE}/venv-bench) or pass --aiconfigurator, "
                "or use --skip-aiconfigurator"
            )
        aic = Aic(a.aiconfigurator, Path(a.work_dir), a.reuse, a.timeout)
        v = subprocess.run([a.aiconfigurator, "version"], capture_output=True, text=True)
        aic_version = (re.findall(r"\d+\.\d+\.\d+\S*", v.stdout + v.stderr) or [None])[0]

    result: dict = {
        "workload": {"model": MODEL_AIC, "isl": ISL, "osl": OSL, "gpu_budget": a.gpus},
        "tools": {
            "rackscale": a.rackscale,
            "aiconfigurator": None if a.skip_aiconfigurator else {"path": a.aiconfigurator, "version": aic_version, "backend": BACKEND},
        },
        "units": "tok_s_gpu = total (input+output) tokens/s per GPU of the recipe; aiconfigurator output tok/s/GPU x (ISL+OSL)/OSL",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "article": ARTICLE,
    }

    # (a) per-row accuracy ------------------------------------------------
    rows_out = []
    for i, row in enumerate(read_rows(Path(a.csv))):
        sku = row["sku"]
        rs = rackscale_json(
            a.rackscale,
            [
                "--sku", sku, "--prefill-gpus", row["prefill_gpus"], "--prefill-tp", row["prefill_tp"],
                "--decode-gpus", row["decode_gpus"], "--decode-ep", row["decode_ep"],
                "--concurrency", row["concurrency"],
            ],
        )  # fmt: skip
        meas = {k: float(row[k]) for k in ("tok_s_gpu", "tok_s_user", "tpot_ms")}
        rec = {
            "row": i + 1,
            "sku": sku,
            "recipe": {k: int(row[k]) for k in ("concurrency", "prefill_gpus", "prefill_tp", "decode_gpus", "decode_ep")},
            "measured": meas,
            "rackscale": {
                "decode_shape": rs.get("decode_shape"),
                "fits": rs.get("fits"),
                "reason": rs.get("reason"),
                "tok_s_gpu": rs.get("tok_s_gpu"),
                "tok_s_user": rs.get("tok_s_user"),
                "tpot_ms": rs.get("tpot_ms"),
                "err_tok_s_gpu": rel(rs.get("tok_s_gpu"), meas["tok_s_gpu"]),
                "err_tpot_ms": rel(rs.get("tpot_ms"), meas["tpot_ms"]),
            },
        }
        if aic is not None:
            shape = rs.get("decode_shape") or ""
            tp_only = int(shape[2:]) if shape.startswith("TP") else 0
            args, mapping = estimate_args(row, sku, tp_only)
            log(f"row {i + 1}/10 {sku}: aiconfigurator estimate ({mapping['decode']})")
            r = aic.run(args)
            est = parse_estimate(r["output"]) if r["rc"] == 0 else None
            rec["aiconfigurator"] = {
                "command": r["command"],
                "mapping": mapping,
                "rc": r["rc"],
                "wall_s": r["wall_s"],
                "evaluated": est is not None,
                "error": None if est is not None else aic_error(r["output"]),
                **(est or {}),
                "err_tok_s_gpu": rel(est["tok_s_gpu"], meas["tok_s_gpu"]) if est else None,
                "err_tpot_ms": rel(est["tpot_ms"], meas["tpot_ms"]) if est else None,
                "db_version": aic_db_version(r["output"]),
                "fallbacks": aic_fallbacks(r["output"]),
            }
        rows_out.append(rec)
    result["rows"] = rows_out
    both = [r for r in rows_out if r.get("aiconfigurator", {}).get("evaluated")]
    result["row_summary"] = {
        "rackscale_mape_tok_s_gpu_all": mape([r["rackscale"]["err_tok_s_gpu"] for r in rows_out]),
        "rackscale_mape_tpot_all": mape([r["rackscale"]["err_tpot_ms"] for r in rows_out]),
        "rows_aiconfigurator_evaluated": len(both),
        "rackscale_mape_tok_s_gpu_common": mape([r["rackscale"]["err_tok_s_gpu"] for r in both]),
        "rackscale_mape_tpot_common": mape([r["rackscale"]["err_tpot_ms"] for r in both]),
        "aiconfigurator_mape_tok_s_gpu_common": mape([r["aiconfigurator"]["err_tok_s_gpu"] for r in both]),
        "aiconfigurator_mape_tpot_common": mape([r["aiconfigurator"]["err_tpot_ms"] for r in both]),
    }

    # (b) frontiers -------------------------------------------------------
    fronts: dict = {"levels": LEVELS, "rackscale": {}, "aiconfigurator": {}, "inferencex_rows": {}}
    for sku in SKUS:
        pts = [r["measured"] for r in rows_out if r["sku"] == sku]
        f = frontier(pts)
        # Only 10 calibration rows: a sparse reading of the measured frontier.
        fronts["inferencex_rows"][sku] = {
            "frontier": f,
            "at_levels": {f"{l:g}": at_level(f, l) for l in LEVELS},
        }
    for sku in SKUS:
        other = [s for s in SKUS if s != sku][0]
        start = time.monotonic()
        rs = rackscale_json(a.rackscale, ["--sku", sku, "--gpus", str(a.gpus), "--compare", other])
        wall = time.monotonic() - start
        pts = [{"tok_s_user": p["tok_s_user"], "tok_s_gpu": p["tok_s_gpu"]} for p in rs.get("frontier", [])]
        fronts["rackscale"][sku] = {
            "command": f"{a.rackscale} plan --sku {sku} --gpus {a.gpus} --compare {other} --json",
            "wall_s": round(wall, 2),
            "frontier_points": len(pts),
            "max_tok_s_user": max((p["tok_s_user"] for p in pts), default=None),
            "max_tok_s_gpu": max((p["tok_s_gpu"] for p in pts), default=None),
            # Read from rackscale's own `compare` output (perfmodel::search::at_level).
            "at_levels": {
                f"{float(c['tok_s_user']):g}": (c.get(sku) or {}).get("tok_s_gpu")
                for c in rs.get("compare", [])
            },
            # Cross-check: the same reading done here from the frontier array.
            "at_levels_recomputed": {f"{l:g}": at_level(frontier(pts), l) for l in LEVELS},
        }
        if aic is not None:
            save = Path(a.work_dir) / f"default-{sku}-{a.gpus}"
            args = [
                "default", "--model", MODEL_AIC, "--system", sku, "--backend", BACKEND,
                "--total-gpus", str(a.gpus), "--isl", str(ISL), "--osl", str(OSL),
                "--serving-mode", "disagg", "--save-dir", str(save),
            ]  # fmt: skip
            log(f"{sku}: aiconfigurator default sweep ({a.gpus} GPUs; a minute or two)")
            r = aic.run(args, save)
            pts, path = pareto_points(save) if r["rc"] == 0 else ([], None)
            f = frontier(pts)
            skipped = sorted(
                set(re.sub(r".*err=", "", l).strip() for l in r["output"].splitlines() if "skipping. err=" in l)
            )
            fronts["aiconfigurator"][sku] = {
                "command": r["command"],
                "rc": r["rc"],
                "wall_s": r["wall_s"],
                "error": None if pts else aic_error(r["output"]),
                "pareto_csv": path,
                "pareto_points": len(pts),
                "frontier": f,
                "max_tok_s_user": max((p["tok_s_user"] for p in pts), default=None),
                "max_tok_s_gpu": max((p["tok_s_gpu"] for p in pts), default=None),
                "at_levels": {f"{l:g}": at_level(f, l) for l in LEVELS},
                "db_version": aic_db_version(r["output"]),
                "fallbacks": aic_fallbacks(r["output"]),
                "skipped_shapes_reasons": skipped,
                "skipped_shapes": sum(1 for l in r["output"].splitlines() if "skipping. err=" in l),
            }
    for tool in ("rackscale", "aiconfigurator", "inferencex_rows"):
        if set(SKUS) <= set(fronts[tool]):
            a3, a2 = fronts[tool]["gb300"]["at_levels"], fronts[tool]["gb200"]["at_levels"]
            fronts[tool]["ratio_gb300_gb200"] = {
                k: (a3[k] / a2[k] if a3.get(k) and a2.get(k) else None) for k in a3
            }
    result["frontiers"] = fronts

    md = render(result, a)
    Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if a.markdown_out:
        Path(a.markdown_out).write_text(md)
    else:
        print(md)
    log(f"JSON written to {a.json_out}")


def render(res: dict, a: argparse.Namespace) -> str:
    L = []
    aic_on = res["tools"]["aiconfigurator"] is not None
    ver = res["tools"]["aiconfigurator"]["version"] if aic_on else None
    L.append(f"### Per-recipe accuracy against InferenceX (10 calibration rows)\n")
    L.append(
        "Errors are prediction / measurement - 1. aiconfigurator "
        + (f"{ver}, backend {BACKEND}, `cli estimate --estimate-mode disagg`." if aic_on else "skipped.")
        + "\n"
    )
    head = "| # | SKU | conc | prefill | decode | measured tok/s/GPU | measured TPOT ms | rackscale tok/s/GPU | err | rackscale TPOT | err |"
    sep = "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|"
    if aic_on:
        head += " aiconfigurator tok/s/GPU | err | aiconfigurator TPOT | err |"
        sep += "---:|---:|---:|---:|"
    L += [head, sep]
    for r in res["rows"]:
        rc, m, rs = r["recipe"], r["measured"], r["rackscale"]
        line = (
            f"| {r['row']} | {r['sku']} | {rc['concurrency']} | {rc['prefill_gpus']}×TP{rc['prefill_tp']}"
            f" | {rc['decode_gpus']} GPUs {rs['decode_shape']} | {num(m['tok_s_gpu'], 1)} | {num(m['tpot_ms'], 1)}"
            f" | {num(rs['tok_s_gpu'], 1)} | {pct(rs['err_tok_s_gpu'])} | {num(rs['tpot_ms'], 1)} | {pct(rs['err_tpot_ms'])} |"
        )
        if aic_on:
            ai = r["aiconfigurator"]
            if ai["evaluated"]:
                line += (
                    f" {num(ai['tok_s_gpu'], 1)} | {pct(ai['err_tok_s_gpu'])} | {num(ai['tpot_ms'], 1)}"
                    f" | {pct(ai['err_tpot_ms'])} |"
                )
            else:
                line += " n/a¹ | | n/a¹ | |"
        L.append(line)
    s = res["row_summary"]
    L.append("")
    L.append(
        f"Mean absolute error, rackscale over all 10 rows: tok/s/GPU {pct(s['rackscale_mape_tok_s_gpu_all'])[1:]},"
        f" TPOT {pct(s['rackscale_mape_tpot_all'])[1:]}."
    )
    if aic_on:
        L.append(
            f"On the {s['rows_aiconfigurator_evaluated']} rows aiconfigurator could evaluate: rackscale "
            f"tok/s/GPU {pct(s['rackscale_mape_tok_s_gpu_common'])[1:]}, TPOT {pct(s['rackscale_mape_tpot_common'])[1:]};"
            f" aiconfigurator tok/s/GPU {pct(s['aiconfigurator_mape_tok_s_gpu_common'])[1:]},"
            f" TPOT {pct(s['aiconfigurator_mape_tpot_common'])[1:]}."
        )
        errs = sorted({r["aiconfigurator"]["error"] for r in res["rows"] if not r["aiconfigurator"]["evaluated"]})
        if errs:
            L.append("")
            L.append("¹ aiconfigurator refused these configurations; its message:")
            for e in errs:
                L.append(f"- `{e}`")
        fb = sorted({x for r in res["rows"] for x in r["aiconfigurator"]["fallbacks"]})
        if fb:
            L.append("")
            L.append("aiconfigurator's own fidelity warnings for these estimates:")
            for x in fb:
                L.append(f"- {x}")
    fr = res["frontiers"]
    L.append("")
    L.append(
        f"### Frontiers at {res['workload']['gpu_budget']} GPUs, total tok/s/GPU at each tok/s/user level\n"
    )
    L.append(
        "Linear interpolation on each tool's Pareto frontier; — = beyond the frontier's reach. "
        "aiconfigurator's output tok/s/GPU × (8192+1024)/1024. \"InferenceX rows\" is the frontier of "
        "the 10 measured calibration rows, read the same way (a sparse subset of what InferenceX ran); "
        "the article's own figures are at 27 tok/s/user.\n"
    )
    head = "| tok/s/user | rackscale GB300 | rackscale GB200 | rackscale ratio |"
    sep = "|---:|---:|---:|---:|"
    if aic_on:
        head += " aiconfigurator GB300 | aiconfigurator GB200 | aiconfigurator ratio |"
        sep += "---:|---:|---:|"
    head += " InferenceX rows GB300 | rows GB200 | rows ratio | InferenceX article |"
    sep += "---:|---:|---:|---|"
    L += [head, sep]
    for lvl in LEVELS:
        k = f"{lvl:g}"
        rs3, rs2 = fr["rackscale"]["gb300"]["at_levels"].get(k), fr["rackscale"]["gb200"]["at_levels"].get(k)
        line = f"| {lvl} | {num(rs3)} | {num(rs2)} | {num(fr['rackscale']['ratio_gb300_gb200'].get(k), 2)} |"
        if aic_on:
            ai = fr["aiconfigurator"]
            a3, a2 = ai.get("gb300", {}).get("at_levels", {}).get(k), ai.get("gb200", {}).get("at_levels", {}).get(k)
            ratio = ai.get("ratio_gb300_gb200", {}).get(k)
            line += f" {num(a3)} | {num(a2)} | {num(ratio, 2)} |"
        ix = fr["inferencex_rows"]
        line += (
            f" {num(ix['gb300']['at_levels'].get(k))} | {num(ix['gb200']['at_levels'].get(k))}"
            f" | {num(ix['ratio_gb300_gb200'].get(k), 2)} |"
        )
        art = (
            f" {ARTICLE['gb300']:,.0f} / {ARTICLE['gb200']:,.0f}, {ARTICLE['ratio']:.2f}x |"
            if lvl == ARTICLE["tok_s_user"]
            else " |"
        )
        L.append(line + art)
    L.append("")
    L.append("| tool | SKU | wall time | frontier points | max tok/s/user | max tok/s/GPU |")
    L.append("|---|---|---:|---:|---:|---:|")
    for tool in ("rackscale", "aiconfigurator"):
        for sku in SKUS:
            f = fr.get(tool, {}).get(sku)
            if not f:
                continue
            n = f.get("frontier_points", f.get("pareto_points"))
            L.append(
                f"| {tool} | {sku} | {f['wall_s']:.1f} s | {n} | {num(f['max_tok_s_user'], 1)} | {num(f['max_tok_s_gpu'])} |"
            )
    if aic_on:
        for sku in SKUS:
            f = fr["aiconfigurator"].get(sku, {})
            if f.get("error"):
                L.append(f"\naiconfigurator {sku} frontier failed: `{f['error']}`")
            if f.get("skipped_shapes_reasons"):
                L.append(
                    f"\naiconfigurator {sku}: {f['skipped_shapes']} worker shapes skipped during the sweep; reasons:"
                )
                for x in f["skipped_shapes_reasons"]:
                    L.append(f"- `{x}`")
        L.append("\naiconfigurator frontier points (best tok/s/GPU first):\n")
        L.append("| SKU | tok/s/user | total tok/s/GPU | TPOT ms | TTFT ms | prefill | decode |")
        L.append("|---|---:|---:|---:|---:|---|---|")
        for sku in SKUS:
            for p in fr["aiconfigurator"].get(sku, {}).get("frontier", []):
                L.append(
                    f"| {sku} | {p['tok_s_user']:.1f} | {p['tok_s_gpu']:,.0f} | {p['tpot_ms']:.1f} | {p['ttft_ms']:.0f}"
                    f" | {p['prefill']} | {p['decode']} |"
                )
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
