#!/usr/bin/env bash
# Benchmark of the rebalancer: `rackscale simulate --policy all` for 72 GB300
# GPUs serving DeepSeek-V4-Pro on deploy/traces/shift.yaml (8K/1K -> 32K/1K
# -> 1K/4K -> 8K/1K), rebalancing against a static split, an oracle and a
# Dynamo-style planner. Writes one markdown report with the targets.
#
# Usage: scripts/bench-rebalance.sh [OUTPUT.md]      (default: stdout)
#
# Environment:
#   CARGO_TARGET_DIR  cargo's target dir (default: target)
#   BENCH_SEED        seed of the arrivals (default 1)
#   BENCH_OUT_DIR     where the JSON goes (default: $CARGO_TARGET_DIR/bench)
#
# Idempotent: rerunning rebuilds only what changed and overwrites the report.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT_DIR="${BENCH_OUT_DIR:-$TARGET/bench}"
SEED="${BENCH_SEED:-1}"
OUTPUT="${1:-}"

say() { printf '[bench-rebalance] %s\n' "$*" >&2; }
fail() {
  printf '[bench-rebalance] ERROR: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '[bench-rebalance]   how to fix: %s\n' "$2" >&2
  exit 1
}

[ $# -le 1 ] || fail "too many arguments" "usage: scripts/bench-rebalance.sh [OUTPUT.md]"
command -v cargo >/dev/null || fail "cargo not found" "install Rust (rustup) and put cargo on PATH"
command -v python3 >/dev/null || fail "python3 not found" "install Python 3.10 or later"
if [ -n "$OUTPUT" ]; then
  mkdir -p "$(dirname "$OUTPUT")" || fail "cannot create the directory of $OUTPUT"
fi
mkdir -p "$OUT_DIR"
cd "$ROOT"
export CARGO_TARGET_DIR="$TARGET"

say "building rackscale (debug profile, as make bench does) in $TARGET"
cargo build -p cli >&2 || fail "cargo build -p cli failed" "see the compiler output above"
RACKSCALE="$TARGET/debug/rackscale"
[ -x "$RACKSCALE" ] || fail "no binary at $RACKSCALE after the build"

ARGS=(simulate --trace deploy/traces/shift.yaml --model deepseek-v4-pro --sku gb300 --gpus 72
  --prefill-tp 4 --decode-ep 16 --min-interactivity 20 --max-ttft-ms 10000
  --interval 30 --window 60 --max-moves 4 --seed "$SEED" --policy all)
say "simulating: rackscale ${ARGS[*]}"
START=$(date +%s.%N)
"$RACKSCALE" "${ARGS[@]}" --json >"$OUT_DIR/rebalance.json" ||
  fail "rackscale simulate failed" "see its message above"
END=$(date +%s.%N)
TEXT="$("$RACKSCALE" "${ARGS[@]}")"

REPORT="$(
  python3 - "$OUT_DIR/rebalance.json" "rackscale ${ARGS[*]}" "$START" "$END" <<'PY'
import json, sys
reports = {r["policy"]: r for r in json.load(open(sys.argv[1]))}
cmd, start, end = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
rb = reports["rebalance"]
g = {p: r["goodput_per_gpu_hour"] for p, r in reports.items()}
ok = lambda b: "met" if b else "**missed**"
print("## Rebalancer benchmark run\n")
print(f"Command: `{cmd}` (all four policies in {end - start:.1f} s wall).\n")
print("| policy | goodput (req/GPU-h) | SLO met | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | role switches | GPU-s lost |")
print("|---|---:|---:|---:|---:|---:|---:|")
for p in ["rebalance", "static", "oracle", "dynamo"]:
    r = reports[p]
    print(f"| {p} | {r['goodput_per_gpu_hour']:.1f} | {100*r['slo_attainment']:.1f}% | "
          f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f} | "
          f"{1e3*r['tpot_s']['p50']:.1f} / {1e3*r['tpot_s']['p99']:.1f} | "
          f"{r['role_switches']} | {r['gpu_seconds_switching']:.0f} |")
vs_static = g["rebalance"] / g["static"] if g["static"] > 0 else float("inf")
vs_oracle = g["rebalance"] / g["oracle"]
vs_dynamo = g["rebalance"] / g["dynamo"] if g["dynamo"] > 0 else float("inf")
settle = [p["intervals_to_settle"] for p in rb["phases"][1:]]
print()
print("| target | measured | |")
print("|---|---:|---|")
print(f"| rebalance / static goodput >= 1.3x | {vs_static:.2f}x | {ok(vs_static >= 1.3)} |")
print(f"| rebalance within 10% of oracle | {vs_oracle:.2f}x | {ok(vs_oracle >= 0.9)} |")
print(f"| rebalance ahead of dynamo-style | {vs_dynamo:.2f}x | {ok(vs_dynamo > 1.0)} |")
print(f"| intervals to settle after each shift <= 3 | {', '.join(map(str, settle))} | {ok(all(s <= 3 for s in settle))} |")
print()
print("Per phase (rebalance): split at the end of the phase vs the oracle's best split for it.\n")
print("| phase | SLO met | split at end | best | last move after the shift |")
print("|---|---:|---|---|---:|")
for p in rb["phases"]:
    sp, bs = p["split_at_end"], p["best_split"]
    print(f"| {p['name']} | {100*p['slo_attainment']:.1f}% | {sp['prefill']}P:{sp['decode']}D | "
          f"{bs['prefill']}P:{bs['decode']}D | {p['settle_s']:.0f} s ({p['intervals_to_settle']} intervals) |")
PY
)"
REPORT="$REPORT"$'\n\n```\n'"$TEXT"$'\n```\n\nJSON: '"$OUT_DIR/rebalance.json"
if [ -n "$OUTPUT" ]; then
  printf '%s\n' "$REPORT" >"$OUTPUT"
  say "report written to $OUTPUT"
else
  printf '%s\n' "$REPORT"
fi
