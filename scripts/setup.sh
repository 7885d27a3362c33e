#!/usr/bin/env bash
# Installs the real components that rackscale's tests and local runs use:
# etcd and kube-apiserver (built from the Go module proxy), kubectl, helm,
# Debian's prometheus and protoc, a Python virtual environment with the OpenAI SDK,
# NVIDIA's aiperf benchmark client in a virtual environment of its own, and
# vllm-router (the peer of scripts/bench-router.sh) in another.
#
# Idempotent and pinned: everything lands in $RACKSCALE_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/rackscale), each step is skipped when its
# pinned output is already there, and a failing step says what is missing.
#
# Usage: scripts/setup.sh [step...]   (steps: protoc etcd kube helm prometheus python aiperf router; default all but router)
set -euo pipefail

ETCD_VERSION=v3.6.16
KUBE_VERSION=v1.37.2
KUBE_STAGING_VERSION=v0.37.2
HELM_VERSION=v4.3.2
PY_PACKAGES=("openai==3.51.0")
AIPERF_VERSION=0.13.0
VLLM_ROUTER_VERSION=0.1.17

CACHE="${RACKSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackscale}"
BIN="$CACHE/bin"
LOGS="$CACHE/logs"
VENV="$CACHE/venv"
AIPERF_VENV="$CACHE/venv-aiperf"
ROUTER_VENV="$CACHE/venv-router"
mkdir -p "$BIN" "$LOGS"

export GOFLAGS=-mod=mod
export CGO_ENABLED=0

say() { printf '[setup] %s\n' "$*"; }
fail() {
  printf '[setup] ERROR: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '[setup]   how to fix: %s\n' "$2" >&2
  exit 1
}

# run_step NAME CHECK_FN INSTALL_FN: skip when CHECK_FN succeeds, otherwise
# run INSTALL_FN with its output in $LOGS/NAME.log and report elapsed time.
run_step() {
  local name=$1 check=$2 install=$3 start end log="$LOGS/$1.log"
  if "$check"; then
    say "$name: already installed, skipping"
    return 0
  fi
  say "$name: installing (log: $log)"
  start=$(date +%s)
  if ! "$install" >"$log" 2>&1; then
    tail -n 25 "$log" >&2 || true
    fail "$name could not be installed (full log: $log)" "$(hint_for "$name")"
  fi
  if ! "$check"; then
    fail "$name installed but its check still fails (log: $log)" "$(hint_for "$name")"
  fi
  end=$(date +%s)
  say "$name: done in $((end - start)) s"
}

hint_for() {
  case $1 in
    etcd|kube|helm) echo "needs Go >= 1.26 on PATH (https://go.dev/doc/install) and access to the Go module proxy (GOPROXY=$(go env GOPROXY 2>/dev/null || echo unset))" ;;
    prometheus) echo "needs Debian's package: run 'apt-get update && apt-get install -y prometheus' as root" ;;
    protoc) echo "needs Debian's package: run 'apt-get update && apt-get install -y protobuf-compiler libprotobuf-dev' as root" ;;
    python) echo "needs python3 with the venv module (Debian: apt-get install -y python3-venv) and access to PyPI" ;;
    router) echo "needs python3 with the venv module (Debian: apt-get install -y python3-venv) and access to PyPI" ;;
    aiperf) echo "needs python3 3.11 to 3.13 with the venv module (or AIPERF_PYTHON=/path/to/such a python) and access to PyPI" ;;
  esac
}

need() { command -v "$1" >/dev/null 2>&1 || fail "'$1' is not on PATH" "$2"; }

# ---------------------------------------------------------------- etcd
# output_has CMD... -- TEXT: CMD's output contains TEXT. Captures first:
# `cmd | grep -q` under pipefail fails at random when grep exits early and
# cmd dies of SIGPIPE writing the rest.
output_has() {
  local text=${*: -1} out
  out=$("${@:1:$#-2}" 2>/dev/null) || return 1
  [[ $out == *"$text"* ]]
}

etcd_ok() { [ -x "$BIN/etcd" ] && output_has "$BIN/etcd" --version -- "etcd Version: ${ETCD_VERSION#v}"; }
etcd_install() {
  need go "install Go >= 1.26"
  local mod="$CACHE/src/etcd-$ETCD_VERSION"
  rm -rf "$mod" && mkdir -p "$mod"
  cat >"$mod/go.mod" <<GOMOD
module rackscale.local/etcd

go 1.24
GOMOD
  cat >"$mod/main.go" <<'GO'
// Wrapper that builds the etcd server from the Go module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$mod" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy &&
    go build -trimpath -o "$BIN/etcd" .)
}

# ------------------------------------------------------ kube-apiserver
kube_ok() {
  [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubectl" ] &&
    output_has "$BIN/kube-apiserver" --version -- "Kubernetes $KUBE_VERSION" &&
    output_has "$BIN/kubectl" version --client -- "Client Version: $KUBE_VERSION"
}
kube_install() {
  need go "install Go >= 1.26"
  local mod="$CACHE/src/kubernetes-$KUBE_VERSION" gomod staging ldflags
  rm -rf "$mod" && mkdir -p "$mod"
  # k8s.io/kubernetes replaces its staging modules with local paths, which a
  # module dependency cannot follow: point each at its published v0.x tag.
  gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || { echo "could not download k8s.io/kubernetes@$KUBE_VERSION go.mod"; return 1; }
  staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$gomod" | sort -u)
  [ -n "$staging" ] || { echo "no staging replaces found in $gomod"; return 1; }
  {
    echo "module rackscale.local/kubernetes"
    echo
    sed -n 's/^go \(.*\)/go \1/p' "$gomod"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $KUBE_STAGING_VERSION"; done
    echo ")"
  } >"$mod/go.mod"
  cat >"$mod/tools.go" <<'GO'
//go:build tools

// Pins the commands this wrapper builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  local major=${KUBE_VERSION#v}; major=${major%%.*}
  local minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
  ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$mod" && go mod tidy -e &&
    go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver &&
    go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN/kubectl" k8s.io/kubernetes/cmd/kubectl)
}

# ---------------------------------------------------------------- helm
helm_ok() { [ -x "$BIN/helm" ] && output_has "$BIN/helm" version --short -- "$HELM_VERSION"; }
helm_install() {
  need go "install Go >= 1.26"
  GOBIN="$BIN" go install -trimpath \
    -ldflags "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
}

# ---------------------------------------------------------- prometheus
prometheus_ok() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }
# apt_install PKG...: Debian packages, with one 'apt-get update' per run.
APT_UPDATED=""
# sudo_cmd: "sudo" unless we are root already.
sudo_cmd() { [ "$(id -u)" = 0 ] || echo sudo; }
apt_install() {
  need apt-get "Debian's packages ($*) are needed; on another OS install them and put them on PATH"
  local sudo
  sudo=$(sudo_cmd)
  if [ -z "$APT_UPDATED" ]; then $sudo apt-get update && APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$@"
}

prometheus_install() {
  apt_install prometheus
  # The package starts a system service where an init system runs; tests
  # start their own instances on free ports instead.
  $(sudo_cmd) service prometheus stop >/dev/null 2>&1 || true
}

# -------------------------------------------------------------- protoc
# etcd-client's build script compiles etcd's .proto files with protoc, and
# they import the well-known types (google/protobuf/descriptor.proto, ...),
# which Debian ships in libprotobuf-dev, only recommended by the compiler.
protoc_ok() {
  command -v protoc >/dev/null 2>&1 && [ -f /usr/include/google/protobuf/descriptor.proto ]
}
protoc_install() { apt_install protobuf-compiler libprotobuf-dev; }

# -------------------------------------------------------------- python
python_stamp() { printf '%s\n' "${PY_PACKAGES[@]}" | sha256sum | cut -c1-16; }
python_ok() { [ -f "$VENV/.rackscale-$(python_stamp)" ] && "$VENV/bin/python" -c 'import openai' 2>/dev/null; }
python_install() {
  need python3 "install Python 3.10 or newer"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check -q "${PY_PACKAGES[@]}"
  rm -f "$VENV"/.rackscale-*
  touch "$VENV/.rackscale-$(python_stamp)"
}

# -------------------------------------------------------------- aiperf
# NVIDIA's benchmark client (tests/tests/aiperf.rs cross-checks `rackscale
# bench` with it). Its own venv: it pulls in transformers, pandas, pyarrow...
# (about 1 GiB), which the OpenAI SDK's venv has no use for.
aiperf_ok() {
  [ -x "$AIPERF_VENV/bin/aiperf" ] &&
    output_has "$AIPERF_VENV/bin/python" -m pip show aiperf -- "Version: $AIPERF_VERSION"
}
aiperf_install() {
  local py=${AIPERF_PYTHON:-python3}
  need "$py" "install Python 3.11 to 3.13 (aiperf $AIPERF_VERSION requires it)"
  "$py" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' ||
    { echo "aiperf $AIPERF_VERSION needs Python 3.11 to 3.13; $py is $("$py" --version 2>&1)"; return 1; }
  [ -x "$AIPERF_VENV/bin/python" ] || "$py" -m venv "$AIPERF_VENV"
  "$AIPERF_VENV/bin/python" -m pip install --disable-pip-version-check -q "aiperf==$AIPERF_VERSION"
}

# --------------------------------------------------------- vllm-router
# vLLM's Rust router (a wheel with its binary), the peer that
# scripts/bench-router.sh measures our frontend against.
router_ok() {
  [ -x "$ROUTER_VENV/bin/vllm-router" ] &&
    output_has "$ROUTER_VENV/bin/python" -m pip show vllm-router -- "Version: $VLLM_ROUTER_VERSION"
}
router_install() {
  need python3 "install Python 3.10 or newer"
  [ -x "$ROUTER_VENV/bin/python" ] || python3 -m venv "$ROUTER_VENV"
  "$ROUTER_VENV/bin/python" -m pip install --disable-pip-version-check -q "vllm-router==$VLLM_ROUTER_VERSION"
}

steps=("$@")
# `router` (vllm-router) only serves `make bench`, whose script asks for it.
[ ${#steps[@]} -gt 0 ] || steps=(protoc etcd kube helm prometheus python aiperf)
total_start=$(date +%s)
for s in "${steps[@]}"; do
  case $s in
    etcd) run_step etcd etcd_ok etcd_install ;;
    kube) run_step kube kube_ok kube_install ;;
    helm) run_step helm helm_ok helm_install ;;
    prometheus) run_step prometheus prometheus_ok prometheus_install ;;
    python) run_step python python_ok python_install ;;
    aiperf) run_step aiperf aiperf_ok aiperf_install ;;
    router) run_step router router_ok router_install ;;
    protoc) run_step protoc protoc_ok protoc_install ;;
    *) fail "unknown step '$s'" "steps are: protoc etcd kube helm prometheus python aiperf router" ;;
  esac
done
say "all done in $(($(date +%s) - total_start)) s; binaries in $BIN"
