#!/usr/bin/env bash
# Run every benchmark in benchmarks/ (bench_*.py), one after another; arguments are passed to each, e.g.
#   scripts/bench.sh --seconds 1
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
status=0
for f in benchmarks/bench_*.py; do
  [ -e "$f" ] || continue
  echo "== $f"
  python "$f" "$@" || { echo "!! $f failed" >&2; status=1; }
  echo
done
exit $status
