# rackscale: the two commands a newcomer runs are `make run` and `make test`.
# Both install what they need first (scripts/setup.sh: idempotent, cached
# under $${XDG_CACHE_HOME:-$$HOME/.cache}/rackscale).

SHELL := /bin/bash
CARGO ?= cargo
# One dev-profile build serves `make run` and `make test` (perfmodel is
# optimised even there, see Cargo.toml).
RACKSCALE := target/debug/rackscale
OUT ?= target/rackscale-run

.PHONY: all setup build run test lint unit bench clean-cache help crds

all: test

help:
	@echo "make run    - plan DeepSeek-V4-Pro on GB300 and GB200 racks, compare them, draw the frontiers"
	@echo "make test   - install test components, check fmt and clippy, run every test"
	@echo "make bench  - run the benchmarks and print their figures"
	@echo "make setup  - install etcd, kube-apiserver, kubectl, helm, prometheus, Python tools"

setup:
	@scripts/setup.sh

build:
	@echo "[build] cargo build (the first build takes 10-15 minutes on 2 cores)"
	@$(CARGO) build --workspace --bins

# The whole system on one machine: the planner over both rack SKUs with the
# InferenceX comparison and frontier plot, the calibration check, then
# `rackscale up`: etcd, one rackscale-agent per simulated tray (one GB300 and
# one GB200 NVL72 rack), rackscale-operator in standalone mode planning,
# placing and launching deploy/examples/ as engine processes, a frontend per
# deployment, a short `rackscale bench` on each and the predicted-vs-measured
# summary with both racks' frontiers and the measured points; then a clean
# stop. KEEP=1 leaves it up (Ctrl-C stops it).
run: setup build
	@mkdir -p $(OUT)
	@echo
	@echo "== 1. The planner: DeepSeek-V4-Pro on GB300 vs GB200 NVL72 at 27 tok/s/user =="
	@$(RACKSCALE) plan --model deepseek-v4-pro --sku gb300 --isl 8192 --osl 1024 --gpus 72 \
		--min-interactivity 27 --compare gb200 --explain --plot $(OUT)/frontiers.svg
	@echo
	@echo "== 2. The InferenceX calibration rows, predicted against measured =="
	@$(RACKSCALE) calibrate --check
	@echo
	@echo "== 3. A local rack: rackscale up, a bench on every deployment, predicted vs measured =="
	@$(RACKSCALE) up --specs deploy/examples --log-dir $(OUT)/up --bench --plot $(OUT)/measured.svg
	@echo
	@echo "Frontier plots: $(OUT)/frontiers.svg (planner), $(OUT)/measured.svg (with the measured points)"

lint:
	@echo "[lint] cargo fmt --check"
	@$(CARGO) fmt --all -- --check || { echo "cargo fmt found unformatted code: run 'cargo fmt --all'"; exit 1; }
	@echo "[lint] cargo clippy --all-targets -- -D warnings"
	@$(CARGO) clippy --workspace --all-targets -- -D warnings

# Integration tests start the binaries (operator, agent, engine) as processes.
unit:
	@$(CARGO) build --workspace --bins
	@$(CARGO) test --workspace --no-fail-fast

test: setup lint unit

# Benchmarks report figures (docs/benchmarks.md); tests only assert behaviour.
bench: setup
	@mkdir -p target/bench
	@scripts/bench-planner.sh target/bench/planner.md
	@echo "== placement at scale =="
	@$(CARGO) bench -p operator --bench placement | tee target/bench/placement.md
	@echo "== KV transfer and registry watch =="
	@scripts/bench-transport.sh target/bench
	@echo "== a 72-GPU deployment, create -> Ready =="
	@$(CARGO) build -q --workspace --bins
	@target/debug/rack-ready --runs 5 --out target/bench/rack-ready.md
	@echo "== a GB300 recipe through the real processes vs perfmodel, at two concurrency levels =="
	@$(RACKSCALE) up --topology gb300:3x4 --specs deploy/bench --bench --concurrency 16,64 \
		--time-scale 2 --log-dir target/bench/recipe --plot target/bench/recipe.svg --report target/bench/recipe.md
	@echo "== router overhead: rackscale frontend vs vllm-router =="
	@scripts/bench-router.sh target/bench/router.md
	@echo "== rebalancer: 72 GB300 GPUs on a shifting trace vs static, oracle, dynamo-style =="
	@scripts/bench-rebalance.sh target/bench/rebalance.md
	@echo "== fuzzing: registry records, KV framing, OpenAI requests (60 s each) =="
	@scripts/bench-fuzz.sh target/bench/fuzz.md
	@$(CARGO) bench -q -p engine --bench cpu_backend | tee target/bench/cpu-backend.md
	@echo "reports in target/bench/"

clean-cache:
	@echo "removing $${RACKSCALE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/rackscale}"
	@rm -rf "$${RACKSCALE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/rackscale}"

# Regenerate the CRD YAML from the Rust types (CI fails when it drifts).
crds:
	@$(CARGO) run -q -p operator --bin rackscale-operator -- crds --out-dir deploy/crds --out-dir charts/rackscale/crds
