#!/usr/bin/env bash
# qmesh's main job on its embedded default: a local mesh of real sidecar processes, no cluster.
# Builds the CLI and the sidecar (release) and runs `qmesh demo`; extra arguments go to the demo
# (see `qmesh demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
cargo build --release --locked --bin qmesh --bin qmesh-sidecar
exec target/release/qmesh demo "$@"
