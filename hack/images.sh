#!/usr/bin/env bash
# Builds qmesh's container images from the release binaries, as docker-archive tars, and imports
# them into the containerd of the test cluster (hack/cluster.sh):
#
#   qmesh/operator:dev   /usr/local/bin/qmesh-operator   (as the Dockerfile's `operator` stage)
#   qmesh/sidecar:dev    /usr/local/bin/qmesh-sidecar    (as the Dockerfile's `sidecar` stage)
#   qmesh/example:dev    /usr/local/bin/qmesh            (as the Dockerfile's `example` stage: the CLI)
#
#   hack/images.sh [--build] [--no-import] [--from DIR]
#     --build      run `cargo build --release` for the three binaries first
#     --no-import  only write the tars (to ${QMESH_CACHE_DIR:-~/.cache/qmesh}/image-archives)
#     --from DIR   take the binaries from DIR (e.g. the test run's own debug build)
#
# Binaries: $CARGO_TARGET_DIR/release, else target/release, else
# ${QMESH_CACHE_DIR:-~/.cache/qmesh}/cargo-target/release (the first holding all three).
# No Docker and no registry are needed: each image is one layer built from a directory. Like the
# Dockerfile's distroless/cc-debian12:nonroot base, the layer holds the shared libraries the
# binaries need (found with ldd, checked in a chroot), /etc/passwd and /etc/group with the user
# nonroot (65532), nsswitch.conf, CA certificates, /tmp and /home/nonroot; the images run as
# 65532:65532 with the Dockerfile's entrypoints, ports and environment. Pods must use
# imagePullPolicy: Never. Prints the image references on stdout.
# tests/tests/images_match_dockerfile.rs checks these images against the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_ROOT=${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}
STATE=${QMESH_CLUSTER_DIR:-$CACHE_ROOT/cluster}
CTR_SOCK=$STATE/run/containerd/containerd.sock
OUT=$CACHE_ROOT/image-archives
BINARIES=(qmesh-operator qmesh-sidecar qmesh)

log() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }

BUILD=0
IMPORT=1
FROM=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) BUILD=1 ;;
    --no-import) IMPORT=0 ;;
    --from) FROM=${2:?--from needs a directory}; shift ;;
    *) echo "usage: $0 [--build] [--no-import] [--from DIR]" >&2; exit 2 ;;
  esac
  shift
done

if [[ $BUILD -eq 1 ]]; then
  log "cargo build --release (qmesh-operator, qmesh-sidecar, qmesh)"
  cargo build --release --locked -p qmesh-operator -p qmesh-sidecar -p qmesh \
    --bin qmesh-operator --bin qmesh-sidecar --bin qmesh >&2
fi

RELEASE=
candidates=()
if [[ -n $FROM ]]; then
  candidates+=("$FROM")
else
  [[ -n ${CARGO_TARGET_DIR:-} ]] && candidates+=("$CARGO_TARGET_DIR/release")
  candidates+=(target/release "$CACHE_ROOT/cargo-target/release")
fi
for dir in "${candidates[@]}"; do
  ok=1
  for b in "${BINARIES[@]}"; do [[ -x $dir/$b ]] || ok=0; done
  if [[ $ok -eq 1 ]]; then RELEASE=$dir; break; fi
done
[[ -n $RELEASE ]] || die "no release build of ${BINARIES[*]} in ${candidates[*]}: run
  cargo build --release -p qmesh-operator -p qmesh-sidecar -p qmesh   (or hack/images.sh --build)"
log "binaries from $RELEASE"

if [[ $IMPORT -eq 1 ]]; then
  command -v ctr >/dev/null || die "ctr not found: start the cluster first (hack/cluster.sh up)"
  ctr --address "$CTR_SOCK" version >/dev/null 2>&1 ||
    die "the cluster's containerd ($CTR_SOCK) is not running: hack/cluster.sh up (or use --no-import)"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

# The image's root directory: the binary, the shared libraries it loads, and distroless' basics.
stage_rootfs() { # root binary
  local root=$1 bin=$2 lib
  mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
  install -m 0755 "$RELEASE/$bin" "$root/usr/local/bin/$bin"
  if ldd "$RELEASE/$bin" >/dev/null 2>&1; then
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
    for lib in $(ldd "$RELEASE/$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  fi
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  echo "hosts: files dns" >"$root/etc/nsswitch.conf"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  fi
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  chmod 0700 "$root/home/nonroot"
  # The layer must be enough on its own: let its dynamic loader resolve every library inside it.
  local interp
  interp=$(ldd "$RELEASE/$bin" 2>/dev/null | awk '$1 ~ /^\/.*ld-linux/ {print $1}')
  if [[ -n $interp ]]; then
    if ! chroot "$root" "$interp" --list "/usr/local/bin/$bin" >"$work/$bin.libs" 2>&1 ||
      grep -q "not found" "$work/$bin.libs"; then
      cat "$work/$bin.libs" >&2
      die "$bin cannot load its libraries from its image layer"
    fi
  fi
}

# One docker-archive tar: layer.tar (the directory), the image config, manifest.json.
archive() { # root tag config-json out
  python3 - "$@" <<'EOF'
import hashlib, io, json, os, sys, tarfile
root, tag, config_json, out = sys.argv[1:5]
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            info = t.gettarinfo(path, arcname=os.path.relpath(path, root))
            info.mtime = 0
            info.uname = info.gname = ""
            if info.isfile():
                with open(path, "rb") as f:
                    t.addfile(info, f)
            else:
                t.addfile(info)
layer = layer.getvalue()
config = json.loads(config_json)
config.update({"architecture": "amd64", "os": "linux",
               "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}})
config = json.dumps(config, sort_keys=True).encode()
config_name = hashlib.sha256(config).hexdigest() + ".json"
manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]).encode()
with tarfile.open(out + ".tmp", "w") as t:
    for name, blob in (("layer.tar", layer), (config_name, config), ("manifest.json", manifest)):
        info = tarfile.TarInfo(name)
        info.size = len(blob)
        t.addfile(info, io.BytesIO(blob))
os.replace(out + ".tmp", out)
print(config_name[:12])
EOF
}

BASE_ENV='"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"'
refs=()
build_image() { # tag binary extra-config-json-fragment
  local tag=$1 bin=$2 extra=$3 root=$work/${2}-root out id
  out=$OUT/$(echo "$tag" | tr '/:' '__').tar
  stage_rootfs "$root" "$bin"
  id=$(archive "$root" "$tag" "{\"config\": {\"User\": \"65532:65532\", \"WorkingDir\": \"/home/nonroot\",
    \"Entrypoint\": [\"/usr/local/bin/$bin\"], $extra}}" "$out")
  log "$tag: $out ($(du -h "$out" | cut -f1), image id $id)"
  if [[ $IMPORT -eq 1 ]]; then
    ctr --address "$CTR_SOCK" -n k8s.io images import "$out" >&2
  fi
  refs+=("$tag")
}

build_image qmesh/operator:dev qmesh-operator "\"Env\": [$BASE_ENV]"
# Peer API, app gRPC, app HTTP, admin; glibc's malloc gives a drained backlog's memory back.
build_image qmesh/sidecar:dev qmesh-sidecar "\"Env\": [$BASE_ENV, \"MALLOC_ARENA_MAX=2\", \"MALLOC_TRIM_THRESHOLD_=131072\"],
  \"ExposedPorts\": {\"7070/tcp\": {}, \"7071/tcp\": {}, \"7072/tcp\": {}, \"7073/tcp\": {}}"
build_image qmesh/example:dev qmesh "\"Env\": [$BASE_ENV]"

[[ $IMPORT -eq 0 ]] || log "imported into $CTR_SOCK (namespace k8s.io); use imagePullPolicy: Never"
printf '%s\n' "${refs[@]}"
