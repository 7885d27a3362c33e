#!/usr/bin/env bash
# Router overhead: the rackscale frontend against vllm-router, side by side in
# one run, in front of the same aggregated workers (tests/benches/router.rs).
# Prints a markdown report and writes it to the file given.
#
# Usage: scripts/bench-router.sh [OUTPUT_FILE]   (default: $CARGO_TARGET_DIR/bench/router.md)
#
# Steps (each says what failed and how to fix it):
#   1. scripts/setup.sh etcd router   (pinned etcd and vllm-router; skipped when installed)
#   2. cargo build --release -p engine -p cli --bins   (rackscale-engine, rackscale)
#   3. cargo bench -p rackscale-tests --bench router -- --engine .. --rackscale .. --vllm-router ..
#
# Environment (defaults in brackets):
#   CARGO_TARGET_DIR            cargo's target dir [target]
#   BENCH_ROUTER_WORKERS        aggregated workers behind both routers [2]
#   BENCH_ROUTER_CONCURRENCY    closed-loop clients at saturation [128]
#   BENCH_ROUTER_REQUESTS       measured requests per saturation run [4000]
#   BENCH_ROUTER_RATE           fixed open-loop rate, requests/s [500]
#   BENCH_ROUTER_DURATION       seconds per fixed-rate run [15]
#   BENCH_ROUTER_ROUNDS         rounds over the three targets; medians reported [3]
#   BENCH_ROUTER_POLICY         vllm-router --policy, one that takes a single worker [round_robin]
#   BENCH_ROUTER_TLS            1: also our frontend over mutual TLS to its workers (a fourth target) [1]
#
# The bench exits non-zero only when something is broken (a failed request, a
# process that would not start); a missed target is printed as MISS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${1:-$TARGET/bench/router.md}"
CACHE="${RACKSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackscale}"

say() { printf '[bench-router] %s\n' "$*" >&2; }
fail() {
  printf '[bench-router] ERROR: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '[bench-router]   how to fix: %s\n' "$2" >&2
  exit 1
}

[ $# -le 1 ] || fail "too many arguments" "usage: scripts/bench-router.sh [OUTPUT_FILE]"
command -v cargo >/dev/null || fail "cargo not found" "install Rust (rustup) and put cargo on PATH"
mkdir -p "$(dirname "$OUT")" || fail "cannot create the directory of $OUT"
cd "$ROOT"
export CARGO_TARGET_DIR="$TARGET"

"$ROOT/scripts/setup.sh" etcd router >&2 ||
  fail "scripts/setup.sh etcd router failed" "see its message above"
VLLM_ROUTER="$CACHE/venv-router/bin/vllm-router"
[ -x "$VLLM_ROUTER" ] || fail "no vllm-router at $VLLM_ROUTER" "run scripts/setup.sh router"

say "building rackscale-engine and rackscale (release; the first build takes 10-15 minutes on 2 cores)"
cargo build -q --release -p engine -p cli --bins >&2 ||
  fail "cargo build --release -p engine -p cli failed" "see the compiler output above"
say "building the bench"
cargo bench -q -p rackscale-tests --bench router --no-run >&2 ||
  fail "cargo bench --no-run for router failed" "see the compiler output above"

args=(
  --engine "$TARGET/release/rackscale-engine"
  --rackscale "$TARGET/release/rackscale"
  --vllm-router "$VLLM_ROUTER"
  --workers "${BENCH_ROUTER_WORKERS:-2}"
  --concurrency "${BENCH_ROUTER_CONCURRENCY:-128}"
  --requests "${BENCH_ROUTER_REQUESTS:-4000}"
  --rate "${BENCH_ROUTER_RATE:-500}"
  --duration "${BENCH_ROUTER_DURATION:-15}"
  --rounds "${BENCH_ROUTER_ROUNDS:-3}"
  --policy "${BENCH_ROUTER_POLICY:-round_robin}"
)
[ "${BENCH_ROUTER_TLS:-1}" = 1 ] && args+=(--tls)
cmd="cargo bench -p rackscale-tests --bench router -- ${args[*]}"
say "running: $cmd"
status=0
out="$(cargo bench -q -p rackscale-tests --bench router -- "${args[@]}")" || status=$?
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)"
{
  printf '## Router overhead (%s)\n\n' "$(date -u +%Y-%m-%dT%H:%MZ)"
  printf '`scripts/bench-router.sh` (CARGO_TARGET_DIR=%s), that is:\n`%s`\n\n' "$TARGET" "$cmd"
  printf 'Host: %s CPUs (%s), load average %s at the end of the run; the client, both routers\n' \
    "$(nproc)" "${cpu:-unknown CPU}" "$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
  printf 'and the workers share them.\n\n'
  printf '%s\n' "$out"
  [ "$status" = 0 ] || printf '\n**The bench failed (exit %s); its error went to stderr.**\n' "$status"
} >"$OUT"
cat "$OUT"
say "report written to $OUT"
[ "$status" = 0 ] || fail "the router bench failed (exit $status)" "see the error above and the table in $OUT"
