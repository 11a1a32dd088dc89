#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer, AddressSanitizer, debug assertions and overflow
# checks on) of qmesh's parsers: log records, log replay, peer frames, mesh files, HTTP bodies.
#
#   hack/fuzz.sh [--seconds N] [target ...]      (default: 10 s for each of every target)
#
# Installs cargo-fuzz if it is missing, builds every target once, then runs each for N seconds on a
# temporary copy of its seed corpus (fuzz/corpus/<target>/ is only read, never written). Exits
# non-zero if any target crashes (panic, failed assert, sanitizer report, timeout, out of memory)
# and prints the crash input's path (fuzz/artifacts/<target>/…). Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz <target> <artifact>
# and keep it as a regression under fuzz/regressions/<target>/ (fuzz/tests/corpus.rs replays those).
#
# Stable Rust is enough: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags. Builds go to
# ${QMESH_CACHE_DIR:-~/.cache/qmesh}/fuzz-target, apart from the workspace's target dir.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

seconds=10
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds=${2:?--seconds needs a number}; shift 2 ;;
    --seconds=*) seconds=${1#--seconds=}; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "--seconds must be a positive integer" >&2; exit 2; }

step() { printf '\n==> %s\n' "$*" >&2; }

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}/fuzz-target"
fuzz=(--fuzz-dir fuzz --target-dir "$CARGO_TARGET_DIR")

if ! cargo fuzz --version >/dev/null 2>&1; then
  step "Installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

step "Building ${targets[*]} ($CARGO_TARGET_DIR)"
started=$(date +%s)
cargo fuzz build "${fuzz[@]}"
echo "build took $(($(date +%s) - started)) s" >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/qmesh-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

failed=()
summary=()
for t in "${targets[@]}"; do
  [[ -d fuzz/corpus/$t ]] || { echo "no seed corpus fuzz/corpus/$t" >&2; exit 2; }
  step "Fuzzing $t for ${seconds} s"
  corpus="$work/corpus/$t"
  mkdir -p "$corpus"
  cp -R "fuzz/corpus/$t/." "$corpus/"
  mkdir -p "fuzz/artifacts/$t"
  log="$work/$t.log"
  extra=()
  envs=()
  if [[ $t == log_replay ]]; then
    # Each DiskLog's writer thread frees its state after the input returns (and the last ones may
    # still be running at exit), so LeakSanitizer, per input or at exit, reports memory that is
    # not leaked (and the per-input check costs two thirds of the speed).
    extra+=(-detect_leaks=0)
    envs+=("ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0")
  fi
  set +e
  env "${envs[@]}" cargo fuzz run "${fuzz[@]}" "$t" "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 "${extra[@]}" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1 || true)
  if [[ $status -ne 0 ]]; then
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    failed+=("$t")
    summary+=("$t: CRASHED (exit $status) ${artifact:+artifact $artifact}")
    echo "$t crashed; input: ${artifact:-(none written; see the output above)}" >&2
  else
    summary+=("$t: ok, ${execs:-?} runs, ${rate:-?} exec/s, ${cov:-no coverage line}")
  fi
done

step "Summary (${seconds} s each)"
printf '  %s\n' "${summary[@]}" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "crashed: ${failed[*]}" >&2
  exit 1
fi
