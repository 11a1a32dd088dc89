#!/usr/bin/env bash
# The whole qmesh test suite, with all of its set-up, on a fresh Debian 12 machine (run as root):
#   formatting, clippy -D warnings, the fuzz corpus and a short fuzzing run, then CRD drift, unit,
#   component, mesh, fault-campaign, Kubernetes (real kube-apiserver + etcd) and real-pods (a
#   one-node cluster, hack/cluster.sh) tests.
# Set-up it does itself: Debian packages, the test Kubernetes binaries (cached, version-keyed, in
# ${QMESH_CACHE_DIR:-~/.cache/qmesh}; honours KUBEBUILDER_ASSETS), and Python packages for the
# example client.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

command -v cargo >/dev/null || {
  echo "cargo not found: install the Rust toolchain (rustup) first" >&2
  exit 1
}

step "Debian packages"
need=()
for pkg in openssl ca-certificates python3 python3-pip python3-venv unzip util-linux curl iproute2 prometheus chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [[ ${#need[@]} -gt 0 ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

step "Traffic stays on this machine"
# The tests' API servers hand out ClusterIPs from 198.19.0.0/16 and dial Service endpoints, never
# ClusterIPs (--enable-aggregator-routing=true); pods of the real-pods cluster live in
# 198.18.0.0/16 (a more specific bridge route wins). Anything that still dials one of these ranges
# is refused by the kernel at once instead of leaving the machine. See docs/testing.md.
for range in 198.19.0.0/16 198.18.0.0/16; do
  ip route replace unreachable "$range" 2>/dev/null ||
    echo "warning: could not route $range nowhere (not root?); tests still dial no ClusterIP" >&2
done

step "Kubernetes test binaries"
KUBEBUILDER_ASSETS=$(hack/k8s-test-env.sh)
export KUBEBUILDER_ASSETS
echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS" >&2

# The real-pods tier (tests/tests/real_pods.rs) brings up a one-node cluster (hack/cluster.sh:
# kubelet, containerd, CNI, cluster DNS) from node binaries built once from the same Debian source
# (cached beside the others); it is taken down when this script exits, whatever the outcome.
step "Kubernetes node binaries (real pods)"
hack/k8s-test-env.sh --node >/dev/null
export QMESH_REAL_PODS=1
trap 'hack/cluster.sh down >/dev/null 2>&1 || echo "warning: hack/cluster.sh down failed" >&2' EXIT

step "Python packages for the example client, the console's browser test and the AMQP clients (venv)"
CACHE_DIR="${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}"
VENV="$CACHE_DIR/venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import grpc, grpc_tools, selenium, pika, kombu" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet -r examples/python/requirements.txt \
    -r cli/tests/console/requirements.txt -r sidecar/tests/amqp/requirements.txt
fi
export QMESH_PYTHON="$VENV/bin/python"

# CI builds each crate once: incremental caches there only fill the disk (tens of GiB per run).
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0
fi
# Keep CI's builds warm between runs on the same machine.
if [[ "${CI:-}" == "true" && -z "${CARGO_TARGET_DIR:-}" ]]; then
  export CARGO_TARGET_DIR="${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}/cargo-target"
fi

step "rustfmt"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The fuzz crate (its own workspace): its seed corpus and every saved crash replayed on stable, then
# a few seconds of coverage-guided fuzzing per target (hack/chaos.sh runs long ones).
step "fuzz corpus and regressions"
(cd fuzz && CARGO_TARGET_DIR="${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}/fuzz-target" \
  cargo test --locked --test corpus)

step "fuzzing (${QMESH_FUZZ_SECONDS:-5} s per target)"
hack/fuzz.sh --seconds "${QMESH_FUZZ_SECONDS:-5}"

# Last, so the test runner's summary closes the output.
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
