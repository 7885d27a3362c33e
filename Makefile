# rackscale: the two commands a newcomer runs are `make run` and `make test`.
# Both install what they need first (scripts/setup.sh: idempotent, cached
# under $${XDG_CACHE_HOME:-$$HOME/.cache}/rackscale).

SHELL := /bin/bash
CARGO ?= cargo
RACKSCALE := target/release/rackscale
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
	@echo "[build] cargo build --release (first build takes several minutes on 2 cores)"
	@$(CARGO) build --release -p cli

# The most complete real thing available today: the planner over both rack
# SKUs, the InferenceX comparison table and the frontier plot.
run: setup build
	@mkdir -p $(OUT)
	@echo
	@$(RACKSCALE) plan --model deepseek-v4-pro --sku gb300 --isl 8192 --osl 1024 --gpus 72 \
		--min-interactivity 27 --compare gb200 --explain --plot $(OUT)/frontiers.svg
	@echo
	@echo "== The InferenceX calibration rows, predicted against measured =="
	@$(RACKSCALE) calibrate --check
	@echo
	@echo "Frontier plot: $(OUT)/frontiers.svg"

lint:
	@echo "[lint] cargo fmt --check"
	@$(CARGO) fmt --all -- --check || { echo "cargo fmt found unformatted code: run 'cargo fmt --all'"; exit 1; }
	@echo "[lint] cargo clippy --all-targets -- -D warnings"
	@$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	@$(CARGO) test --workspace --no-fail-fast

test: setup lint unit

# Benchmarks report figures (docs/benchmarks.md); tests only assert behaviour.
bench: setup
	@mkdir -p target/bench
	@scripts/bench-planner.sh target/bench/planner.md
	@echo "== placement at scale =="
	@$(CARGO) bench -p operator --bench placement | tee target/bench/placement.md
	@echo "reports in target/bench/"

clean-cache:
	@echo "removing $${RACKSCALE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/rackscale}"
	@rm -rf "$${RACKSCALE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/rackscale}"

# Regenerate the CRD YAML from the Rust types (CI fails when it drifts).
crds:
	@$(CARGO) run -q -p operator --bin rackscale-operator -- crds --out-dir deploy/crds --out-dir charts/rackscale/crds
