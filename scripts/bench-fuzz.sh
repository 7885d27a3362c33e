#!/usr/bin/env bash
# Runs every cargo fuzz target of fuzz/ for a bounded time and reports what
# each found. The corpora in fuzz/corpus/<target> are kept (and committed):
# each run starts from what earlier runs found, adds to it, and minimises it
# (cargo fuzz cmin) so only inputs that add coverage stay.
#
# Usage: scripts/bench-fuzz.sh [OUTPUT_FILE] (default: target/bench/fuzz.md)
#
# Needs the nightly toolchain (cargo fuzz builds with sanitizers) and
# cargo-fuzz; installs cargo-fuzz into the rackscale cache when missing.
#
# Environment:
#   FUZZ_SECONDS  seconds per target (default 60)
#
# Exits non-zero when a target found a crash (its input is saved under
# fuzz/artifacts/<target>/ and named in the report).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/target/bench/fuzz.md}"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
CACHE="${RACKSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackscale}"
FUZZ_ROOT="$CACHE/cargo-fuzz"
export PATH="$FUZZ_ROOT/bin:$PATH"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "[fuzz] the nightly toolchain is missing: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz into $FUZZ_ROOT (once)"
  cargo install cargo-fuzz --locked --root "$FUZZ_ROOT" >"$CACHE/logs/cargo-fuzz.log" 2>&1 || {
    echo "[fuzz] installing cargo-fuzz failed; see $CACHE/logs/cargo-fuzz.log" >&2
    exit 1
  }
fi

cd "$ROOT/fuzz"
mkdir -p "$(dirname "$OUT")"
echo "[fuzz] building the targets (nightly, address sanitizer)"
cargo +nightly fuzz build >/dev/null

failed=0
{
  echo "| target | seconds | runs | corpus before | corpus after | crashes |"
  echo "|---|---:|---:|---:|---:|---|"
} >"$OUT"
for target in $(cargo +nightly fuzz list); do
  corpus="corpus/$target"
  mkdir -p "$corpus" "artifacts/$target"
  before=$(find "$corpus" -type f | wc -l)
  log="$ROOT/target/bench/fuzz-$target.log"
  echo "[fuzz] $target for ${SECONDS_PER_TARGET}s"
  status=0
  cargo +nightly fuzz run "$target" "$corpus" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 -print_final_stats=1 >"$log" 2>&1 || status=$?
  # Keep the corpus minimal: only inputs that add coverage stay.
  cargo +nightly fuzz cmin "$target" "$corpus" >"$log.cmin" 2>&1 || true
  after=$(find "$corpus" -type f | wc -l)
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  crash="none"
  if [ "$status" -ne 0 ]; then
    crash="$(ls -t "artifacts/$target" | head -1) (see $log)"
    failed=1
  fi
  echo "| $target | $SECONDS_PER_TARGET | $runs | $before | $after | $crash |" >>"$OUT"
done
cat "$OUT"
exit "$failed"
