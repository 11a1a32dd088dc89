#!/usr/bin/env bash
# A long fault campaign against real sidecars (see sidecar/tests/campaign.rs and docs/guarantees.md):
#   hack/chaos.sh [--minutes N] [--seed S]
# Prints the seed first; on failure the checker names the broken promise and keeps the history
# (JSON lines) so the same schedule can be replayed with --seed. Also fuzzes each target for a
# while when hack/fuzz.sh is there.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=30
seed=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --minutes N, --seed S)" >&2; exit 2 ;;
  esac
done
[[ -n "$seed" ]] || seed=$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))
echo "fault campaign: $minutes minute(s), seed $seed" >&2

export QMESH_CHAOS_MINUTES="$minutes" QMESH_CHAOS_SEED="$seed"
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
cargo nextest run -p qmesh-sidecar --test campaign --run-ignored only --no-capture long_campaign

if [[ -x hack/fuzz.sh ]]; then
  hack/fuzz.sh --seconds "$(( minutes * 60 / 10 + 10 ))"
fi
