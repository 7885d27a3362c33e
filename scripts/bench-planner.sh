#!/usr/bin/env bash
# Benchmarks of the planner (perfmodel): the sweep's wall time, pinned to one
# core, and rackscale side by side with NVIDIA aiconfigurator against the
# InferenceX DeepSeek-V4-Pro measurements. Writes one markdown report.
#
# Usage: scripts/bench-planner.sh [OUTPUT.md]      (default: stdout)
#
# Steps (each says what failed and how to fix it):
#   1. cargo build --release -p cli                  (the `rackscale` binary)
#   2. cargo bench -p perfmodel --bench sweep        (pinned: taskset -c $BENCH_CPU)
#   3. aiconfigurator==0.12.0 in $RACKSCALE_CACHE/venv-bench (created only if
#      missing, reinstalled only if the version differs)
#   4. scripts/aiconfigurator_compare.py             (HF_HUB_OFFLINE=1)
#
# Environment:
#   CARGO_TARGET_DIR  cargo's target dir (default: target)
#   RACKSCALE_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/rackscale)
#   BENCH_REPS        timed runs per sweep case (default 5)
#   BENCH_CPU         core to pin the sweep bench to (default 0; "none" = unpinned)
#   BENCH_SKIP_AIC=1  rackscale only (no aiconfigurator install or runs)
#   BENCH_AIC_REUSE=1 reuse aiconfigurator results cached in the work dir
#   BENCH_OUT_DIR     where the JSON and aiconfigurator outputs go
#                     (default: $CARGO_TARGET_DIR/bench)
#
# Idempotent: rerunning rebuilds only what changed, reuses the venv, and
# overwrites the report and the JSON.
set -euo pipefail

AIC_VERSION=0.12.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${RACKSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackscale}"
VENV="$CACHE/venv-bench"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT_DIR="${BENCH_OUT_DIR:-$TARGET/bench}"
REPS="${BENCH_REPS:-5}"
CPU="${BENCH_CPU:-0}"
OUTPUT="${1:-}"

say() { printf '[bench-planner] %s\n' "$*" >&2; }
fail() {
  printf '[bench-planner] ERROR: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '[bench-planner]   how to fix: %s\n' "$2" >&2
  exit 1
}

[ $# -le 1 ] || fail "too many arguments" "usage: scripts/bench-planner.sh [OUTPUT.md]"
command -v cargo >/dev/null || fail "cargo not found" "install Rust (rustup) and put cargo on PATH"
command -v python3 >/dev/null || fail "python3 not found" "install Python 3.10 or later"
if [ "$CPU" != none ]; then
  command -v taskset >/dev/null ||
    fail "taskset not found (needed to pin the sweep bench)" "install util-linux, or set BENCH_CPU=none"
fi
if [ -n "$OUTPUT" ]; then
  mkdir -p "$(dirname "$OUTPUT")" || fail "cannot create the directory of $OUTPUT"
fi
mkdir -p "$OUT_DIR"
cd "$ROOT"
export CARGO_TARGET_DIR="$TARGET"

say "building rackscale (release) in $TARGET"
cargo build --release -p cli >&2 || fail "cargo build --release -p cli failed" "see the compiler output above"
RACKSCALE="$TARGET/release/rackscale"
[ -x "$RACKSCALE" ] || fail "no binary at $RACKSCALE after the build"

say "building the sweep bench"
cargo bench -p perfmodel --bench sweep --no-run >&2 ||
  fail "cargo bench --no-run failed" "see the compiler output above"
PIN=()
[ "$CPU" != none ] && PIN=(taskset -c "$CPU")
say "running the sweep bench (${PIN[*]:-unpinned}, $REPS reps; about a minute)"
BENCH_STATUS=0
BENCH_MD="$(${PIN[@]+"${PIN[@]}"} cargo bench -q -p perfmodel --bench sweep -- --reps "$REPS")" || BENCH_STATUS=$?
[ -n "$BENCH_MD" ] || fail "the sweep bench printed nothing (exit $BENCH_STATUS)"

COMPARE_ARGS=(--rackscale "$RACKSCALE" --work-dir "$OUT_DIR/aiconfigurator"
  --json-out "$OUT_DIR/aiconfigurator_compare.json" --markdown-out "$OUT_DIR/aiconfigurator_compare.md")
if [ "${BENCH_SKIP_AIC:-0}" = 1 ]; then
  COMPARE_ARGS+=(--skip-aiconfigurator)
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed" "install the python3-venv package"
  fi
  have="$("$VENV/bin/python" -m pip show aiconfigurator 2>/dev/null | sed -n 's/^Version: //p')"
  if [ "$have" != "$AIC_VERSION" ] || [ ! -x "$VENV/bin/aiconfigurator" ]; then
    say "installing aiconfigurator==$AIC_VERSION into $VENV (log: $OUT_DIR/pip.log)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check "aiconfigurator==$AIC_VERSION" \
      >"$OUT_DIR/pip.log" 2>&1 || {
      tail -n 20 "$OUT_DIR/pip.log" >&2
      fail "pip install aiconfigurator==$AIC_VERSION failed" "check access to PyPI (full log: $OUT_DIR/pip.log)"
    }
  else
    say "aiconfigurator $AIC_VERSION already installed in $VENV"
  fi
  COMPARE_ARGS+=(--aiconfigurator "$VENV/bin/aiconfigurator")
  [ "${BENCH_AIC_REUSE:-0}" = 1 ] && COMPARE_ARGS+=(--reuse)
fi

if [ "${BENCH_SKIP_AIC:-0}" = 1 ]; then
  say "comparing with the InferenceX rows (aiconfigurator skipped)"
else
  say "comparing with aiconfigurator (about 5 minutes on 2 cores; less with BENCH_AIC_REUSE=1)"
fi
HF_HUB_OFFLINE=1 python3 scripts/aiconfigurator_compare.py "${COMPARE_ARGS[@]}" ||
  fail "scripts/aiconfigurator_compare.py failed" "see its message above"

cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)"
REPORT="$(
  printf '## Planner benchmark run (%s)\n\n' "$(date -u +%Y-%m-%dT%H:%MZ)"
  printf 'Host: %s CPUs (%s), load average %s at the end of the run.\n\n' \
    "$(nproc)" "${cpu_model:-unknown CPU}" "$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
  printf '### Sweep wall time (`%scargo bench -p perfmodel --bench sweep -- --reps %s`)\n\n' \
    "${PIN[*]:+${PIN[*]} }" "$REPS"
  printf '%s\n\n' "$BENCH_MD"
  cat "$OUT_DIR/aiconfigurator_compare.md"
  printf '\nJSON: %s\n' "$OUT_DIR/aiconfigurator_compare.json"
)"
if [ -n "$OUTPUT" ]; then
  printf '%s\n' "$REPORT" >"$OUTPUT"
  say "report written to $OUTPUT"
else
  printf '%s\n' "$REPORT"
fi
[ "$BENCH_STATUS" = 0 ] || fail "the sweep bench missed its target (exit $BENCH_STATUS); see the table"
