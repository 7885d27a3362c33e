#!/usr/bin/env bash
# Benchmarks of rackscale's transports: KV transfer between a prefill and a
# decode engine over loopback gRPC against raw loopback TCP
# (engine/benches/kv_transfer.rs), and etcd registry watch latency
# (tests/benches/registry_watch.rs). Writes one markdown report per bench.
#
# Usage: scripts/bench-transport.sh [OUTPUT_DIR]   (default: $CARGO_TARGET_DIR/bench)
#
# Steps (each says what failed and how to fix it):
#   1. cargo bench -p engine --bench kv_transfer -- --reps $BENCH_KV_REPS --tls
#   2. cargo bench -p rackscale-tests --bench registry_watch
#        -- --count $BENCH_WATCH_COUNT --rate $BENCH_WATCH_RATE
#      (needs etcd from scripts/setup.sh, which `make bench` runs first)
#
# Environment:
#   CARGO_TARGET_DIR   cargo's target dir (default: target)
#   BENCH_KV_REPS      timed transfers per case (default 20)
#   BENCH_WATCH_COUNT  puts per watch case (default 2000)
#   BENCH_WATCH_RATE   steady puts per second (default 200)
#
# A bench exits non-zero only when what it measures is broken (a corrupt KV
# transfer, a lost or reordered watch event); a missed target is printed as
# MISS. Both benches run even if the first fails; the script then fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT_DIR="${1:-$TARGET/bench}"
KV_REPS="${BENCH_KV_REPS:-20}"
WATCH_COUNT="${BENCH_WATCH_COUNT:-2000}"
WATCH_RATE="${BENCH_WATCH_RATE:-200}"

say() { printf '[bench-transport] %s\n' "$*" >&2; }
fail() {
  printf '[bench-transport] ERROR: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '[bench-transport]   how to fix: %s\n' "$2" >&2
  exit 1
}

[ $# -le 1 ] || fail "too many arguments" "usage: scripts/bench-transport.sh [OUTPUT_DIR]"
command -v cargo >/dev/null || fail "cargo not found" "install Rust (rustup) and put cargo on PATH"
mkdir -p "$OUT_DIR" || fail "cannot create $OUT_DIR"
cd "$ROOT"
export CARGO_TARGET_DIR="$TARGET"

host() {
  local cpu
  cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)"
  printf 'Host: %s CPUs (%s), load average %s at the end of the run.\n' \
    "$(nproc)" "${cpu:-unknown CPU}" "$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
}

# run TITLE PACKAGE BENCH [BENCH-ARGS...]: builds and runs one bench, writes
# $OUT_DIR/BENCH.md and prints it; returns the bench's exit status.
run() {
  local title="$1" package="$2" bench="$3" status=0 out cmd
  shift 3
  cmd="cargo bench -p $package --bench $bench -- $*"
  say "building $bench (release; the first build takes about 10 minutes on 2 cores)"
  cargo bench -q -p "$package" --bench "$bench" --no-run >&2 ||
    fail "cargo bench --no-run for $bench failed" "see the compiler output above"
  say "running: $cmd"
  out="$(cargo bench -q -p "$package" --bench "$bench" -- "$@")" || status=$?
  {
    printf '## %s (%s)\n\n' "$title" "$(date -u +%Y-%m-%dT%H:%MZ)"
    printf '`%s` (CARGO_TARGET_DIR=%s)\n\n' "$cmd" "$TARGET"
    host
    printf '%s\n' "$out"
    [ "$status" = 0 ] || printf '\n**The bench failed (exit %s); its error went to stderr.**\n' "$status"
  } >"$OUT_DIR/$bench.md"
  cat "$OUT_DIR/$bench.md"
  say "report written to $OUT_DIR/$bench.md"
  return "$status"
}

KV_STATUS=0
run "KV transfer throughput" engine kv_transfer --reps "$KV_REPS" --tls || KV_STATUS=$?
WATCH_STATUS=0
run "Registry watch latency" rackscale-tests registry_watch \
  --count "$WATCH_COUNT" --rate "$WATCH_RATE" || WATCH_STATUS=$?

[ "$KV_STATUS" = 0 ] ||
  fail "the KV transfer bench failed (exit $KV_STATUS)" "a transfer was corrupt or an engine failed; see $OUT_DIR/kv_transfer.md"
[ "$WATCH_STATUS" = 0 ] ||
  fail "the registry watch bench failed (exit $WATCH_STATUS)" "see its error in $OUT_DIR/registry_watch.md (is etcd installed? run scripts/setup.sh)"
